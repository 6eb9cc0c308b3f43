"""The simulated engine over real HTTP: vLLM's answers, errors and metrics, and a queue that fills."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines.common.audio import silent_wav
from harness.processes import post_form, request, start_engine, wait_until

pytestmark = pytest.mark.e2e

MODEL = "whisper-tiny"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # One slot; a 30 s chunk takes 1 s of wall time alone: a queue builds under a small burst.
    process, url = start_engine(tmp_path_factory.mktemp("engine"), MODEL, "sim1", max_num_seqs=2, time_scale=4)
    yield url
    process.stop()


def post(url: str, *parts, path: str = "/v1/audio/transcriptions"):
    return post_form(url + path, list(parts))


def clip(seconds: float = 2.0):
    return ("file", silent_wav(seconds), "clip.wav")


def samples(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(request("GET", url + "/metrics").text):
        for sample in family.samples:
            if sample.labels.get("model_name") == MODEL:
                reason = sample.labels.get("finished_reason")
                key = sample.name + (f"[{reason}]" if reason else "")
                values[key] = sample.value
    return values


def test_json_answer_like_vllm(engine):
    response = post(engine, clip(), ("model", MODEL, None), ("language", "en", None))
    assert response.status == 200
    assert response.json() == {"text": f" sim1 transcribed chunk 1 of 1 (2.00 s) for {MODEL}.",
                               "usage": {"type": "duration", "seconds": 2}}


def test_long_audio_is_cut_in_30_second_chunks(engine):
    text = post(engine, clip(65), ("language", "en", None)).json()["text"]
    assert "chunk 1 of 3 (30.00 s)" in text and "chunk 3 of 3 (5.00 s)" in text


def test_text_format_is_json_and_verbose_json_has_segments(engine):
    assert post(engine, clip(), ("response_format", "text", None)).json()["text"].startswith(" sim1")
    verbose = post(engine, clip(), ("response_format", "verbose_json", None)).json()
    assert set(verbose) == {"duration", "language", "text", "segments", "words"}
    assert verbose["duration"] == 2.0 and verbose["segments"][0]["end"] == 2.0


def test_translation_has_no_usage(engine):
    body = post(engine, clip(), path="/v1/audio/translations").json()
    assert set(body) == {"text"} and "translated" in body["text"]


def test_stream_is_vllm_sse(engine):
    response = post(engine, clip(), ("stream", "true", None))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "transcription.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("transcribe-")
    assert chunks[-1]["choices"][0] == {"delta": {"content": ""}, "finish_reason": "stop", "stop_reason": None}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks).startswith(" sim1 transcribed")


@pytest.mark.parametrize(
    "parts,status,param,message",
    [
        ([("model", MODEL, None)], 400, "body.file", "Field required"),
        ([clip(), ("model", "nope", None)], 404, "model", "The model `nope` does not exist"),
        ([("file", b"not audio at all", "x.wav")], 400, None, "Invalid or corrupted audio data"),
        ([("file", b"", "x.wav")], 400, None, "Invalid or corrupted audio data"),
        ([clip(), ("language", "xx", None)], 400, None, "Unsupported language: 'xx'"),
        ([clip(), ("response_format", "srt", None)], 400, None, "Currently only support response_format"),
        ([clip(), ("response_format", "foo", None)], 400, "body.response_format", "literal_error"),
        ([clip(), ("temperature", "hot", None)], 400, "body.temperature", "valid number"),
    ],
)
def test_bad_input_gets_vllm_errors(engine, parts, status, param, message):
    response = post(engine, *parts)
    assert response.status == status
    error = response.json()["error"]
    assert error["code"] == status and error["param"] == param and message in error["message"]
    assert request("GET", engine + "/health").status == 200


def test_surface_endpoints(engine):
    assert request("GET", engine + "/health").body == b""
    models = request("GET", engine + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert request("GET", engine + "/version").json()["version"]
    assert request("GET", engine + "/v1/audio/transcriptions").status == 405


def test_metrics_parse_and_gauges_follow_the_queue(engine):
    before = samples(engine)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert before[name] == 0.0
    # Six requests of one 30 s chunk each on two slots: two run, four wait.
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, engine, clip(30), ("language", "en", None)) for _ in range(6)]
        # (between one request finishing and the next admitted, one slot is briefly free)
        busy = wait_until(lambda: (s := samples(engine))["vllm:num_requests_waiting"] >= 3
                          and s["vllm:num_requests_running"] == 2 and s, 10, "two running and a queue")
        assert busy["vllm:kv_cache_usage_perc"] == 1.0
        assert all(f.result().status == 200 for f in futures)
    after = samples(engine)
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
    assert after["vllm:request_success_total[stop]"] - before["vllm:request_success_total[stop]"] == 6
    assert after["vllm:e2e_request_latency_seconds_count"] - before["vllm:e2e_request_latency_seconds_count"] == 6
    queued = after["vllm:request_queue_time_seconds_sum"] - before["vllm:request_queue_time_seconds_sum"]
    assert queued > 1.0  # four of them waited about a second or two each


def test_missing_language_costs_a_detection_request(engine):
    before = samples(engine)["vllm:request_success_total[stop]"]
    assert post(engine, clip()).status == 200
    assert samples(engine)["vllm:request_success_total[stop]"] - before == 2


@pytest.mark.parametrize("body,param", [(b'{"metrics": "bogus"}', "metrics"), (b'{"nope": "ok"}', "nope"),
                                        (b"not json", None), (b"[1]", None), (b'{"slowdown": 0.5}', "slowdown"),
                                        (b'{"crash": "yes"}', "crash"), (b'{"requests": "ok", "health": 5}', "health")])
def test_fault_switch_rejects_bad_input(engine, body, param):
    response = request("POST", engine + "/_sim/faults", body, {"Content-Type": "application/json"})
    assert response.status == 400
    assert response.json()["error"]["param"] == param
    assert request("GET", engine + "/_sim/faults").json() == {"metrics": "ok", "health": "ok", "requests": "ok",
                                                              "slowdown": 1.0}


def test_metrics_faults_switch_on_and_off(engine):
    def switch(mode):
        return request("POST", engine + "/_sim/faults", json.dumps({"metrics": mode}).encode(),
                       {"Content-Type": "application/json"})

    try:
        assert switch("error").json()["metrics"] == "error"
        assert request("GET", engine + "/metrics").status == 500
        switch("hang")
        with pytest.raises(OSError):
            request("GET", engine + "/metrics", timeout=0.5)
        assert post(engine, clip(), ("language", "en", None)).status == 200  # serving is unaffected
    finally:
        switch("ok")
    assert request("GET", engine + "/metrics").status == 200


def test_request_faults(tmp_path):
    process, url = start_engine(tmp_path, MODEL, "faulty", time_scale=0.1)

    def switch(**changes):
        return request("POST", url + "/_sim/faults", json.dumps(changes).encode(), {"Content-Type": "application/json"})

    switch(requests="503")
    answer = post(url, clip())
    assert answer.status == 503 and answer.json()["error"]["type"] == "ServiceUnavailableError"
    switch(requests="500")
    assert post(url, clip()).status == 500
    switch(requests="drop")
    # The answer begins, then the connection is cut: the body ends short.
    with pytest.raises(http.client.IncompleteRead):
        post(url, clip())
    switch(requests="ok", health="error")
    assert request("GET", url + "/health").status == 503
    switch(health="hang")
    with pytest.raises(OSError):
        request("GET", url + "/health", timeout=0.5)
    switch(health="ok", slowdown=20)
    assert post(url, clip(), ("language", "en", None)).status == 200
    assert switch(crash=True).status == 200
    process.popen.wait(5)
    assert process.popen.returncode == 137


@pytest.mark.parametrize("header", [b'form-data; name="model"; x="\x00"', b'form-data; name="model"; x="' + b"a" * 100_000 + b'"'],
                         ids=["NUL in a part header", "100 kB part-header line"])
def test_malformed_form_is_a_400_not_a_500(engine, header):
    """A 500 would count against the engine; a client's broken form is the client's 400, as in vLLM."""
    body = (b"--bnd\r\nContent-Disposition: " + header + b"\r\n\r\n" + MODEL.encode() + b"\r\n"
            b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + silent_wav(1)
            + b"\r\n--bnd--\r\n")
    response = request("POST", engine + "/v1/audio/transcriptions", body,
                       {"Content-Type": "multipart/form-data; boundary=bnd"})
    assert response.status == 400, response.text
    assert response.json()["error"]["code"] == 400
