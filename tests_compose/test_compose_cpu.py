"""The `cpu` profile as a user runs it: `docker-compose up`, a key from `keys create`, real speech
through Envoy's published port, scaling by DNS, containers killed under load, and the inside
channels closed to a container without a certificate."""

from __future__ import annotations

import os
import signal
import socket
import ssl

import openai
import pytest

from control_plane.supervisor import SAMPLE_CLIP
from harness.compose import TOKEN, docker
from harness.processes import LoadGenerator, request, transcribe, wait_until
from harness.speech import word_error_rate

MODEL = "whisper-1"
SAMPLE_SENTENCE = "Welcome. Your speech was sent through the gateway and turned into text."
SPEECH = SAMPLE_CLIP.read_bytes()


def bearer(project) -> dict:
    return {"Authorization": f"Bearer {project.secret}"}


def envoy_hosts(project) -> dict[str, dict[str, str]]:
    """The model's engines as Envoy holds them ({host: {rq_total, health_flags, ...}}, from its
    /clusters, inside its container)."""
    script = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9901/clusters', "
              "timeout=5).read().decode())")
    text = project.exec("envoy", "python", "-c", script).stdout
    hosts: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0].startswith("model:"):
            hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
    return hosts


def engines_served(project) -> dict[str, int]:
    """Requests each engine got through Envoy so far."""
    return {host: int(stats.get("rq_total", 0)) for host, stats in envoy_hosts(project).items()}


def serving(project) -> set[str]:
    """The engines Envoy sends new requests to (healthy, not draining)."""
    return {host for host, stats in envoy_hosts(project).items() if stats.get("health_flags") == "healthy"}


def test_real_speech_through_the_published_port_with_a_key(cpu):
    answer = transcribe(cpu.url, MODEL, audio=SPEECH, headers=bearer(cpu))
    assert answer.status == 200, answer.text
    assert word_error_rate(SAMPLE_SENTENCE, answer.json()["text"]) <= 0.25, answer.json()["text"]
    refused = transcribe(cpu.url, MODEL, audio=SPEECH)
    assert refused.status == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_the_openai_sdk_works_against_compose(cpu):
    client = openai.OpenAI(base_url=cpu.url + "/v1", api_key=cpu.secret)
    text = client.audio.transcriptions.create(model=MODEL, file=("sample.wav", SPEECH)).text
    assert word_error_rate(SAMPLE_SENTENCE, text) <= 0.25, text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cpu.url + "/v1", api_key="wrong").audio.transcriptions.create(
            model=MODEL, file=("sample.wav", SPEECH))


def _host_address() -> str:
    """This host's address on its default route (not loopback), where published ports also answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
        return probe.getsockname()[0]


def test_the_status_page_answers_on_the_published_admin_port_and_nowhere_else(cpu):
    ca = ssl.create_default_context(cafile=None)
    ca.check_hostname, ca.verify_mode = False, ssl.CERT_NONE  # its CA is in the pki volume; the CLI checks it
    status = request("GET", cpu.admin + "/status", headers={"Authorization": f"Bearer {TOKEN}"}, context=ca)
    assert status.status == 200 and status.json()["envoys"][0]["identity"] == "envoy/envoy"
    assert request("GET", cpu.admin + "/ui", context=ca).status == 200
    # Not in plain HTTP, not on the host's other addresses, and neither xDS nor etcd is published.
    with pytest.raises(OSError):
        request("GET", cpu.admin.replace("https", "http") + "/healthz", timeout=3)
    host = _host_address()
    for port in (cpu.ports["ADMIN_PORT"], 18000, 18001):
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=3).close()


def test_a_container_without_a_certificate_gets_nothing_inside(cpu):
    """An extra container on the compose network (where the engines live) tries the xDS port as
    an attacker would: plaintext, TLS without a certificate; neither gets a byte of config."""
    script = """
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
def first(channel):
    request = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="envoy"),
        type_url="type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret")
    stream = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(iter([request]), timeout=5)
    try:
        next(stream)
        return "GOT CONFIG"
    except grpc.RpcError as error:
        return error.code().name
