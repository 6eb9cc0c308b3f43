"""The longform worker: one long recording in, its pieces out to the fleet, one answer back.

Envoy routes an admitted long upload here as the client sent it (multipart POST to
/v1/audio/transcriptions or /translations), with the model the Lua filter resolved (MODEL_HEADER)
and how many of its pieces may be at the engines at once (LONGFORM_PARALLEL_HEADER). The upload's
file is spooled to a temporary file (a decoder needs a seekable input: an MP4 whose moov comes last),
decoded (decode.py: FFmpeg's libraries through PyAV) to 16 kHz mono (or the recording's own lower rate) as it comes, and cut (cuts.py) whenever more than a piece
is buffered: each piece goes at once to the pieces listener (routed, retried and hedged by Envoy),
so a recording holds about one piece of PCM in memory, however long. The answers are joined
(answers.py) as one engine's, or streamed in vLLM's SSE chunks in the recording's order.

A piece answered non-2xx (Envoy has already retried it) fails the recording with that answer as it
is; a client that goes away cancels the pieces still out, the decoding and the spooled file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from control_plane.longform import answers, cuts, decode
from control_plane.longform.sockets import ensure_private
from control_plane.names import (ADMIT_KEY_HEADER, ADMIT_MODEL_HEADER, AUDIO_PATHS, KEY_ID_HEADER, LONGFORM_HEADER,
                                 LONGFORM_PARALLEL_HEADER, LONGFORM_STREAMED, MODEL_HEADER, RECORDING_MODEL_HEADER,
                                 RECORDING_SECONDS_HEADER)
from engines.common.errors import INVALID_AUDIO, EngineError, missing_field
from engines.common.runner import serve_until_signal

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4
MAX_PARALLEL = 256  # pieces of one recording out at once: about 256 MB of WAV at most
DEFAULT_MAX_UPLOAD_MB = 1024.0
DEFAULT_MAX_AUDIO_S = 14400.0  # limits.max_audio_s's default
PIECE_TRIES = 3  # a piece an engine answered 5xx is asked again, up to this many times in all
READ_BYTES = 1 << 16
# The client's fields that are the worker's to set on each piece (the rest go as they came).
OWN_FIELDS = {"file", "model", "response_format", "stream", "stream_include_usage", "stream_continuous_usage_stats"}
# What travels from the recording's request to each piece's: its trace, nothing else (never a key).
FORWARDED_HEADERS = ("traceparent", "tracestate")
TRUE = ("true", "1", "yes", "on")


def parallel_pieces(value: str | None) -> int:
    """LONGFORM_PARALLEL_HEADER's value, bounded; the default where absent or not a number."""
    try:
        return min(MAX_PARALLEL, max(1, int(value))) if value is not None else DEFAULT_PARALLEL
    except ValueError:
        return DEFAULT_PARALLEL


class Slots:
    """How many of a recording's pieces may be out at once: the limit Envoy gave with the
    recording, then whatever each piece's answer says (it moves with the clients' own requests at
    the model: decide/longform.py). A lower limit takes effect as pieces come back."""

    def __init__(self, limit: int):
        self.limit, self.out = limit, 0
        self.most = self.least = limit  # the limits it was given, for the recording's log line
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.out < self.limit)
            self.out += 1

    async def release(self, limit: int | None = None) -> None:
        async with self._changed:
            self.out -= 1
            if limit is not None:
                self.limit, self.most, self.least = limit, max(self.most, limit), min(self.least, limit)
            self._changed.notify_all()


class TooLarge(Exception):
    pass


