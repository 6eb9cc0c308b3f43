"""Long recordings split across the fleet, end to end: Envoy sends an admitted upload above
longform.split_above_s to a longform worker, which cuts it, sends the pieces back through Envoy's
pieces listener to the model's engines at once, and answers as one engine would have. The
recording is metered once, for its whole duration; its pieces count as their engines' work."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from control_plane.config.longform import pieces_socket, worker_socket
from engines.common.audio import silent_wav
from harness.processes import (GatewayStack, multipart, request, socket_dir, start_engine, start_longform_worker,
                               transcribe, unix_request, wait_until)

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"
NAMES = ["e1", "e2", "e3", "e4"]
RECORDING_S = 95.0  # four pieces: three of about 29 s and the rest
ALIAS = "transcriber"
# A 16 kHz 16-bit WAV is 32 kB a second: 95 s are buffered as any upload, 200 s stream to a worker.
MAX_UPLOAD_MB, MAX_LONGFORM_MB = 4, 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("longform")
    engines = [start_engine(tmp_path, MODEL, name, time_scale=0.01)[1] for name in NAMES]
    sockets = socket_dir()
    worker = start_longform_worker(tmp_path, sockets)
    gateway = GatewayStack(tmp_path, MODEL, engines, aliases=(ALIAS,), longform={
        "workers": 1, "socket_dir": sockets, "split_above_s": 60.0},
        limits={"max_upload_mb": MAX_UPLOAD_MB, "max_longform_mb": MAX_LONGFORM_MB},
        auth={"api_keys": "required", "plans": {"long": {"requests_per_minute": 600, "audio_seconds_per_minute": 10000},
                                                "minute": {"requests_per_minute": 600, "audio_seconds_per_minute": 120}}})
    key = gateway.admin.call("POST", "/keys", {"name": "recorder", "plan": "long"}).json()
    gateway.key_id, gateway.bearer = key["id"], {"Authorization": f"Bearer {key['secret']}"}
    wait_until(lambda: all(h.get("health_flags") == "healthy"
                           for h in gateway.envoy.endpoints().get("whisper:longform", {"-": {}}).values()),
               10, "Envoy to find the worker healthy")
    yield gateway
    gateway.stop()
    worker.stop()


def usage(stack, key: str | None = None) -> tuple[int, float]:
    """Requests and audio-seconds served today, as billed: every key's, or `key`'s."""
    rows = stack.admin.call("GET", "/usage" + (f"?key={key}" if key else "")).json()["data"]
    return sum(r["requests"] for r in rows), round(sum(r["audio_served_s"] for r in rows), 3)


def pieces_in(text: str) -> list[tuple[str, float]]:
    """(engine, seconds) of each piece, from the simulated engines' text: one 30 s window each."""
    return [(name, float(seconds)) for name, seconds in re.findall(r" (e\d) transcribed chunk 1 of 1 \(([\d.]+) s\)", text)]


def test_a_long_recording_is_split_across_the_engines_and_billed_once(stack):
    before, before_key = usage(stack), usage(stack, stack.key_id)
    answer = transcribe(stack.envoy.url, MODEL, seconds=RECORDING_S, headers=stack.bearer)
    assert answer.status == 200, answer.text
    body = answer.json()
    assert body["usage"] == {"type": "duration", "seconds": 95}
    pieces = pieces_in(body["text"])
    assert len(pieces) == 4 and round(sum(s for _, s in pieces), 1) == RECORDING_S, body["text"]
    assert all(s <= 30.0 for _, s in pieces)
    assert len({name for name, _ in pieces}) >= 2  # at once, on several engines
    # The recording, once, for its whole duration: not its pieces too.
    once = (before[0] + 1, round(before[1] + RECORDING_S, 3))
    wait_until(lambda: usage(stack) == once, 10, "the recording metered")
    assert usage(stack, stack.key_id) == (before_key[0] + 1, round(before_key[1] + RECORDING_S, 3))  # to its key
    # The pieces' logs went out before the recording's answer; one more request metered after it
    # (its logs flushed later) shows nothing of theirs came late either.
    assert transcribe(stack.envoy.url, MODEL, seconds=1.0, headers=stack.bearer).status == 200
    wait_until(lambda: usage(stack)[0] == once[0] + 1, 10, "a clip metered after the recording")
    assert usage(stack) == (once[0] + 1, round(once[1] + 1.0, 3))
    # Envoy's logs name the worker by its socket, which the plane knows: nothing it reported was dropped.
    assert "whisper_gateway_reports_dropped_total{" not in stack.admin.call("GET", "/metrics").text
    assert stack.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_total") > 0


