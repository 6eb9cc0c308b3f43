"""Failing engines and malformed requests cost at most those requests, never the gateway."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
import signal
import socket
import statistics
import time

import pytest

from engines.common.audio import silent_wav
from harness.processes import (
    Envoy,
    GatewayConfigFile,
    GatewayStack,
    LoadGenerator,
    multipart,
    raw_http,
    request,
    base_config,
    free_port,
    served_by,
    start_control_plane,
    start_engine,
    transcribe,
    wait_until,
)

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"
# Tight enough for tests: an engine that stops answering is out within about two seconds.
FAST_RESILIENCE = {"health_interval_s": 0.5, "health_timeout_s": 1.0, "unhealthy_threshold": 2,
                   "healthy_threshold": 1, "ejection_s": 2}


class FaultGateway(GatewayStack):
    """Simulated engines by name behind a gateway tuned to notice failures quickly."""

    def __init__(self, tmp_path, names: list[str], time_scale: float = 0.2, **sections):
        self.engines, self.processes = {}, {}
        for name in names:
            self.processes[name], self.engines[name] = start_engine(tmp_path, MODEL, name, time_scale=time_scale)
        sections.setdefault("resilience", FAST_RESILIENCE)
        super().__init__(tmp_path, MODEL, list(self.engines.values()), **sections)
        wait_until(lambda: all(h.get("health_flags") == "healthy" for h in self.hosts().values()), 10,
                   "every engine healthy")

    def flags(self, name: str) -> str:
        return self.hosts()[self.engines[name].removeprefix("http://")]["health_flags"]

    def fault(self, name: str, **changes) -> None:
        answer = request("POST", self.engines[name] + "/_sim/faults", json.dumps(changes).encode(),
                         {"Content-Type": "application/json"})
        assert answer.status == 200, answer.text

    def served_by(self, count: int) -> dict[str, int]:
        return served_by(self.envoy.url, MODEL, list(self.engines), count)

    def upstream_requests(self) -> int:
        return self.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_total")


def test_killed_engine_leaves_rotation_and_rejoins(tmp_path):
    gateway = FaultGateway(tmp_path, ["e1", "e2", "e3"])
    load = LoadGenerator(gateway.envoy.url, MODEL, concurrency=6, seconds=5)
    try:
        wait_until(lambda: len(load.statuses) >= 12, 10, "load to flow")
        gateway.processes["e3"].signal(signal.SIGKILL)
        wait_until(lambda: gateway.flags("e3") != "healthy", 5, "the dead engine to leave rotation")
        after_kill = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= after_kill + 30, 15, "more load after the kill")
    finally:
        statuses = load.stop()
    # A transcription has no side effects: what the killed engine held is retried on another.
    assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200]
    assert gateway.served_by(12)["e3"] == 0
    # It comes back on the same address and rejoins.
    gateway.processes["e3"], _ = start_engine(tmp_path, MODEL, "e3", port=int(gateway.engines["e3"].rsplit(":", 1)[1]),
                                              time_scale=0.2)
    wait_until(lambda: gateway.flags("e3") == "healthy", 10, "the engine to rejoin")
    wait_until(lambda: gateway.served_by(6)["e3"] > 0, 10, "traffic on the returned engine")


def test_hung_engine_costs_no_request_and_leaves_rotation(tmp_path):
    # A try that has not answered within the hedge deadline (short here) is hedged: another engine
    # is asked too and the first answer wins, so what the hung engine held still gets answered;
    # new requests stop going there once it fails its health checks.
    gateway = FaultGateway(tmp_path, ["e1", "e2"], timeouts={"route_s": 30},
                           resilience={**FAST_RESILIENCE, "hedge_after_s": 1, "hedge_per_mb_s": 0})
    load = LoadGenerator(gateway.envoy.url, MODEL, concurrency=4, seconds=5)
    try:
        wait_until(lambda: len(load.statuses) >= 8, 10, "load to flow")
        gateway.fault("e2", requests="hang", health="hang", metrics="hang")
        wait_until(lambda: gateway.flags("e2") != "healthy", 10, "the hung engine to fail its health checks")
        after = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= after + 20, 15, "load to go on")
    finally:
        statuses = load.stop()
    assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200]
    assert gateway.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_retry") > 0  # the hedged tries
    assert gateway.served_by(10) == {"e1": 10, "e2": 0}


def test_a_hedge_that_loses_is_not_its_engines_failure(tmp_path):
    # Either engine answers a clip in about 1.5x the hedge deadline: each request's first try
    # passes its deadline, is hedged on the other engine, and still answers first (before the
    # hedge's own deadline); Envoy resets the hedge. Neither the late answer nor the reset hedge
    # is its engine failing (counted as failures, they got an engine ejected within the 8 requests).
    gateway = FaultGateway(tmp_path, ["e1", "e2"], resilience={**FAST_RESILIENCE, "hedge_after_s": 0.4,
                                                                "hedge_per_mb_s": 0})
    for name in gateway.engines:
        gateway.fault(name, slowdown=22)  # about 0.6 s a clip (time_scale 0.2), one at a time
    assert [transcribe(gateway.envoy.url, MODEL).status for _ in range(8)] == [200] * 8
    assert gateway.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_retry") >= 8  # each request hedged
    # A reset hedge is logged before its winner's end, on the same stream: all are in once every
    # answer is metered.
    wait_until(lambda: gateway.admin.status()["models"][0]["requests"] >= 8, 10, "every answer metered")
    rows = gateway.admin.status()["endpoints"]
    assert len(rows) == 2
    for row in rows:  # a straggler past twice the deadline may lose a hedge of its own: slow, counted
        assert row["failure_ratio"] < 0.3 and row["ejected_until"] is None, row


def timed_transcriptions(url: str, seconds: float, count: int, at_once: int) -> list[tuple[int, float]]:
    """(status, seconds taken) of `count` requests of a `seconds` clip, `at_once` at a time."""
    def one(_):
        started = time.monotonic()
        status = transcribe(url, MODEL, seconds=seconds).status
        return status, time.monotonic() - started
    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(one, range(count)))


def test_a_stopped_engine_delays_no_request_more_than_three_times_its_expected_time(tmp_path):
    # Once the model's speed is measured, a try is hedged after 1.25 x what recent tries took per
    # audio-second (90th percentile) x the upload's audio-seconds: a 10 s clip that takes about
    # 1.1 s is hedged after about 1.6 s, not after a fixed 30 s.
    gateway = FaultGateway(tmp_path, ["e1", "e2", "e3"], time_scale=6.0,
                           resilience={**FAST_RESILIENCE, "hedge_floor_s": 0.3})
    warm = timed_transcriptions(gateway.envoy.url, 10.0, 12, 2)
    assert {status for status, _ in warm} == {200}
    expected = statistics.median(taken for _, taken in warm)
    wait_until(lambda: gateway.admin.status()["models"][0]["hedge_ms_per_audio_s"], 10, "the model's speed measured")
    published = f'["per_try_ms_per_audio_s"] = {{["{MODEL}"] = {gateway.admin.status()["models"][0]["hedge_ms_per_audio_s"]}}}'
    wait_until(lambda: published in request("GET", gateway.envoy.admin + "/config_dump").text.replace('\\"', '"'),
               10, "Envoy's routes to carry it")
    hedged_before = gateway.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_retry")
    gateway.processes["e2"].signal(signal.SIGSTOP)
    try:
        stopped = timed_transcriptions(gateway.envoy.url, 10.0, 12, 2)
    finally:
        gateway.processes["e2"].signal(signal.SIGCONT)
    assert {status for status, _ in stopped} == {200}
    assert gateway.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_retry") > hedged_before  # e2 held some: hedged
    slowest = max(taken for _, taken in stopped)
    assert slowest <= 3 * expected, (slowest, expected)


def test_without_hedging_a_hung_engine_holds_its_requests_until_the_route_timeout(tmp_path):
    """What remains with hedging off: the requests a hung engine holds end at route_s (504)."""
    gateway = FaultGateway(tmp_path, ["e1", "e2"], timeouts={"route_s": 3},
                           resilience={**FAST_RESILIENCE, "hedge_after_s": 0, "hedge_per_mb_s": 0})
    gateway.fault("e2", requests="hang")
    # Eight at once: least request spreads them over both engines (one at a time, or four on a
    # loaded machine, all could go to e1 by chance).
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: transcribe(gateway.envoy.url, MODEL).status, range(8)))
    assert set(statuses) <= {200, 504} and 504 in statuses, statuses


def test_500s_from_an_engine_do_not_eject_it(tmp_path):
    """A client's odd upload can make vLLM answer 500: sending many must not take healthy engines out."""
    gateway = FaultGateway(tmp_path, ["e1", "e2"])
    gateway.fault("e2", requests="500")
    load = LoadGenerator(gateway.envoy.url, MODEL, concurrency=5, seconds=1, max_requests=30)
    wait_until(lambda: len(load.statuses) >= 30, 30, "30 requests")
    statuses = load.stop()
    assert 500 in statuses and set(statuses) <= {200, 500}
    assert gateway.envoy.stat(f"cluster.model_{MODEL}.outlier_detection.ejections_enforced_total") == 0
    assert gateway.flags("e2") == "healthy"


