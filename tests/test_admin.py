"""The admin API: runtime fleet changes under load, durability, auth and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from harness.processes import (
    PYTHON,
    REPO,
    GatewayConfigFile,
    GatewayStack,
    LoadGenerator,
    Process,
    base_config,
    free_port,
    request,
    served_by,
    start_engine,
    transcribe,
    wait_until,
)

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"


def Gateway(tmp_path, backends: list[str], **sections) -> GatewayStack:
    return GatewayStack(tmp_path, MODEL, backends, **sections)


def host(url: str) -> str:
    return url.removeprefix("http://")


def test_add_under_load_takes_traffic_at_once(tmp_path):
    _, e1 = start_engine(tmp_path, MODEL, "e1", time_scale=0.5)
    _, e2 = start_engine(tmp_path, MODEL, "e2", time_scale=0.5)
    gateway = Gateway(tmp_path, [e1])
    load = LoadGenerator(gateway.envoy.url, MODEL, concurrency=3, seconds=5)
    try:
        wait_until(lambda: len(load.statuses) >= 3, 10, "load to flow")
        added = gateway.admin.call("POST", "/backends", {"url": e2})  # models read from the engine
        assert added.status == 201, added.text
        body = added.json()
        assert body["models"] == [MODEL] and body["source"] == "api" and body["state"] == "active"
        started = time.monotonic()
        wait_until(lambda: set(gateway.hosts()) == {host(e1), host(e2)}, 2, "the new engine in Envoy")
        assert time.monotonic() - started < 2
        assert served_by(gateway.envoy.url, MODEL, ["e1", "e2"], 10)["e2"] > 0
    finally:
        statuses = load.stop()
    assert statuses and set(statuses) == {200}


def test_a_backend_with_a_new_model_gets_its_route(tmp_path):
    _, e1 = start_engine(tmp_path, MODEL, "e1")
    _, other = start_engine(tmp_path, "whisper-medium", "m1")
    gateway = Gateway(tmp_path, [e1])
    assert transcribe(gateway.envoy.url, "whisper-medium").status == 404
    assert gateway.admin.call("POST", "/backends", {"url": other, "models": ["whisper-medium"]}).status == 201
    wait_until(lambda: transcribe(gateway.envoy.url, "whisper-medium").status == 200, 5, "the new model's route")
    assert "whisper-medium" in [m["id"] for m in request("GET", gateway.envoy.url + "/v1/models").json()["data"]]
    # The model goes with its last backend: 404 again (not 503 for ever), and a restart keeps it gone.
    other_id = gateway.admin.backends()[other]["id"]
    assert gateway.admin.call("DELETE", f"/backends/{other_id}?force=true").status == 200
    wait_until(lambda: transcribe(gateway.envoy.url, "whisper-medium").status == 404, 5, "the model to go")
    assert "whisper-medium" not in [m["id"] for m in request("GET", gateway.envoy.url + "/v1/models").json()["data"]]
    gateway.restart_plane()
    wait_until(lambda: gateway.admin.call("GET", "/healthz").status == 200, 10, "the control plane back")
    assert json.loads((gateway.plane.state_dir / "state.json").read_text())["models"] == []
    assert transcribe(gateway.envoy.url, MODEL).status == 200


def test_drain_and_delete_under_load_lose_nothing(tmp_path):
    _, e1 = start_engine(tmp_path, MODEL, "e1", time_scale=2)
    e2_process, e2 = start_engine(tmp_path, MODEL, "e2", time_scale=2)
    gateway = Gateway(tmp_path, [e1])
    backend = gateway.admin.call("POST", "/backends", {"url": e2}).json()
    wait_until(lambda: set(gateway.hosts()) == {host(e1), host(e2)}, 5, "e2 in Envoy")
    # Requests of about a second each, so some are in flight on e2 when it is drained.
    load = LoadGenerator(gateway.envoy.url, MODEL, concurrency=4, seconds=30)
    try:
        wait_until(lambda: gateway.admin.status()["endpoints"][-1]["running"], 5, "requests running on e2")
        deleted = gateway.admin.call("DELETE", f"/backends/{backend['id']}")
        assert deleted.status == 202 and deleted.json()["state"] == "draining"
        wait_until(lambda: set(gateway.hosts()) == {host(e1)}, 20, "e2 to leave Envoy once idle")
        assert backend["id"] not in [b["id"] for b in gateway.admin.call("GET", "/backends").json()["data"]]
        assert gateway.admin.call("GET", f"/backends/{backend['id']}").status == 404
    finally:
        statuses = load.stop()
    assert statuses and set(statuses) == {200}, statuses
    # In-flight requests finished on e2 itself: it served some, and it is still up.
    assert e2_process.alive()
    metrics = request("GET", e2 + "/metrics").text
    assert 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="' + MODEL + '"} 0.0' not in metrics


def test_config_backends_drain_and_resume_but_are_not_deleted(tmp_path):
    _, e1 = start_engine(tmp_path, MODEL, "e1")
    _, e2 = start_engine(tmp_path, MODEL, "e2")
    gateway = Gateway(tmp_path, [e1, e2])
    backends = gateway.admin.backends()
    e2_id = backends[e2]["id"]
    refused = gateway.admin.call("DELETE", f"/backends/{e2_id}")
    assert refused.status == 409 and "config file" in refused.json()["error"]["message"]
    assert gateway.admin.call("POST", f"/backends/{e2_id}/drain", {"timeout_s": 30}).status == 202
    wait_until(lambda: gateway.admin.backends()[e2]["state"] == "drained", 10, "the drain to finish")
    assert set(gateway.hosts()) == {host(e1)}
    assert served_by(gateway.envoy.url, MODEL, ["e1", "e2"], 6) == {"e1": 6, "e2": 0}
    assert gateway.admin.call("POST", f"/backends/{e2_id}/resume").json()["state"] == "active"
    wait_until(lambda: set(gateway.hosts()) == {host(e1), host(e2)}, 5, "e2 back in rotation")


def test_drain_times_out_when_the_engine_never_looks_idle(tmp_path):
    _, e1 = start_engine(tmp_path, MODEL, "e1")
    _, e2 = start_engine(tmp_path, MODEL, "e2")
    gateway = Gateway(tmp_path, [e1])
    backend = gateway.admin.call("POST", "/backends", {"url": e2}).json()
    assert request("POST", e2 + "/_sim/faults", b'{"metrics": "error"}', {"Content-Type": "application/json"}).status == 200
    # Its scrapes fail before the drain begins (a scrape from before the fault is as good as any
    # while it is fresh: the engine was idle then, and the drain would be right to finish).
    wait_until(lambda: gateway.admin.backends()[e2]["endpoints"][0]["health"] in ("stale", "failing"), 5,
               "failed scrapes")
    gateway.admin.call("POST", f"/backends/{backend['id']}/drain", {"timeout_s": 2})
    # Its idleness cannot be known, so it stays until the drain's time is up.
    wait_until(lambda: (b := gateway.admin.backends()[e2])["state"] == "draining"
               and b["endpoints"][0]["health"] in ("stale", "failing"), 2, "failed scrapes while draining")
    assert gateway.admin.backends()[e2]["state"] == "draining"
    wait_until(lambda: e2 not in gateway.admin.backends(), 5, "the drain timeout to remove it")


def test_api_changes_survive_a_restart_and_envoy_keeps_its_endpoints(tmp_path):
    _, e1 = start_engine(tmp_path, MODEL, "e1")
    _, e2 = start_engine(tmp_path, MODEL, "e2")
    _, e3 = start_engine(tmp_path, MODEL, "e3")
    gateway = Gateway(tmp_path, [e1])
    gateway.admin.call("POST", "/backends", {"url": e2, "weight": 3})
    e3_id = gateway.admin.call("POST", "/backends", {"url": e3}).json()["id"]
    # e3's drain cannot finish (no metrics say it is idle): it stays draining through the restart.
    assert request("POST", e3 + "/_sim/faults", b'{"metrics": "hang"}', {"Content-Type": "application/json"}).status == 200
    wait_until(lambda: gateway.admin.backends()[e3]["endpoints"][0]["health"] in ("stale", "failing"), 5,
               "e3's scrapes to fail before its drain")  # a fresh idle scrape from before would finish it
    gateway.admin.call("POST", f"/backends/{e3_id}/drain", {"timeout_s": 600})
    expected = {host(e1), host(e2), host(e3)}
    wait_until(lambda: set(gateway.hosts()) == expected, 5, "three endpoints")
    before = {url: (b["state"], b["weight"], b["source"]) for url, b in gateway.admin.backends().items()}

    seen: list[set[str]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.append(set(gateway.hosts()))
            except OSError:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        gateway.restart_plane()
        # Until the Envoy re-joined the new control plane and applied everything it serves.
        wait_until(lambda: (report := gateway.admin.status())["envoys"]
                   and report["envoys"][0]["acked"] == report["versions"], 10, "the Envoy to re-join")
    finally:
        stop.set()
        watcher.join()
    after = {url: (b["state"], b["weight"], b["source"]) for url, b in gateway.admin.backends().items()}
    assert after == before
    assert seen and all(hosts == expected for hosts in seen), [h for h in seen if h != expected][:3]


def test_a_damaged_state_file_stops_the_start(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text("{not json")
    config = GatewayConfigFile(tmp_path / "gateway.yaml")
    config.write(base_config(free_port(), free_port(), [{"name": MODEL}], []))
    result = subprocess.run([PYTHON, "-m", "control_plane", "serve", "--config", str(config.path), "--state-dir",
                             str(state)], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 1
    assert "cannot restore state" in result.stderr and "state.json is not valid JSON" in result.stderr
    assert (state / "state.json").read_text() == "{not json"


def durable(backends: dict[str, dict]) -> dict:
    """What a change would alter (the live load figures move on their own)."""
    keys = ("id", "url", "models", "weight", "source", "state", "drain_deadline")
    return {url: {k: b[k] for k in keys} for url, b in backends.items()}


@pytest.fixture(scope="module")
def quiet_gateway(tmp_path_factory):
    """A gateway for requests that must change nothing."""
    tmp_path = tmp_path_factory.mktemp("quiet")
    process, e1 = start_engine(tmp_path, MODEL, "e1")
    gateway = Gateway(tmp_path, [e1])
    yield gateway, e1
    gateway.stop()
    process.stop()


BAD_REQUESTS = [
    # (what, method, path, body or raw bytes, token override, expected status, expected param)
    ("no token", "GET", "/backends", None, "", 401, None),
    ("wrong token", "GET", "/backends", None, "nope", 401, None),
    ("status needs the token", "GET", "/status", None, "nope", 401, None),
    ("malformed JSON", "POST", "/backends", b"{url:", None, 400, None),
    ("not an object", "POST", "/backends", b'["http://127.0.0.1:1"]', None, 400, None),
    ("url missing", "POST", "/backends", {"models": [MODEL]}, None, 400, "url"),
    ("url not a string", "POST", "/backends", {"url": 80, "models": [MODEL]}, None, 400, "url"),
    ("file URL", "POST", "/backends", {"url": "file:///etc/passwd", "models": [MODEL]}, None, 400, "url"),
    ("user info", "POST", "/backends", {"url": "http://user:pw@127.0.0.1:9", "models": [MODEL]}, None, 400, "url"),
    ("no port", "POST", "/backends", {"url": "http://127.0.0.1", "models": [MODEL]}, None, 400, "url"),
    ("a path", "POST", "/backends", {"url": "http://127.0.0.1:9/v1", "models": [MODEL]}, None, 400, "url"),
    ("ftp", "POST", "/backends", {"url": "ftp://127.0.0.1:9", "models": [MODEL]}, None, 400, "url"),
    ("unknown field", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": [MODEL], "wieght": 2}, None, 400,
     "wieght"),
    ("weight zero", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": [MODEL], "weight": 0}, None, 400,
     "weight"),
    ("weight as text", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": [MODEL], "weight": "2"}, None,
     400, "weight"),
    ("weight as boolean", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": [MODEL], "weight": True},
     None, 400, "weight"),
    ("no models", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": []}, None, 400, "models"),
    ("models not a list", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": MODEL}, None, 400, "models"),
    ("bad model name", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": ["a b"]}, None, 400, "models"),
    ("model name with a newline", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": ["whisper\n"]}, None,
     400, "models"),
    ("deeply nested JSON", "POST", "/backends", b"[" * 50_000, None, 400, None),
    ("model twice", "POST", "/backends", {"url": "http://127.0.0.1:9", "models": [MODEL, MODEL]}, None, 400,
     "models"),
    ("engine unreachable, no models given", "POST", "/backends", {"url": "http://127.0.0.1:9"}, None, 400, "models"),
    ("huge body", "POST", "/backends", b'{"url": "' + b"x" * 100_000 + b'"}', None, 413, None),
    ("unknown id", "GET", "/backends/b-0000000000", None, None, 404, "id"),
    ("drain unknown id", "POST", "/backends/b-0000000000/drain", {}, None, 404, "id"),
    ("delete unknown id", "DELETE", "/backends/b-0000000000", None, None, 404, "id"),
    ("wrong method", "PUT", "/backends", {}, None, 405, None),
    # Addresses Envoy would refuse (one poisoned a whole model) or that no engine can be on.
    ("IPv6 zone id", "POST", "/backends", {"url": "http://[fe80::1%25lo]:28107", "models": [MODEL]}, None, 400,
     "url"),
    ("space in the host", "POST", "/backends", {"url": "http://engine a:8000", "models": [MODEL]}, None, 400, "url"),
    ("NUL in the host", "POST", "/backends", {"url": "http://engine\u0000:8000", "models": [MODEL]}, None, 400,
     "url"),
    ("HTML in the host", "POST", "/backends", {"url": "http://<b>x</b>:8000", "models": [MODEL]}, None, 400, "url"),
    ("CRLF in the URL", "POST", "/backends", {"url": "http://127.0.0.1:9\r\nHost: evil", "models": [MODEL]}, None,
     400, "url"),
    ("port 0", "POST", "/backends", {"url": "http://127.0.0.1:0", "models": [MODEL]}, None, 400, "url"),
    ("decimal IPv4", "POST", "/backends", {"url": "http://2130706433:8000", "models": [MODEL]}, None, 400, "url"),
    ("cloud metadata address", "POST", "/backends", {"url": "http://169.254.169.254:80", "models": [MODEL]}, None,
     400, "url"),
    ("unspecified address", "POST", "/backends", {"url": "http://0.0.0.0:8000", "models": [MODEL]}, None, 400, "url"),
    ("unclosed IPv6 bracket", "POST", "/backends", {"url": "http://[::1:28105", "models": [MODEL]}, None, 400, "url"),
    ("300-character host", "POST", "/backends", {"url": "http://" + "a" * 300 + ":8000", "models": [MODEL]}, None,
     400, "url"),
    ("64-character label", "POST", "/backends", {"url": "http://" + "a" * 64 + ".example:8000", "models": [MODEL]},
     None, 400, "url"),
    ("name that does not resolve", "POST", "/backends", {"url": "http://no-such-engine.invalid:8000",
                                                         "models": [MODEL]}, None, 400, "url"),
    ("5,000-digit weight", "POST", "/backends", b'{"url": "http://127.0.0.1:9", "models": ["' + MODEL.encode()
     + b'"], "weight": ' + b"9" * 5000 + b"}", None, 400, None),
    ("4,000-digit weight", "POST", "/backends", b'{"url": "http://127.0.0.1:9", "models": ["' + MODEL.encode()
     + b'"], "weight": ' + b"9" * 4000 + b"}", None, 400, "weight"),
    ("unknown path", "GET", "/nothing", None, None, 404, None),
]


@pytest.mark.parametrize("what,method,path,body,token,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_admin_requests_change_nothing(quiet_gateway, what, method, path, body, token, status, param):
    gateway, e1 = quiet_gateway
    state_file = gateway.plane.state_dir / "state.json"
    state_before = state_file.read_bytes() if state_file.exists() else None
    before = durable(gateway.admin.backends())
    raw = body if isinstance(body, bytes) else None
    response = gateway.admin.call(method, path, None if raw is not None else body, token=token, raw=raw,
                                  headers={"Authorization": ""} if token == "" else None)
    assert response.status == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["param"] == param
    if status == 401:
        assert response.headers.get("WWW-Authenticate") == "Bearer"
    assert durable(gateway.admin.backends()) == before
    assert (state_file.read_bytes() if state_file.exists() else None) == state_before


def test_the_gateways_own_addresses_are_not_backends(quiet_gateway):
    gateway, _ = quiet_gateway
    listen = gateway.raw["listen"]
    for name, port in [("listener", listen["port"]), ("admin API", listen["admin_port"]),
                       ("xDS server", listen["xds_port"]), ("Envoy metrics listener", listen["envoy_metrics_port"]),
                       ("Envoy admin", listen["envoy_admin_port"])]:
        # Every spelling of the address: IPv4-mapped IPv6 (dotted or hex) reaches the IPv4 listener too.
        for host_name in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]"):
            answer = gateway.admin.call("POST", "/backends", {"url": f"http://{host_name}:{port}", "models": [MODEL]})
            assert answer.status == 400, (name, answer.text)
            assert "gateway's own" in answer.json()["error"]["message"] and name in answer.json()["error"]["message"]
    assert len(gateway.admin.backends()) == 1


def test_conflicts_with_existing_backends(quiet_gateway):
    gateway, e1 = quiet_gateway
    duplicate = gateway.admin.call("POST", "/backends", {"url": e1, "models": [MODEL]})
    assert duplicate.status == 409 and duplicate.json()["error"]["param"] == "url"
    config_id = gateway.admin.backends()[e1]["id"]
    bad_timeout = gateway.admin.call("POST", f"/backends/{config_id}/drain", {"timeout_s": -5})
    assert bad_timeout.status == 400 and bad_timeout.json()["error"]["param"] == "timeout_s"
    bad_force = gateway.admin.call("DELETE", f"/backends/{config_id}?force=yes")
    assert bad_force.status == 400
    assert gateway.admin.backends()[e1]["state"] == "active"


def test_open_endpoints_and_openapi(quiet_gateway):
    gateway, _ = quiet_gateway
    assert request("GET", gateway.admin.url + "/healthz").json() == {"status": "ok"}
    document = request("GET", gateway.admin.url + "/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert {"/backends", "/backends/{id}", "/backends/{id}/drain", "/backends/{id}/resume", "/status", "/keys",
            "/keys/{id}", "/keys/{id}/rotate"} <= set(document["paths"])
    assert set(document["paths"]["/backends"]) == {"get", "post"}


def test_a_public_admin_address_needs_a_configured_token(tmp_path):
    raw = base_config(free_port(), free_port(), [{"name": MODEL}], [])
    raw["listen"]["admin_address"] = "0.0.0.0"
    raw["listen"]["admin_plaintext"] = True  # tests/test_tls.py serves it over HTTPS
    config = GatewayConfigFile(tmp_path / "gateway.yaml")
    config.write(raw)
    command = [PYTHON, "-m", "control_plane", "serve", "--config", str(config.path), "--state-dir", str(tmp_path / "s")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_GATEWAY_ADMIN_TOKEN")}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO, env=env)
    assert refused.returncode == 1 and "WHISPER_GATEWAY_ADMIN_TOKEN" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    process = Process("public", command, tmp_path, env={"WHISPER_GATEWAY_ADMIN_TOKEN_FILE": str(token_file)})
    wait_until(lambda: "xDS (ADS) listening" in process.log_text(), 20, "start with a token")
    url = f"http://127.0.0.1:{raw['listen']['admin_port']}"
    assert request("GET", url + "/backends", headers={"Authorization": "Bearer s3cret-token"}).status == 200
    assert request("GET", url + "/backends", headers={"Authorization": "Bearer s3cret-tokeN"}).status == 401
    assert not (tmp_path / "s" / "admin-token").exists()  # a configured token is never written down
    process.stop()


def test_backends_command(tmp_path):
    _, e1 = start_engine(tmp_path, MODEL, "e1")
    _, e2 = start_engine(tmp_path, MODEL, "e2")
    gateway = Gateway(tmp_path, [e1])
    cli = [PYTHON, "-m", "control_plane", "backends", "--url", gateway.admin.url, "--state-dir",
           str(gateway.plane.state_dir)]

    def run(*args):
        return subprocess.run(cli[:4] + list(args) + cli[4:], capture_output=True, text=True, timeout=30, cwd=REPO)

    added = run("add", e2, "--weight", "2")
    assert added.returncode == 0, added.stderr
    assert added.stdout.split()[1:] == [e2 + ":", "active"]
    listing = run("list").stdout.splitlines()
    assert listing[0].split() == ["ID", "URL", "MODELS", "SOURCE", "STATE", "WEIGHT"]
    assert {line.split()[1]: line.split()[3] for line in listing[1:]} == {e1: "config", e2: "api"}
    # A drained API backend goes away once idle (milliseconds here); a config one stays, drained.
    assert run("drain", e1, "--timeout", "30").stdout.strip().endswith("draining")
    assert run("resume", e1).stdout.strip().endswith("active")
    assert run("remove", e2, "--force").stdout.strip().endswith("removed")
    missing = run("remove", "b-0000000000")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    conflict = run("remove", e1)
    assert conflict.returncode == 1 and "config file" in conflict.stderr
    assert json.loads(run("list", "--json").stdout)["data"][0]["url"] == e1


def test_dns_discovery_moves_backends_in_and_out(tmp_path):
    from dnslib import QTYPE, RR, A
    from dnslib.server import BaseResolver, DNSServer

    records: dict[str, list[str]] = {"engines.test.": []}

    class Resolver(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            name = str(request.q.qname)
            if request.q.qtype == QTYPE.A:
                for address in records.get(name, []):
                    reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=1))
            return reply

    dns_port = free_port()
    server = DNSServer(Resolver(), port=dns_port, address="127.0.0.1")
    server.start_thread()
    try:
        port = free_port()
        _, first = start_engine(tmp_path, MODEL, "d1", port=port, host="127.0.0.2")
        _, second = start_engine(tmp_path, MODEL, "d2", port=port, host="127.0.0.3")
        _, static = start_engine(tmp_path, MODEL, "s1")
        gateway = Gateway(tmp_path, [static], discovery=[{
            "name": "engines.test", "port": port, "models": [MODEL], "interval_s": 0.2,
            "nameserver": f"127.0.0.1:{dns_port}"}])
        assert set(gateway.hosts()) == {host(static)}
        records["engines.test."] = ["127.0.0.2", "127.0.0.3"]
        wait_until(lambda: set(gateway.hosts()) == {host(static), host(first), host(second)}, 5, "both records as backends")
        sources = {url: b["source"] for url, b in gateway.admin.backends().items()}
        assert sources[first] == sources[second] == "dns:engines.test"
        assert served_by(gateway.envoy.url, MODEL, ["d1", "d2", "s1"], 12)["d2"] > 0
        # A record that vanishes is drained (idle here, so it goes at once), not cut.
        records["engines.test."] = ["127.0.0.2"]
        wait_until(lambda: set(gateway.hosts()) == {host(static), host(first)}, 5, "the vanished record to go")
        assert second not in gateway.admin.backends()
        refused = gateway.admin.call("DELETE", f"/backends/{gateway.admin.backends()[first]['id']}")
        assert refused.status == 409 and "DNS" in refused.json()["error"]["message"]
        # DNS failing changes nothing (two failed lookups logged, then the endpoints are the same).
        server.stop()
        wait_until(lambda: gateway.plane.log_text().count("DNS lookup of engines.test failed") >= 2, 10,
                   "failed lookups")
        assert set(gateway.hosts()) == {host(static), host(first)}
    finally:
        server.stop()