def test_verbose_json_is_timed_across_the_whole_recording(stack):
    answer = transcribe(stack.envoy.url, MODEL, seconds=RECORDING_S, headers=stack.bearer, extra=[("response_format", "verbose_json", None)])
    assert answer.status == 200, answer.text
    body = answer.json()
    assert body["duration"] == RECORDING_S
    segments = body["segments"]
    assert [s["id"] for s in segments] == list(range(4))
    assert segments[0]["start"] == 0.0 and segments[-1]["end"] == pytest.approx(RECORDING_S, abs=0.01)
    assert all(a["end"] == pytest.approx(b["start"], abs=0.01) for a, b in zip(segments, segments[1:]))


def test_a_streamed_recording_sends_its_pieces_in_order(stack):
    answer = transcribe(stack.envoy.url, MODEL, seconds=RECORDING_S, headers=stack.bearer, extra=[("stream", "true", None)])
    assert answer.status == 200, answer.text
    events = [line.removeprefix("data: ") for line in answer.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    lengths = [s for _, s in pieces_in(text)]
    assert len(lengths) == 4 and lengths[-1] < 29  # in the recording's order: the short rest last
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_recording_below_the_threshold_goes_whole_to_one_engine(stack):
    answer = transcribe(stack.envoy.url, MODEL, seconds=50.0, headers=stack.bearer)
    assert answer.status == 200, answer.text
    assert " transcribed chunk 1 of 2 " in answer.json()["text"]  # the engine cut it into its own windows


# Another user's try at each socket, as a process of that user would make it.
CONNECT = """import socket, sys
for path in sys.argv[1:]:
    try:
        socket.socket(socket.AF_UNIX).connect(path)
        print("connected")
    except OSError as error:
        print(type(error).__name__)
"""


def test_no_other_user_can_hand_a_worker_a_recording_or_send_a_piece(stack):
    """The workers and the pieces listener listen on no port: on Unix sockets in a directory only
    the gateway's user may enter. Its own worker's way works (a piece needs no key); another
    user's process is refused by the kernel before a byte is read."""
    sockets = stack.raw["longform"]["socket_dir"]
    pieces, worker = pieces_socket(sockets), worker_socket(sockets, 0)
    listeners = {s["name"]: s["local_address"] for s in
                 request("GET", stack.envoy.admin + "/listeners?format=json").json()["listener_statuses"]}
    assert listeners["whisper_pieces"] == {"pipe": {"path": pieces}}
    assert [oct(os.stat(path).st_mode & 0o777) for path in (sockets, pieces, worker)] == ["0o700", "0o600", "0o600"]
    body = multipart([("model", MODEL, None), ("file", silent_wav(1.0), "clip.wav")])
    piece = unix_request("POST", pieces, "/v1/audio/transcriptions", body,
                         {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk"})
    assert piece.status == 200, piece.body
    assert unix_request("GET", worker, "/health").status == 200
    if os.geteuid() != 0:
        return  # only root can run a process as another user here; the modes above say the same
    other = subprocess.run(["/usr/bin/python3", "-c", CONNECT, pieces, worker], user=65534, group=65534,
                           capture_output=True, text=True, timeout=30, cwd="/")
    assert other.stdout.split() == ["PermissionError", "PermissionError"], other


def test_a_recording_without_a_key_is_refused_before_any_worker_sees_it(stack):
    sent = "cluster.whisper_longform.upstream_rq_total"
    before = stack.envoy.stat(sent)
    assert transcribe(stack.envoy.url, MODEL, seconds=RECORDING_S, headers=stack.bearer).status == 200
    wait_until(lambda: stack.envoy.stat(sent) == before + 1, 5, "a keyed recording counted at the worker")
    before += 1
    answer = transcribe(stack.envoy.url, MODEL, seconds=RECORDING_S)
    assert answer.status == 401, answer.text
    assert stack.envoy.stat(sent) == before


def test_a_recording_the_edge_can_only_estimate_is_billed_by_what_its_worker_decoded(stack, tmp_path):
    """Raw ADTS AAC: the edge cannot parse it and estimates its length from its size (half of it,
    here); the worker decodes it whole, and the key is billed the 150 s it holds."""
    aac = tmp_path / "recording.aac"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=300:duration=150:sample_rate=16000", "-ac", "1", "-c:a", "aac", "-b:a", "64k",
                    "-f", "adts", "-y", str(aac)], check=True, timeout=60)
    before = usage(stack, stack.key_id)
    answer = transcribe(stack.envoy.url, MODEL, headers=stack.bearer, audio=aac.read_bytes())
    assert answer.status == 200, answer.text
    assert answer.json()["usage"]["seconds"] in (150, 151)  # AAC adds its encoder's priming samples
    assert "x-whisper-recording-seconds" not in answer.headers
    wait_until(lambda: usage(stack, stack.key_id)[1] - before[1] == pytest.approx(150.0, abs=0.2), 10,
               "the recording billed by its decoded length")
    assert usage(stack, stack.key_id)[0] == before[0] + 1


STREAMED_S = 200.0  # 6.4 MB: over max_upload_mb, so Envoy does not buffer it


def test_an_upload_too_large_to_buffer_streams_to_a_worker_and_is_billed_once(stack):
    """Over limits.max_upload_mb: not the 413 a buffered upload gets, but its worker's answer,
    named by an alias and billed once to its key under the model's own name."""
    before, before_key = usage(stack), usage(stack, stack.key_id)
    answer = transcribe(stack.envoy.url, ALIAS, seconds=STREAMED_S, headers=stack.bearer,
                        extra=[("response_format", "verbose_json", None)])
    assert answer.status == 200, answer.text
    body = answer.json()
    assert body["duration"] == STREAMED_S and len(body["segments"]) >= 7  # each at most 30 s
    assert body["segments"][-1]["end"] == pytest.approx(STREAMED_S, abs=0.01)
    assert not any(name.startswith("x-whisper-recording") for name in answer.headers)
    once = (before[0] + 1, round(before[1] + STREAMED_S, 3))
    wait_until(lambda: usage(stack) == once, 10, "the streamed recording metered")
    assert usage(stack, stack.key_id) == (before_key[0] + 1, round(before_key[1] + STREAMED_S, 3))
    rows = stack.admin.call("GET", f"/usage?key={stack.key_id}").json()["data"]
    assert {r["model"] for r in rows} == {MODEL}


def test_a_streamed_upload_is_refused_as_a_buffered_one_is(stack, tmp_path):
    """What its worker learns only after spooling it (the model, the key's plan) refuses it with the
    gateway's own answer, and bills nothing."""
    before = usage(stack)
    small = transcribe(stack.envoy.url, "whisper-huge", seconds=1.0, headers=stack.bearer)
    large = transcribe(stack.envoy.url, "whisper-huge", seconds=STREAMED_S, headers=stack.bearer)
    assert (small.status, large.status) == (404, 404), large.text
    assert large.json() == small.json()
    missing = transcribe(stack.envoy.url, None, seconds=STREAMED_S, headers=stack.bearer)
    assert missing.status == 400 and missing.json()["error"]["param"] == "model", missing.text
    # Past max_longform_mb: refused at its headers, before a byte of it is sent (curl asks first:
    # Expect: 100-continue).
    audio = tmp_path / "long.wav"
    audio.write_bytes(silent_wav(300.0))
    curl = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-H", f"Authorization: {stack.bearer['Authorization']}", "-F", f"model={MODEL}", "-F", f"file=@{audio}",
        stack.envoy.url + "/v1/audio/transcriptions"], capture_output=True, text=True, timeout=30)
    body, status = curl.stdout.rsplit("\n", 1)
    assert status == "413", curl
    assert f"{MAX_LONGFORM_MB} MiB" in json.loads(body)["error"]["message"]
    assert transcribe(stack.envoy.url, MODEL, seconds=1.0, headers=stack.bearer).status == 200
    wait_until(lambda: usage(stack)[0] == before[0] + 1, 10, "a clip metered after the refusals")
    assert usage(stack) == (before[0] + 1, round(before[1] + 1.0, 3))


def test_a_streamed_recording_longer_than_the_keys_plan_allows_is_refused(stack):
    key = stack.admin.call("POST", "/keys", {"name": "short", "plan": "minute"}).json()
    bearer = {"Authorization": f"Bearer {key['secret']}"}
    wait_until(lambda: transcribe(stack.envoy.url, MODEL, seconds=1.0, headers=bearer).status == 200, 10,
               "the new key at Envoy")
    answer = transcribe(stack.envoy.url, MODEL, seconds=STREAMED_S, headers=bearer)
    assert answer.status == 429, answer.text
    assert answer.json()["error"]["message"] == ("This upload is 200 audio-seconds; the API key's plan allows 120 "
                                                 "per minute.")
