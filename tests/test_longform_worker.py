"""The longform worker as a client sees it (control_plane/longform/worker.py).

A real worker process (`whisper-gateway longform-worker`) sends its pieces straight to a simulated
engine, or to a pieces endpoint the tests steer (run here, on its own loop in a thread): one that
answers subtitles, fails a piece, holds pieces, or drops the connection. The recording is 95.5 s of
tone with three 0.3 s silences, so where each cut falls is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
from array import array
from pathlib import Path

import pytest
from aiohttp import web

from control_plane.longform import cuts
from control_plane.names import LONGFORM_PARALLEL_HEADER, MODEL_HEADER
from engines.common.api import EngineApp
from engines.common.errors import INVALID_AUDIO, error_body
from engines.common.metrics import VllmMetrics
from engines.simulated.queue_model import GpuProfile
from engines.simulated.server import SimulatedBackend
from harness.processes import PYTHON, Process, free_port, multipart, post_form, request, start_engine, wait_until

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"
SECONDS = 95.5
SILENCES = (29.4, 58.7, 88.1)  # each 0.3 s: the quietest part of the last five seconds before each 30 s
# Where the cuts fall (the middle of the silent 0.1 s windows in each pause) and each piece's length.
OFFSETS = (0.0, 29.55, 58.85, 88.25)  # the middle of each pause (cuts.py)
LENGTHS = (29.55, 29.3, 29.4, 7.25)
TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
SPEED = {"time_scale": 0.01}  # the simulated engines' work, 100x faster than real time
PIECE_FAILURE = error_body("piece 1 failed on every engine", "InternalServerError", None, 500)


def tone() -> bytes:
    """SECONDS of a 440 Hz tone, silent where SILENCES say, as a 16 kHz mono WAV."""
    rate = cuts.RATE
    samples = array("h", (round(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(round(SECONDS * rate))))
    for start in SILENCES:
        samples[round(start * rate):round((start + 0.3) * rate)] = array("h", bytes(2 * round(0.3 * rate)))
    return cuts.wav(samples, cuts.Piece(0, 0, len(samples)))


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("longform-audio")
    wav = folder / "tone.wav"
    wav.write_bytes(tone())
    encoded = {"wav": wav.read_bytes()}
    for name, suffix, codec in (("mp3", "mp3", "libmp3lame"), ("opus", "ogg", "libopus"), ("m4a", "m4a", "aac")):
        out = folder / f"tone.{suffix}"  # ffmpeg writes an M4A's moov at its end: the worker must seek
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(wav), "-c:a", codec, "-y", str(out)],
                       check=True, timeout=60)
        encoded[name] = out.read_bytes()
    return encoded


def start_worker(log_dir: Path, name: str, pieces_url: str, spool: Path, *options: str) -> str:
    port = free_port()
    spool.mkdir(exist_ok=True)
    process = Process(name, [PYTHON, "-m", "control_plane", "longform-worker", "--listen", f"127.0.0.1:{port}",
                             "--pieces", pieces_url, "--max-upload-mb", "8", *options], log_dir, env={"TMPDIR": str(spool)})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: process.alive() and request("GET", url + "/health", timeout=2).status == 200, 20, f"{name} health")
    return url


class SubtitlesBackend(SimulatedBackend):
    """A simulated engine that answers srt and vtt too (as faster-whisper's here do; vLLM 0.32 does not)."""

    response_formats = ("json", "text", "verbose_json", "srt", "vtt")


class Pieces:
    """A pieces endpoint the tests steer: a simulated engine's answers, in the mode `mode` says.

    answer: as the engine; pairs: the first pieces wait until two are in at once; fail: piece 1
    answers 500; hold: every piece waits forever (until its connection closes); drop: the
    connection is closed. It counts the pieces in at once, the most seen, and those cancelled.
    """

    def __init__(self):
        self.mode = "answer"
        self.rates: list[int] = []
        # Each piece as it came: (file name, response_format, language, the pieces answered before it came).
        self.forms: list[tuple[str, str, str | None, int]] = []
        self.answered = 0
        self.in_flight = self.most = self.arrived = self.cancelled = 0
        self.changed = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        backend = SubtitlesBackend("pieces", (MODEL,), GpuProfile(time_scale=0.01))
        app = EngineApp(backend, VllmMetrics(MODEL, backend.load)).build()
        app.middlewares.append(self._steer)
        self.two_in, self.three_in = asyncio.Event(), asyncio.Event()
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def reset(self, mode: str) -> None:
        with self.changed:
            self.mode, self.most, self.arrived, self.cancelled, self.failed_once = mode, 0, 0, 0, False
            self.rates, self.forms, self.answered = [], [], 0
        self.loop.call_soon_threadsafe(self.two_in.clear)
        self.loop.call_soon_threadsafe(self.three_in.clear)

    def _count(self, **change: int) -> None:
        with self.changed:
            for name, by in change.items():
                setattr(self, name, getattr(self, name) + by)
            self.most = max(self.most, self.in_flight)
            self.changed.notify_all()

    def wait(self, what, timeout: float = 10) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: what(self), timeout), \
                f"in flight {self.in_flight}, arrived {self.arrived}, cancelled {self.cancelled}"

    @web.middleware
    async def _steer(self, request: web.Request, handler):
        if not request.path.startswith("/v1/audio"):
            return await handler(request)
        form = await request.post()  # kept: the engine's handler reads the same form
        piece = form["file"].filename
        head = form["file"].file.read(28)
        form["file"].file.seek(0)
        self.rates.append(int.from_bytes(head[24:28], "little"))  # the WAV's sample rate
        with self.changed:
            self.forms.append((piece, form.get("response_format"), form.get("language"), self.answered))
        self._count(in_flight=1, arrived=1)
        try:
            if self.in_flight >= 2:
                self.two_in.set()
            if self.in_flight >= 3:
                self.three_in.set()
            if self.mode == "pairs" and piece in ("piece-0.wav", "piece-1.wav"):
                await self.two_in.wait()
            if self.mode == "widen":  # the first answer says three may be out: the other three wait for it
                if piece != "piece-0.wav":
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.three_in.wait(), 5)
                answer = await handler(request)
                answer.headers[LONGFORM_PARALLEL_HEADER] = "3"
                return answer
            if self.mode == "hold":
                await asyncio.Event().wait()
            if self.mode == "fail" and piece == "piece-1.wav":
                return web.json_response(PIECE_FAILURE, status=500)
            if self.mode == "fail-once" and piece == "piece-1.wav" and not self.failed_once:
                self.failed_once = True
                return web.json_response(PIECE_FAILURE, status=500)
            if self.mode == "fail-late" and piece == "piece-3.wav":  # after the first pieces were streamed
                return web.json_response(PIECE_FAILURE, status=400)
            if self.mode == "bad-input" and piece == "piece-1.wav":
                return web.json_response(PIECE_FAILURE, status=400)
            if self.mode == "drop":
                request.transport.close()
                return web.Response()
            answer = await handler(request)
            self._count(answered=1)
            return answer
        except asyncio.CancelledError:
            self._count(cancelled=1)
            raise
        finally:
            self._count(in_flight=-1)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> str:
    """A worker whose pieces go to a simulated engine (a real process)."""
    log_dir = tmp_path_factory.mktemp("longform-simulated")
    _, engine = start_engine(log_dir, MODEL, "sim", **SPEED)
    return start_worker(log_dir, "worker-simulated", engine, log_dir / "spool")


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    """A worker whose pieces go to a Pieces endpoint; yields (worker URL, Pieces, its spool folder)."""
    log_dir = tmp_path_factory.mktemp("longform-steered")
    pieces = Pieces()
    try:
        yield start_worker(log_dir, "worker-steered", pieces.url, log_dir / "spool"), pieces, log_dir / "spool"
    finally:
        pieces.stop()


