"""The Lua filter in-process (harness/lua_filter.py): every answer of README's "What Envoy
answers" that the filter decides, and every corpus file's duration, in milliseconds and without
Envoy. The filter's source is the control plane's (filter_source over envoy/*.lua); only Envoy's
handle API is a stub.

Rows decided elsewhere (Envoy's configuration, not the Lua): the quota filters' 429s for
requests and audio-seconds per minute and day and for requests_in_flight (builders/quotas.py;
the Lua part, the plan's share check and the x-ratelimit-* renaming, is here), malformed HTTP
(400), plain HTTP to the TLS port (400), 408, 413, 431, 503, 504, `GET /v1/models`, `/health`
and unknown paths (direct responses with the Lua filter off), and the 508 of health checks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest

from control_plane.config import parse_config
from control_plane.fleet.resolved import Backend, Fleet
from control_plane.names import (AUDIO_SECONDS_PER_DAY_LIMIT, BUDGET_SCALE, METADATA_NAMESPACE, MODEL_KEY,
                                 REQUESTED_MODEL_KEY, batch_lane)
from control_plane.tenants.keys import Access, Budget, KeyTable
from engines.common.audio import silent_wav
from harness.lua_filter import LuaFilter
from harness.lying_audio import LYING_KINDS, lying
from harness.processes import multipart
from tests.test_audio_seconds import EXACT_TOLERANCE_S, MAX_AUDIO_S, corpus  # noqa: F401 (a fixture)

BIG, SMALL, ALIAS = "big", "small", "whisper-1"
RAW = {"models": [{"name": BIG, "aliases": [ALIAS]}, {"name": SMALL}], "backends": []}
BOUNDARY = "wgboundary7MA4YWxk"  # harness.processes.multipart's
FORM = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
OWN_HEADERS = ("x-whisper-model", "x-whisper-long-upload", "x-whisper-audio-seconds", "x-whisper-audio-estimated",
               "x-whisper-key-id", "x-whisper-batch-lane")
NOW_MS = 1_800_000_000_000


def open_filter(**raw) -> LuaFilter:
    return LuaFilter(parse_config(RAW | raw))


def form(model: str | bytes | None = BIG, audio: bytes | None = None, filename: str | None = "clip.wav",
         extra: list | None = None) -> bytes:
    parts = [] if model is None else [("model", model, None)]
    return multipart(parts + [("file", silent_wav(1.0) if audio is None else audio, filename)] + (extra or []))


def raw_form(*parts: bytes, boundary: str = BOUNDARY, closing: bool = True) -> bytes:
    """Parts given as (headers block, value) byte pairs, for what multipart() cannot write."""
    out = b""
    for headers, value in parts:
        out += b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n\r\n" + value + b"\r\n"
    return out + (b"--" + boundary.encode() + b"--\r\n" if closing else b"")


def disposition(name: bytes, filename: bytes | None = None) -> bytes:
    return b'Content-Disposition: form-data; name="' + name + b'"' + (
        b'; filename="' + filename + b'"' if filename is not None else b"")


def assert_error(outcome, status: int, param: str | None = None, code=None, error_type: str | None = None) -> dict:
    """An OpenAI-style answer of the filter's own, marked so Envoy's local-reply mapper keeps it."""
    assert outcome.error is None, outcome.error
    assert outcome.status == status, (outcome.status, outcome.reply_body)
    assert outcome.reply_headers["content-type"] == "application/json"
    error = outcome.json["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert error["code"] == (code if code is not None else status), error
    if error_type is not None:
        assert error["type"] == error_type, error
    assert outcome.metadata["whisper_gateway"]["lua_reply"] == str(code if code is not None else status)
    assert not outcome.route_cache_cleared
    assert outcome.header("x-whisper-model") is None
    assert not outcome.violations, outcome.violations
    return error


def assert_routed(outcome, model: str) -> None:
    assert outcome.error is None, outcome.error
    assert outcome.status is None, outcome.reply_body
    assert outcome.header("x-whisper-model") == model and outcome.header_count("x-whisper-model") == 1
    assert outcome.route_cache_cleared
    assert outcome.metadata["whisper_gateway"]["model"] == model
    assert outcome.header("x-whisper-audio-seconds") == outcome.metadata["whisper_gateway"]["audio_seconds"]
    assert not outcome.violations, outcome.violations


# -- routed: the model's header, the alias rewritten, the audio measured ------------------------------------------


@pytest.mark.parametrize("model_first", [True, False], ids=["model-before-file", "model-after-file"])
def test_a_form_is_routed_by_its_model_field(model_first):
    lua = open_filter()
    parts = [("model", SMALL, None), ("file", silent_wav(2.0), "clip.wav")]
    body = multipart(parts if model_first else parts[::-1])
    outcome = lua.run_request(headers=FORM, body=body)
    assert_routed(outcome, SMALL)
    assert outcome.body == body and not outcome.body_set  # the model's own name: the body as sent
    assert outcome.header("x-whisper-audio-seconds") == "2.000" and outcome.header("x-whisper-audio-estimated") is None
    assert outcome.metadata["whisper_gateway"]["audio_seconds"] == "2.000"
    assert "audio_estimated" not in outcome.metadata["whisper_gateway"]
    assert "key_id" not in outcome.metadata["whisper_gateway"] and outcome.header("x-whisper-key-id") is None


def test_translations_and_a_quoted_boundary_with_an_unquoted_field_name():
    boundary = "quoted boundary (needs quotes)"
    body = raw_form((b"Content-Disposition: form-data; name=model", SMALL.encode()),
                    (disposition(b"file", b"a.wav"), silent_wav(1.0)), boundary=boundary)
    outcome = open_filter().run_request(path="/v1/audio/translations", body=body,
                                        headers={"Content-Type": f'multipart/form-data; boundary="{boundary}"'})
    assert_routed(outcome, SMALL)


@pytest.mark.parametrize("where", ["model-before-a-large-file", "model-after-a-large-file", "model-between-long-fields"])
def test_the_model_field_is_found_anywhere_in_a_large_form(where):
    """The end windows hold the field, or the filter scans the whole body (and reads it all)."""
    audio = silent_wav(5.0)  # 160 kB: far beyond a 4 KiB window
    model, file = ("model", SMALL, None), ("file", audio, "clip.wav")
    parts = {"model-before-a-large-file": [model, file], "model-after-a-large-file": [file, model],
             "model-between-long-fields": [file, ("prompt", "x" * 20_000, None), model,
                                           ("temperature", "0" * 9000, None)]}[where]
    body = multipart(parts)
    outcome = open_filter().run_request(headers=FORM, body=body)
    assert_routed(outcome, SMALL)
    assert outcome.header("x-whisper-audio-seconds") == "5.000"
    whole_scan = where == "model-between-long-fields"
    assert (outcome.bytes_read >= len(body)) == whole_scan, (outcome.bytes_read, len(body))


def test_an_alias_is_rewritten_in_the_body_to_the_models_name():
    audio = silent_wav(1.5)
    body = multipart([("file", audio, "clip.wav"), ("model", ALIAS, None), ("language", "en", None)])
    outcome = open_filter().run_request(headers=FORM, body=body)
    assert_routed(outcome, BIG)
    expected = multipart([("file", audio, "clip.wav"), ("model", BIG, None), ("language", "en", None)])
    assert outcome.body_set and outcome.body == expected
    assert outcome.header("content-length") == str(len(expected))  # Envoy's setBytes sets it
    assert outcome.header("x-whisper-audio-seconds") == "1.500"  # measured before the bytes moved


@pytest.mark.parametrize("named,served,requested", [(ALIAS, BIG, ALIAS), (BIG, BIG, None), (SMALL, SMALL, None)],
                         ids=["an-alias", "a-model-with-aliases", "a-model-without"])
def test_the_name_a_request_used_is_in_the_metadata_only_when_it_was_an_alias(named, served, requested):
    """envoy/models.lua: the alias as asked goes to the traces (whisper.requested_model) beside the
    model served; a request naming the model itself carries only the model."""
    outcome = open_filter().run_request(headers=FORM, body=form(named))
    assert_routed(outcome, served)
    metadata = outcome.metadata[METADATA_NAMESPACE]
    assert metadata[MODEL_KEY] == served and metadata.get(REQUESTED_MODEL_KEY) == requested


def test_headers_a_client_sends_under_the_filters_names_are_removed():
    forged = {name: "forged" for name in OWN_HEADERS} | {"x-whisper-audio-seconds": "9999999",
                                                         "x-envoy-upstream-rq-per-try-timeout-ms": "1"}
    lua = open_filter(resilience={"retries": 0})  # no hedging: the filter sets no per-try deadline
    routed = lua.run_request(headers=FORM | forged, body=form(SMALL))
    assert_routed(routed, SMALL)
    for name in OWN_HEADERS:
        assert routed.header_count(name) <= 1 and routed.header(name) != "forged", name
    assert routed.header("x-whisper-audio-seconds") == "1.000"
    assert routed.header("x-whisper-key-id") is None and routed.header("x-whisper-long-upload") is None
    assert routed.header("x-envoy-upstream-rq-per-try-timeout-ms") is None  # nor a deadline of its own
    refused = lua.run_request(headers=FORM | forged, body=form("no-such-model"))
    assert_error(refused, 404, "model", error_type="NotFoundError")
    assert not any(refused.header(name) for name in OWN_HEADERS)  # gone from what the log sees too


def test_long_uploads_are_marked_and_tries_get_a_deadline_by_size():
    lua = open_filter(routing={"long_upload_kb": 100}, resilience={"hedge_after_s": 2, "hedge_per_mb_s": 3})
    short, long = form(audio=silent_wav(1.0)), form(audio=silent_wav(5.0))  # 32 kB, 160 kB
    outcome = lua.run_request(headers=FORM, body=short)
    assert outcome.header("x-whisper-long-upload") is None
    assert outcome.header("x-envoy-upstream-rq-per-try-timeout-ms") == str(2000 + len(short) * 3000 // 1048576)
    outcome = lua.run_request(headers=FORM, body=long)
    assert outcome.header("x-whisper-long-upload") == "1"
    assert outcome.header("x-envoy-upstream-rq-per-try-timeout-ms") == str(2000 + len(long) * 3000 // 1048576)


def test_once_a_models_speed_is_measured_tries_get_a_deadline_by_audio_seconds_with_a_floor():
    config = parse_config(RAW | {"resilience": {"hedge_after_s": 2, "hedge_per_mb_s": 3, "hedge_floor_s": 1.5}})
    fleet = Fleet(models=config.models, backends=(), hedge_ms={BIG: 300})  # 0.3 s per audio-second
    lua = LuaFilter(config, fleet)
    for seconds, deadline in ((20.0, 6000), (2.0, 1500)):  # 20 s x 300 ms; 2 s x 300 ms is under the floor
        outcome = lua.run_request(headers=FORM, body=form(audio=silent_wav(seconds)))
        assert_routed(outcome, BIG)
        assert outcome.header("x-envoy-upstream-rq-per-try-timeout-ms") == str(deadline)
    unmeasured = LuaFilter(config, Fleet(models=config.models, backends=(), hedge_ms={"other": 300}))
    body = form(audio=silent_wav(20.0))  # a model not measured yet keeps the deadline by size
    assert unmeasured.run_request(headers=FORM, body=body).header("x-envoy-upstream-rq-per-try-timeout-ms") == str(
        2000 + len(body) * 3000 // 1048576)


def admission_filter(**raw) -> LuaFilter:
    """The listener's upload-admission filter: the same source, run for that alone."""
    return LuaFilter(parse_config(RAW | raw), admission=True)


