"""TLS at both ends: clients over HTTPS (mTLS optional), https:// engines checked by name, the
admin API beyond loopback, and certificates replaced while traffic flows.

Certificates are made at test time with Debian's openssl (harness/certificates.py); everything
runs as real processes: the control plane, Envoy, simulated engines serving HTTPS.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
from datetime import datetime, timezone

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from harness.certificates import Certificates, make_certificates
from harness.processes import (PYTHON, REPO, GatewayConfigFile, GatewayStack, Process, base_config, free_port,
                               multipart, request, silent_wav, start_engine, wait_until)

pytestmark = pytest.mark.e2e

MODEL = "whisper-1"
FORM = multipart([("model", MODEL, None), ("file", silent_wav(1.0), "clip.wav")])
FORM_HEADERS = {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def served_copy(certs: Certificates, folder) -> dict:
    """listen.tls over copies of the server's certificate and key in `folder`, which a test may replace."""
    pair = certs.server
    folder.mkdir(exist_ok=True)
    shutil.copy(pair.cert, folder / "cert.pem")
    shutil.copy(pair.key, folder / "key.pem")
    return {"cert_file": str(folder / "cert.pem"), "key_file": str(folder / "key.pem")}


def replace_file(source, target) -> None:
    """As an operator's tooling does: a new file renamed over the old one."""
    shutil.copy(source, f"{target}.new")
    os.replace(f"{target}.new", target)


def presented(port: int, context: ssl.SSLContext | None = None, alpn: list[str] | None = None) -> dict:
    """What a fresh TLS handshake with the listener shows: the leaf's fingerprint, the version, ALPN."""
    context = context or ssl._create_unverified_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return {"sha256": hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest(),
                    "version": tls.version(), "alpn": tls.selected_alpn_protocol()}


def sdk_http_client(context: ssl.SSLContext, asynchronous: bool = False):
    """The HTTP client the OpenAI SDK uses by default, trusting `context`'s CA."""
    names = ("DefaultAsyncHttpx2Client", "DefaultAsyncHttpxClient") if asynchronous else \
        ("DefaultHttpx2Client", "DefaultHttpxClient")
    kind = next(getattr(openai, name) for name in names if hasattr(openai, name))
    return kind(verify=context)


def openssl_field(path, *flags: str) -> str:
    """What `openssl x509 -noout <flags>` says of the certificate, after its `=`."""
    out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", *flags],
                         capture_output=True, text=True, check=True).stdout
    return out.split("=", 1)[1].strip()


def fingerprint(path) -> str:
    return openssl_field(path, "-fingerprint", "-sha256").replace(":", "").lower()


@pytest.fixture(scope="module")
def https(tmp_path_factory, certs):
    """A gateway serving HTTPS with a copy of the server certificate, over one plain engine."""
    tmp_path = tmp_path_factory.mktemp("https")
    engine = start_engine(tmp_path, MODEL, "plain", time_scale=0.0001)
    stack = GatewayStack(tmp_path, MODEL, [engine[1]], listen={"tls": served_copy(certs, tmp_path / "served")},
                         tls=certs.client_context())
    yield stack
    stack.stop()
    engine[0].stop()


def test_the_openai_sdk_over_https_sync_async_and_streaming(https, certs):
    assert https.envoy.url.startswith("https://localhost:")
    client = OpenAI(base_url=https.envoy.url + "/v1", api_key="none", http_client=sdk_http_client(certs.client_context()))
    assert client.audio.transcriptions.create(model=MODEL, file=("a.wav", silent_wav(1.0))).text
    chunks = list(client.audio.transcriptions.create(model=MODEL, file=("a.wav", silent_wav(1.0)), stream=True))
    # vLLM's stream: text deltas, then a chunk that finishes it.
    assert len(chunks) > 1 and chunks[-1].choices[0]["finish_reason"] == "stop"

    async def twice():
        async_client = AsyncOpenAI(base_url=https.envoy.url + "/v1", api_key="none",
                                   http_client=sdk_http_client(certs.client_context(), asynchronous=True))
        results = await asyncio.gather(*(async_client.audio.transcriptions.create(
            model=MODEL, file=("a.wav", silent_wav(1.0))) for _ in range(2)))
        return [r.text for r in results]
    assert all(asyncio.run(twice()))
    # A client that does not trust the test CA refuses the listener (it is not a public certificate).
    with pytest.raises(ssl.SSLCertVerificationError):
        presented(https.envoy.listen_port, ssl.create_default_context())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TLS 1.1, to see it refused