def send(url: str, audio: bytes, path: str = TRANSCRIPTIONS, headers: dict | None = None, **fields: str):
    parts = [("model", "whisper-1", None), ("file", audio, "recording")] + [(k, v, None) for k, v in fields.items()]
    return post_form(url + path, parts, headers={MODEL_HEADER: MODEL} | (headers or {}), timeout=60)


def piece_texts(verb: str = "transcribed", name: str = "sim") -> list[str]:
    return [f" {name} {verb} chunk 1 of 1 ({length:.2f} s) for {MODEL}." for length in LENGTHS]


def lengths_in(text: str) -> list[float]:
    return [float(seconds) for seconds in re.findall(r"\(([\d.]+) s\)", text)]


# -- what a client sees ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("container", ["wav", "mp3", "opus", "m4a"])
def test_json_is_the_pieces_text_joined_and_the_whole_duration(simulated, audio, container):
    answer = send(simulated, audio[container])
    assert answer.status == 200, answer.text
    body = answer.json()
    # The model the Lua filter resolved (MODEL_HEADER), not the alias the client named.
    assert body["usage"] == {"type": "duration", "seconds": math.ceil(SECONDS)}
    if container == "wav":
        assert body["text"] == "".join(piece_texts())
    else:  # lossy codecs blur the silences' edges: each cut falls somewhere in its 0.3 s of silence
        lengths = lengths_in(body["text"])
        assert len(lengths) == len(LENGTHS) and sum(lengths) == pytest.approx(SECONDS, abs=0.1), body["text"]
        assert lengths == pytest.approx(LENGTHS, abs=0.3)