def test_an_engine_that_cuts_its_answers_is_ejected_and_comes_back_whole(tmp_path):
    """200 headers, then a cut connection: Envoy counts it a success and cannot retry it; the
    gateway sees the cuts in the try logs, ejects the engine (EDS unhealthy), and lets it back
    once its time is up, where it must prove itself again."""
    gateway = FaultGateway(tmp_path, ["e1", "e2", "e3"])
    e3 = gateway.engines["e3"].removeprefix("http://")
    gateway.fault("e3", requests="drop")
    load = LoadGenerator(gateway.envoy.url, MODEL, concurrency=6, seconds=1, max_requests=2000, max_seconds=60)
    try:
        wait_until(lambda: "failed_eds_health" in gateway.hosts()[e3]["health_flags"], 20, "e3 ejected")
        evidence = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= evidence + 200, 60, "200 requests after the ejection")
    finally:
        statuses = load.stop()
    cut_before, cut_after = statuses[:evidence].count(0), statuses[evidence:].count(0)
    assert 0 < cut_before, statuses[:evidence]
    assert cut_after <= len(statuses[evidence:]) / 100, (cut_after, len(statuses[evidence:]))  # at most 1%
    row = next(r for r in gateway.admin.status()["endpoints"] if r["url"] == gateway.engines["e3"])
    assert row["ejected_until"] is not None and row["failure_ratio"] > 0.3
    assert "ejected for failing their answers" in gateway.plane.log_text()
    # Whole again: back once its ejection (10 s the first time) is over, and serving.
    gateway.fault("e3", requests="ok")
    wait_until(lambda: "failed_eds_health" not in gateway.hosts()[e3]["health_flags"], 20, "e3 back")
    before = int(gateway.hosts()[e3]["rq_total"])
    assert all(transcribe(gateway.envoy.url, MODEL).status == 200 for _ in range(30))
    assert int(gateway.hosts()[e3]["rq_total"]) > before