def admitted(outcome) -> bool:
    """Let through to the routes' filter, its body not read here."""
    assert outcome.error is None and outcome.body_calls == 0, outcome.error
    return outcome.status is None


def test_uploads_in_flight_are_admitted_against_the_memory_for_them_and_return_it_when_they_end():
    # max_heap_mb 100: 75 MiB for uploads; a 20 MiB upload holds 40 (its body, the retry copy).
    lua = admission_filter(limits={"max_heap_mb": 100})
    big = form(audio=silent_wav(20 * 1024 * 1024 / 32000))
    first = lua.run_request(headers=FORM, body=big)
    assert admitted(first)
    refused = lua.run_request(headers=FORM, body=big)  # 80 > 75: refused before a byte is buffered
    body = assert_error(refused, 503, error_type="ServiceUnavailableError")
    assert "limits.max_heap_mb" in body["message"] and refused.reply_headers["retry-after"] == "1"
    assert admitted(lua.run_request(headers=FORM, body=form(audio=silent_wav(1.0))))  # 64 kB still fits
    assert admitted(lua.run_request(method="GET", path="/v1/models"))  # no upload: nothing to hold
    first.end_stream()  # its stream ended: what it held is free again once collected
    assert admitted(lua.run_request(headers=FORM, body=big, now_ms=lua.now_ms + 1000))


def test_a_worker_holding_nothing_admits_one_upload_larger_than_its_share():
    lua = admission_filter(limits={"max_heap_mb": 64, "max_upload_mb": 60})  # 48 MiB, less than 2 x 30
    held = lua.run_request(headers=FORM, body=form(audio=silent_wav(30 * 1024 * 1024 / 32000)))
    assert admitted(held)
    assert lua.run_request(headers=FORM, body=form(audio=silent_wav(1.0))).status == 503


def test_an_upload_streamed_to_a_longform_worker_holds_only_what_envoy_buffers_of_it():
    # max_heap_mb 64: 48 MiB for uploads; a 100 MiB upload streams to a worker, holding 2 MiB.
    lua = admission_filter(limits={"max_heap_mb": 64, "max_upload_mb": 20}, longform={"workers": 1})
    streamed = {"content-length": str(100 * 2**20)}
    held = [lua.run_request(headers=FORM | streamed) for _ in range(20)]
    assert all(admitted(outcome) for outcome in held)
    buffered = lua.run_request(headers=FORM, body=form(audio=silent_wav(3.5 * 2**20 / 32000)))
    assert admitted(buffered)  # 40 + 7 MiB (its body, and the retry copy)
    assert lua.run_request(headers=FORM | streamed).status == 503  # 47 + 2 > 48
    # Without workers, what it declares past the upload limit counts as the limit (Envoy answers 413).
    plain = admission_filter(limits={"max_heap_mb": 64, "max_upload_mb": 20})
    first = plain.run_request(headers=FORM | streamed)
    assert admitted(first)
    assert plain.run_request(headers=FORM | streamed).status == 503  # 40 + 40 > 48


def test_where_keys_are_required_a_request_without_one_holds_no_upload_memory():
    lua = admission_filter(limits={"max_heap_mb": 64, "max_upload_mb": 60}, auth={"api_keys": "required"})
    huge = form(audio=silent_wav(30 * 1024 * 1024 / 32000))
    strangers = [lua.run_request(headers=FORM, body=huge) for _ in range(3)]  # refused at their headers (401)
    assert all(admitted(outcome) for outcome in strangers)
    keyed = FORM | {"Authorization": "Bearer sk-whatever"}
    held = lua.run_request(headers=keyed, body=huge)  # the share is still whole
    assert admitted(held)
    assert lua.run_request(headers=keyed, body=huge).status == 503


def test_the_routes_filter_leaves_upload_memory_to_the_listeners():
    lua = open_filter(limits={"max_heap_mb": 64, "max_upload_mb": 60})
    huge = form(audio=silent_wav(30 * 1024 * 1024 / 32000))
    held = [lua.run_request(headers=FORM, body=huge) for _ in range(2)]
    assert [outcome.status for outcome in held] == [None, None]


def test_an_upload_without_a_duration_field_is_estimated_and_says_so():
    outcome = open_filter().run_request(headers=FORM, body=form(audio=b"\x00" * 16000, filename="clip.mp3"))
    assert_routed(outcome, BIG)
    assert outcome.header("x-whisper-audio-seconds") == "1.000"  # 16000 bytes at 128 kbit/s
    assert outcome.header("x-whisper-audio-estimated") == "1"
    assert outcome.metadata["whisper_gateway"]["audio_estimated"] == "1"