def test_verbose_json_segments_are_moved_and_renumbered(simulated, audio):
    body = send(simulated, audio["wav"], response_format="verbose_json", language="en").json()
    assert body["duration"] == SECONDS and body["language"] == "en" and body["words"] is None
    assert [s["id"] for s in body["segments"]] == [0, 1, 2, 3]
    assert [s["start"] for s in body["segments"]] == list(OFFSETS)
    assert [s["end"] for s in body["segments"]] == [round(o + n, 3) for o, n in zip(OFFSETS, LENGTHS)]
    assert [s["text"] for s in body["segments"]] == piece_texts()


def test_a_translation_is_joined_too(simulated, audio):
    answer = send(simulated, audio["wav"], path=TRANSLATIONS, response_format="text")
    assert answer.json() == {"text": "".join(piece_texts("translated"))}  # vLLM answers text as JSON


@pytest.mark.parametrize("path,prefix,kind,verb", [(TRANSCRIPTIONS, "transcribe-", "transcription.chunk", "transcribed"),
                                                    (TRANSLATIONS, "trsl-", "translation.chunk", "translated")])
def test_stream_sends_the_pieces_deltas_in_order_then_done(simulated, audio, path, prefix, kind, verb):
    answer = send(simulated, audio["wav"], path=path, stream="true", response_format="verbose_json")
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in answer.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {(c["id"], c["object"], c["model"]) for c in chunks} == {(chunks[0]["id"], kind, MODEL)}
    assert chunks[0]["id"].startswith(prefix)
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:-1]] == piece_texts(verb)
    assert chunks[-1]["choices"] == [{"delta": {"content": ""}, "finish_reason": "stop", "stop_reason": None}]


@pytest.mark.parametrize("response_format", ["srt", "vtt"])
def test_subtitles_are_retimed_and_renumbered(steered, audio, response_format):
    url, pieces, _ = steered
    pieces.reset("answer")
    answer = send(url, audio["wav"], response_format=response_format)
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain"), answer.text
    stamps = [f"{_stamp(o, response_format)} --> {_stamp(o + n, response_format)}" for o, n in zip(OFFSETS, LENGTHS)]
    texts = [text.strip() for text in piece_texts(name="pieces")]
    if response_format == "srt":
        expected = "\n".join(f"{i}\n{stamp}\n{text}\n" for i, (stamp, text) in enumerate(zip(stamps, texts), 1))
    else:
        expected = "WEBVTT\n\n" + "\n".join(f"{stamp}\n{text}\n" for stamp, text in zip(stamps, texts))
    assert answer.text == expected


def _stamp(seconds: float, response_format: str) -> str:
    millis = round(seconds * 1000)
    separator = "," if response_format == "srt" else "."
    return f"00:{millis // 60000:02d}:{millis // 1000 % 60:02d}{separator}{millis % 1000:03d}"


# -- refusals and failures -------------------------------------------------------------------------------------

@pytest.mark.parametrize("audio_bytes", [b"this is not audio at all" * 100, b""], ids=["garbage", "empty"])
def test_what_ffmpeg_cannot_decode_is_vllms_400(simulated, audio_bytes):
    answer = send(simulated, audio_bytes)
    assert answer.status == 400
    assert answer.json() == {"error": {"message": INVALID_AUDIO, "type": "BadRequestError", "param": None, "code": 400}}


def test_a_form_without_its_file_is_vllms_400(simulated):
    answer = post_form(simulated + TRANSCRIPTIONS, [("model", MODEL, None)])
    assert answer.status == 400 and answer.json()["error"]["param"] == "body.file"


def test_an_upload_over_the_limit_is_413(simulated):
    answer = send(simulated, bytes(9 * 2**20))
    assert answer.status == 413
    assert answer.json()["error"] == {"message": "Request body is larger than the gateway's upload limit of 8 MiB.",
                                      "type": "RequestTooLargeError", "param": None, "code": 413}


def test_a_piece_that_fails_every_try_is_the_recordings_answer(steered, audio):
    url, pieces, _ = steered
    pieces.reset("fail")
    answer = send(url, audio["wav"])
    assert answer.status == 500 and answer.json() == PIECE_FAILURE
    assert pieces.arrived >= 3  # piece 1 was asked three times