def test_503_queue_full_is_retried_on_another_engine(tmp_path):
    gateway = FaultGateway(tmp_path, ["e1", "e2"], resilience={**FAST_RESILIENCE, "consecutive_gateway_failures": 1000})
    gateway.fault("e2", requests="503")
    load = LoadGenerator(gateway.envoy.url, MODEL, concurrency=4, seconds=2, max_requests=40)
    statuses = load.stop() if wait_until(lambda: len(load.statuses) >= 40, 30, "40 requests") else []
    assert len(statuses) == 40 and set(statuses) == {200}
    assert gateway.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_retry") > 0


def test_answers_envoy_makes_itself_are_openai_json(tmp_path):
    gateway = FaultGateway(tmp_path, ["e1"], timeouts={"route_s": 1.5}, limits={"max_requests_per_model": 1})

    def error_of(response, status: int) -> dict:
        assert response.status == status, response.text
        assert response.headers.get("content-type", "").startswith("application/json")
        error = response.json()["error"]
        assert error["code"] == status and error["message"] and error["type"]
        return error

    # Timeout: the engine takes longer than the route allows.
    gateway.fault("e1", slowdown=100)
    assert "did not answer in time" in error_of(transcribe(gateway.envoy.url, MODEL, seconds=30), 504)["message"]
    gateway.fault("e1", slowdown=1)
    # No healthy engine.
    gateway.fault("e1", health="error")
    wait_until(lambda: gateway.flags("e1") != "healthy", 10, "the only engine to fail its checks")
    assert "No engine could take the request" in error_of(transcribe(gateway.envoy.url, MODEL), 503)["message"]
    assert request("GET", gateway.envoy.admin + "/ready").status == 200


