"""The simulated engine's backend: audio length in, queueing delay, deterministic text out."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

from engines.common.api import Segment, SpeechRequest, Transcript
from engines.common.audio import audio_duration_seconds
from engines.common.metrics import EngineLoad, VllmMetrics
from engines.simulated.queue_model import GpuProfile, GpuQueue

CHUNK_SECONDS = 30.0
# Rough token counts per engine request, for the token counters only.
ENCODER_PROMPT_TOKENS = 4
TOKENS_PER_AUDIO_SECOND = 3


def chunk_lengths(duration: float) -> list[float]:
    """Audio seconds in each 30 s chunk: vLLM makes one engine request of each."""
    count = max(1, math.ceil(duration / CHUNK_SECONDS))
    return [min(CHUNK_SECONDS, duration - i * CHUNK_SECONDS) for i in range(count)]


class SimulatedBackend:
    """Splits audio into 30 s chunks like vLLM, runs each as an engine request on `GpuQueue`.

    The text names the engine and the chunk, so a test can tell where a request was served.
    """

    response_formats = ("json", "text", "verbose_json")
    text_format_is_json = True

    def __init__(self, name: str, served_models: tuple[str, ...], profile: GpuProfile):
        self.name = name
        self.served_models = served_models
        self.queue = GpuQueue(profile)
        self.profile = profile
        self.metrics: VllmMetrics | None = None

    def load(self) -> EngineLoad:
        return self.queue.load()

    async def _engine_request(self, work: float, generated_tokens: int) -> None:
        timing = await self.queue.run(work)
        if self.metrics is not None:
            self.metrics.observe_engine_request(
                timing.queue_s, timing.inference_s, ENCODER_PROMPT_TOKENS, generated_tokens
            )

    async def transcribe(self, request: SpeechRequest) -> Transcript:
        duration = audio_duration_seconds(request.audio)
        return Transcript(duration=round(duration, 6), language=request.language or "en",
                          segments=self._segments(request, duration))

    async def _segments(self, request: SpeechRequest, duration: float) -> AsyncIterator[Segment]:
        if request.language is None and request.task == "transcribe":
            await self._engine_request(self.profile.seconds_per_detection, 1)
        lengths = chunk_lengths(duration)
        count = len(lengths)
        # vLLM submits every chunk at once and merges the results in order.
        chunks = [
            asyncio.ensure_future(
                self._engine_request(self.profile.chunk_work(length), max(1, int(length * TOKENS_PER_AUDIO_SECOND)))
            )
            for length in lengths
        ]
        verb = "transcribed" if request.task == "transcribe" else "translated"
        try:
            for index, (chunk, length) in enumerate(zip(chunks, lengths)):
                await chunk
                start = index * CHUNK_SECONDS
                text = f" {self.name} {verb} chunk {index + 1} of {count} ({length:.2f} s) for {request.model}."
                yield Segment(start=start, end=start + max(length, 0.0), text=text)
        finally:
            for chunk in chunks:
                chunk.cancel()