def test_tls_versions_and_alpn(https, certs):
    port = https.envoy.listen_port
    assert presented(port, alpn=["h2", "http/1.1"])["alpn"] == "h2"
    assert presented(port, alpn=["http/1.1"])["alpn"] == "http/1.1"
    assert presented(port)["version"] == "TLSv1.3"
    old = ssl._create_unverified_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert presented(port, old)["version"] == "TLSv1.2"
    older = ssl._create_unverified_context()
    older.minimum_version = older.maximum_version = ssl.TLSVersion.TLSv1_1
    older.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        presented(port, older)
    # HTTP/2 carries a transcription too (curl, as a client that speaks it).
    clip = https.tmp_path / "clip.wav"
    clip.write_bytes(silent_wav(1.0))
    answer = subprocess.run(["curl", "-s", "--http2", "--cacert", str(certs.ca), "-o", "/dev/null", "-w",
                             "%{http_version} %{http_code}", "-F", f"model={MODEL}", "-F", f"file=@{clip}",
                             https.envoy.url + "/v1/audio/transcriptions"], capture_output=True, text=True, timeout=30)
    assert answer.stdout == "2 200", answer.stderr


def test_plain_http_to_the_tls_port_is_told_to_use_https(https):
    answer = request("POST", f"http://127.0.0.1:{https.envoy.listen_port}/v1/audio/transcriptions", FORM, FORM_HEADERS)
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "https_required" and "https://" in answer.json()["error"]["message"]
    # Nothing else is affected: HTTPS still answers.
    assert request("POST", https.envoy.url + "/v1/audio/transcriptions", FORM, FORM_HEADERS,
                   context=https.envoy.tls).status == 200


def test_status_shows_the_served_certificate_and_never_the_key(https, certs):
    report = https.admin.status()["certificates"]
    assert report["problem"] is None
    not_after = datetime.strptime(openssl_field(certs.server.cert, "-enddate"), "%b %d %H:%M:%S %Y %Z")
    assert report["served"]["listener"] == {"subject": "CN=server", "sha256": fingerprint(certs.server.cert),
                                            "not_after": not_after.replace(tzinfo=timezone.utc).isoformat()}
    # With no backend_tls.ca_file, https:// engines are checked against the system's CAs.
    assert report["served"]["backend_ca"]["certificates"] > 10
    lines = certs.server.key.read_text().splitlines()[1:-1]
    secret = "".join(lines)[len(lines[0]) // 2:][:32]  # past the header every P-256 key shares
    for text in (https.admin.call("GET", "/status").text, https.admin.call("GET", "/metrics").text,
                 https.plane.log_text(), https.envoy.process.log_text()):
        assert secret not in text


def test_rotation_under_load_drops_nothing(https, certs):
    served = https.tmp_path / "served"
    port = https.envoy.listen_port
    assert presented(port)["sha256"] == fingerprint(certs.server.cert)
    # A connection opened before the rotation keeps working after it.
    kept = http.client.HTTPSConnection("localhost", port, context=https.envoy.tls, timeout=10)
    kept.request("POST", "/v1/audio/transcriptions", FORM, FORM_HEADERS)
    first = kept.getresponse()
    assert first.status == 200 and first.read()
    failures, done, stop = [], [0], threading.Event()

    def load():
        while not stop.is_set():
            try:  # a new connection each time: each handshake meets the certificate of the moment
                answer = request("POST", https.envoy.url + "/v1/audio/transcriptions", FORM, FORM_HEADERS,
                                 context=https.envoy.tls, timeout=10)
                (done.__setitem__(0, done[0] + 1) if answer.status == 200 else failures.append(answer.status))
            except Exception as error:  # noqa: BLE001 - any failure counts
                failures.append(repr(error))
    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: done[0] >= 20, 20, "load before the rotation")
        replace_file(certs.server_next.key, served / "key.pem")  # a moment when key and certificate differ
        replace_file(certs.server_next.cert, served / "cert.pem")
        wait_until(lambda: presented(port)["sha256"] == fingerprint(certs.server_next.cert), 10, "the new certificate")
        before = done[0]
        wait_until(lambda: done[0] >= before + 20, 20, "load after the rotation")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    kept.request("POST", "/v1/audio/transcriptions", FORM, FORM_HEADERS)
    assert kept.getresponse().status == 200
    kept.close()
    assert https.admin.status()["certificates"]["served"]["listener"]["sha256"] == fingerprint(certs.server_next.cert)


