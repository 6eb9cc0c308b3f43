"""Named admin tokens and roles, the audit trail, failed-auth limits, the admin API over HTTPS
with the internal CA, and key ids off /metrics by default: against real control planes."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from control_plane import internal_pki
from control_plane.config import parse_config
from control_plane.operator.admin import ROUTE_ROLES, AuthFailures
from control_plane.operator.audit import FileAudit, make_record
from control_plane.operator.tokens import ROLES, TokenTable, allows
from harness.processes import (
    PYTHON,
    REPO,
    AdminClient,
    GatewayConfigFile,
    GatewayStack,
    Process,
    base_config,
    free_port,
    request,
    start_control_plane,
    start_engine,
    wait_until,
)

MODEL = "whisper-large-v3-turbo"
NO_SUCH = {"{id}": "x-0000000000"}


# --- pure parts -----------------------------------------------------------------------------


def test_failed_authentications_are_limited_per_address_and_forgotten():
    failures = AuthFailures(limit=3, window_s=60, max_addresses=2)
    for t in (0, 1, 2):
        assert failures.blocked_for("10.0.0.1", t) is None
        failures.failed("10.0.0.1", t)
    assert failures.blocked_for("10.0.0.1", 3) == 57  # until the first failure leaves the window
    assert failures.blocked_for("10.0.0.2", 3) is None  # another address is not held back
    assert failures.blocked_for("10.0.0.1", 60.5) is None  # one left the window: one more try
    failures.failed("10.0.0.1", 60.5)
    assert failures.blocked_for("10.0.0.1", 60.5) == 1  # the failure at 1 s leaves at 61 s
    failures.failed("10.0.0.2", 62)
    failures.failed("10.0.0.3", 63)  # bounded: the address that failed longest ago is forgotten
    assert list(failures.by_address) == ["10.0.0.2", "10.0.0.3"]
    assert all(len(times) <= 3 for times in failures.by_address.values())


def test_tokens_keep_digests_and_show_neither_secret_nor_digest():
    table = TokenTable()
    token, secret = table.create("ci", "operator", 1.0)
    assert secret.startswith("wg-admin-") and token.id.startswith("tok-")
    assert table.find(secret) == token and table.find(secret + "x") is None
    assert token.sha256 == hashlib.sha256(secret.encode()).hexdigest()
    shown = json.dumps(token.to_json())
    assert secret not in shown and token.sha256 not in shown
    assert TokenTable.from_state(table.to_state()).find(secret) == token
    for name, role in (("bootstrap", "admin"), ("tok-abc", "admin"), ("a b", "admin"), ("ok", "root")):
        with pytest.raises(ValueError):
            table.create(name, role, 1.0)
    with pytest.raises(ValueError):
        table.create("ci", "viewer", 1.0)  # an active token has the name
    table.revoke(token.id, 2.0)
    assert table.find(secret) is None and table.by_id[token.id].state == "revoked"
    assert allows("admin", "operator") and allows("operator", "operator") and not allows("viewer", "operator")


def test_the_audit_file_keeps_the_newest_records_and_survives_a_torn_line(tmp_path):
    trail = FileAudit(tmp_path, keep=5, slack=3)

    async def write(count: int, start: int):
        for i in range(start, start + count):
            await trail.append(make_record("who", None, "admin", "127.0.0.1", "keys.create", f"key-{i}", None,
                                           {"n": i}, micros=1_700_000_000_000_000 + i))

    asyncio.run(write(8, 0))
    assert len(trail.path.read_text().splitlines()) == 8
    asyncio.run(write(1, 8))  # the ninth: over keep + slack, the oldest go
    records, more = asyncio.run(trail.read(None, 100))
    assert [r["target"] for r in records] == [f"key-{i}" for i in range(4, 9)] and not more
    with open(trail.path, "ab") as file:
        file.write(b'{"id":"17000000000000')  # a crash in the middle of a line
    again = FileAudit(tmp_path, keep=5, slack=3)  # as after a restart
    asyncio.run(again.append(make_record("who", None, "admin", "", "keys.revoke", "key-9", {}, None,
                                         micros=1_700_000_000_000_009)))
    records, _ = asyncio.run(again.read(None, 100))
    assert [r["target"] for r in records][-2:] == ["key-8", "key-9"]
    since, more = asyncio.run(again.read("1700000000000006", 2))
    assert [r["target"] for r in since] == ["key-6", "key-7"] and more
    assert oct(trail.path.stat().st_mode & 0o777) == "0o600"


def test_the_admin_api_beyond_loopback_prefers_the_internal_certificate():
    raw = {"models": ["m"], "listen": {"admin_address": "0.0.0.0", "tls": {"cert_file": "l.pem", "key_file": "l.key"}}}
    assert parse_config(raw).admin_tls == ("l.pem", "l.key")  # listen.tls alone, as before
    both = parse_config(raw | {"internal_tls": {"dir": "/pki"}})
    assert both.admin_tls == ("/pki/control-plane.pem", "/pki/control-plane.key")
    assert both.admin_url.startswith("https://0.0.0.0:")
    internal_only = parse_config({"models": ["m"], "listen": {"admin_address": "0.0.0.0"}, "internal_tls": {"dir": "/pki"}})
    assert internal_only.admin_tls == ("/pki/control-plane.pem", "/pki/control-plane.key")  # the cross-check takes it
    assert parse_config({"models": ["m"], "internal_tls": {"dir": "/pki"}}).admin_tls is None  # loopback: plain
    plain = parse_config({"models": ["m"], "listen": {"admin_address": "0.0.0.0", "admin_plaintext": True},
                          "internal_tls": {"dir": "/pki"}})
    assert plain.admin_tls is None and plain.admin_url.startswith("http://")


def test_every_route_names_a_role():
    assert ROUTE_ROLES and set(ROUTE_ROLES.values()) <= {None, *ROLES}
    open_routes = {path for (_, path), role in ROUTE_ROLES.items() if role is None}
    assert open_routes == {"/healthz", "/openapi.json", "/metrics", "/", "/ui"}
    assert ROUTE_ROLES[("GET", "/audit")] == ROUTE_ROLES[("POST", "/tokens")] == "admin"
    assert ROUTE_ROLES[("POST", "/backends/{id}/drain")] == "operator"


# --- one control plane (no Envoy: nothing here needs one) ---------------------------------------


class Plane:
    def __init__(self, folder: Path, **sections):
        self.folder = folder
        self.raw = base_config(free_port(), free_port(), [{"name": MODEL}], [], **sections)
        self.config = GatewayConfigFile(folder / "gateway.yaml")
        self.config.write(self.raw)
        self.process = start_control_plane(folder, self.config.path)
        self.url = f"http://127.0.0.1:{self.raw['listen']['admin_port']}"
        self.admin = AdminClient(self.url, self.process.state_dir)
        self.restarts = 0

    def token(self, name: str, role: str) -> dict:
        answer = self.admin.call("POST", "/tokens", {"name": name, "role": role})
        assert answer.status == 201, answer.text
        return answer.json()

    def restart(self) -> None:
        self.process.stop()
        self.restarts += 1
        self.process = start_control_plane(self.folder, self.config.path, name=f"control-plane-{self.restarts}",
                                           state_dir=self.process.state_dir)

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.folder.glob("*.log"))

    def audit(self, query: str = "") -> list[dict]:
        answer = self.admin.call("GET", "/audit" + query)
        assert answer.status == 200, answer.text
        return answer.json()["data"]


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    plane = Plane(tmp_path_factory.mktemp("roles"))
    yield plane
    plane.process.stop()


def fill(path: str, ids: dict[str, str]) -> str:
    for placeholder, value in ids.items():
        path = path.replace(placeholder, value)
    return path


@pytest.mark.e2e
def test_each_role_against_each_route(plane):
    backend = plane.admin.call("POST", "/backends", {"url": f"http://127.0.0.1:{free_port()}", "models": [MODEL]})
    key = plane.admin.call("POST", "/keys", {"name": "for-reads"}).json()
    assert backend.status == 201 and "id" in key
    tokens = {role: plane.token(f"matrix-{role}", role)["secret"] for role in ROLES}
    real = {"/backends/{id}": backend.json()["id"], "/keys/{id}": key["id"]}
    checked = 0
    for (method, path), needed in ROUTE_ROLES.items():
        if needed is None:
            continue
        for role, secret in tokens.items():
            if method == "GET":  # reads of what exists: 200 for whoever may
                target = path.replace("{id}", real.get(path, "x")) if "{id}" in path else path
                answer = plane.admin.call(method, target, token=secret)
                expected = 200 if allows(role, needed) else 403
            else:  # changes: ids that do not exist, bodies that say nothing, so nothing changes
                answer = plane.admin.call(method, fill(path, NO_SUCH), {} if method != "DELETE" else None, token=secret)
                expected = None if allows(role, needed) else 403
            if expected is None:
                assert answer.status in (400, 404), (method, path, role, answer.text)
            else:
                assert answer.status == expected, (method, path, role, answer.text)
            if answer.status == 403:
                error = answer.json()["error"]
                assert error["type"] == "permission_error" and error["code"] == 403
                assert f"needs the {needed} role" in error["message"] and role in error["message"]
            checked += 1
    assert checked == 3 * sum(1 for role in ROUTE_ROLES.values() if role is not None)
    # The open routes stay open; a revoked token is no token.
    for path in ("/healthz", "/openapi.json", "/metrics"):
        assert request("GET", plane.url + path).status == 200
    viewer = next(t for t in plane.admin.call("GET", "/tokens").json()["data"] if t["name"] == "matrix-viewer")
    assert plane.admin.call("DELETE", f"/tokens/{viewer['id']}").status == 200
    revoked = plane.admin.call("GET", "/status", token=tokens["viewer"])
    assert revoked.status == 401 and revoked.json()["error"]["type"] == "authentication_error"
    listing = plane.admin.call("GET", "/tokens").text
    assert all(secret not in listing for secret in tokens.values()) and "sha256" not in listing
    described = request("GET", plane.url + "/openapi.json").json()["paths"]
    assert described["/tokens"]["post"]["x-required-role"] == "admin"
    assert described["/backends/{id}/drain"]["post"]["x-required-role"] == "operator"
    assert {"/tokens", "/tokens/{id}", "/audit"} <= set(described)


@pytest.mark.e2e
def test_every_admin_change_is_audited_with_who_and_nothing_secret(plane):
    operator = plane.token("ops", "operator")
    admin = plane.token("sec", "admin")
    start = len(plane.audit("?limit=1000"))
    call = plane.admin.call
    url = f"http://127.0.0.1:{free_port()}"
    added = call("POST", "/backends", {"url": url, "models": [MODEL], "weight": 2}, token=operator["secret"]).json()
    assert call("POST", f"/backends/{added['id']}/drain", {"timeout_s": 600}, token=operator["secret"]).status == 202
    assert call("POST", f"/backends/{added['id']}/drain", {"timeout_s": 600}, token=operator["secret"]).status == 202
    assert call("POST", f"/backends/{added['id']}/resume", token=operator["secret"]).status == 200
    assert call("DELETE", f"/backends/{added['id']}", token=operator["secret"]).status == 202
    assert call("DELETE", f"/backends/{added['id']}?force=true", token=operator["secret"]).status == 200
    key = call("POST", "/keys", {"name": "audited"}, token=admin["secret"]).json()
    assert call("PATCH", f"/keys/{key['id']}", {"class": "batch"}, token=admin["secret"]).status == 200
    rotated = call("POST", f"/keys/{key['id']}/rotate", {"grace_s": 60}, token=admin["secret"]).json()
    assert call("DELETE", f"/keys/{key['id']}", token=admin["secret"]).status == 200
    made = call("POST", "/tokens", {"name": "short-lived", "role": "viewer"}).json()  # the bootstrap token
    assert call("DELETE", f"/tokens/{made['id']}").status == 200
    # Failed changes write nothing.
    assert call("POST", "/keys", {"name": "audited", "class": "nope"}, token=admin["secret"]).status == 400
    assert call("DELETE", f"/keys/{key['id']}", token=admin["secret"]).status == 409  # already revoked
    assert call("DELETE", f"/tokens/{made['id']}").status == 409
    assert call("POST", "/keys", {"name": "not-mine"}, token=operator["secret"]).status == 403

    records = plane.audit("?limit=1000")[start:]
    actions = [r["action"] for r in records]
    assert actions == ["backends.add", "backends.drain", "backends.resume", "backends.remove", "backends.remove",
                       "keys.create", "keys.set", "keys.rotate", "keys.revoke", "tokens.create", "tokens.revoke"]
    by_action = {}
    for record in records:
        by_action.setdefault(record["action"], []).append(record)
        assert record["source"] == "127.0.0.1" and record["at"].endswith("Z")
        assert set(record) == {"id", "at", "who", "token_id", "role", "source", "action", "target", "before", "after"}
    for record in records[:5]:
        assert (record["who"], record["role"], record["token_id"]) == ("ops", "operator", operator["id"])
        assert record["target"] == added["id"]
    for record in records[5:9]:
        assert (record["who"], record["role"], record["target"]) == ("sec", "admin", key["id"])
    for record in records[9:]:
        assert (record["who"], record["role"], record["token_id"]) == ("bootstrap", "admin", None)
    add = by_action["backends.add"][0]
    assert add["before"] is None and add["after"]["url"] == url and add["after"]["weight"] == 2
    drain = by_action["backends.drain"][0]
    assert drain["before"]["state"] == "active" and drain["after"]["state"] == "draining"
    assert by_action["backends.resume"][0]["after"]["state"] == "active"
    assert by_action["backends.remove"][0]["after"]["state"] == "draining"
    assert by_action["backends.remove"][1]["after"] is None
    assert by_action["keys.set"][0]["before"]["class"] == "interactive"
    assert by_action["keys.set"][0]["after"]["class"] == "batch"
    assert len(by_action["keys.rotate"][0]["after"]["secrets"]) == 2
    assert by_action["keys.revoke"][0]["after"]["state"] == "revoked"
    assert by_action["tokens.create"][0]["after"]["role"] == "viewer"
    assert by_action["tokens.revoke"][0]["after"]["state"] == "revoked"
    places = {"GET /audit": plane.admin.call("GET", "/audit?limit=1000").text,
              "audit.jsonl": (plane.process.state_dir / "audit.jsonl").read_text(), "logs": plane.log()}
    for secret in (key["secret"], rotated["secret"], operator["secret"], admin["secret"], made["secret"]):
        for place, text in places.items():
            assert secret not in text, place
            assert hashlib.sha256(secret.encode()).hexdigest() not in text, place
            assert hashlib.sha256(secret.encode()).hexdigest()[:8] not in places["GET /audit"]

    # since and limit; a bad since is refused.
    third = records[2]
    since = plane.admin.call("GET", f"/audit?since={third['at']}&limit=2").json()
    assert [r["id"] for r in since["data"]] == [third["id"], records[3]["id"]] and since["has_more"]
    assert plane.admin.call("GET", "/audit?since=yesterday").status == 400
    assert plane.admin.call("GET", "/audit?limit=0").status == 400


@pytest.mark.e2e
def test_the_trail_and_the_tokens_survive_a_restart(tmp_path):
    plane = Plane(tmp_path)
    operator = plane.token("ops", "operator")
    added = plane.admin.call("POST", "/backends", {"url": f"http://127.0.0.1:{free_port()}", "models": [MODEL]},
                             token=operator["secret"])
    assert added.status == 201
    before = plane.audit()
    assert [r["action"] for r in before] == ["tokens.create", "backends.add"]
    plane.restart()
    assert plane.audit() == before
    assert plane.admin.call("GET", "/status", token=operator["secret"]).status == 200  # the named token too
    assert plane.admin.call("POST", "/tokens", {"name": "after-restart", "role": "viewer"}).status == 201
    assert [r["action"] for r in plane.audit()] == ["tokens.create", "backends.add", "tokens.create"]
    assert len((plane.process.state_dir / "audit.jsonl").read_text().splitlines()) == 3
    state = json.loads((plane.process.state_dir / "state.json").read_text())
    assert [t["name"] for t in state["admin_tokens"]] == ["ops", "after-restart"]
    assert operator["secret"] not in json.dumps(state)  # its digest only
    plane.process.stop()


@pytest.mark.e2e
def test_the_cli_makes_tokens_and_reads_the_audit_trail(plane):
    def run(*args, token: str | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_GATEWAY_ADMIN_TOKEN")}
        if token:
            env["WHISPER_GATEWAY_ADMIN_TOKEN"] = token
        return subprocess.run([PYTHON, "-m", "control_plane", *args, "--url", plane.url, "--state-dir",
                               str(plane.process.state_dir)], capture_output=True, text=True, timeout=30, cwd=REPO,
                              env=env)

    made = run("tokens", "create", "from-cli", "--role", "viewer")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("wg-admin-") and "shown only now" in made.stderr
    assert run("tokens", "create", "no-role").returncode == 1
    listing = run("tokens", "list").stdout.splitlines()
    assert listing[0].split()[:4] == ["ID", "NAME", "ROLE", "STATE"]
    assert any(line.split()[1:4] == ["from-cli", "viewer", "active"] for line in listing[1:])
    assert secret not in "\n".join(listing)
    # A viewer's token from the environment: reads work, changes are refused naming the role.
    assert run("status", "--json", token=secret).returncode == 0
    refused = run("tokens", "create", "sneaky", "--role", "admin", token=secret)
    assert refused.returncode == 1 and "HTTP 403" in refused.stderr and "admin role" in refused.stderr
    table = run("audit").stdout.splitlines()
    assert table[0].split() == ["AT", "(UTC)", "WHO", "ROLE", "SOURCE", "ACTION", "TARGET", "CHANGE"]
    assert table[-1].split()[1:5] == ["bootstrap", "admin", "127.0.0.1", "tokens.create"]
    records = json.loads(run("audit", "--json", "--since", "2000-01-01T00:00:00Z").stdout)["data"]
    assert records[-1]["after"]["name"] == "from-cli"
    assert run("tokens", "revoke", "from-cli").stdout.strip().endswith("revoked")
    assert run("status", "--json", token=secret).returncode == 1
    assert run("audit", "--json").stdout.count("tokens.revoke") >= 1


@pytest.mark.e2e
def test_failed_authentication_is_limited_per_address(tmp_path):
    plane = Plane(tmp_path)
    port = plane.raw["listen"]["admin_port"]

    def call(token: str, source: str = "127.0.0.1", path: str = "/status") -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        response.read()
        connection.close()
        return response

    assert [call("wrong").status for _ in range(10)] == [401] * 10
    limited = call("wrong")
    assert limited.status == 429 and 1 <= int(limited.getheader("Retry-After")) <= 60
    assert call(plane.admin.token).status == 429  # not even a right token, or the 429 would not slow guessing
    assert call("", path="/healthz").status == 200  # open routes stay open
    assert call(plane.admin.token, source="127.0.0.2").status == 200  # another address is not held back
    assert call("wrong", source="127.0.0.2").status == 401
    assert "missing or wrong" not in request("GET", plane.url + "/metrics").text
    plane.process.stop()


def fingerprint(path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(x509.load_pem_x509_certificate(path.read_bytes())
                          .public_bytes(serialization.Encoding.DER)).hexdigest()


def presented(port: int) -> str:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


@pytest.mark.e2e
def test_the_admin_api_beyond_loopback_serves_the_internal_certificate(tmp_path):
    pki, other = tmp_path / "pki", tmp_path / "other"
    internal_pki.ensure(pki)  # the CA and control-plane.pem for localhost and 127.0.0.1
    internal_pki.ensure(other)  # stands for the listener's public certificate
    listener_cert, listener_key = internal_pki.pair_paths(other, "control-plane")
    raw = base_config(free_port(), free_port(), [{"name": MODEL}], [], internal_tls={"dir": str(pki)})
    raw["listen"].update(admin_address="0.0.0.0", tls={"cert_file": str(listener_cert), "key_file": str(listener_key)})
    config = GatewayConfigFile(tmp_path / "gateway.yaml")
    config.write(raw)
    token = "internal-admin-token"
    command = [PYTHON, "-m", "control_plane", "serve", "--config", str(config.path), "--state-dir", str(tmp_path / "s")]
    process = Process("admin-internal-tls", command, tmp_path, env={"WHISPER_GATEWAY_ADMIN_TOKEN": token})
    wait_until(lambda: "xDS (ADS) listening" in process.log_text(), 20, "start")
    assert "admin API on https://0.0.0.0" in process.log_text()
    port = raw["listen"]["admin_port"]
    own_cert = internal_pki.pair_paths(pki, "control-plane")[0]
    assert presented(port) == fingerprint(own_cert) != fingerprint(listener_cert)
    trusting = ssl.create_default_context(cafile=str(internal_pki.ca_path(pki)))  # the name checked too
    headers = {"Authorization": f"Bearer {token}"}
    assert request("GET", f"https://127.0.0.1:{port}/status", headers=headers, context=trusting).status == 200
    with pytest.raises(OSError):  # plain HTTP: the token would travel in the clear
        request("GET", f"http://127.0.0.1:{port}/status", headers=headers, timeout=5)

    def cli(*args):
        env = dict(os.environ, WHISPER_GATEWAY_ADMIN_TOKEN=token)
        return subprocess.run([PYTHON, "-m", "control_plane", *args, "--config", str(config.path)],
                              capture_output=True, text=True, timeout=30, cwd=REPO, env=env)

    status = cli("status", "--json")  # dials https://127.0.0.1 (admin_address 0.0.0.0), trusting ca.pem
    assert status.returncode == 0 and '"certificates"' in status.stdout, status.stderr
    assert cli("tokens", "create", "over-tls", "--role", "operator").stdout.startswith("wg-admin-")
    wrong_name = cli("status", "--url", f"https://127.0.0.2:{port}")  # not a name its certificate holds
    assert wrong_name.returncode == 1 and "certs issue control-plane" in wrong_name.stderr
    # Re-issued (as `certs renew` does), it is served at once; the CLI needs nothing new.
    internal_pki.issue(pki, "control-plane", "control-plane", ("localhost", "127.0.0.1"))
    wait_until(lambda: presented(port) == fingerprint(own_cert), 10, "the re-issued certificate")
    assert cli("audit", "--json").returncode == 0
    process.stop()


# --- state in etcd: tokens and the trail shared by the control planes --------------------------


@pytest.mark.e2e
def test_with_etcd_tokens_and_the_audit_trail_are_shared(tmp_path):
    from harness.etcd import EtcdCluster

    etcd = EtcdCluster(tmp_path / "etcd", members=1)
    try:
        raw = base_config(free_port(), free_port(), [{"name": MODEL}], [], state={"etcd": etcd.endpoints,
                                                                                 "prefix": "/roles/"})
        planes = []
        for i in range(2):
            folder = tmp_path / f"plane{i}"
            folder.mkdir()
            mine = dict(raw, listen=dict(raw["listen"], xds_port=free_port(), admin_port=free_port()))
            config = GatewayConfigFile(folder / "gateway.yaml")
            config.write(mine)
            process = start_control_plane(folder, config.path, name=f"plane{i}")
            planes.append(AdminClient(f"http://127.0.0.1:{mine['listen']['admin_port']}", process.state_dir))
        made = planes[0].call("POST", "/tokens", {"name": "shared", "role": "admin"})
        assert made.status == 201, made.text
        secret = made.json()["secret"]
        wait_until(lambda: planes[1].call("GET", "/status", token=secret).status == 200, 10, "the token on plane 1")
        assert planes[1].call("POST", "/keys", {"name": "from-b"}, token=secret).status == 201
        records = planes[0].call("GET", "/audit").json()["data"]
        assert [(r["action"], r["who"]) for r in records] == [("tokens.create", "bootstrap"), ("keys.create", "shared")]
        assert records[1]["after"]["name"] == "from-b"
        assert secret not in json.dumps(records)
        assert not (tmp_path / "plane0" / "state" / "audit.jsonl").exists()  # in etcd, not a file
    finally:
        etcd.stop()


@pytest.mark.e2e
def test_etcd_keeps_the_newest_audit_records(tmp_path):
    from control_plane.fleet.etcd_state import EtcdState
    from harness.etcd import EtcdCluster

    etcd = EtcdCluster(tmp_path / "etcd", members=1)

    async def scenario():
        state = EtcdState(tuple(etcd.endpoints), "/trim/", 2.0)
        try:
            for i in range(8):
                record = make_record("w", None, "admin", "", "keys.create", f"k{i}", None, {},
                                     micros=1_700_000_000_000_000 + i)
                await state.add_audit_record(record["id"], json.dumps(record).encode(), 4, 3)
            newest, more = await state.audit_records(None, 100)
            since, since_more = await state.audit_records("1700000000000005", 1)
            return [json.loads(v)["target"] for v in newest], more, [json.loads(v)["target"] for v in since], since_more
        finally:
            await state.close()
    try:
        newest, more, since, since_more = asyncio.run(scenario())
    finally:
        etcd.stop()
    assert newest == ["k4", "k5", "k6", "k7"] and not more  # eighth record: over 4 + 3, the oldest went
    assert since == ["k5"] and since_more


# --- /metrics: key ids only with metrics.key_labels ------------------------------------------


@pytest.mark.e2e
def test_metrics_name_keys_only_when_told(tmp_path):
    _, engine = start_engine(tmp_path, MODEL, "m1", time_scale=0.0001)
    stack = GatewayStack(tmp_path, MODEL, [engine], auth={"api_keys": "required"})
    key = stack.admin.call("POST", "/keys", {"name": "metered"}).json()
    from harness.processes import post_form
    from engines.common.audio import silent_wav

    sent = post_form(stack.envoy.url + "/v1/audio/transcriptions", [("model", MODEL, None),
                                                                     ("file", silent_wav(1.0), "clip.wav")],
                     headers={"Authorization": f"Bearer {key['secret']}"})
    assert sent.status == 200, sent.text
    wait_until(lambda: stack.admin.call("GET", f"/keys/{key['id']}").json()["usage"].get(MODEL, {}).get("requests"),
               10, "the request metered")
    metrics = request("GET", stack.admin.url + "/metrics").text
    assert key["id"] not in metrics and 'key="' not in metrics
    assert f'whisper_gateway_key_requests_total{{model="{MODEL}"}} 1.0' in metrics
    assert "whisper_gateway_key_requests_in_flight 0.0" in metrics
    stack.raw["metrics"] = {"key_labels": True}
    stack.config.write(stack.raw)
    stack.plane.signal(signal.SIGHUP)
    wait_until(lambda: f'key="{key["id"]}"' in request("GET", stack.admin.url + "/metrics").text, 10,
               "the key's id as a label after the reload")
    assert key["secret"] not in request("GET", stack.admin.url + "/metrics").text
    stack.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
