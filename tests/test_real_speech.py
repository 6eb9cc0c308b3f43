"""Real speech through the gateway to real Whisper on the CPU (faster-whisper, tiny.en)."""

from __future__ import annotations

import threading

import pytest
from openai import OpenAI

from harness.certificates import make_certificates
from harness.processes import GatewayStack, post_form, request, start_cpu_engine, wait_until
from harness.speech import SENTENCES, join_clips, speak, word_error_rate

pytestmark = pytest.mark.e2e

MODEL = "whisper-tiny.en"
MAX_WER = 0.3
TRUST: list = []  # the context that checks cpu-b's certificate, once the fixture made it


def engine_get(url: str, timeout: float = 30):
    return request("GET", url, timeout=timeout, context=TRUST[0])  # http:// URLs ignore the context


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech")
    sentences = [speak(text, folder / f"s{i}.wav") for i, text in enumerate(SENTENCES)]
    # Three rounds of all six: about 80 s, so Whisper decodes it in three 30 s windows.
    long_clip = join_clips(sentences * 3, folder / "long.wav")
    return {"sentences": list(zip(SENTENCES, sentences)), "long": long_clip}


@pytest.fixture(scope="module")
def cpu_gateway(tmp_path_factory):
    """Two real Whisper engines; cpu-b serves HTTPS (a certificate of a CA made here), which the
    gateway checks: every test below goes through TLS to it too."""
    log_dir = tmp_path_factory.mktemp("cpu-gateway")
    certs = make_certificates(log_dir / "certs")
    engines = {"cpu-a": start_cpu_engine(log_dir, MODEL, "cpu-a"),
               "cpu-b": start_cpu_engine(log_dir, MODEL, "cpu-b", tls=(certs.server.cert, certs.server.key))}
    assert engines["cpu-b"][1].startswith("https://")
    stack = GatewayStack(log_dir, MODEL, [url for _, url in engines.values()], aliases=("whisper-1",),
                         limits={"max_upload_mb": 4}, backend_tls={"ca_file": str(certs.ca)})
    TRUST.append(certs.client_context())
    yield stack.envoy, {name: url for name, (_, url) in engines.items()}
    stack.stop()
    for process, _ in engines.values():
        process.stop()


def transcribe_file(url: str, clip, **fields) -> tuple[int, dict]:
    parts = [("model", fields.pop("model", MODEL), None), ("file", clip.read_bytes(), clip.name)]
    parts += [(key, value, None) for key, value in fields.items()]
    response = post_form(url + "/v1/audio/transcriptions", parts, timeout=60)
    return response.status, response


def test_spoken_sentences_come_back_as_text(cpu_gateway, clips):
    envoy, _ = cpu_gateway
    for text, clip in clips["sentences"]:
        status, response = transcribe_file(envoy.url, clip)
        assert status == 200, response.text
        transcript = response.json()["text"]
        assert word_error_rate(text, transcript) <= MAX_WER, (text, transcript)


@pytest.mark.parametrize("response_format", ["text", "verbose_json", "srt", "vtt"])
def test_response_formats(cpu_gateway, clips, response_format):
    envoy, _ = cpu_gateway
    text, clip = clips["sentences"][0]
    status, response = transcribe_file(envoy.url, clip, response_format=response_format)
    assert status == 200, response.text
    if response_format == "verbose_json":
        body = response.json()
        assert body["language"] == "en" and body["duration"] > 3 and body["segments"]
        assert word_error_rate(text, body["text"]) <= MAX_WER
    elif response_format == "text":
        assert response.headers["content-type"].startswith("text/plain")
        assert word_error_rate(text, response.text) <= MAX_WER
    else:
        lines = response.text.splitlines()
        assert ("WEBVTT" == lines[0]) == (response_format == "vtt")
        assert any("-->" in line for line in lines)


def test_openai_sdk_unchanged(cpu_gateway, clips):
    envoy, _ = cpu_gateway
    client = OpenAI(base_url=envoy.url + "/v1", api_key="not-needed")
    text, clip = clips["sentences"][1]
    with clip.open("rb") as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert word_error_rate(text, result.text) <= MAX_WER, result.text
    assert "whisper-1" in [m.id for m in client.models.list()]