def test_a_broken_replacement_keeps_the_old_certificate(https, certs):
    served, port = https.tmp_path / "served", https.envoy.listen_port
    before = presented(port)["sha256"]
    logged = len(https.plane.log_text())
    replace_file(certs.client.key, served / "key.pem")  # a key that is not the certificate's
    wait_until(lambda: https.admin.status()["certificates"]["problem"], 10, "the problem on /status")
    assert "is not the key of the certificate" in https.admin.status()["certificates"]["problem"]
    assert "cannot serve, keeping the ones before" in https.plane.log_text()[logged:]
    assert presented(port)["sha256"] == before
    replace_file(certs.expired.key, served / "key.pem")
    replace_file(certs.expired.cert, served / "cert.pem")
    wait_until(lambda: "expired on" in (https.admin.status()["certificates"]["problem"] or ""), 10, "expiry refused")
    assert presented(port)["sha256"] == before
    assert request("POST", https.envoy.url + "/v1/audio/transcriptions", FORM, FORM_HEADERS,
                   context=https.envoy.tls).status == 200
    replace_file(certs.server.key, served / "key.pem")
    replace_file(certs.server.cert, served / "cert.pem")
    wait_until(lambda: presented(port)["sha256"] == fingerprint(certs.server.cert), 10, "a good file served again")
    assert https.admin.status()["certificates"]["problem"] is None


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_client_certificates(tmp_path, certs, mode):
    engine = start_engine(tmp_path, MODEL, "mtls", time_scale=0.0001)
    tls = served_copy(certs, tmp_path / "served") | {"client_certificates": mode, "client_ca_file": str(certs.ca)}
    stack = GatewayStack(tmp_path, MODEL, [engine[1]], listen={"tls": tls},
                         tls=certs.client_context(certs.client))

    def send(context):
        return request("POST", stack.envoy.url + "/v1/audio/transcriptions", FORM, FORM_HEADERS, context=context,
                       timeout=10)
    assert send(certs.client_context(certs.client)).status == 200
    with pytest.raises(OSError):  # a certificate from another CA: the handshake fails
        send(certs.client_context(certs.other_client))
    with pytest.raises(OSError):  # an expired one too
        send(certs.client_context(certs.expired_client))
    if mode == "required":
        with pytest.raises(OSError):
            send(certs.client_context())
    else:
        assert send(certs.client_context()).status == 200
    assert send(certs.client_context(certs.client)).status == 200  # nothing else was affected


