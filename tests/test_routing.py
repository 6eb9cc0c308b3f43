"""Requests through the real Envoy, routed by the Lua filter on the `model` form field."""

from __future__ import annotations

import pytest

from engines.common.audio import silent_wav
from tests.conftest import MODEL_A, MODEL_B
from harness.processes import engine_names_in, multipart, post_form, request, transcribe

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("model_first", [True, False], ids=["model-before-file", "model-after-file"])
@pytest.mark.parametrize("model,engines", [(MODEL_A, ["a1", "a2"]), (MODEL_B, ["b1"])])
def test_request_lands_on_an_engine_of_its_model(gateway, model, engines, model_first):
    for _ in range(4):
        response = transcribe(gateway.url, model, model_first=model_first)
        assert response.status == 200, response.text
        text = response.json()["text"]
        assert f"for {model}." in text
        assert any(f" {name} " in text for name in engines), text


def test_model_after_a_large_file_is_found(gateway):
    # 40 s of audio is 1.28 MB: the field sits far beyond the first window of the body.
    response = transcribe(gateway.url, MODEL_B, seconds=40, model_first=False)
    assert response.status == 200, response.text
    assert " b1 " in response.json()["text"]


def test_model_between_long_fields_is_found(gateway):
    """Neither end window holds the field: the filter falls back to scanning the whole body."""
    padding = ("prompt", "x" * 20_000, None)
    parts = [("file", silent_wav(5), "clip.wav"), padding, ("model", MODEL_B, None), ("temperature", "0" * 9000, None)]
    response = post_form(gateway.url + "/v1/audio/transcriptions", parts)
    assert response.status == 200, response.text
    assert " b1 " in response.json()["text"]


def test_quoted_boundary_and_unquoted_field_name(gateway):
    boundary = "quoted boundary (needs quotes)"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=model\r\n\r\n{MODEL_B}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    ).encode() + silent_wav(1) + f"\r\n--{boundary}--\r\n".encode()
    response = request("POST", gateway.url + "/v1/audio/transcriptions", body,
                       {"Content-Type": f'multipart/form-data; boundary="{boundary}"'})
    assert response.status == 200, response.text
    assert " b1 " in response.json()["text"]


def test_translations_are_routed_too(gateway):
    response = transcribe(gateway.url, MODEL_B, path="/v1/audio/translations")
    assert response.status == 200, response.text
    assert "b1 translated" in response.json()["text"]


def test_alias_reaches_the_model_and_the_engine_sees_the_model_name(gateway):
    response = transcribe(gateway.url, "whisper-1", model_first=False)
    assert response.status == 200, response.text
    # The engine serves MODEL_A only: it answered, and its text names the model it was asked for.
    assert f"for {MODEL_A}." in response.json()["text"]


def test_traffic_spreads_over_the_engines_of_a_model(gateway):
    text = "".join(transcribe(gateway.url, MODEL_A).json()["text"] for _ in range(12))
    counts = engine_names_in(text, ["a1", "a2", "b1"])
    assert counts["a1"] > 0 and counts["a2"] > 0 and counts["b1"] == 0, counts


def test_client_cannot_route_by_setting_the_header_itself(gateway):
    parts = [("model", MODEL_B, None), ("file", silent_wav(1), "a.wav")]
    body_only = post_form(gateway.url + "/v1/audio/transcriptions", parts)
    spoofed = request("POST", gateway.url + "/v1/audio/transcriptions", multipart(parts),
                      {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk",
                       "x-whisper-model": MODEL_A})
    assert body_only.status == spoofed.status == 200
    assert " b1 " in spoofed.json()["text"]


def _error(response, status: int, param_is_model: bool = False) -> dict:
    assert response.status == status, response.text
    assert response.headers.get("content-type", "").startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    if param_is_model:
        assert error["param"] == "model"
    return error


def _engine_requests(gateway) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for url in gateway.engine_urls.values():
        for family in text_string_to_metric_families(request("GET", url + "/metrics").text):
            if family.name == "vllm:request_success":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def test_bad_requests_get_openai_errors_and_reach_no_engine(gateway):
    before = _engine_requests(gateway)
    url = gateway.url + "/v1/audio/transcriptions"

    error = _error(transcribe(gateway.url, "no-such-model"), 404, param_is_model=True)
    assert "no-such-model" in error["message"] and MODEL_A in error["message"]
    _error(transcribe(gateway.url, None), 400, param_is_model=True)
    _error(request("POST", url, b'{"model": "whisper-small"}', {"Content-Type": "application/json"}), 400)
    _error(request("POST", url, b"x", {"Content-Type": "multipart/form-data"}), 400)  # no boundary
    _error(request("POST", url, None, {"Content-Type": "multipart/form-data; boundary=x"}), 400, param_is_model=True)
    _error(request("GET", url), 405)
    _error(post_form(url, [("model", MODEL_A, None), ("model", MODEL_B, None), ("file", b"RIFF", "a.wav")]), 400,
           param_is_model=True)
    _error(post_form(url, [("model", "", None), ("file", b"RIFF", "a.wav")]), 400, param_is_model=True)
    _error(post_form(url, [("model", "m" * 300, None), ("file", b"RIFF", "a.wav")]), 400, param_is_model=True)
    _error(post_form(url, [("model", "whisper\r\nx-evil: 1", None), ("file", b"RIFF", "a.wav")]), 400,
           param_is_model=True)
    _error(post_form(url, [("model", "caf\xe9", None), ("file", b"RIFF", "a.wav")]), 404, param_is_model=True)
    _error(request("GET", gateway.url + "/v1/chat/completions"), 404)
    assert _engine_requests(gateway) == before


def test_upload_over_the_limit_is_refused(gateway):
    # The stack allows 8 MiB bodies; 300 s of 16 kHz audio is 9.6 MB.
    response = transcribe(gateway.url, MODEL_A, seconds=300)
    error = _error(response, 413)
    assert "8 MiB" in error["message"]


def test_models_list_is_answered_by_envoy(gateway):
    response = request("GET", gateway.url + "/v1/models")
    assert response.status == 200
    body = response.json()
    assert body["object"] == "list"
    ids = {m["id"]: m for m in body["data"]}
    assert set(ids) == {MODEL_A, MODEL_B, "whisper-1"}
    assert ids["whisper-1"]["root"] == MODEL_A
    assert all(m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"] for m in body["data"])
    one = request("GET", gateway.url + f"/v1/models/{MODEL_B}")
    assert one.status == 200 and one.json()["id"] == MODEL_B
    assert request("GET", gateway.url + "/v1/models/nope").status == 404


def test_health(gateway):
    response = request("GET", gateway.url + "/health")
    assert response.status == 200 and response.json() == {"status": "ok"}


def test_streaming_passes_through(gateway):
    response = transcribe(gateway.url, MODEL_B, extra=[("stream", "true", None)])
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert '"object":"transcription.chunk"' in events[0]
