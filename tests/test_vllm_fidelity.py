"""The simulated engine against the real vLLM captures in tests/fixtures/vllm, field by field.

Benchmarks and routing tests trust the simulator; this keeps it faithful to the real thing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines.common.audio import silent_wav
from harness.processes import post_form, request, start_engine

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
MODEL = "whisper-tiny"
# The series routing reads, and the ones the speed estimate reads.
ROUTING_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                  "vllm:request_success", "vllm:request_inference_time_seconds", "vllm:e2e_request_latency_seconds",
                  "vllm:request_queue_time_seconds", "vllm:prompt_tokens", "vllm:generation_tokens")


def captured(name: str) -> dict[str, tuple[str, int]]:
    """`### title` sections of a capture file: title -> (body, HTTP status)."""
    sections = {}
    text = (FIXTURES / name).read_text()
    for block in text.split("### ")[1:]:
        title, _, rest = block.partition("\n")
        body, _, status = rest.rpartition("[HTTP ")
        sections.setdefault(title.strip(), (body.strip(), int(status.split()[0])))
    return sections


def families(page: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(page)}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    process, url = start_engine(tmp_path_factory.mktemp("fidelity"), MODEL, "sim", time_scale=0.1)
    yield url
    process.stop()


def test_metrics_have_vllms_names_types_and_labels(engine):
    real = families((FIXTURES / "metrics-busy.txt").read_text())
    ours = families(request("GET", engine + "/metrics").text)
    for name in ROUTING_SERIES:
        assert name in real and name in ours, name
        assert ours[name].type == real[name].type, name
        real_labels = {tuple(sorted(s.labels)) for s in real[name].samples if not s.name.endswith("_created")}
        our_labels = {tuple(sorted(s.labels)) for s in ours[name].samples if not s.name.endswith("_created")}
        assert our_labels == real_labels, name
    real_buckets = [s.labels["le"] for s in real["vllm:e2e_request_latency_seconds"].samples if "le" in s.labels]
    our_buckets = [s.labels["le"] for s in ours["vllm:e2e_request_latency_seconds"].samples if "le" in s.labels]
    assert our_buckets == real_buckets
    # The raw lines routing parses look alike, label order included.
    line = re.compile(r'^vllm:num_requests_running\{engine="0",model_name="whisper-tiny"\} \d+\.\d+$', re.M)
    assert line.search((FIXTURES / "metrics-busy.txt").read_text())
    assert line.search(request("GET", engine + "/metrics").text)


def _shape(value):
    """Keys and value types, recursively: what clients parse."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


ERROR_CASES = {
    "missing file": [("model", MODEL, None)],
    "unknown model": [("file", silent_wav(1), "a.wav"), ("model", "nope", None)],
    "non-audio bytes": [("file", b"this is not audio", "a.wav"), ("model", MODEL, None)],
    "empty file": [("file", b"", "a.wav"), ("model", MODEL, None)],
    "bad language": [("file", silent_wav(1), "a.wav"), ("model", MODEL, None), ("language", "xx", None)],
    "bad response_format": [("file", silent_wav(1), "a.wav"), ("model", MODEL, None), ("response_format", "foo", None)],
    "srt": [("file", silent_wav(1), "a.wav"), ("model", MODEL, None), ("response_format", "srt", None)],
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_match_vllm(engine, case):
    real_body, real_status = captured("responses-errors.txt").get(case) or captured("responses-requests.txt")[case]
    response = post_form(engine + "/v1/audio/transcriptions", ERROR_CASES[case])
    assert response.status == real_status
    real, ours = json.loads(real_body), response.json()
    assert ours == real  # word for word, status and all


@pytest.mark.parametrize("response_format,case", [("json", "json language=en"), ("verbose_json", "verbose_json")])
def test_answers_match_vllm(engine, response_format, case):
    real_body, _ = captured("responses-requests2.txt")[case]
    parts = [("file", silent_wav(1), "a.wav"), ("model", MODEL, None), ("response_format", response_format, None)]
    if "language" in case:
        parts.append(("language", "en", None))
    ours = post_form(engine + "/v1/audio/transcriptions", parts).json()
    real = json.loads(real_body)
    assert set(ours) == set(real)
    if response_format == "verbose_json":
        assert set(ours["segments"][0]) == set(real["segments"][0])
    else:
        assert ours["usage"] == real["usage"] | {"seconds": ours["usage"]["seconds"]}


def test_stream_chunks_match_vllm(engine):
    real_body, _ = captured("responses-requests2.txt")["stream"]
    real = [e.removeprefix("data: ") for e in real_body.split("\n\n") if e.strip()]
    response = post_form(engine + "/v1/audio/transcriptions",
                         [("file", silent_wav(1), "a.wav"), ("model", MODEL, None), ("stream", "true", None)])
    ours = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e.strip()]
    assert ours[-1] == real[-1] == "[DONE]"
    real_chunks, our_chunks = [json.loads(e) for e in real[:-1]], [json.loads(e) for e in ours[:-1]]
    assert _shape(our_chunks[0]) == _shape(real_chunks[0])
    assert _shape(our_chunks[-1]) == _shape(real_chunks[-1])
    assert our_chunks[-1]["choices"][0] == real_chunks[-1]["choices"][0]
    assert re.fullmatch(r"transcribe-[0-9a-f]{16}", our_chunks[0]["id"])
    # Compact JSON, as vLLM writes it.
    assert '{"id":"transcribe-' in response.text