def test_a_closing_delimiter_before_the_fields_never_makes_a_negative_duration():
    """The first window holds a closing delimiter, the last the fields, the file's value runs to a
    closing delimiter without its CRLF: the file's end is the body's, not before its start (found
    by tests/test_lua_fuzz.py: multipart.lua's value_end took that first closing delimiter)."""
    body = (b"--" + BOUNDARY.encode() + b"--\r\n" + b"epilogue " * 1000 + b"\r\n" + raw_form(
        (disposition(b"model"), ALIAS.encode()), (disposition(b"file", b"a.wav"), silent_wav(0.05)), closing=False)[:-2]
        + b"--" + BOUNDARY.encode() + b"--")
    outcome = open_filter().run_request(headers=FORM, body=body)
    assert_routed(outcome, BIG)
    assert 0 <= float(outcome.header("x-whisper-audio-seconds")) < 1


def tiny_webm(duration: bytes) -> bytes:
    """EBML header, Segment (unknown size), Info with an 8-byte Duration, then bytes."""
    return (b"\x1a\x45\xdf\xa3\x80" + b"\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff"
            + b"\x15\x49\xa9\x66\x8b" + b"\x44\x89\x88" + duration + b"\x00" * 6000)


def test_a_webm_duration_too_small_to_show_is_estimated():
    """A Duration of 6.95e-313 ms passes `> 0`; LuaJIT's string.format("%.3f") (since 2025-12-08)
    shows such a number as 975630014329515881.946, past limits.max_audio_s (found by test_lua_fuzz.py)."""
    lua = open_filter()
    outcome = lua.run_request(headers=FORM, body=form(audio=tiny_webm(b"\x00\x00\x7f\xff\x00\x00\x00\x00"),
                                                      filename="a.webm"))
    assert_routed(outcome, BIG)
    assert outcome.header("x-whisper-audio-estimated") == "1"
    assert outcome.header("x-whisper-audio-seconds") == f"{len(tiny_webm(b'0' * 8)) * 8 / 48000:.3f}"
    exact = lua.run_request(headers=FORM, body=form(audio=tiny_webm(b"\x40\xb3\x88\x00\x00\x00\x00\x00"),
                                                    filename="a.webm"))  # 5000.0 ms
    assert exact.header("x-whisper-audio-seconds") == "5.000" and exact.header("x-whisper-audio-estimated") is None


# -- 400, 404, 405, 508 ----------------------------------------------------------------------------------------------

LONG_HEADERS = disposition(b"file", b"a.wav") + b"\r\nX-Padding: " + b"p" * 8200
BAD_FORMS = [
    # (what, body, param)
    ("model missing", form(None), "model"),
    ("model empty", form(""), "model"),
    ("model repeated", multipart([("model", BIG, None), ("model", SMALL, None), ("file", b"RIFF", "a.wav")]), "model"),
    ("model over 256 bytes", form("m" * 257), "model"),
    ("model with CR LF", form("whisper\r\nx-evil: 1"), "model"),
    ("model with a control character", form("bi\x01g"), "model"),
    ("model with a tab", form("big\t"), "model"),
    ("file missing", multipart([("model", BIG, None)]), "file"),
    ("file empty", form(audio=b""), "file"),
    ("file repeated", multipart([("model", BIG, None), ("file", b"RIFF", "a.wav"), ("file", b"RIFF", "b.wav")]), "file"),
    ("file name with a path", form(filename="dir/clip.wav"), "file"),
    ("file name with a Windows path", form(filename="C:\\clip.wav"), "file"),
    ("file name ..", form(filename=".."), "file"),
    ("non-ASCII field name", raw_form((disposition(b"model"), BIG.encode()), (disposition(b"fil\xc3\xa9"), b"x"),
                                      (disposition(b"file", b"a.wav"), silent_wav(0.5))), None),
    ("part headers over 8 KiB", raw_form((disposition(b"model"), BIG.encode()), (LONG_HEADERS, silent_wav(0.5))), None),
    ("part headers with a control character", raw_form((disposition(b"model") + b"\r\nX-Odd: a\x01b", BIG.encode()),
                                                       (disposition(b"file", b"a.wav"), b"RIFF")), None),
    ("part without a name", raw_form((disposition(b"model"), BIG.encode()), (b"Content-Type: text/plain", b"x"),
                                     (disposition(b"file", b"a.wav"), b"RIFF")), None),
    ("no closing boundary", raw_form((disposition(b"model"), BIG.encode()), (disposition(b"file", b"a.wav"), b"RIFF"),
                                     closing=False), None),
    ("cut in the model's value", raw_form((disposition(b"file", b"a.wav"), b"RIFF"), closing=False)
     + b"--" + BOUNDARY.encode() + b"\r\n" + disposition(b"model") + b"\r\n\r\nbig--" + BOUNDARY.encode() + b"--", None),
]


@pytest.mark.parametrize("what,body,param", BAD_FORMS, ids=[b[0] for b in BAD_FORMS])
def test_bad_forms_get_400(what, body, param):
    outcome = open_filter().run_request(headers=FORM, body=body)
    assert_error(outcome, 400, param, error_type="BadRequestError")


NOT_FORMS = [
    ("JSON", {"content-type": "application/json"}, b'{"model": "big"}'),
    ("multipart without a boundary", {"content-type": "multipart/form-data"}, b"x"),
    ("a boundary over 70 characters", {"content-type": "multipart/form-data; boundary=" + "b" * 71}, b"x"),
    ("multipart/mixed", {"content-type": f"multipart/mixed; boundary={BOUNDARY}"}, form()),
    ("no content-type", {}, form()),
]


@pytest.mark.parametrize("what,headers,body", NOT_FORMS, ids=[n[0] for n in NOT_FORMS])
def test_a_body_that_is_not_a_multipart_form_gets_400_before_it_is_read(what, headers, body):
    outcome = open_filter().run_request(headers=headers, body=body)
    error = assert_error(outcome, 400, None, error_type="BadRequestError")
    assert "multipart/form-data" in error["message"]
    assert outcome.body_calls == 0


def test_a_form_without_a_body_gets_400():
    assert_error(open_filter().run_request(headers=FORM, body=None), 400, "model")


def test_an_unknown_model_gets_404_naming_the_served_models():
    error = assert_error(open_filter().run_request(headers=FORM, body=form("no-such-model")), 404, "model",
                         error_type="NotFoundError")
    assert error["message"] == "The model `no-such-model` does not exist. Served models: big, small, whisper-1."