def _bad_inputs(port: int, boundary: str = "xyzBOUNDARY") -> list[tuple[str, object, int]]:
    """(what, request, expected status): bytes for raw requests, else (headers, body) for POST."""
    clip = silent_wav(1)
    path = "/v1/audio/transcriptions"

    def form(parts, b=boundary):
        return ({"Content-Type": f"multipart/form-data; boundary={b}"}, multipart(parts, b))

    good_file = ("file", clip, "a.wav")
    good_model = ("model", MODEL, None)
    whole = multipart([good_model, good_file], boundary)
    http = f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode()
    return [
        ("no body", ({"Content-Type": f"multipart/form-data; boundary={boundary}"}, b""), 400),
        ("GET", b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ("PUT", b"PUT " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        ("JSON body", ({"Content-Type": "application/json"}, json.dumps({"model": MODEL}).encode()), 400),
        ("text body", ({"Content-Type": "text/plain"}, b"hello"), 400),
        ("multipart without boundary", ({"Content-Type": "multipart/form-data"}, whole), 400),
        ("boundary over 70 characters", form([good_model, good_file], "b" * 80), 400),
        ("boundary not in the body", ({"Content-Type": "multipart/form-data; boundary=other"}, whole), 400),
        ("truncated body", ({"Content-Type": f"multipart/form-data; boundary={boundary}"}, whole[:-60]), 400),
        ("no closing boundary", ({"Content-Type": f"multipart/form-data; boundary={boundary}"},
                                 whole[:whole.rindex(f"--{boundary}--".encode())]), 400),
        ("part without a name", ({"Content-Type": f"multipart/form-data; boundary={boundary}"},
                                 f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nx\r\n".encode() + whole), 400),
        ("missing file", form([good_model]), 400),
        ("empty file", form([good_model, ("file", b"", "a.wav")]), 400),
        ("missing model", form([good_file]), 400),
        ("empty model", form([("model", "", None), good_file]), 400),
        ("two models", form([good_model, ("model", MODEL, None), good_file]), 400),
        ("model with CR/LF", form([("model", MODEL + "\r\nx-evil: 1", None), good_file]), 400),
        ("model 10 kB long", form([("model", "m" * 10_000, None), good_file]), 400),
        ("unknown model", form([("model", "whisper-huge", None), good_file]), 404),
        ("non-UTF-8 field name", form([good_model, ("caf\udcc3\udca9".encode("utf-8", "surrogateescape").decode(
            "latin-1"), "x", None), good_file]), 400),
        ("path traversal in the filename", form([good_model, ("file", clip, "../../etc/passwd")]), 400),
        ("body over the limit", form([good_model, ("file", silent_wav(70), "big.wav")]), 413),
        ("header flood", http + b"".join(b"X-Flood-%d: %s\r\n" % (i, b"v" * 100) for i in range(150)) + b"\r\n", 431),
        ("huge header", http + b"X-Big: " + b"v" * 70_000 + b"\r\n\r\n", 431),
        ("broken chunked encoding", http + b"Content-Type: multipart/form-data; boundary=x\r\n"
                                           b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n", 400),
        ("unknown path", b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("forged reply marker on a local reply",
         b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-whisper-lua-reply: 1\r\n\r\n", 404),
        ("part header with a NUL byte", ({"Content-Type": f"multipart/form-data; boundary={boundary}"},
                                         whole.replace(b'name="model"', b'name="model"; x="\x00"', 1)), 400),
        ("100 kB part-header line", ({"Content-Type": f"multipart/form-data; boundary={boundary}"},
                                     whole.replace(b'name="model"', b'name="model"; x="' + b"a" * 100_000 + b'"', 1)),
         400),
        ("request that came round a loop", ({"Content-Type": f"multipart/form-data; boundary={boundary}",
                                             "x-whisper-gateway-hop": "1"}, whole), 508),
        ("path escaping upwards", b"GET /v1/audio/../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ]


@pytest.fixture(scope="module")
def bad_input_gateway(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad-input")
    gateway = FaultGateway(tmp_path, ["e1", "e2"], limits={"max_upload_mb": 2}, timeouts={"request_s": 2})
    yield gateway
    gateway.stop()
    for process in gateway.processes.values():
        process.stop()


CASES = _bad_inputs(0)


@pytest.mark.parametrize("what,sent,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(bad_input_gateway, what, sent, status):
    gateway = bad_input_gateway
    before = gateway.upstream_requests()
    port = gateway.envoy.listen_port
    if isinstance(sent, bytes):
        response = raw_http(port, sent)
    else:
        headers, body = sent
        response = request("POST", gateway.envoy.url + "/v1/audio/transcriptions", body, headers)
    assert response.status == status, response.text
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    error = json.loads(response.body)["error"]
    assert error["code"] == status and error["message"] and error["type"]
    assert gateway.upstream_requests() == before, "an engine received it"
    assert request("GET", gateway.envoy.admin + "/ready").status == 200
    assert gateway.plane.alive()


def test_slow_drip_upload_times_out_with_408(bad_input_gateway):
    gateway = bad_input_gateway
    body = multipart([("model", MODEL, None), ("file", silent_wav(1), "a.wav")])
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=wgboundary7MA4YWxk\r\n\r\n").encode()
    before = gateway.upstream_requests()
    response = raw_http(gateway.envoy.listen_port, head + body[:100],
                        drip=[body[i:i + 10] for i in range(100, 400, 10)], drip_every=0.3)
    assert response.status == 408
    assert "not received in time" in json.loads(response.body)["error"]["message"]
    assert gateway.upstream_requests() == before


def test_chunked_upload_without_length_is_fine(bad_input_gateway):
    """Documented: chunked transfer encoding is valid HTTP/1.1 and is transcribed like any upload."""
    gateway = bad_input_gateway
    body = multipart([("model", MODEL, None), ("file", silent_wav(2), "a.wav")])
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4000]), body[i:i + 4000]) for i in range(0, len(body), 4000))
    sent = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=wgboundary7MA4YWxk\r\n\r\n" + chunks + b"0\r\n\r\n")
    response = raw_http(gateway.envoy.listen_port, sent)
    assert response.status == 200, response.body
    assert "transcribed" in json.loads(response.body)["text"]


def test_control_plane_killed_and_restarted_under_load(tmp_path):
    gateway = FaultGateway(tmp_path, ["e1", "e2"])
    load = LoadGenerator(gateway.envoy.url, MODEL, concurrency=4, seconds=5)
    try:
        wait_until(lambda: len(load.statuses) >= 10, 10, "load to flow")
        gateway.plane.kill()
        served = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= served + 20, 15, "serving with the control plane gone")
        gateway.restart_plane()
        wait_until(lambda: gateway.admin.call("GET", "/healthz").status == 200, 10, "the control plane back")
        served = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= served + 20, 15, "serving after the restart")
    finally:
        statuses = load.stop()
    assert statuses and set(statuses) == {200}


def test_envoy_restarted_gets_the_full_configuration(tmp_path):
    gateway = FaultGateway(tmp_path, ["e1", "e2"])
    versions = gateway.envoy.config_versions()
    gateway.envoy.stop()
    gateway.envoy = Envoy(tmp_path, gateway.raw, name="envoy-again")
    gateway.envoy.wait_serving()
    wait_until(lambda: gateway.envoy.config_versions() == versions, 10, "the same configuration")
    assert sum(gateway.served_by(10).values()) == 10


def test_two_gateways_pointed_at_each_other_stop_at_the_first_hop(tmp_path):
    """Each gateway is the other's backend: health checks carry the hop header, so each answers the
    other's with 508 and each marks the other unhealthy; a request costs one answer, never a loop."""
    port_a, port_b = free_port(), free_port()
    envoys = []
    for name, port, other in (("a", port_a, port_b), ("b", port_b, port_a)):
        raw = base_config(free_port(), port, [{"name": MODEL}], [{"url": f"http://127.0.0.1:{other}", "models": [MODEL]}])
        config = GatewayConfigFile(tmp_path / f"gateway-{name}.yaml")
        config.write(raw)
        start_control_plane(tmp_path, config.path, name=f"control-plane-{name}", state_dir=tmp_path / f"state-{name}")
        envoys.append(Envoy(tmp_path, raw, name=f"envoy-{name}"))
    a, b = envoys
    for envoy in envoys:
        envoy.wait_serving()
        wait_until(lambda envoy=envoy: all("failed_active_hc" in h["health_flags"]
                                           for h in envoy.endpoints()[f"model:{MODEL}"].values()),
                   15, "the other gateway marked unhealthy by its health checks")
    assert request("GET", a.url + "/health", headers={"x-whisper-gateway-hop": "1"}).status == 508
    assert request("GET", a.url + "/health").status == 200  # a load balancer's check is not a loop
    response = transcribe(a.url, MODEL, seconds=100)  # 3.2 MB
    assert response.status == 503, response.text
    assert b.stat(f"cluster.model_{MODEL}.upstream_rq_total") == 0


def test_uploads_that_would_fill_envoys_memory_get_503_and_those_admitted_finish(tmp_path):
    """Slow uploads hold memory until they end: past the share of limits.max_heap_mb for uploads
    (envoy/uploads.lua), a new upload gets a 503 in OpenAI's shape before a byte of it is
    buffered; those admitted still finish; once they end, even by a client's reset, uploads are
    admitted again."""
    # 256 MiB: 192 for uploads (one worker); a 20 MiB upload holds 40 (with its retry copy): 4 fit.
    gateway = FaultGateway(tmp_path, ["e1"], limits={"max_heap_mb": 256, "max_upload_mb": 21}, workers=1)
    body = multipart([("model", MODEL, None), ("file", silent_wav(20 * 1024 * 1024 / 32000), "a.wav")])
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=wgboundary7MA4YWxk\r\n\r\n").encode()
    connections = []
    try:
        for sent in range(1, 7):  # all but the last bytes: admitted ones wait for them, buffered
            connection = socket.create_connection(("127.0.0.1", gateway.envoy.listen_port))
            connections.append(connection)
            try:
                connection.sendall(head + body[:-50])
            except OSError:
                pass  # refused while it was still sending: Envoy answered 503 and closed
            wait_until(lambda: gateway.envoy.stat("http.whisper.downstream_rq_5xx")
                       + gateway.envoy.stat("http.whisper.downstream_rq_active") == sent, 10, "the upload's fate")
        assert gateway.envoy.stat("http.whisper.downstream_rq_active") == 4
        routes = gateway.envoy.config_versions()["RDS"]
        gateway.raw["models"][0]["aliases"] = ["whisper-1"]  # a route update starts the routes' Lua afresh:
        gateway.config.write(gateway.raw)  # the listener's count of what uploads hold goes on
        gateway.plane.signal(signal.SIGHUP)
        wait_until(lambda: gateway.envoy.config_versions()["RDS"] != routes, 15, "the routes updated")
        refused = raw_http(gateway.envoy.listen_port, head)  # the answer comes before the body is sent
        assert refused.status == 503 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json()["error"]["type"] == "ServiceUnavailableError"
        assert "limits.max_heap_mb" in refused.json()["error"]["message"]
        assert transcribe(gateway.envoy.url, MODEL).status == 200  # a small one still fits
        rss_mib = int(next(line.split()[1] for line in open(f"/proc/{gateway.envoy.process.popen.pid}/status")
                           if line.startswith("VmRSS"))) // 1024
        assert rss_mib < 256, rss_mib
        answers = []
        for connection in connections:
            try:
                connection.sendall(body[-50:])
                answers.append(connection.recv(4096).split(b" ", 2)[1])
            except OSError:
                answers.append(b"closed")
        assert answers[:4] == [b"200"] * 4, answers  # what was admitted finishes
    finally:
        for connection in connections:
            connection.close()
    held = socket.create_connection(("127.0.0.1", gateway.envoy.listen_port))
    held.sendall(head + body[:-50])
    wait_until(lambda: gateway.envoy.stat("http.whisper.downstream_rq_active") == 1, 10, "an upload in flight")
    held.close()  # the client gives up: its reservation returns with its stream
    wait_until(lambda: gateway.envoy.stat("http.whisper.downstream_rq_active") == 0, 10, "its stream to end")
    refusals = gateway.envoy.stat("http.whisper.downstream_rq_5xx")
    again = [socket.create_connection(("127.0.0.1", gateway.envoy.listen_port)) for _ in range(4)]
    try:  # the whole share is free again: four fit, as at first
        for connection in again:
            connection.sendall(head + body[:-50])
        wait_until(lambda: gateway.envoy.stat("http.whisper.downstream_rq_active") == 4, 10, "four uploads in flight")
        assert gateway.envoy.stat("http.whisper.downstream_rq_5xx") == refusals
    finally:
        for connection in again:
            connection.close()


def test_envoy_drain_lets_requests_in_flight_finish_before_a_restart(tmp_path):
    import subprocess
    import threading

    from harness.processes import PYTHON, REPO

    gateway = FaultGateway(tmp_path, ["e1"])
    gateway.fault("e1", slowdown=50)  # a 30 s clip now takes a few seconds
    answers = []
    in_flight = threading.Thread(target=lambda: answers.append(transcribe(gateway.envoy.url, MODEL, seconds=30)))
    in_flight.start()
    wait_until(lambda: gateway.envoy.stat("http.whisper.downstream_rq_active") == 1, 10, "a request in flight")
    drain = subprocess.Popen([PYTHON, "-m", "control_plane", "envoy-drain", "--config", str(gateway.config.path),
                              "--admin", gateway.envoy.admin, "--timeout", "60"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    # A load balancer in front, checking the metrics port's /health, sees it fail at once.
    health = f"http://127.0.0.1:{gateway.raw['listen']['envoy_metrics_port']}/health"
    assert request("GET", gateway.envoy.url + "/health").status == 200  # the API's own: always 200
    wait_until(lambda: request("GET", health).status == 503, 10, "/health to fail")
    output, _ = drain.communicate(timeout=60)
    in_flight.join(30)
    assert drain.returncode == 0 and "drained" in output, output
    assert answers and answers[0].status == 200, answers
    # Only now said done: the audio listener is closed to new connections.
    with pytest.raises(OSError):
        transcribe(gateway.envoy.url, MODEL)
    gateway.envoy.stop()
    gateway.envoy = Envoy(tmp_path, gateway.raw, name="envoy-again")
    gateway.envoy.wait_serving()
    assert request("GET", health).status == 200
    assert transcribe(gateway.envoy.url, MODEL).status == 200