def _running(engine_urls) -> float:
    total = 0.0
    for url in engine_urls:
        for line in engine_get(url + "/metrics").text.splitlines():
            if line.startswith("vllm:num_requests_running{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_openai_sdk_stream_arrives_while_decoding(cpu_gateway, clips):
    """The first chunk reaches the client while the engine still decodes: Envoy does not buffer."""
    envoy, engines = cpu_gateway
    client = OpenAI(base_url=envoy.url + "/v1", api_key="not-needed")
    with clips["long"].open("rb") as audio:
        stream = client.audio.transcriptions.create(model="whisper-1", file=audio, stream=True)
        deltas, running_at_first_chunk = [], None
        for event in stream:
            chunk = event.model_dump()
            if running_at_first_chunk is None:
                running_at_first_chunk = _running(engines.values())
            choice = chunk["choices"][0]
            deltas.append(choice["delta"]["content"])
    assert running_at_first_chunk == 1, "the whole answer came after decoding ended"
    assert choice["finish_reason"] == "stop"
    expected = " ".join(SENTENCES * 3)
    assert word_error_rate(expected, "".join(deltas)) <= MAX_WER


def _error(status: int, response, expected_status: int) -> dict:
    assert status == expected_status, response.text
    error = response.json()["error"]
    assert error["code"] == expected_status and error["message"]
    return error


def test_bad_input_through_the_gateway_leaves_the_engines_healthy(cpu_gateway, clips, tmp_path):
    envoy, engines = cpu_gateway
    url = envoy.url + "/v1/audio/transcriptions"
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("this is not audio " * 50)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.wav"
    huge.write_bytes(clips["long"].read_bytes() * 3)  # over the 4 MiB limit of this gateway

    assert "Invalid or corrupted audio" in _error(*transcribe_file(envoy.url, not_audio), 400)["message"]
    assert "file is empty" in _error(*transcribe_file(envoy.url, empty), 400)["message"]  # the gateway's check
    assert "upload limit" in _error(*transcribe_file(envoy.url, huge), 413)["message"]
    missing_file = post_form(url, [("model", MODEL, None)])
    assert _error(missing_file.status, missing_file, 400)["param"] == "file"  # answered by the gateway
    missing_model = post_form(url, [("file", empty.read_bytes() or b"RIFF", "a.wav")])
    assert _error(missing_model.status, missing_model, 400)["param"] == "model"
    assert _error(*transcribe_file(envoy.url, clips["sentences"][0][1], model="whisper-2"), 404)["param"] == "model"
    assert _error(*transcribe_file(envoy.url, clips["sentences"][0][1], language="de"), 400)["param"] == "language"

    for url in engines.values():
        assert engine_get(url + "/health").status == 200
    status, response = transcribe_file(envoy.url, clips["sentences"][2][1])
    assert status == 200 and word_error_rate(SENTENCES[2], response.json()["text"]) <= MAX_WER


def test_decoding_does_not_block_the_engine(cpu_gateway, clips):
    """While a long clip decodes, the engine answers at once, and a second request waits its turn."""
    _, engines = cpu_gateway
    url = engines["cpu-a"]
    long_form = [("file", clips["long"].read_bytes(), "long.wav")]
    workers = [threading.Thread(target=post_form, args=(url + "/v1/audio/transcriptions", long_form),
                                kwargs={"timeout": 60}) for _ in range(2)]
    workers[0].start()
    try:
        wait_until(lambda: _running([url]) == 1, 10, "the decode to start")
        assert request("GET", url + "/health", timeout=1).status == 200
        workers[1].start()
        wait_until(lambda: 'vllm:num_requests_waiting{engine="0",model_name="whisper-tiny.en"} 1.0'
                   in request("GET", url + "/metrics", timeout=1).text, 10, "the second request to queue")
        assert _running([url]) == 1  # one slot: never two decodes at once
    finally:
        for worker in workers:
            if worker.is_alive() or worker.ident:
                worker.join(60)