def test_a_piece_an_engine_failed_once_is_asked_again(steered, audio):
    url, pieces, _ = steered
    pieces.reset("fail-once")
    answer = send(url, audio["wav"])
    assert answer.status == 200, answer.text
    assert pieces.arrived == 5 and len(lengths_in(answer.json()["text"])) == 4


def test_a_piece_refused_as_bad_input_is_not_asked_again(steered, audio):
    url, pieces, _ = steered
    pieces.reset("bad-input")
    answer = send(url, audio["wav"])
    assert answer.status == 400 and answer.json() == PIECE_FAILURE


def test_a_streamed_recording_that_fails_late_says_so_and_is_cut_not_ended(steered, audio):
    """The 200 went out with the first pieces' text: the error comes as an event, and the stream
    is cut rather than ended with [DONE] (Envoy then logs, and the gateway meters, a failure)."""
    url, pieces, _ = steered
    pieces.reset("fail-late")
    port = int(url.rsplit(":", 1)[1])
    boundary = "longformlate"
    body = multipart([("model", MODEL, None), ("stream", "true", None), ("file", audio["wav"], "recording.wav")], boundary)
    head = (f"POST {TRANSCRIPTIONS} HTTP/1.1\r\nHost: worker\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{MODEL_HEADER}: {MODEL}\r\n\r\n")
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(head.encode() + body)
        while data := client.recv(65536):
            received += data
    text = received.decode(errors="replace")
    assert text.startswith("HTTP/1.1 200") and "x-whisper-recording-seconds: 95.500" in text.lower()
    assert '"transcription.chunk"' in text and '"piece 1 failed on every engine"' in text
    assert "[DONE]" not in text and not text.endswith("0\r\n\r\n")  # no end of the chunked body


def test_a_recording_longer_than_the_gateway_takes_is_refused_before_any_piece(tmp_path, audio):
    pieces = Pieces()
    try:
        url = start_worker(tmp_path, "worker-short", pieces.url, tmp_path / "spool", "--max-audio-s", "60")
        answer = send(url, audio["wav"])
        assert answer.status == 400 and "95.5 s of audio" in answer.json()["error"]["message"], answer.text
        assert pieces.arrived == 0
    finally:
        pieces.stop()


def test_the_answer_says_how_long_the_recording_decoded_to(simulated, audio):
    answer = send(simulated, audio["mp3"])
    assert answer.status == 200 and float(answer.headers["x-whisper-recording-seconds"]) == pytest.approx(SECONDS, abs=0.1)


def test_a_pieces_listener_that_drops_the_connection_is_502(steered, audio):
    url, pieces, _ = steered
    pieces.reset("drop")
    answer = send(url, audio["wav"])
    assert answer.status == 502 and answer.json()["error"]["type"] == "BadGatewayError", answer.text


@pytest.mark.parametrize("mode,header,most", [
    ("pairs", "2", 2),  # never more out at once than the recording came with
    ("widen", "1", 3),  # it came with one at a time; the first answer says three (the model's clients left)
])
def test_no_more_pieces_at_once_than_the_share_says(steered, audio, mode, header, most):
    url, pieces, _ = steered
    pieces.reset(mode)
    answer = send(url, audio["wav"], headers={LONGFORM_PARALLEL_HEADER: header}, language="en")  # no detection first
    assert answer.status == 200, answer.text
    assert pieces.arrived == 4 and pieces.most == most


def test_a_client_that_goes_away_cancels_its_pieces(steered, audio):
    url, pieces, spool = steered
    pieces.reset("hold")
    boundary = "longformdisconnect"
    body = multipart([("file", audio["wav"], "recording.wav"), ("language", "en", None)], boundary)
    head = (f"POST {TRANSCRIPTIONS} HTTP/1.1\r\nHost: worker\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{MODEL_HEADER}: {MODEL}\r\n"
            f"{LONGFORM_PARALLEL_HEADER}: 2\r\n\r\n")
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(head.encode() + body)
        pieces.wait(lambda p: p.in_flight == 2)
        assert any(spool.iterdir())  # the upload, spooled while it is decoded
    pieces.wait(lambda p: p.cancelled == 2 and p.in_flight == 0)
    assert pieces.arrived == 2  # and no piece was sent after
    wait_until(lambda: not any(spool.iterdir()), 10, "the spooled upload to be deleted")


