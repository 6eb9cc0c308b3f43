"""etcd over TLS with client certificates: a real three-member etcd (every member serving
clients and peers over https and requiring a certificate from the internal CA), two control
planes that share their state through it, and the clients it must refuse.

The tests share one cluster and run in order: a member is killed in the first, and etcd's
auth is turned on in the last.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time

import grpc
import pytest
import yaml
from aetcd import rpc

from control_plane import internal_pki
from harness.etcd import EtcdCluster
from harness.processes import (PYTHON, REPO, AdminClient, base_config, free_port, request, start_control_plane,
                               wait_until)

pytestmark = pytest.mark.e2e

MODEL = "whisper-1"
STATE_KEY = b"/whisper-gateway/state"


class Rig:
    def __init__(self, folder):
        self.folder = folder
        self.pki = folder / "pki"
        self.etcd = EtcdCluster(folder / "etcd", tls=self.pki)
        self.admins = [self.start_plane(f"plane{i}") for i in range(2)]

    def config(self, **state) -> dict:
        """A plane's config: its own ports, an engine nobody answers on (no Envoy here), and
        state.etcd over TLS unless `state` says otherwise."""
        state = {"etcd": self.etcd.endpoints, "etcd_tls": self.etcd.client_tls, **state}
        return base_config(free_port(), free_port(), [{"name": MODEL}],
                           [{"url": f"http://127.0.0.1:{free_port()}", "models": [MODEL]}], state=state)

    def write(self, name: str, raw: dict):
        path = self.folder / name / "gateway.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw))
        return path

    def start_plane(self, name: str, **state) -> AdminClient:
        raw = self.config(**state)
        path = self.write(name, raw)
        plane = start_control_plane(path.parent, path, name=name)
        return AdminClient(f"http://127.0.0.1:{raw['listen']['admin_port']}", plane.state_dir)

    def plane_fails(self, name: str, env: dict | None = None, **state) -> str:
        """Starts a plane that must stop at start: what it said."""
        path = self.write(name, self.config(**state))
        done = subprocess.run([PYTHON, "-m", "control_plane", "serve", "--config", str(path), "--state-dir",
                               str(path.parent / "state")], cwd=REPO, capture_output=True, text=True, timeout=30,
                              env={**os.environ, **(env or {})})
        assert done.returncode != 0, done.stderr
        return done.stderr

    def target(self, i: int) -> str:
        return f"127.0.0.1:{self.etcd.ports[i][0]}"

    def read_state(self, i: int, metadata=None) -> bytes:
        """The state document, read as a control plane reads it (its certificate)."""
        with grpc.secure_channel(self.target(i), internal_pki.channel_credentials(self.pki, "etcd-client")) as channel:
            found = rpc.KVStub(channel).Range(rpc.RangeRequest(key=STATE_KEY), timeout=5, metadata=metadata)
        return found.kvs[0].value


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("etcd-tls"))
    yield rig
    rig.etcd.stop()


def key_names(admin: AdminClient) -> set[str]:
    return {k["name"] for k in admin.call("GET", "/keys").json()["data"]}


def grpc_refusals(target: str, credentials: grpc.ChannelCredentials | None) -> list[grpc.RpcError]:
    """A range read of the state key and a put over it, as a client with `credentials` (None:
    plaintext gRPC); each must fail."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    stub, errors = rpc.KVStub(channel), []
    with channel:
        for call in (lambda: stub.Range(rpc.RangeRequest(key=STATE_KEY), timeout=3),
                     lambda: stub.Put(rpc.PutRequest(key=STATE_KEY, value=b'{"backends": []}'), timeout=3)):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            errors.append(refused.value)
    return errors


def handshake(target: str, context: ssl.SSLContext) -> ssl.SSLError:
    """A TLS 1.2 handshake (where a refused client certificate fails the handshake itself, not
    the first read as in 1.3) and a request over it; the TLS error it ends with."""
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    host, port = target.split(":")
    with pytest.raises(ssl.SSLError) as refused:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"POST /v3/kv/range HTTP/1.1\r\nHost: etcd\r\nContent-Length: 2\r\n\r\n{}")
            tls.recv(1024)
    return refused.value


def ca_context(rig: Rig) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(internal_pki.ca_path(rig.pki, "etcd")))


def test_the_planes_share_their_state_over_tls_and_lose_a_member_unnoticed(rig):
    a, b = rig.admins
    made = a.call("POST", "/keys", {"name": "over-tls"})
    assert made.status == 201, made.text
    wait_until(lambda: "over-tls" in key_names(b), 2, "the key on the other plane")
    assert b"over-tls" in rig.read_state(1)  # in etcd, not only in the planes
    rig.etcd.kill(0)  # the first member, the one both planes use: they move to the next over TLS
    for i, admin in enumerate((b, a)):
        began = time.monotonic()
        answer = admin.call("POST", "/keys", {"name": f"after-kill-{i}"})
        assert answer.status == 201, answer.text
        assert time.monotonic() - began < 5
    for admin in (a, b):
        wait_until(lambda: {"after-kill-0", "after-kill-1"} <= key_names(admin), 3, "both changes on both planes")


