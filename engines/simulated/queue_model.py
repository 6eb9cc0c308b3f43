"""A GPU running Whisper under continuous batching, as a real-time queueing model.

Each engine request (one 30 s audio chunk, or one language detection) needs some *work*, in
units of "seconds this GPU needs for it when running alone". Up to `max_num_seqs` requests run
at once; the rest wait in FIFO order, as vLLM's scheduler makes them. Running requests share the
GPU: with k of them, each advances at `speed / (1 + batch_penalty * (k - 1))` work-seconds per
simulated second, so a batch of k finishes `k / (1 + batch_penalty * (k - 1))` times more work
per second than one request alone (batching helps, with diminishing returns). `time_scale`
turns simulated seconds into wall seconds (0.01 runs a hundred times faster than real time).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from engines.common.metrics import EngineLoad


@dataclass(frozen=True)
class GpuProfile:
    """Parameters of the model; defaults approximate whisper-large-v3-turbo on one H100."""

    max_num_seqs: int = 8
    # Whisper's encoder always runs over a padded 30 s window (a fixed cost per engine request);
    # decoding grows with the speech in the chunk (work-seconds for a full 30 s chunk).
    seconds_per_request: float = 0.1
    seconds_per_chunk: float = 0.15
    # Language detection is a short decode over the first chunk.
    seconds_per_detection: float = 0.03
    batch_penalty: float = 0.15
    speed: float = 1.0
    time_scale: float = 1.0

    def chunk_work(self, audio_seconds: float) -> float:
        return self.seconds_per_request + self.seconds_per_chunk * min(audio_seconds, 30.0) / 30.0

    def per_request_rate(self, running: int) -> float:
        """Work-seconds per wall second that each of `running` requests receives."""
        return self.speed / (1.0 + self.batch_penalty * (running - 1)) / self.time_scale


@dataclass
class _Job:
    remaining: float
    done: asyncio.Future
    enqueued_at: float
    started_at: float = 0.0


@dataclass(frozen=True)
class JobTiming:
    queue_s: float
    inference_s: float


@dataclass
class GpuQueue:
    """The scheduler: FIFO admission into `max_num_seqs` slots, processor sharing among them."""

    profile: GpuProfile
    _waiting: deque = field(default_factory=deque)
    _running: list = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task | None = None
    _slowdown: float = 1.0

    def set_slowdown(self, factor: float) -> None:
        """A GPU that slowed down (thermal throttling, a noisy neighbour): work takes `factor` times longer."""
        self._slowdown = factor
        self._wake.set()

    def load(self) -> EngineLoad:
        running = len(self._running)
        return EngineLoad(running=running, waiting=len(self._waiting),
                          kv_cache_usage=round(running / self.profile.max_num_seqs, 4))

    async def run(self, work: float) -> JobTiming:
        """Waits until `work` has been done for this request; returns its queue and run times."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._schedule())
        job = _Job(remaining=work, done=loop.create_future(), enqueued_at=loop.time())
        self._waiting.append(job)
        self._wake.set()
        try:
            return await job.done
        except asyncio.CancelledError:
            # A client that went away frees its slot, as vLLM aborts the request.
            if job in self._waiting:
                self._waiting.remove(job)
            if job in self._running:
                self._running.remove(job)
            self._wake.set()
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._waiting and len(self._running) < self.profile.max_num_seqs:
                job = self._waiting.popleft()
                job.started_at = loop.time()
                self._running.append(job)
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            rate = self.profile.per_request_rate(len(self._running)) / self._slowdown
            until_next = min(job.remaining for job in self._running) / rate
            self._wake.clear()
            started = loop.time()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(until_next, 0.0))
            except TimeoutError:
                pass
            progressed = (loop.time() - started) * rate
            now = loop.time()
            still_running = []
            for job in self._running:
                job.remaining -= progressed
                if job.remaining <= 1e-9:
                    if not job.done.done():
                        job.done.set_result(JobTiming(job.started_at - job.enqueued_at, now - job.started_at))
                else:
                    still_running.append(job)
            self._running = still_running