class Failed(Exception):
    """The recording's answer when it cannot be joined: a piece's own error, or the worker's."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None):
        super().__init__(status)
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers or {}

    @classmethod
    def of(cls, error: EngineError) -> Failed:
        response = error.response()
        return cls(error.status, response.body, "application/json")

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type=self.content_type, headers=self.headers)


def invalid_audio() -> Failed:
    return Failed.of(EngineError(400, INVALID_AUDIO))


@dataclass
class Upload:
    path: str
    fields: list[tuple[str, str]]  # the client's other fields, in order (repeated ones kept)
    model: str | None
    response_format: str
    stream: bool
    task: str  # "transcribe" or "translate"


class Recording:
    """One upload's decoding, pieces and answer."""

    def __init__(self, worker: Worker, request: web.Request, upload: Upload):
        self.worker, self.request, self.upload = worker, request, upload
        self.slots = Slots(parallel_pieces(request.headers.get(LONGFORM_PARALLEL_HEADER)))
        self.pieces: list[cuts.Piece] = []
        self.samples, self.rate = 0, cuts.RATE
        self.stream: web.StreamResponse | None = None
        self.streamed = ""  # the last delta sent, for the space between pieces' texts
        # One language for the whole recording, as vLLM detects one for a whole upload: where the
        # client names none, the first piece goes alone, asked for verbose_json (which says what
        # its engine heard), and the others name that language: one detection, not one a piece.
        self.language: str | None = None
        self.heard = asyncio.Event()
        if not self._detects_language():
            self.heard.set()

    async def answer(self) -> web.StreamResponse:
        self.began = time.monotonic()
        try:
            self.duration, self.rate = await decode.probe(self.upload.path)
        except decode.Undecodable as error:
            log.info("recording %s: not decodable: %s", self._id(), error)
            return invalid_audio().response()
        if not self.duration:
            return invalid_audio().response()
        if self.duration > self.worker.max_audio_s:
            return Failed.of(EngineError(400, f"The recording is {self.duration:.1f} s of audio; this gateway takes "
                                              f"at most {self.worker.max_audio_s:.0f} s in one upload.")).response()
        try:
            if self.request.headers.get(LONGFORM_HEADER) == LONGFORM_STREAMED:
                await self._admit()
            # What the Lua filter meters the recording by, in place of the edge's figure (envoy/metering.lua).
            self.headers = {RECORDING_SECONDS_HEADER: f"{self.duration:.3f}", RECORDING_MODEL_HEADER: self.upload.model}
            collected = await self._pieces_answered()
        except Failed as failure:
            log.info("recording %s: %s after %d pieces", self._id(), failure.status, len(self.pieces))
            return await self._failed(failure)
        except asyncio.CancelledError:
            log.info("recording %s: the client went away; its pieces cancelled", self._id())
            raise
        log.info("recording %s: %d pieces, %.1f s of audio, %d-%d at once, in %.1f s", self._id(), len(self.pieces),
                 self.samples / self.rate, self.slots.least, self.slots.most, time.monotonic() - self.began)
        if self.upload.stream:
            return await self._finish()
        joined = answers.join(collected, self.pieces, self.upload.response_format, self.samples / self.rate, self.rate)
        if isinstance(joined, dict):
            return web.json_response(joined, headers=self.headers)
        return web.Response(text=joined, content_type="text/plain", headers=self.headers)

    async def _admit(self) -> None:
        """An upload too large for Envoy to buffer came unread (envoy/longform.lua): now that its
        model and length are known, the pieces listener admits it as the Lua filter would have (the
        model, the key's access to it, its plan), or Failed with the filter's own answer."""
        headers = {ADMIT_MODEL_HEADER: self.upload.model, RECORDING_SECONDS_HEADER: f"{self.duration:.3f}",
                   ADMIT_KEY_HEADER: self.request.headers.get(KEY_ID_HEADER, "")}
        try:
            async with self.worker.session.post(self.worker.pieces_url + self.request.path, headers=headers) as response:
                answer = await response.read()
                if response.status != 204:
                    kept = {name: response.headers[name] for name in ("retry-after",) if name in response.headers}
                    raise Failed(response.status, answer, response.content_type, kept)
                self.upload.model = response.headers.get(MODEL_HEADER, self.upload.model)  # its own name, not an alias
                self.slots.limit = parallel_pieces(response.headers.get(LONGFORM_PARALLEL_HEADER))
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("recording %s: admission: %s", self._id(), type(error).__name__)
            raise Failed.of(EngineError(502, f"The recording could not be admitted: the pieces listener failed "
                                             f"({type(error).__name__}).", "BadGatewayError")) from None

    async def _pieces_answered(self) -> list:
        """Every piece's answer, in order (each streamed as it comes, with stream=true); Failed at the
        first failure, every other piece and the decoding stopped by then."""
        collected = []
        try:
            async with asyncio.TaskGroup() as group:
                queue: asyncio.Queue = asyncio.Queue()
                group.create_task(self._decode(group, queue))
                while (piece := await queue.get()) is not None:
                    collected.append(await piece)
                    if self.upload.stream:
                        await self._delta(collected[-1])
        except* Failed as failures:
            raise failures.exceptions[0] from None
        return collected

    def _id(self) -> str:
        return self.request.headers.get("x-request-id", "-")

    async def _decode(self, group: asyncio.TaskGroup, queue: asyncio.Queue) -> None:
        """The recording's PCM as it is decoded, a piece sent whenever more than one is buffered."""
        buffer, start = array("h"), 0  # start: the recording's sample at buffer[0]
        try:
            async for data in decode.pcm(self.upload.path, self.rate):
                buffer.extend(cuts.pcm16(data))
                while (end := cuts.cut(buffer, rate=self.rate)) is not None:
                    await self._dispatch(group, queue, buffer, start, end)
                    del buffer[:end]
                    start += end
        except decode.Undecodable as error:
            log.info("recording %s: not decodable: %s", self._id(), error)
            raise invalid_audio() from None
        self.samples = start + len(buffer)
        if not self.samples:
            raise invalid_audio()
        if buffer:
            await self._dispatch(group, queue, buffer, start, len(buffer))
        await queue.put(None)

    def _detects_language(self) -> bool:
        """Whether the first piece must tell the others their language: a transcription naming
        none, answered as JSON (subtitles carry no language; a translation's is English)."""
        named = any(name == "language" and value.strip() for name, value in self.upload.fields)
        formats = ("json", "text", "verbose_json")
        return self.upload.task == "transcribe" and not named and (self.upload.stream or self.upload.response_format in formats)

    async def _dispatch(self, group: asyncio.TaskGroup, queue: asyncio.Queue, buffer: array, start: int,
                        end: int) -> None:
        if self.pieces:
            await self.heard.wait()  # the first piece's answer names the language the others are sent in
        await self.slots.acquire()
        piece = cuts.Piece(len(self.pieces), start, start + end)
        self.pieces.append(piece)
        body = cuts.wav(buffer, cuts.Piece(piece.index, 0, end), self.rate)
        await queue.put(group.create_task(self._send(piece, body)))

    async def _send(self, piece: cuts.Piece, body: bytes):
        """One piece's answer: its parsed JSON, or its text; Failed with its error as it came. An
        engine's 5xx (Envoy already retried what it retries: a connection refused, a 503) is asked
        again, up to PIECE_TRIES in all: one engine's failure does not cost the whole recording."""
        limit = None  # what the piece's answers say the recording may hold now
        detects = not self.heard.is_set()  # the first piece, whose answer names the recording's language
        try:
            for attempt in range(1, PIECE_TRIES + 1):
                status, answer, content_type, said = await self._post(piece, body, detects)
                limit = said if said is not None else limit
                if 200 <= status < 300:
                    answer = json.loads(answer) if content_type == "application/json" else answer.decode()
                    if detects:
                        self.language = answers.language_code(answer)
                        answer = answers.from_verbose(answer, "json" if self.upload.stream else self.upload.response_format)
                    return answer
                if status < 500 or attempt == PIECE_TRIES:
                    raise Failed(status, answer, content_type)
                log.info("recording %s: piece %d answered %d; asking again", self._id(), piece.index, status)
        except (ValueError, UnicodeDecodeError) as error:
            raise Failed.of(EngineError(502, f"A piece of the recording got an answer that could not be read "
                                             f"({type(error).__name__}).", "BadGatewayError")) from None
        except asyncio.CancelledError:
            limit = -1  # the recording is over: its slot is not given to a next piece
            raise
        finally:
            if detects:
                self.heard.set()
            if limit != -1:
                await self.slots.release(limit)

    async def _post(self, piece: cuts.Piece, body: bytes, detects: bool = False) -> tuple[int, bytes, str, int | None]:
        """One try of a piece at the pieces listener: (status, body, content type, the share its
        answer says); `detects`: asked for verbose_json, whose answer names its language."""
        form = aiohttp.FormData()
        form.add_field("file", body, filename=f"piece-{piece.index}.wav", content_type="audio/wav")
        if self.upload.model:
            form.add_field("model", self.upload.model)
        for name, value in self.upload.fields:
            form.add_field(name, value)
        if self.language and not detects:
            form.add_field("language", self.language)
        form.add_field("response_format", "verbose_json" if detects else
                       "json" if self.upload.stream else self.upload.response_format)
        headers = {name: self.request.headers[name] for name in FORWARDED_HEADERS if name in self.request.headers}
        if self.upload.model:
            headers[MODEL_HEADER] = self.upload.model
        try:
            async with self.worker.session.post(self.worker.pieces_url + self.request.path, data=form,
                                                headers=headers) as response:
                said = response.headers.get(LONGFORM_PARALLEL_HEADER)
                return (response.status, await response.read(), response.content_type,
                        parallel_pieces(said) if said is not None else None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.warning("recording %s: piece %d: %s", self._id(), piece.index, type(error).__name__)
            raise Failed.of(EngineError(502, f"A piece of the recording could not be transcribed: the pieces "
                                             f"listener failed ({type(error).__name__}).", "BadGatewayError")) from None

    # -- stream=true: vLLM's SSE chunks -------------------------------------------------------------------

    async def _send_chunk(self, choice: dict) -> None:
        chunk = {"id": self.stream_id, "object": self.stream_object, "created": self.created,
                 "model": self.upload.model, "choices": [choice]}
        await self.stream.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())

    async def _delta(self, answer) -> None:
        """A piece's text, sent once it and every piece before it are done."""
        if self.stream is None:  # the first piece answered: the recording's status is 200
            prefix, kind = ("transcribe", "transcription") if self.upload.task == "transcribe" else ("trsl", "translation")
            self.stream_id, self.stream_object = f"{prefix}-{secrets.token_hex(8)}", f"{kind}.chunk"
            self.created = int(time.time())
            self.stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                                             | self.headers)
            await self.stream.prepare(self.request)
        text = (answer.get("text") or "") if isinstance(answer, dict) else answer
        delta = answers.join_text([self.streamed, text])[len(self.streamed):]
        if delta:
            await self._send_chunk({"delta": {"content": delta}})
            self.streamed = delta

    async def _finish(self) -> web.StreamResponse:
        await self._send_chunk({"delta": {"content": ""}, "finish_reason": "stop", "stop_reason": None})
        await self.stream.write(b"data: [DONE]\n\n")
        await self.stream.write_eof()
        return self.stream

    async def _failed(self, failure: Failed) -> web.StreamResponse:
        if self.stream is None:
            return failure.response()
        # Already streaming (200 sent): the error as an event, as vLLM sends one, then the connection
        # is cut rather than ended with [DONE], so that Envoy logs the recording as failed, not served.
        await self.stream.write(b"data: " + failure.body.strip() + b"\n\n")
        self.request.transport.abort()
        return self.stream