def test_a_telephone_recording_goes_in_pieces_at_its_own_rate(steered, audio, tmp_path):
    """8 kHz in, 8 kHz pieces (the engines resample anyway): half the bytes of 16 kHz ones."""
    url, pieces, _ = steered
    pieces.reset("answer")
    wav = tmp_path / "tone.wav"
    wav.write_bytes(audio["wav"])
    narrow = tmp_path / "tone-8k.wav"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(wav), "-ar", "8000", "-y", str(narrow)],
                   check=True, timeout=60)
    answer = send(url, narrow.read_bytes(), response_format="verbose_json")
    assert answer.status == 200, answer.text
    assert set(pieces.rates) == {8000} and len(pieces.rates) == 4
    assert [s["start"] for s in answer.json()["segments"]] == pytest.approx(list(OFFSETS), abs=0.1)
    assert answer.json()["duration"] == pytest.approx(SECONDS, abs=0.01)


# -- one language for the whole recording ----------------------------------------------------------------------

@pytest.mark.parametrize("response_format,stream", [("json", "false"), ("text", "false"), ("verbose_json", "false"),
                                                    ("json", "true")])
def test_the_first_piece_names_the_language_every_other_piece_is_sent_in(steered, audio, response_format, stream):
    """Where the client names none: the first piece alone, asked for verbose_json; the others once
    it has answered, in the language it heard (one detection, as vLLM makes for a whole upload),
    and the answer in the format asked for."""
    url, pieces, _ = steered
    pieces.reset("answer")
    answer = send(url, audio["wav"], response_format=response_format, stream=stream)
    assert answer.status == 200, answer.text
    asked = "json" if stream == "true" else response_format
    assert pieces.forms[0] == ("piece-0.wav", "verbose_json", None, 0)
    assert [form[1:3] for form in pieces.forms[1:]] == [(asked, "en")] * 3
    assert all(before >= 1 for *_, before in pieces.forms[1:])  # sent once the first had answered
    if stream == "true":
        assert lengths_in(answer.text) == pytest.approx(list(LENGTHS))
    elif response_format == "text":
        assert answer.text == "".join(piece_texts(name="pieces")) and answer.headers["Content-Type"].startswith("text/plain")
    else:
        body = answer.json()
        assert body["text"] == "".join(piece_texts(name="pieces"))
        assert body.get("language") == ("en" if response_format == "verbose_json" else None)
        if response_format == "json":
            assert body == {"text": body["text"], "usage": {"type": "duration", "seconds": 96}}


@pytest.mark.parametrize("path,fields", [(TRANSCRIPTIONS, {"language": "de"}), (TRANSLATIONS, {}),
                                         (TRANSCRIPTIONS, {"response_format": "srt"})])
def test_pieces_go_out_at_once_where_there_is_nothing_to_detect(steered, audio, path, fields):
    """A language the client named goes to every piece as it came; a translation's pieces (English
    out, whatever came in) and subtitles (which say no language) detect nothing first."""
    url, pieces, _ = steered
    pieces.reset("pairs")  # the first two pieces answer only once both are in
    answer = send(url, audio["wav"], path, headers={LONGFORM_PARALLEL_HEADER: "2"}, **fields)
    assert answer.status == 200, answer.text
    assert [form[2] for form in pieces.forms] == [fields.get("language")] * 4
    assert "verbose_json" not in {form[1] for form in pieces.forms}


# -- kept running beside Envoy ----------------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listed:
        return [int(child) for child in listed.read().split()]


def test_a_worker_kept_running_is_started_again_when_it_dies(tmp_path):
    """`--keep-running` (how `whisper-gateway envoy` starts its workers in a container): a worker
    killed is serving again a moment later; SIGTERM stops the keeper and its worker."""
    port = free_port()
    keeper = Process("keeper", [PYTHON, "-m", "control_plane", "longform-worker", "--listen", f"127.0.0.1:{port}",
                                "--pieces", "http://127.0.0.1:9", "--keep-running"], tmp_path)
    health = f"http://127.0.0.1:{port}/health"
    wait_until(lambda: request("GET", health, timeout=2).status == 200, 20, "the worker")
    [first] = children_of(keeper.popen.pid)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: children_of(keeper.popen.pid) not in ([], [first]) and request("GET", health, timeout=2).status == 200,
               20, "the worker started again")
    [second] = children_of(keeper.popen.pid)
    assert "exited with status -9" in keeper.log_path.read_text()
    keeper.popen.send_signal(signal.SIGTERM)
    assert keeper.popen.wait(10) == 0
    wait_until(lambda: not Path(f"/proc/{second}").exists(), 10, "the worker stopped with its keeper")