def test_an_expired_or_mismatched_certificate_stops_the_start(tmp_path, certs):
    for cert, key, problem in ((certs.expired.cert, certs.expired.key, "expired on"),
                               (certs.server.cert, certs.client.key, "is not the key")):
        raw = base_config(free_port(), free_port(), [{"name": MODEL}], [])
        raw["listen"]["tls"] = {"cert_file": str(cert), "key_file": str(key)}
        config = GatewayConfigFile(tmp_path / "gateway.yaml")
        config.write(raw)
        refused = subprocess.run([PYTHON, "-m", "control_plane", "serve", "--config", str(config.path),
                                  "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=30,
                                 cwd=REPO)
        assert refused.returncode == 1 and problem in refused.stderr, refused.stderr


def test_https_engines_are_checked_by_name_and_ca(tmp_path, certs):
    """The good engine wants a client certificate too (mTLS to engines). Another engine's
    certificate comes from another CA, a third's names another host: both are reported with the
    reason, fail Envoy's health checks, and get nothing."""
    good = start_engine(tmp_path, MODEL, "good", time_scale=0.0001, ssl_certfile=certs.server.cert,
                        ssl_keyfile=certs.server.key, ssl_ca_certs=certs.ca)
    foreign = start_engine(tmp_path, MODEL, "foreign", time_scale=0.0001, ssl_certfile=certs.other_server.cert,
                           ssl_keyfile=certs.other_server.key)
    misnamed = start_engine(tmp_path, MODEL, "misnamed", time_scale=0.0001, ssl_certfile=certs.misnamed.cert,
                            ssl_keyfile=certs.misnamed.key)
    assert good[1].startswith("https://localhost:")
    ca_file = tmp_path / "engines-ca.pem"
    shutil.copy(certs.ca, ca_file)
    stack = GatewayStack(tmp_path, MODEL, [good[1], misnamed[1]],
                         backend_tls={"ca_file": str(ca_file), "cert_file": str(certs.client.cert),
                                      "key_file": str(certs.client.key)},
                         resilience={"health_interval_s": 0.5, "unhealthy_threshold": 1, "healthy_threshold": 1})
    # One more through the admin API: its models cannot be read over TLS that does not verify.
    refused = stack.admin.call("POST", "/backends", {"url": foreign[1]})
    assert refused.status == 400 and "TLS: unable to get local issuer certificate" in refused.json()["error"]["message"]
    assert stack.admin.call("POST", "/backends", {"url": foreign[1], "models": [MODEL]}).status == 201
    rows = lambda: {row["url"]: row for row in stack.admin.status()["endpoints"]}  # noqa: E731
    wait_until(lambda: rows()[good[1]]["health"] == "ok" and rows()[foreign[1]]["scrape_error"]
               and rows()[misnamed[1]]["scrape_error"], 15, "the good engine scraped over mTLS, the others refused")
    assert rows()[foreign[1]]["scrape_error"] == "TLS: unable to get local issuer certificate"
    assert rows()[misnamed[1]]["scrape_error"].startswith("TLS: Hostname mismatch")
    port_of = lambda url: url.rsplit(":", 1)[1]  # noqa: E731
    refused = [next(h for h in stack.hosts() if h.endswith(":" + port_of(e[1]))) for e in (foreign, misnamed)]
    wait_until(lambda: all("failed_active_hc" in stack.hosts()[h].get("health_flags", "") for h in refused), 15,
               "Envoy's health checks refuse both")
    for _ in range(10):
        assert request("POST", stack.envoy.url + "/v1/audio/transcriptions", FORM, FORM_HEADERS).status == 200
    assert [stack.hosts()[h]["rq_total"] for h in refused] == ["0", "0"]
    assert stack.envoy.stat(f"cluster.model_{MODEL}.ssl.handshake") > 0  # the good engine is reached over TLS
    # The engines' CA file replaced by a bundle that also holds the other CA: the foreign engine
    # is scraped and serves, with no restart.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(certs.ca.read_bytes() + certs.other_ca.read_bytes())
    replace_file(bundle, ca_file)
    wait_until(lambda: rows()[foreign[1]]["health"] == "ok", 15, "the foreign engine scraped")
    wait_until(lambda: stack.hosts()[refused[0]].get("health_flags") == "healthy", 15, "Envoy's health check passes")
    wait_until(lambda: request("POST", stack.envoy.url + "/v1/audio/transcriptions", FORM, FORM_HEADERS).status == 200
               and stack.hosts()[refused[0]]["rq_total"] != "0", 15, "traffic on the foreign engine")
    assert stack.hosts()[refused[1]]["rq_total"] == "0"  # still misnamed
    stack.stop()


def test_the_admin_api_beyond_loopback_is_https(tmp_path, certs):
    raw = base_config(free_port(), free_port(), [{"name": MODEL}], [])
    raw["listen"].update(admin_address="0.0.0.0", tls=served_copy(certs, tmp_path / "served"))
    config = GatewayConfigFile(tmp_path / "gateway.yaml")
    config.write(raw)
    token = tmp_path / "token"
    token.write_text("tls-admin-token\n")
    command = [PYTHON, "-m", "control_plane", "serve", "--config", str(config.path), "--state-dir", str(tmp_path / "s")]
    process = Process("admin-tls", command, tmp_path, env={"WHISPER_GATEWAY_ADMIN_TOKEN_FILE": str(token)})
    wait_until(lambda: "xDS (ADS) listening" in process.log_text(), 20, "start")
    assert "admin API on https://0.0.0.0" in process.log_text()
    port = raw["listen"]["admin_port"]
    headers = {"Authorization": "Bearer tls-admin-token"}
    assert request("GET", f"https://localhost:{port}/backends", headers=headers,
                   context=certs.client_context()).status == 200
    with pytest.raises(OSError):  # plain HTTP: the token would have travelled in the clear
        request("GET", f"http://127.0.0.1:{port}/backends", headers=headers, timeout=5)
    env = dict(os.environ, WHISPER_GATEWAY_ADMIN_TOKEN="tls-admin-token")
    status = subprocess.run([PYTHON, "-m", "control_plane", "status", "--config", str(config.path), "--json"],
                            capture_output=True, text=True, timeout=30, cwd=REPO, env=env)
    assert status.returncode == 0 and '"certificates"' in status.stdout, status.stderr
    # The admin API's certificate rotates with the files too.
    replace_file(certs.server_next.key, tmp_path / "served" / "key.pem")
    replace_file(certs.server_next.cert, tmp_path / "served" / "cert.pem")
    wait_until(lambda: presented(port)["sha256"] == fingerprint(certs.server_next.cert), 10, "the new admin certificate")
    assert request("GET", f"https://localhost:{port}/backends", headers=headers,
                   context=certs.client_context()).status == 200
    process.stop()
