"""vLLM's OpenAI-compatible audio surface, shared by every engine in this project.

An engine supplies a `SpeechBackend` (how it turns audio into segments and how loaded it is);
this module parses the multipart form, rejects bad input in vLLM's error shape, and shapes the
answer (json, text, verbose_json, srt, vtt, or an SSE stream) as vLLM does.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from aiohttp import web
from aiohttp.web_request import FileField

from engines.common.errors import INVALID_AUDIO, EngineError, missing_field
from engines.common.metrics import EngineLoad, VllmMetrics

# Whisper's languages in the order vLLM lists them.
LANGUAGES = (
    "af ar hy az be bs bg ca zh hr cs da nl en et fi fr gl de el he hi hu is id it ja kn kk ko lv lt mk "
    "ms mr mi ne no fa pl pt ro ru sr sk sl es sw sv tl ta th tr uk ur vi cy"
).split()
KNOWN_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
DEFAULT_MAX_UPLOAD_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class SpeechRequest:
    """One transcription or translation, validated."""

    task: str  # "transcribe" or "translate"
    model: str
    audio: bytes
    filename: str
    language: str | None
    prompt: str
    response_format: str
    temperature: float
    stream: bool


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()


@dataclass
class Transcript:
    """What a backend produced: segments arrive while decoding, duration once audio is read."""

    duration: float
    language: str
    segments: AsyncIterator[Segment]


class SpeechBackend(Protocol):
    """The part that differs between engines."""

    name: str
    served_models: tuple[str, ...]
    # Formats answered natively; other known formats get vLLM's 400.
    response_formats: tuple[str, ...]
    # vLLM answers response_format=text with JSON; an engine may answer plain text instead.
    text_format_is_json: bool

    async def transcribe(self, request: SpeechRequest) -> Transcript: ...

    def load(self) -> EngineLoad: ...


@dataclass
class EngineInfo:
    version: str = "0.32.0"
    max_model_len: int = 448
    created: int = field(default_factory=lambda: int(time.time()))


def _parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off", ""):
        return False
    raise EngineError(400, f"Input should be a valid boolean, unable to interpret input: {value!r}", "Bad Request",
                      f"body.{name}")


def _parse_temperature(value: str) -> float:
    try:
        temperature = float(value)
    except ValueError:
        raise EngineError(400, f"Input should be a valid number: {value!r}", "Bad Request", "body.temperature") from None
    if not 0.0 <= temperature <= 1.0 or math.isnan(temperature):
        raise EngineError(400, "temperature must be between 0 and 1", "Bad Request", "body.temperature")
    return temperature


def parse_form(form, task: str, backend: SpeechBackend) -> SpeechRequest:
    """Checks a posted form in the order vLLM does and returns the request it describes."""
    upload = form.get("file")
    if not isinstance(upload, FileField):
        raise missing_field("file", len(form) + 13)
    response_format = str(form.get("response_format", "json"))
    if response_format not in KNOWN_FORMATS and response_format != "diarized_json":
        # vLLM's pydantic union of two literals, word for word.
        expected = "'json', 'text', 'srt', 'verbose_json' or 'vtt'"
        message = (
            "2 validation errors:\n"
            f"  {{'type': 'literal_error', 'loc': 'body.response_format', 'msg': \"Input should be {expected}\", "
            f"'input': {response_format!r}, 'ctx': {{'expected': \"{expected}\"}}}}\n"
            f"  {{'type': 'literal_error', 'loc': 'body.response_format', 'msg': \"Input should be 'diarized_json'\", "
            f"'input': {response_format!r}, 'ctx': {{'expected': \"'diarized_json'\"}}}}"
        )
        raise EngineError(400, message, "Bad Request", "body.response_format")
    model = str(form.get("model") or backend.served_models[0])
    if model not in backend.served_models:
        raise EngineError(
            404,
            f"The model `{model}` does not exist. Valid aliases: {', '.join(backend.served_models)}.",
            "NotFoundError",
            "model",
        )
    language = form.get("language") or None
    if language is not None and language not in LANGUAGES:
        raise EngineError(400, f"Unsupported language: {language!r}.  Must be one of {list(LANGUAGES)}.")
    if response_format not in backend.response_formats:
        raise EngineError(400, "Currently only support response_format: `text`, `json`, `verbose_json` or "
                               "`diarized_json`")
    audio = upload.file.read()
    if not audio:
        raise EngineError(400, INVALID_AUDIO)
    return SpeechRequest(
        task=task,
        model=model,
        audio=audio,
        filename=upload.filename or "audio",
        language=str(language) if language else None,
        prompt=str(form.get("prompt", "")),
        response_format=response_format,
        temperature=_parse_temperature(str(form.get("temperature", "0"))),
        stream=_parse_bool(str(form.get("stream", "false")), "stream"),
    )


def _timestamp(seconds: float, separator: str) -> str:
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def render_subtitles(segments: list[Segment], response_format: str) -> str:
    """SRT or WebVTT cues, one per segment."""
    if response_format == "vtt":
        cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
        return "WEBVTT\n\n" + "\n".join(cues)
    cues = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def _verbose_segment(index: int, segment: Segment, temperature: float) -> dict:
    return {
        "id": index,
        "avg_logprob": -0.1,
        "compression_ratio": 1.0,
        "end": round(segment.end, 3),
        "no_speech_prob": None,
        "seek": 0,
        "start": round(segment.start, 3),
        "temperature": temperature,
        "text": segment.text,
        "tokens": list(segment.tokens),
    }


class EngineApp:
    """The aiohttp application around one backend."""

    def __init__(self, backend: SpeechBackend, metrics: VllmMetrics, info: EngineInfo | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, api_key: str | None = None):
        self.backend = backend
        self.metrics = metrics
        self.info = info or EngineInfo()
        self.max_upload_bytes = max_upload_bytes
        self.api_key = api_key

    def build(self) -> web.Application:
        # Room for the other form fields and the multipart framing around the file.
        app = web.Application(client_max_size=self.max_upload_bytes + 1024 * 1024,
                              middlewares=[self._authenticate, self._errors])
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        app.router.add_post("/v1/audio/translations", self._translations)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/version", self._version)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/load", self._load)
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        """vLLM's --api-key: every /v1 path needs `Authorization: Bearer <key>`; /health and /metrics do not."""
        if self.api_key is not None and request.path.startswith("/v1") and not secrets.compare_digest(
                request.headers.get("Authorization", "").encode(), f"Bearer {self.api_key}".encode()):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except EngineError as error:
            return error.response()
        except web.HTTPRequestEntityTooLarge:
            return EngineError(
                413, f"Request body exceeds the maximum upload size of {self.max_upload_bytes} bytes.", "BadRequestError"
            ).response()
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)

    async def _transcriptions(self, request: web.Request) -> web.StreamResponse:
        return await self._speech(request, "transcribe")

    async def _translations(self, request: web.Request) -> web.StreamResponse:
        return await self._speech(request, "translate")

    async def _speech(self, request: web.Request, task: str) -> web.StreamResponse:
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise
        except Exception as error:  # noqa: BLE001 - any parser failure is the client's malformed form
            # vLLM answers malformed forms with a 400; a 500 here would count against the engine.
            raise EngineError(400, f"Malformed multipart body: {type(error).__name__}: {error}"[:500],
                              "Bad Request") from None
        speech = parse_form(form, task, self.backend)
        transcript = await self.backend.transcribe(speech)
        if speech.stream:
            return await self._stream(request, speech, transcript)
        segments = [segment async for segment in transcript.segments]
        text = "".join(segment.text for segment in segments)
        fmt = speech.response_format
        if fmt in ("srt", "vtt"):
            return web.Response(text=render_subtitles(segments, fmt), content_type="text/plain")
        if fmt == "text" and not self.backend.text_format_is_json:
            return web.Response(text=text, content_type="text/plain")
        if fmt == "verbose_json":
            body = {
                "duration": transcript.duration,
                "language": transcript.language,
                "text": text,
                "segments": [_verbose_segment(i, s, speech.temperature) for i, s in enumerate(segments)],
                "words": None,
            }
            if task == "translate":
                body["language"] = "en"
            return web.json_response(body)
        body = {"text": text}
        if task == "transcribe":
            body["usage"] = {"type": "duration", "seconds": math.ceil(transcript.duration)}
        return web.json_response(body)

    async def _stream(self, request: web.Request, speech: SpeechRequest, transcript: Transcript) -> web.StreamResponse:
        """SSE in vLLM's chunk format: one chunk per word as segments are decoded."""
        prefix, kind = ("transcribe", "transcription.chunk") if speech.task == "transcribe" else ("trsl", "translation.chunk")
        request_id = f"{prefix}-{secrets.token_hex(8)}"
        created = int(time.time())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(choice: dict) -> None:
            chunk = {"id": request_id, "object": kind, "created": created, "model": speech.model, "choices": [choice]}
            await response.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())

        async for segment in transcript.segments:
            for word in segment.text.split(" "):
                if word:
                    await send({"delta": {"content": " " + word}})
        await send({"delta": {"content": ""}, "finish_reason": "stop", "stop_reason": None})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": model,
                "object": "model",
                "created": self.info.created,
                "owned_by": "vllm",
                "root": model,
                "parent": None,
                "max_model_len": self.info.max_model_len,
            }
            for model in self.backend.served_models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.info.version})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def _load(self, request: web.Request) -> web.Response:
        load = self.backend.load()
        return web.json_response({"server_load": load.running + load.waiting})