def test_a_client_without_a_certificate_reads_and_writes_nothing(rig):
    before = rig.read_state(1)
    target = rig.target(1)
    # gRPC with TLS (the CA, to trust etcd) but no certificate: etcd ends the connection in TLS.
    for error in grpc_refusals(target, grpc.ssl_channel_credentials(internal_pki.ca_path(rig.pki, "etcd").read_bytes())):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "TSI" in error.details() or "handshake" in error.details().lower(), error.details()
    # gRPC in plaintext to the TLS port.
    for error in grpc_refusals(target, None):
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    # etcd's JSON gateway, as an attacker would try it: plain HTTP is hung up on unanswered...
    with pytest.raises(OSError):
        request("POST", f"http://{target}/v3/kv/range", b'{"key": "L3doaXNwZXItZ2F0ZXdheS9zdGF0ZQ=="}', timeout=5)
    # ... and HTTPS without a certificate fails its handshake.
    refusal = handshake(target, ca_context(rig))
    assert "ALERT" in str(refusal) or "EOF" in str(refusal), refusal
    assert rig.read_state(1) == before


def test_a_certificate_from_another_ca_is_refused(rig):
    other = rig.folder / "other-pki"
    internal_pki.init_ca(other)
    cert, key = internal_pki.issue(other, "control-plane", "control-plane", ("localhost", "127.0.0.1"))
    before = rig.read_state(1)
    credentials = grpc.ssl_channel_credentials(internal_pki.ca_path(rig.pki, "etcd").read_bytes(), key.read_bytes(),
                                               cert.read_bytes())
    for error in grpc_refusals(rig.target(1), credentials):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "TSI" in error.details() or "handshake" in error.details().lower(), error.details()
    context = ca_context(rig)
    context.load_cert_chain(cert, key)
    refusal = handshake(rig.target(1), context)
    assert "ALERT" in str(refusal), refusal
    assert rig.read_state(1) == before


def test_an_envoys_certificate_gets_nothing_from_etcd(rig):
    """etcd admits any certificate its CA signed: its CA is its own, so the internal CA's, which
    every Envoy holds, gets nothing (nor does the control plane's xDS certificate)."""
    internal_pki.ensure(rig.pki, envoys=("edge",))
    before = rig.read_state(1)
    for role, name in (("envoy", "edge"), ("control-plane", "control-plane")):
        cert, key = internal_pki.pair_paths(rig.pki, role, name)
        credentials = grpc.ssl_channel_credentials(internal_pki.ca_path(rig.pki, "etcd").read_bytes(),
                                                   key.read_bytes(), cert.read_bytes())
        for error in grpc_refusals(rig.target(1), credentials):
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (role, error.details())
    assert rig.read_state(1) == before


def test_a_plane_with_missing_tls_files_stops_at_start(rig):
    files = dict(rig.etcd.client_tls, cert_file=str(rig.folder / "nowhere.pem"))
    said = rig.plane_fails("missing-files", etcd_tls=files)
    assert "state.etcd_tls.cert_file" in said and "nowhere.pem" in said, said
    # etcd's own CA is not the system's: without ca_file etcd's certificate does not pass.
    said = rig.plane_fails("no-ca", etcd_tls=dict(rig.etcd.client_tls, ca_file=None))
    assert "state.etcd_tls" in said and "certificate" in said, said


def test_etcd_users_over_tls(rig, monkeypatch):
    """Last: etcd's auth stays on. A user for the gateway with readwrite on its prefix, root to
    turn auth on; the member killed in the first test is back, and a plane given up on its
    hung member authenticates again on the next."""
    rig.etcd.start(0)
    rig.etcd.wait_healthy(0)
    with grpc.secure_channel(rig.target(1), internal_pki.channel_credentials(rig.pki, "etcd-client")) as channel:
        auth = rpc.AuthStub(channel)
        auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="root-secret"), timeout=5)
        auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        auth.RoleAdd(rpc.AuthRoleAddRequest(name="gateway"), timeout=5)
        auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="gateway", perm=rpc.Permission(
            permType=rpc.Permission.READWRITE, key=b"/whisper-gateway/", range_end=b"/whisper-gateway0")), timeout=5)
        auth.UserAdd(rpc.AuthUserAddRequest(name="gateway", password="gateway-secret"), timeout=5)
        auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="gateway", role="gateway"), timeout=5)
        auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)
        root = auth.Authenticate(rpc.AuthenticateRequest(name="root", password="root-secret"), timeout=5).token
    # A certificate alone is no longer enough: etcd takes its common name as the user (here
    # "control-plane", which etcd does not know).
    with pytest.raises(grpc.RpcError) as refused:
        rig.read_state(1)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    monkeypatch.setenv("ETCD_GATEWAY_PASSWORD", "gateway-secret")
    admin = rig.start_plane("with-user", etcd_user="gateway", etcd_password_env="ETCD_GATEWAY_PASSWORD")
    assert {"over-tls", "after-kill-0"} <= key_names(admin)
    made = admin.call("POST", "/keys", {"name": "as-gateway"})
    assert made.status == 201, made.text
    rig.etcd.pause(0)  # the member it uses (the first, back since it started) hangs
    try:
        began = time.monotonic()
        made = admin.call("POST", "/keys", {"name": "after-moving-on"})
        assert made.status == 201, made.text
        assert time.monotonic() - began < 6
    finally:
        rig.etcd.resume(0)
    saved = rig.read_state(1, metadata=(("token", root),))
    assert b"as-gateway" in saved and b"after-moving-on" in saved
    said = rig.plane_fails("wrong-password", etcd_user="gateway", etcd_password_env="ETCD_WRONG",
                           env={"ETCD_WRONG": "guessed"})
    assert "etcd refused user 'gateway'" in said and "authentication failed" in said, said
    said = rig.plane_fails("unset-password", etcd_user="gateway", etcd_password_env="ETCD_NOT_SET_ANYWHERE")
    assert "state.etcd_password_env" in said and "ETCD_NOT_SET_ANYWHERE" in said, said