class Worker:
    """The worker's HTTP side: one ClientSession to the pieces listener for every recording."""

    def __init__(self, pieces: str, max_upload_bytes: int, max_audio_s: float = DEFAULT_MAX_AUDIO_S):
        # unix:PATH, Envoy's pieces listener's socket (the URL's host is then only a name), or a URL.
        self.pieces_socket = pieces.removeprefix("unix:") if pieces.startswith("unix:") else None
        self.pieces_url = "http://localhost" if self.pieces_socket else pieces.rstrip("/")
        self.max_upload_bytes, self.max_audio_s = max_upload_bytes, max_audio_s
        self.session: aiohttp.ClientSession | None = None

    def build(self) -> web.Application:
        # A client that goes away cancels its handler (off by default since aiohttp 3.9), and so its
        # pieces, the decoding and the spooled file.
        app = web.Application(handler_args={"handler_cancellation": True})
        for path in AUDIO_PATHS:
            app.router.add_post(path, self._speech)
        app.router.add_get("/health", self._health)
        app.cleanup_ctx.append(self._client)
        return app

    async def _client(self, app: web.Application):
        # No limit of the session's own: each recording keeps to its LONGFORM_PARALLEL_HEADER, and Envoy
        # times each piece out.
        connector = (aiohttp.UnixConnector(self.pieces_socket, limit=0) if self.pieces_socket
                     else aiohttp.TCPConnector(limit=0))
        self.session = aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        yield
        await self.session.close()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    def _too_large(self) -> web.Response:
        return EngineError(413, f"Request body is larger than the gateway's upload limit of "
                                f"{self.max_upload_bytes / 2**20:g} MiB.", "RequestTooLargeError").response()

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self.max_upload_bytes:
            return self._too_large()
        descriptor, path = tempfile.mkstemp(prefix="longform-")
        try:
            with os.fdopen(descriptor, "wb") as spool:
                upload = await self._read_form(request, spool, path)
            return await Recording(self, request, upload).answer()
        except TooLarge:
            return self._too_large()
        except EngineError as error:
            return error.response()
        except Failed as failure:
            return failure.response()
        except Exception:  # noqa: BLE001 - a bug answers in vLLM's shape too, and is logged
            log.exception("recording %s failed", request.headers.get("x-request-id", "-"))
            return EngineError(500, "The recording could not be transcribed (an error in the gateway's "
                                    "longform worker).", "InternalServerError").response()
        finally:
            os.unlink(path)

    async def _read_form(self, request: web.Request, spool, path: str) -> Upload:
        """The form's fields, its file written to `spool` as it arrives (never whole in memory)."""
        fields: list[tuple[str, str]] = []
        size, has_file = 0, False
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, aiohttp.BodyPartReader):
                    raise ValueError("a nested multipart part")
                is_file = part.name == "file" and not has_file
                value = bytearray()
                while data := await part.read_chunk(READ_BYTES):
                    size += len(data)
                    if size > self.max_upload_bytes:
                        raise TooLarge()
                    if is_file:
                        spool.write(data)
                    else:
                        value += data
                if is_file:
                    has_file = True
                elif part.name:
                    fields.append((part.name, value.decode("utf-8", errors="replace")))
        except (ValueError, KeyError, AssertionError, aiohttp.ClientError, web.HTTPException) as error:
            # vLLM answers malformed forms with a 400, as the engines here do (engines/common/api.py).
            raise EngineError(400, f"Malformed multipart body: {type(error).__name__}: {error}"[:500],
                              "Bad Request") from None
        if not has_file:
            raise missing_field("file", len(fields) + 13)
        form = dict(fields)
        if not (request.headers.get(MODEL_HEADER) or form.get("model")):  # only a streamed upload comes unread
            raise EngineError(400, "Missing form field `model`.", "BadRequestError", "model")  # the Lua filter's words
        return Upload(
            path=path,
            fields=[(name, value) for name, value in fields if name not in OWN_FIELDS],
            model=request.headers.get(MODEL_HEADER) or form.get("model") or None,
            response_format=form.get("response_format") or "json",
            stream=form.get("stream", "").strip().lower() in TRUE,
            task="translate" if request.path.endswith("/translations") else "transcribe",
        )


async def serve(listen: str | tuple[str, int], pieces: str, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                max_audio_s: float = DEFAULT_MAX_AUDIO_S) -> int:
    """Runs the worker until SIGTERM or SIGINT; the recordings in flight are let finish. `listen`:
    a Unix socket's path, in a directory only this user may enter (sockets.py), or (host, port)."""
    worker = Worker(pieces, int(max_upload_mb * 2**20), max_audio_s)
    description = f"longform worker (pieces to {pieces})"
    if isinstance(listen, str):
        ensure_private(Path(listen).parent)
        await serve_until_signal(worker.build(), "", 0, description, path=listen)
    else:
        await serve_until_signal(worker.build(), *listen, description)
    return 0