def test_a_non_ascii_model_name_is_echoed_as_valid_json():
    outcome = open_filter().run_request(headers=FORM, body=form('caf\xe9 "quoted" \\'.encode()))
    error = assert_error(outcome, 404, "model")
    assert 'caf?? "quoted" \\' in error["message"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
def test_other_methods_than_post_get_405(method):
    outcome = open_filter().run_request(method=method, headers=FORM, body=None)
    assert_error(outcome, 405, None, error_type="MethodNotAllowed")
    assert outcome.body_calls == 0


def test_a_request_that_already_passed_a_gateway_gets_508():
    lua = LuaFilter(parse_config(RAW | {"auth": {"api_keys": "required"}}), access=Access(required=True))
    outcome = lua.run_request(headers=FORM | {"x-whisper-gateway-hop": "1"}, body=form())
    assert_error(outcome, 508, None, error_type="LoopDetected")
    assert outcome.body_calls == 0  # before the key check and the body


# -- API keys: 401, 403, wrong keys per address, the key's id, batch lanes and plans --------------------------------

PLANS = {"audio": {"requests_per_minute": 100, "audio_seconds_per_minute": 20},
         "daily": {"requests_per_minute": 100, "audio_seconds_per_minute": 1000, "audio_seconds_per_day": 10}}


class Keys:
    """A key table as the control plane keeps it, and the filter built from its grants."""

    def __init__(self, auth: dict | None = None, fleet_options: dict | None = None, envoys: int = 1):
        self.config = parse_config(RAW | {"auth": {"api_keys": "required", "plans": PLANS} | (auth or {})})
        self.fleet = Fleet(models=self.config.models, backends=(), **(fleet_options or {}))
        self.table, self.envoys = KeyTable(), envoys
        self.ids: dict[str, str] = {}

    def create(self, name: str, models: tuple[str, ...] = (), key_class: str = "interactive",
               plan: str | None = None) -> str:
        key, secret = self.table.create(name, models, key_class, NOW_MS / 1000, 100, plan=plan)
        self.ids[name] = key.id
        return secret

    def lua(self) -> LuaFilter:
        grants = self.table.grants(set(self.config.auth.plans), self.config.auth.default_plan)
        return LuaFilter(self.config, self.fleet, Access(True, grants), self.envoys, now_ms=NOW_MS)


def bearer(secret: str | None) -> dict:
    return {} if secret is None else {"authorization": f"Bearer {secret}"}


def test_a_valid_key_is_admitted_with_its_id_in_a_header_and_the_metadata():
    keys = Keys()
    secret = keys.create("app")
    outcome = keys.lua().run_request(headers=FORM | bearer(secret) | {"x-whisper-key-id": "key-forged"}, body=form())
    assert_routed(outcome, BIG)
    assert outcome.header("x-whisper-key-id") == keys.ids["app"]
    assert outcome.metadata["whisper_gateway"]["key_id"] == keys.ids["app"]
    # Other spellings of the scheme, and spaces around the key, are accepted.
    lua = keys.lua()
    for authorization in (f"bearer {secret}", f"BEARER   {secret}  ", f" Bearer {secret}"):
        assert_routed(lua.run_request(headers=FORM | {"authorization": authorization}, body=form()), BIG)


def rotated_out(keys: Keys) -> str:
    old = keys.create("rotated")
    keys.table.rotate(keys.ids["rotated"], 0, NOW_MS / 1000)
    return old


def revoked(keys: Keys) -> str:
    secret = keys.create("revoked")
    keys.table.revoke(keys.ids["revoked"], NOW_MS / 1000)
    return secret


UNAUTHENTICATED = [
    ("no key", lambda keys: {}),
    ("not bearer", lambda keys: {"authorization": "Basic dXNlcjpwYXNz"}),
    ("empty bearer", lambda keys: {"authorization": "Bearer "}),
    ("unknown key", lambda keys: bearer("sk-wg-not-a-key")),
    ("a key over 256 bytes", lambda keys: bearer("k" * 300)),
    ("two tokens", lambda keys: {"authorization": f"Bearer {keys.create('two')} extra"}),
    ("rotated-out key", lambda keys: bearer(rotated_out(keys))),
    ("revoked key", lambda keys: bearer(revoked(keys))),
]


@pytest.mark.parametrize("what,headers", UNAUTHENTICATED, ids=[u[0] for u in UNAUTHENTICATED])
def test_no_valid_key_gets_401_before_the_body_is_read(what, headers):
    keys = Keys()
    keys.create("someone")
    sent = headers(keys)
    outcome = keys.lua().run_request(headers=FORM | sent, body=form())
    error = assert_error(outcome, 401, None, code="invalid_api_key", error_type="AuthenticationError")
    assert outcome.body_calls == 0 and outcome.bytes_read == 0  # the upload is never buffered
    assert outcome.header("x-whisper-key-id") is None and "key_id" not in outcome.metadata["whisper_gateway"]
    for token in sent.get("authorization", "").split()[1:]:
        assert token not in error["message"]  # the key is never echoed
    assert ("didn't provide" in error["message"]) == (what in ("no key", "not bearer", "empty bearer", "two tokens"))


def test_keys_are_checked_before_the_method():
    outcome = Keys().lua().run_request(method="GET", body=None)
    assert_error(outcome, 401, None, code="invalid_api_key")


def test_a_key_limited_to_other_models_gets_403():
    keys = Keys()
    secret = keys.create("small-only", models=(SMALL,))
    lua = keys.lua()
    error = assert_error(lua.run_request(headers=FORM | bearer(secret), body=form(BIG)), 403, "model",
                         code="model_not_allowed", error_type="PermissionDeniedError")
    assert "`big`" in error["message"]
    assert_error(lua.run_request(headers=FORM | bearer(secret), body=form(ALIAS)), 403, "model", code="model_not_allowed")
    assert_routed(lua.run_request(headers=FORM | bearer(secret), body=form(SMALL)), SMALL)
    big_only = keys.create("big-only", models=(BIG,))
    assert_routed(keys.lua().run_request(headers=FORM | bearer(big_only), body=form(ALIAS)), BIG)  # its alias too


THRESHOLD, WINDOW_S = 5, 3


def guessing_filter() -> tuple[LuaFilter, str]:
    keys = Keys({"bad_keys_per_address": THRESHOLD, "bad_key_window_s": WINDOW_S})
    secret = keys.create("office")
    return keys.lua(), secret


def send_from(lua: LuaFilter, address: str, secret: str | None, at_ms: int = NOW_MS):
    return lua.run_request(headers=FORM | bearer(secret), body=form(), remote_address=address, now_ms=at_ms)


def assert_refused_for_guessing(outcome, retry_after: int) -> None:
    assert_error(outcome, 429, None, code="too_many_bad_keys", error_type="bad_api_keys")
    assert outcome.reply_headers["retry-after"] == str(retry_after)
    assert f"wait {retry_after} s" in outcome.json["error"]["message"]
    assert outcome.body_calls == 0


def test_wrong_keys_past_the_threshold_get_429_until_the_window_ends():
    lua, secret = guessing_filter()
    address = "192.0.2.7:40001"
    assert [send_from(lua, address, f"sk-wg-guess-{i}").status for i in range(THRESHOLD)] == [401] * THRESHOLD
    assert_refused_for_guessing(send_from(lua, address, "sk-wg-guess-more"), WINDOW_S)
    assert_refused_for_guessing(send_from(lua, "192.0.2.7:50000", None), WINDOW_S)  # any port; no key: 429 too
    assert_refused_for_guessing(send_from(lua, address, "sk-wg-later", NOW_MS + 1200), 2)  # whole seconds left
    assert_routed(send_from(lua, address, secret), BIG)  # a valid key from the address still passes
    assert send_from(lua, "192.0.2.8:40001", "sk-wg-guess").status == 401  # another address: its own count
    after = NOW_MS + WINDOW_S * 1000
    assert send_from(lua, address, "sk-wg-guess-again", after).status == 401  # the window ended: a new one
    statuses = [send_from(lua, address, f"sk-wg-{i}", after).status for i in range(THRESHOLD - 1)]
    assert statuses == [401] * (THRESHOLD - 1)
    assert_refused_for_guessing(send_from(lua, address, "sk-wg-over", after), WINDOW_S)


def test_missing_keys_never_count_and_ipv6_addresses_count_by_their_64():
    lua, _ = guessing_filter()
    assert [send_from(lua, "192.0.2.9:1", None).status for _ in range(3 * THRESHOLD)] == [401] * (3 * THRESHOLD)
    for i in range(THRESHOLD):  # each guess from another address of one /64
        assert send_from(lua, f"[2001:db8:1:2::{i + 1}]:443", f"sk-wg-guess-{i}").status == 401
    assert_refused_for_guessing(send_from(lua, "[2001:db8:1:2:ffff::9]:1", "sk-wg-guess"), WINDOW_S)
    assert send_from(lua, "[2001:db8:1:3::1]:443", "sk-wg-guess").status == 401  # the next /64


def test_a_threshold_of_zero_never_refuses():
    keys = Keys({"bad_keys_per_address": 0})
    lua = keys.lua()
    assert {send_from(lua, "192.0.2.10:1", f"sk-wg-{i}").status for i in range(50)} == {401}


def test_a_batch_key_gets_429_while_its_models_lane_is_closed():
    keys = Keys({"batch_above_wait_s": 1.0}, {"batch_closed": {BIG: 7}})
    bulk, live = keys.create("bulk", key_class="batch"), keys.create("live")
    lua = keys.lua()
    outcome = lua.run_request(headers=FORM | bearer(bulk), body=form(ALIAS))
    error = assert_error(outcome, 429, None, code="rate_limit_exceeded", error_type="batch_lane")
    assert outcome.reply_headers["retry-after"] == "7" and "`big`" in error["message"]
    assert_routed(lua.run_request(headers=FORM | bearer(live), body=form(BIG)), BIG)  # interactive: never refused
    assert_routed(lua.run_request(headers=FORM | bearer(bulk), body=form(SMALL)), SMALL)  # another model's lane


def test_a_batch_keys_request_names_its_lane_when_lanes_are_counted():
    keys = Keys({"batch_in_flight_per_engine": 2})
    bulk, live = keys.create("bulk", key_class="batch"), keys.create("live")
    lua = keys.lua()
    outcome = lua.run_request(headers=FORM | bearer(bulk) | {"x-whisper-batch-lane": "forged"}, body=form(ALIAS))
    assert_routed(outcome, BIG)
    lane = outcome.header("x-whisper-batch-lane")
    assert lua.context["batch_lanes"] and lane == batch_lane(BIG) and outcome.metadata["whisper_gateway"]["batch_lane"] == lane
    outcome = lua.run_request(headers=FORM | bearer(live) | {"x-whisper-batch-lane": "forged"}, body=form())
    assert outcome.header("x-whisper-batch-lane") is None and "batch_lane" not in outcome.metadata["whisper_gateway"]


def test_a_plans_key_is_charged_its_uploads_whole_seconds_times_its_charge_here():
    keys = Keys()
    secret = keys.create("metered", plan="audio")
    outcome = keys.lua().run_request(headers=FORM | bearer(secret), body=form(audio=silent_wav(7.5)))
    assert_routed(outcome, BIG)
    assert outcome.metadata["whisper_gateway"]["plan"] == "audio"
    # In tokens: 8 audio-seconds and 1 request, charged once each (one Envoy, no charge published yet).
    assert outcome.metadata["whisper_gateway"]["audio_cost"] == 8 * BUDGET_SCALE
    assert outcome.metadata["whisper_gateway"]["request_cost"] == BUDGET_SCALE
    unlimited = keys.create("unlimited")
    outcome = keys.lua().run_request(headers=FORM | bearer(unlimited), body=form())
    assert "plan" not in outcome.metadata["whisper_gateway"] and "audio_cost" not in outcome.metadata["whisper_gateway"]


def with_budget(keys: Keys, name: str, budget: Budget) -> LuaFilter:
    grants = keys.table.grants(set(keys.config.auth.plans), keys.config.auth.default_plan)
    grants = {d: replace(g, budget=budget) if g.id == keys.ids[name] else g for d, g in grants.items()}
    return LuaFilter(keys.config, keys.fleet, Access(True, grants), keys.envoys, now_ms=NOW_MS)


@pytest.mark.parametrize("envoys,charge,audio_cost", [
    (1, None, 8 * BUDGET_SCALE),
    (2, None, 2 * 8 * BUDGET_SCALE),  # before the control plane has seen where the key's traffic arrives
    (4, 2 * BUDGET_SCALE, 2 * 8 * BUDGET_SCALE),  # its published charge
    (4, 3 * BUDGET_SCALE, 20 * BUDGET_SCALE),  # never more than the whole bucket: 20 a minute
    (4, None, 20 * BUDGET_SCALE),
])
def test_each_envoy_charges_the_keys_published_charge_capped_at_the_whole_bucket(envoys, charge, audio_cost):
    keys = Keys(envoys=envoys)
    keys.create("spread", plan="audio")
    secret = keys.create("metered", plan="audio")
    lua = with_budget(keys, "metered", Budget(requests_charge=charge, audio_charge=charge))
    outcome = lua.run_request(headers=FORM | bearer(secret), body=form(audio=silent_wav(7.5)))
    assert_routed(outcome, BIG)
    assert outcome.metadata["whisper_gateway"]["audio_cost"] == audio_cost
    assert outcome.metadata["whisper_gateway"]["request_cost"] == (charge or envoys * BUDGET_SCALE)


@pytest.mark.parametrize("envoys", [1, 2, 8])
def test_an_upload_of_a_whole_minutes_budget_passes_any_number_of_envoys_and_a_longer_one_is_told_why(envoys):
    keys = Keys(envoys=envoys)
    secret = keys.create("long", plan="audio")
    whole = keys.lua().run_request(headers=FORM | bearer(secret), body=form(audio=silent_wav(20.0)))
    assert_routed(whole, BIG)
    assert whole.metadata["whisper_gateway"]["audio_cost"] == 20 * BUDGET_SCALE  # the whole bucket, no more
    outcome = keys.lua().run_request(headers=FORM | bearer(secret), body=form(audio=silent_wav(25.0)))
    error = assert_error(outcome, 429, "file", code="rate_limit_exceeded", error_type="audio_seconds")
    assert "25 audio-seconds" in error["message"] and "20 per minute" in error["message"]
    assert "retry-after" not in outcome.reply_headers  # waiting would not help
    assert "plan" not in outcome.metadata["whisper_gateway"]  # nothing charged
    daily = keys.create("daily", plan="daily")
    error = assert_error(keys.lua().run_request(headers=FORM | bearer(daily), body=form(audio=silent_wav(12.0))), 429,
                         "file", code="rate_limit_exceeded", error_type="audio_seconds_per_day")
    assert "per day" in error["message"]


def test_a_key_the_control_plane_refused_gets_429_until_then_and_passes_after():
    keys = Keys()
    secret = keys.create("spent", plan="daily")
    until = int(time.time()) + 3600
    lua = with_budget(keys, "spent", Budget(refused=AUDIO_SECONDS_PER_DAY_LIMIT, refused_until=until))
    outcome = lua.run_request(headers=FORM | bearer(secret), body=form())
    error = assert_error(outcome, 429, None, code="rate_limit_exceeded", error_type=AUDIO_SECONDS_PER_DAY_LIMIT)
    assert "10 audio-seconds a day" in error["message"]
    assert 3590 <= int(outcome.reply_headers["retry-after"]) <= 3600
    assert "plan" not in outcome.metadata["whisper_gateway"]  # nothing charged
    lua = with_budget(keys, "spent", Budget(refused=AUDIO_SECONDS_PER_DAY_LIMIT, refused_until=int(time.time()) - 1))
    assert_routed(lua.run_request(headers=FORM | bearer(secret), body=form()), BIG)  # the refusal is over


def test_the_quota_filters_headers_get_openais_names_in_whole_units_and_a_retry_after():
    keys = Keys()
    secret = keys.create("metered", plan="audio")
    lua = keys.lua()
    request = lua.run_request(headers=FORM | bearer(secret), body=form(audio=silent_wav(7.5)))
    tokens = BUDGET_SCALE  # per unit
    quota_headers = [("x-ratelimit-limit", str(20 * tokens)), ("x-ratelimit-remaining", str(4 * tokens + 7)),
                     ("x-ratelimit-reset", "1"),
                     ("x-ratelimit-limit", str(100 * tokens)), ("x-ratelimit-remaining", str(97 * tokens)),
                     ("x-ratelimit-reset", "1")]
    answer = lua.run_response(200, quota_headers, request.metadata)
    assert answer.error is None and not answer.violations
    assert answer.header("x-ratelimit-limit") is None and answer.header("x-ratelimit-remaining") is None
    assert answer.header("x-ratelimit-limit-audio-seconds") == "20"
    assert answer.header("x-ratelimit-remaining-audio-seconds") == "4"
    assert answer.header("x-ratelimit-reset-audio-seconds") == "48s"
    assert (answer.header("x-ratelimit-limit-requests"), answer.header("x-ratelimit-remaining-requests")) == ("100", "97")
    assert answer.header("retry-after") is None
    refused = lua.run_response(429, quota_headers + [("x-whisper-limited", "audio_seconds")], request.metadata)
    assert refused.header("retry-after") == "12"  # 8 audio-seconds, 4 left, 20 a minute
    refused = lua.run_response(429, [("x-ratelimit-limit", str(3 * tokens)), ("x-ratelimit-remaining", "0"),
                                     ("x-whisper-limited", "requests")], request.metadata)
    assert refused.header("retry-after") == "20" and refused.header("x-ratelimit-limit-requests") == "3"
    plain = lua.run_response(200, [("content-type", "application/json")], request.metadata)
    assert plain.headers == [(":status", "200"), ("content-type", "application/json")]


JSON = [("content-type", "application/json")]


@pytest.mark.parametrize("why,edge,body,engine", [
    ("json's usage.seconds, far from what the edge metered", "1.000",
     b'{"text":" hi","usage":{"type":"duration","seconds":61}}', "61.000"),
    ("verbose_json's duration", "1.000", b'{"duration":61.05,"language":"en","text":" hi","segments":[]}', "61.050"),
    ("within vLLM's rounding up to a whole second: the edge's figure stands", "60.400",
     b'{"text":" hi","usage":{"type":"duration","seconds":61}}', None),
    ("an edge estimate over the rounded-up figure is corrected", "62.936",
     b'{"text":" hi","usage":{"type":"duration","seconds":62}}', "62.000"),
    ("a duration within 1%", "61.500", b'{"duration":61.05,"text":" hi"}', None),
    ("a transcript's own quotes are escaped: it cannot pass for the figure", "2.000",
     b'{"text":"say \\"usage\\":{\\"seconds\\":999}","usage":{"type":"duration","seconds":2}}', None),
    ("the engine's figure is bounded as the edge's is", "1.000",
     b'{"text":" hi","usage":{"type":"duration","seconds":99999999}}', "14400.000"),
])
def test_the_engines_own_figure_goes_to_the_log_where_it_differs_from_the_edges(why, edge, body, engine):
    metadata = {"whisper_gateway": {"model": BIG, "audio_seconds": edge}}
    answer = open_filter().run_response(200, JSON, metadata, body=body)
    assert answer.error is None, answer.error
    assert answer.metadata["whisper_gateway"].get("audio_engine_seconds") == engine, why
    assert answer.headers == [(":status", "200")] + JSON + [("content-length", str(len(body)))]  # untouched


def test_answers_the_filter_did_not_route_checked_against_the_data_or_that_carry_no_figure_are_not_read():
    routed = {"whisper_gateway": {"model": BIG, "audio_seconds": "1.000"}}
    checked = {"whisper_gateway": {"model": BIG, "audio_seconds": "1.000", "audio_checked": "1"}}  # a WAV's bytes
    chunked = JSON + [("transfer-encoding", "chunked")]  # of unknown size: Envoy would buffer all of it
    for status, headers, metadata in ((200, JSON, None), (200, JSON, checked), (200, chunked, routed),
                                      (200, [("content-type", "text/event-stream")], routed),
                                      (200, [("content-type", "text/plain")], routed), (500, JSON, routed)):
        answer = open_filter().run_response(status, headers, metadata, body=b'{"usage":{"seconds":61}}')
        assert answer.error is None and answer.body_calls == 0, (status, headers)
        assert "audio_engine_seconds" not in answer.metadata.get("whisper_gateway", {})


def test_a_container_whose_claim_its_data_disproves_is_metered_by_its_data_and_marked():
    honest = silent_wav(10.0)
    lying = bytearray(honest)
    lying[28:32] = (32000 * 10).to_bytes(4, "little")  # the byte rate x10: the header claims 1 s
    outcome = open_filter().run_request(headers=FORM, body=form(audio=bytes(lying)))
    assert_routed(outcome, BIG)
    assert outcome.header("x-whisper-audio-seconds") == "10.000"  # the samples a decoder plays
    assert outcome.metadata["whisper_gateway"]["audio_claimed"] == "1.000"
    assert outcome.metadata["whisper_gateway"]["audio_checked"] == "1"  # the engine's figure need not be read
    assert "audio_claimed" not in open_filter().run_request(headers=FORM, body=form(audio=honest)).metadata[
        "whisper_gateway"]


# -- every corpus file's duration, as tests/test_audio_seconds.py expects of it through Envoy -----------------------


@pytest.mark.e2e  # the corpus is made by encoders (harness/audio_corpus.py)
def test_every_corpus_file_is_measured_through_the_filter_as_envoy_meters_it(corpus):  # noqa: F811
    """The clips test_audio_seconds sends through a real Envoy, with its limits and expectations:
    exact containers within EXACT_TOLERANCE_S and not marked; estimates marked, within 0.1 s + 1 %."""
    lua = LuaFilter(parse_config({"models": [{"name": BIG, "aliases": [ALIAS]}], "backends": [],
                                  "limits": {"max_upload_mb": 64.0, "max_audio_s": MAX_AUDIO_S}}))
    measured = {}
    for clip in corpus:
        outcome = lua.run_request(headers=FORM, body=multipart([("model", ALIAS, None),
                                                                ("file", clip.path.read_bytes(), clip.path.name)]))
        assert_routed(outcome, BIG)
        seconds, estimated = float(outcome.header("x-whisper-audio-seconds")), outcome.header("x-whisper-audio-estimated")
        measured[clip.name] = seconds
        if clip.exact:
            assert abs(seconds - clip.seconds) <= EXACT_TOLERANCE_S, (clip.name, seconds, clip.seconds)
            assert estimated is None, clip.name
        else:
            assert abs(seconds - clip.seconds) <= 0.1 + 0.01 * clip.seconds, (clip.name, seconds, clip.seconds)
            assert estimated == "1", clip.name
    assert len(measured) == len(corpus) >= 40, json.dumps(measured)


# Of a 61 s clip whose header claims 1 s (harness/lying_audio.py): what the edge measures from the
# data, and how close it comes before the engine's figure corrects it (an estimate: marked).
LYING_EDGE = {"wav": (0.001, False), "flac": (0.001, False), "m4a-faststart": (0.01, False),
              "m4a-moov-at-end": (0.01, False), "webm": (0.01, True), "mp3-cbr": (0.01, True),
              "mp3-vbr": (0.05, True), "opus": (0.10, True), "vorbis": (0.25, True)}


@pytest.mark.e2e  # the corpus is made by encoders (harness/audio_corpus.py)
def test_a_container_whose_claim_its_data_disproves_is_measured_from_the_data(corpus):  # noqa: F811
    lua = LuaFilter(parse_config({"models": [{"name": BIG}], "backends": [], "limits": {"max_upload_mb": 64.0}}))
    assert set(LYING_EDGE) == set(LYING_KINDS)
    for clip in [c for c in corpus if c.name.startswith("61s-") and c.name.removeprefix("61s-") in LYING_KINDS]:
        kind = clip.name.removeprefix("61s-")
        outcome = lua.run_request(headers=FORM, body=form(audio=lying(clip.path, kind, clip.seconds),
                                                            filename=clip.path.name))
        assert_routed(outcome, BIG)
        seconds = float(outcome.header("x-whisper-audio-seconds"))
        tolerance, estimated = LYING_EDGE[kind]
        assert abs(seconds - clip.seconds) <= tolerance * clip.seconds, (kind, seconds)
        assert (outcome.header("x-whisper-audio-estimated") == "1") == estimated, kind
        assert abs(float(outcome.metadata["whisper_gateway"]["audio_claimed"]) - 1.0) <= 0.15, kind
        assert "audio_checked" not in outcome.metadata["whisper_gateway"] or kind == "wav", kind



def vbr_mp3(frames: int, claimed_frames: int) -> bytes:
    """MPEG-2 Layer III, mono, 16 kHz (576 samples, 36 ms a frame) in VBR's shape: a loud frame at
    128 kbit/s (576 bytes) then three quiet ones at 8 (36 bytes); the first carries a Xing header
    that counts `claimed_frames`."""
    def frame(bitrate_index: int, length: int, extra: bytes = b"") -> bytes:
        side = b"\0" * 9  # a mono MPEG-2 frame's side information
        return (bytes([0xFF, 0xF3, bitrate_index << 4 | 2 << 2, 0xC0]) + side + extra).ljust(length, b"\0")
    xing = b"Xing" + (1).to_bytes(4, "big") + claimed_frames.to_bytes(4, "big")
    out = [frame(12, 576, xing)]
    out += [frame(12, 576) if i % 4 == 0 else frame(1, 36) for i in range(1, frames)]
    return b"".join(out)


def test_a_vbr_mp3_whose_frame_count_lied_is_timed_by_its_frames_seconds_per_byte():
    """Its quiet frames are short and its loud ones long: each place read counts the seconds per
    byte of all its whole frames, not one frame's bit rate (which a place lands on a quiet one
    after most of its loud neighbours: 2.5x the truth here)."""
    frames = 1700  # 61.2 s
    data = vbr_mp3(frames, claimed_frames=28)  # about 1 s claimed
    audio_duration = open_filter().module("audio_duration").audio_duration
    seconds, estimated, claimed = audio_duration(lambda offset, n: data[offset:offset + n], len(data), "a.mp3", 14400)[:3]
    assert estimated and abs(claimed - 28 * 0.036) < 0.01
    assert abs(seconds - frames * 0.036) <= 0.03 * frames * 0.036, seconds

def coded_wav(seconds: float) -> bytes:
    """IMA ADPCM, 16 kHz mono: 256-byte blocks of 505 samples (about 8.1 kB a second)."""
    blocks = int(seconds * 16000 / 505)
    byte_rate = 16000 * 256 // 505
    fmt = (17).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little") + \
        byte_rate.to_bytes(4, "little") + (256).to_bytes(2, "little") + (4).to_bytes(2, "little")
    data = b"\x00" * (blocks * 256)
    return (b"RIFF" + (4 + 8 + len(fmt) + 8 + len(data)).to_bytes(4, "little") + b"WAVE" + b"fmt " +
            len(fmt).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data)


def test_a_coded_wav_is_timed_by_its_byte_rate_and_left_for_the_engine_to_confirm():
    outcome = open_filter().run_request(headers=FORM, body=form(audio=coded_wav(60.0)))
    assert_routed(outcome, BIG)
    assert abs(float(outcome.header("x-whisper-audio-seconds")) - 60.0) < 0.1  # not 60 / 256 x 505
    assert "audio_checked" not in outcome.metadata["whisper_gateway"]  # the engine's figure is read


def test_a_forged_last_flac_frame_never_takes_the_figure_under_the_raw_pcm_rate():
    stream_info = bytes.fromhex("10001000") + b"\x00" * 6 + ((16000 << 44) | (15 << 36) | 16000).to_bytes(8, "big")
    data = b"fLaC" + b"\x80\x00\x00\x22" + stream_info + b"\x00" * 16 + b"\x11" * 960000  # claims 1 s of 30 s
    frame = bytes([0xFF, 0xF8, 0xC5, 0x08, 0x00])  # frame number 0: the data "ends" at 4096 samples
    data += frame + bytes([lua_crc8(frame)])
    seconds = float(open_filter().run_request(headers=FORM, body=form(audio=data, filename="a.flac"))
                    .header("x-whisper-audio-seconds"))
    assert seconds >= len(data) * 8 / (16000 * 16 * 1.05) - 0.01  # at least what raw PCM would take


def lua_crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


# -- long recordings: to the longform workers above longform.split_above_s; their pieces neither admitted nor charged --


def longform_keys(envoys: int = 1) -> Keys:
    keys = Keys(auth={"plans": {"long": {"requests_per_minute": 100, "audio_seconds_per_minute": 100_000}}}, envoys=envoys)
    keys.config = replace(keys.config, longform=parse_config(RAW | {"longform": {
        "workers": 1, "split_above_s": 60.0, "pieces_per_engine": 8, "max_share": 0.5}}).longform)
    engines = [Backend(f"e{i}", "10.0.0.1", 9000 + i, (BIG,)) for i in range(5)] + [Backend("s", "10.0.0.2", 9000, (SMALL,))]
    keys.fleet = Fleet(models=keys.config.models, backends=tuple(engines))
    return keys


PIECE = {"whisper_gateway": {"piece": "1"}}  # what the pieces listener's first filter sets


@pytest.mark.parametrize("seconds,model,decided,to_workers,parallel", [
    (60.0, BIG, {}, False, None),  # at the threshold: whole, to one engine
    (61.0, BIG, {}, True, "40"),  # above it: to a worker, its pieces in every slot of five engines (8 each)
    (61.0, BIG, {BIG: 20, SMALL: 4}, True, "20"),  # as the control plane decided (decide/longform.py)
    (61.0, SMALL, {BIG: 20, SMALL: 4}, True, "4"),
])
def test_a_recording_above_the_threshold_goes_to_the_longform_workers(seconds, model, decided, to_workers, parallel):
    keys = longform_keys()
    keys.fleet = replace(keys.fleet, longform_parallel=decided)
    secret = keys.create("app", plan="long")
    outcome = keys.lua().run_request(headers=FORM | bearer(secret), body=form(model, silent_wav(seconds)))
    assert_routed(outcome, model)
    assert outcome.header("x-whisper-longform") == ("1" if to_workers else None)
    assert outcome.header("x-whisper-longform-parallel") == parallel
    assert outcome.header("x-whisper-key-id") == keys.ids["app"]  # admitted, metered and charged once, as a whole
    assert outcome.metadata["whisper_gateway"]["audio_cost"] == math.ceil(seconds) * BUDGET_SCALE
    assert outcome.metadata["whisper_gateway"]["audio_seconds"] == f"{seconds:.3f}"
    assert outcome.header("x-whisper-piece") is None


def test_a_clients_own_longform_and_piece_headers_are_dropped():
    keys = longform_keys()
    secret = keys.create("app", plan="long")
    forged = {"x-whisper-longform": "1", "x-whisper-longform-parallel": "64", "x-whisper-piece": "1"}
    outcome = keys.lua().run_request(headers=FORM | bearer(secret) | forged, body=form(BIG, silent_wav(5.0)))
    assert_routed(outcome, BIG)
    assert [outcome.header(name) for name in forged] == [None, None, None]


def test_a_piece_is_routed_without_a_key_and_marked_never_charged():
    keys = longform_keys()
    outcome = keys.lua().run_request(headers=FORM, body=form(BIG, silent_wav(29.5)), metadata=PIECE)
    assert_routed(outcome, BIG)
    assert outcome.header("x-whisper-piece") == "1"
    assert outcome.header("x-whisper-key-id") is None and "key_id" not in outcome.metadata["whisper_gateway"]
    assert not {"plan", "audio_cost", "request_cost"} & set(outcome.metadata["whisper_gateway"])  # no bucket charged
    # A piece above the threshold (a worker configured with longer pieces) still goes to an engine.
    long_piece = keys.lua().run_request(headers=FORM, body=form(BIG, silent_wav(61.0)), metadata=PIECE)
    assert_routed(long_piece, BIG)
    assert long_piece.header("x-whisper-longform") is None
    # Not hedged: a client's clip gets its try's deadline, a piece none (its recording has many out).
    assert outcome.header("x-envoy-upstream-rq-per-try-timeout-ms") is None
    secret = keys.create("app", plan="long")
    clip = keys.lua().run_request(headers=FORM | bearer(secret), body=form(BIG, silent_wav(29.5)))
    assert int(clip.header("x-envoy-upstream-rq-per-try-timeout-ms")) > 0


def test_without_the_mark_a_keyless_request_is_refused_as_before():
    keys = longform_keys()
    assert_error(keys.lua().run_request(headers=FORM, body=form(BIG, silent_wav(5.0))), 401, None,
                 code="invalid_api_key")


def test_without_workers_nothing_is_split_and_the_mark_means_nothing():
    outcome = open_filter().run_request(headers=FORM, body=form(BIG, silent_wav(400.0)), metadata=PIECE)
    assert_routed(outcome, BIG)
    assert outcome.header("x-whisper-longform") is None and outcome.header("x-whisper-piece") is None


def test_a_pieces_answer_tells_the_worker_its_recordings_share_now():
    keys = longform_keys()
    idle = keys.lua().run_response(200, {"content-type": "application/json"},
                                   metadata={"whisper_gateway": {"piece": "1", "model": BIG}}, body='{"text":" a"}')
    assert idle.header("x-whisper-longform-parallel") == "40"
    keys.fleet = replace(keys.fleet, longform_parallel={BIG: 2})
    busy = keys.lua().run_response(200, {"content-type": "application/json"},
                                   metadata={"whisper_gateway": {"piece": "1", "model": BIG}}, body='{"text":" a"}')
    assert busy.header("x-whisper-longform-parallel") == "2"
    client = keys.lua().run_response(200, {"content-type": "application/json"},
                                     metadata={"whisper_gateway": {"model": BIG}}, body='{"text":" a"}')
    assert client.header("x-whisper-longform-parallel") is None  # a client's own answer says nothing of it


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_a_recordings_answer_is_metered_by_what_its_worker_decoded(content_type):
    """Whatever the answer's format or size (a stream too): the worker's figure stands where it
    contradicts the edge's claim or estimate, bounded as any figure is; the header stays inside."""
    keys = longform_keys()
    lua = keys.lua()
    recording = {"whisper_gateway": {"longform": "1", "model": BIG, "audio_seconds": "31.600"}}
    outcome = lua.run_response(200, {"content-type": content_type, "x-whisper-recording-seconds": "61.020"},
                               metadata=recording)
    assert outcome.metadata["whisper_gateway"]["audio_engine_seconds"] == "61.020"
    assert outcome.header("x-whisper-recording-seconds") is None
    agreed = lua.run_response(200, {"content-type": content_type, "x-whisper-recording-seconds": "31.610"},
                              metadata=recording)
    assert "audio_engine_seconds" not in agreed.metadata["whisper_gateway"]
    absurd = lua.run_response(200, {"content-type": content_type, "x-whisper-recording-seconds": "1e12"},
                              metadata=recording)
    assert absurd.metadata["whisper_gateway"]["audio_engine_seconds"] == f"{keys.config.limits.max_audio_s:.3f}"
    failed = lua.run_response(500, {"content-type": content_type, "x-whisper-recording-seconds": "61.020"},
                              metadata=recording)
    assert "audio_engine_seconds" not in failed.metadata["whisper_gateway"]


# -- uploads too large to buffer: streamed to a worker unread, admitted once its worker has read them --

STREAMED_BYTES = 30 * 2**20  # over limits.max_upload_mb (25)


def test_an_upload_too_large_to_buffer_goes_to_a_worker_unread_charged_one_audio_second():
    keys = longform_keys()
    secret = keys.create("app", plan="long")
    outcome = keys.lua().run_request(headers=FORM | bearer(secret) | {"content-length": str(STREAMED_BYTES)})
    assert outcome.routed and outcome.route_cache_cleared, outcome.reply_body
    assert outcome.body_calls == 0  # never buffered
    assert outcome.header("x-whisper-longform") == "streamed" and outcome.header("x-whisper-model") is None
    assert outcome.header("x-whisper-key-id") == keys.ids["app"]
    fields = outcome.metadata["whisper_gateway"]
    assert (fields["streamed"], fields["longform"], fields["audio_seconds"]) == ("1", "1", "0.000")
    assert fields["audio_cost"] == BUDGET_SCALE and fields["key_id"] == keys.ids["app"]
    # At the limit: buffered and read as any upload.
    within = keys.lua().run_request(headers=FORM | bearer(secret), body=form(BIG, silent_wav(5.0)))
    assert_routed(within, BIG)
    assert within.body_calls == 1 and within.header("x-whisper-longform") is None


def test_an_upload_past_max_longform_mb_or_without_a_key_is_refused_at_its_headers():
    keys = longform_keys()
    secret = keys.create("app", plan="long")
    too_large = keys.lua().run_request(headers=FORM | bearer(secret) | {"content-length": str(2**31)})
    assert_error(too_large, 413, "file", error_type="RequestTooLargeError")
    assert "1024 MiB" in too_large.json["error"]["message"] and too_large.body_calls == 0
    keyless = keys.lua().run_request(headers=FORM | {"content-length": str(STREAMED_BYTES)})
    assert_error(keyless, 401, None, code="invalid_api_key")
    # Without longform workers an upload is buffered whatever it declares (Envoy answers 413 past the limit).
    assert open_filter().run_request(headers=FORM | {"content-length": str(STREAMED_BYTES)}).body_calls == 1


def admit(keys: Keys, model: str, seconds: float, key: str | None, metadata: dict | None = PIECE):
    headers = {"x-whisper-admit-model": model, "x-whisper-recording-seconds": f"{seconds:.3f}"}
    return keys.lua().run_request(headers=headers | ({"x-whisper-admit-key": key} if key else {}), metadata=metadata)


def test_a_workers_question_is_answered_as_the_upload_would_have_been():
    keys = longform_keys()
    keys.config = replace(keys.config, auth=replace(keys.config.auth, plans=keys.config.auth.plans | parse_config(
        RAW | {"auth": {"api_keys": "required", "plans": PLANS}}).auth.plans))
    keys.fleet = replace(keys.fleet, longform_parallel={BIG: 20})
    long_secret = keys.create("app", plan="long")
    keys.create("small", models=(SMALL,), plan="long")
    keys.create("minute", plan="audio")  # 20 audio-seconds a minute
    yes = admit(keys, ALIAS, 200.0, keys.ids["app"])
    assert yes.status == 204 and yes.body_calls == 0
    assert yes.reply_headers["x-whisper-model"] == BIG  # the model's own name, for its answer's metering
    assert yes.reply_headers["x-whisper-longform-parallel"] == "20"
    # The same answers as an upload of the same gets at the audio listener.
    unknown = admit(keys, "whisper-huge", 200.0, keys.ids["app"])
    buffered = keys.lua().run_request(headers=FORM | bearer(long_secret), body=form("whisper-huge"))
    assert_error(unknown, 404, "model")
    assert unknown.json == buffered.json
    assert_error(admit(keys, BIG, 200.0, keys.ids["small"]), 403, "model", code="model_not_allowed")
    plan = assert_error(admit(keys, BIG, 200.0, keys.ids["minute"]), 429, "file", code="rate_limit_exceeded")
    assert plan["message"] == "This upload is 200 audio-seconds; the API key's plan allows 20 per minute."
    assert_error(admit(keys, BIG, 200.0, "key-revoked"), 401, None, code="invalid_api_key")


def test_only_the_pieces_listener_takes_a_workers_question():
    keys = longform_keys()
    secret = keys.create("app", plan="long")
    asked = {"x-whisper-admit-model": BIG, "x-whisper-admit-key": keys.ids["app"]}
    outcome = keys.lua().run_request(headers=FORM | bearer(secret) | asked, body=form(BIG, silent_wav(5.0)))
    assert_routed(outcome, BIG)  # a client's upload, the question's headers dropped
    assert [outcome.header(name) for name in asked] == [None, None]
    assert_error(admit(keys, BIG, 200.0, keys.ids["app"], metadata=None), 401, None, code="invalid_api_key")


def test_a_streamed_recordings_answer_names_what_its_log_meters():
    """Its worker's model (one this gateway serves) and length (bounded) into the metadata its
    request log meters by; neither header leaves Envoy."""
    keys = longform_keys()
    lua = keys.lua()
    streamed = {"whisper_gateway": {"longform": "1", "streamed": "1", "audio_seconds": "0.000"}}
    said = {"content-type": "application/json", "x-whisper-recording-seconds": "200.020", "x-whisper-recording-model": BIG}
    outcome = lua.run_response(200, said, metadata=streamed)
    fields = outcome.metadata["whisper_gateway"]
    assert (fields["model"], fields["audio_seconds"]) == (BIG, "200.020") and "audio_engine_seconds" not in fields
    assert outcome.header("x-whisper-recording-seconds") is None and outcome.header("x-whisper-recording-model") is None
    unknown = lua.run_response(200, said | {"x-whisper-recording-model": ALIAS}, metadata=streamed)
    assert "model" not in unknown.metadata["whisper_gateway"]  # an alias or a stranger: not metered by it
    absurd = lua.run_response(200, said | {"x-whisper-recording-seconds": "1e12"}, metadata=streamed)
    assert absurd.metadata["whisper_gateway"]["audio_seconds"] == f"{keys.config.limits.max_audio_s:.3f}"
