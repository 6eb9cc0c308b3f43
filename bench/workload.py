"""The routing benchmark's pure parts: seeded arrivals, the oracle's view of each engine, percentiles.

Nothing here does I/O, so the same seed gives every policy the same requests at the same times,
and the oracle's bookkeeping can be checked on its own.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from engines.simulated.queue_model import GpuProfile
from engines.simulated.server import chunk_lengths

# Long-tailed audio lengths: half the clips under 15 s, one in a hundred over three minutes.
MEDIAN_AUDIO_S, AUDIO_SIGMA, MIN_AUDIO_S, MAX_AUDIO_S = 15.0, 1.0, 1.0, 600.0


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the run starts (simulated time)
    audio_s: float
    foreign: bool = False  # sent straight to engine 0, past any router


def request_work(profile: GpuProfile, audio_s: float) -> list[float]:
    """The engine requests one clip becomes (one per 30 s chunk, as vLLM splits it), in GPU seconds."""
    return [profile.chunk_work(length) for length in chunk_lengths(audio_s)]


def audio_lengths(rng: random.Random, count: int) -> list[float]:
    return [min(MAX_AUDIO_S, max(MIN_AUDIO_S, rng.lognormvariate(math.log(MEDIAN_AUDIO_S), AUDIO_SIGMA)))
            for _ in range(count)]


def mixed_lengths(rng: random.Random, count: int) -> list[float]:
    """Voice commands and meetings: 90% clips of 2 to 8 s, 10% recordings of 5 to 30 minutes."""
    return [rng.uniform(2, 8) if rng.random() < 0.9 else rng.uniform(300, 1800) for _ in range(count)]


def mean_work(profile: GpuProfile, seed: int = 0, samples: int = 20000, lengths_of=audio_lengths) -> float:
    """Mean GPU seconds per request of this length distribution, for sizing the arrival rate."""
    lengths = lengths_of(random.Random(seed), samples)
    return sum(sum(request_work(profile, length)) for length in lengths) / samples


def engine_capacity(profile: GpuProfile) -> float:
    """GPU seconds of work an engine finishes per second with its batch full."""
    return profile.max_num_seqs * profile.per_request_rate(profile.max_num_seqs)


def arrivals(seed: int, duration_s: float, rate_at, foreign_share: float = 0.0,
             lengths_of=audio_lengths) -> list[Arrival]:
    """Poisson arrivals at `rate_at(t)` requests per second (piecewise constant), seeded."""
    rng = random.Random(seed)
    result, now = [], 0.0
    while True:
        now += rng.expovariate(rate_at(now))
        if now >= duration_s:
            return result
        length = lengths_of(rng, 1)[0]
        result.append(Arrival(round(now, 6), round(length, 3), rng.random() < foreign_share))


@dataclass
class VirtualEngine:
    """The oracle's exact copy of a simulated engine's scheduler (engines/simulated/queue_model.py):
    FIFO admission into `max_num_seqs` slots, processor sharing with the batch penalty.

    Fed the same requests at the same times, it knows each engine's outstanding work without
    asking the engine, as an oracle router would.
    """

    profile: GpuProfile  # its speed is the engine's
    slowdown: float = 1.0
    now: float = 0.0
    waiting: list[float] = field(default_factory=list)
    running: list[float] = field(default_factory=list)

    def advance(self, until: float) -> None:
        while self.now < until:
            while self.waiting and len(self.running) < self.profile.max_num_seqs:
                self.running.append(self.waiting.pop(0))
            if not self.running:
                self.now = until
                return
            rate = self.profile.per_request_rate(len(self.running)) / self.slowdown
            step = min(until - self.now, min(self.running) / rate)
            self.running = [left - step * rate for left in self.running if left - step * rate > 1e-9]
            self.now += step

    def submit(self, works: list[float], at: float) -> None:
        self.advance(at)
        self.waiting.extend(works)

    def expected_drain_s(self, at: float) -> float:
        """Seconds this engine needs for all it holds, at its full-batch rate."""
        self.advance(at)
        outstanding = sum(self.running) + sum(self.waiting)
        return outstanding / self.capacity()

    def capacity(self) -> float:
        return engine_capacity(self.profile) / self.slowdown


def oracle_choice(engines: list[VirtualEngine], at: float, works: list[float]) -> int:
    """Joins the engine where this request's work would be done soonest if queued behind the rest."""
    def finish(index: int) -> float:
        engine = engines[index]
        return engine.expected_drain_s(at) + sum(works) / engine.capacity()
    return min(range(len(engines)), key=finish)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]