print("plaintext", first(grpc.insecure_channel("control-plane:18000")))
print("tls", first(grpc.secure_channel("control-plane:18000", grpc.ssl_channel_credentials())))
"""
    result = docker("run", "--rm", "--network", cpu.network(), "--entrypoint", "python", "whisper-gateway:latest",
                    "-c", script, timeout=120)
    assert "GOT CONFIG" not in result.stdout
    assert "plaintext UNAVAILABLE" in result.stdout and "tls UNAVAILABLE" in result.stdout, result.stdout


def test_scaled_engines_are_found_by_dns_and_scaling_down_loses_nothing(cpu):
    cpu.up("engine-cpu", scale={"engine-cpu": 3})
    before = engines_served(cpu)
    load = LoadGenerator(cpu.url, MODEL, concurrency=3, seconds=1.0, max_seconds=120, max_requests=400,
                         headers=bearer(cpu))
    try:
        # The discovery interval is 5 s: the new engines get requests soon after it.
        wait_until(lambda: len(serving(cpu)) == 3 and all(
            engines_served(cpu)[host] > before.get(host, 0) for host in serving(cpu)), 60, "three engines serving")
        cpu.up("engine-cpu", scale={"engine-cpu": 1})  # records vanish: drained (Envoy sends them nothing)
        served = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= served + 3, 60, "requests after scaling down")
        after, served = engines_served(cpu), len(load.statuses)
        wait_until(lambda: len(load.statuses) >= served + 10, 60, "more requests after scaling down")
        grew = [host for host, n in engines_served(cpu).items() if n > after.get(host, 0)]
        assert len(grew) == 1 and serving(cpu) == set(grew), (grew, envoy_hosts(cpu))  # only the engine left
    finally:
        statuses = load.stop()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


@pytest.mark.parametrize("service, lost", [("engine-cpu", 0), ("control-plane", 0)])
def test_a_killed_container_is_restarted_and_loses_what_the_docs_say(cpu, service, lost):
    """docs/operations.md, "Restarts in compose": an engine killed loses nothing while another
    serves (Envoy retries what it held); the control plane killed loses nothing (Envoy keeps its
    configuration). Compose's restart policy brings each back."""
    if service == "engine-cpu":
        cpu.up("engine-cpu", scale={"engine-cpu": 2})
        wait_until(lambda: len(serving(cpu)) == 2, 60, "two engines")
    load = LoadGenerator(cpu.url, MODEL, concurrency=3, seconds=1.0, max_seconds=120, max_requests=400,
                         headers=bearer(cpu))
    try:
        wait_until(lambda: len(load.statuses) >= 5, 60, "load before the kill")
        victim = cpu.containers(service)[0]
        os.kill(victim["State"]["Pid"], signal.SIGKILL)  # a crash, not `docker kill` (a manual stop)
        wait_until(lambda: cpu.containers(service)[0]["RestartCount"] > victim["RestartCount"]
                   and cpu.containers(service)[0]["State"]["Running"], 60, f"{service} restarted by compose")
        served = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= served + 10, 90, "requests after the restart")
    finally:
        statuses = load.stop()
    failed = [s for s in statuses if s != 200]
    assert len(failed) <= lost, {s: statuses.count(s) for s in set(statuses)}
    if service == "engine-cpu":
        cpu.up("engine-cpu", scale={"engine-cpu": 1})


def test_a_killed_envoy_is_restarted_and_serves_again(cpu):
    """Envoy is the one part whose loss a client sees: what it holds and what is sent while it
    restarts fail (connection refused or reset; docs/operations.md says run two behind a load
    balancer to lose nothing). Compose brings it back, with its certificate and its config."""
    load = LoadGenerator(cpu.url, MODEL, concurrency=2, seconds=1.0, max_seconds=120, max_requests=2000,
                         headers=bearer(cpu), failure_pause_s=0.1)
    try:
        wait_until(lambda: len(load.statuses) >= 5, 60, "load before the kill")
        victim = cpu.containers("envoy")[0]
        killed_at = len(load.statuses)
        os.kill(victim["State"]["Pid"], signal.SIGKILL)
        wait_until(lambda: cpu.containers("envoy")[0]["State"]["Running"]
                   and cpu.containers("envoy")[0]["RestartCount"] > victim["RestartCount"], 60, "Envoy restarted")
        wait_until(lambda: load.statuses[-3:] == [200, 200, 200], 60, "answers again")
    finally:
        statuses = load.stop()
    assert set(statuses[:killed_at]) == {200}
    failed = [s for s in statuses[killed_at:] if s != 200]
    assert set(failed) <= {0, 503}, failed  # refused or cut while down; 503 until its engines are healthy
    print(f"envoy kill: {len(failed)} failed of {len(statuses) - killed_at} sent from the kill on")


def lb_hosts(project) -> dict[str, str]:
    """The Envoys compose's `lb` sends to, with their health (its admin, inside its container)."""
    script = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9903/clusters', "
              "timeout=5).read().decode())")
    text = project.exec("lb", "python", "-c", script).stdout
    return {parts[1]: parts[3] for parts in (line.split("::") for line in text.splitlines())
            if len(parts) == 4 and parts[0] == "envoys" and parts[2] == "health_flags"}


def test_a_rolling_restart_of_one_of_two_envoys_loses_nothing(cpu):
    """Two Envoys behind compose's `lb`: one drained with `envoy-drain` (its /health fails, the lb
    stops sending it connections, its listener closes once its requests are done), restarted,
    and back in rotation; the clients see only 200s."""
    cpu.up("envoy", scale={"envoy": 2})
    wait_until(lambda: list(lb_hosts(cpu).values()) == ["healthy", "healthy"], 60, "two Envoys behind the lb")
    load = LoadGenerator(cpu.url, MODEL, concurrency=3, seconds=1.0, max_seconds=120, max_requests=600,
                         headers=bearer(cpu))
    try:
        wait_until(lambda: len(load.statuses) >= 10, 60, "load through both")
        first = cpu.containers("envoy")[0]["Id"]
        drained = docker("exec", first, "whisper-gateway", "envoy-drain", "--config", "/etc/whisper-gateway/gateway.yaml",
                         "--lb-grace", "2", "--timeout", "60", timeout=90)
        assert "drained" in drained.stdout, drained.stdout
        docker("restart", first, timeout=60)
        wait_until(lambda: list(lb_hosts(cpu).values()) == ["healthy", "healthy"], 60, "both Envoys back")
        served = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= served + 10, 60, "requests after the restart")
    finally:
        statuses = load.stop()
        cpu.up("envoy", scale={"envoy": 1})
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
