"""What the scrapes said, per (backend, model): last load, its age, and a running speed estimate.

Speed is measured, not configured: the changes in vLLM's inference-time counters (seconds spent
running engine requests, and their count) are summed with exponential decay (time constant
SPEED_TAU_S), and their ratio is the endpoint's seconds_per_request. Weighting by completions,
not by scrape, keeps it steady: a scrape interval in which one short or one long request
finished does not swing it. It is evidence from recent work only: it includes the slowdown of
whatever batch the engine was running, so an engine that has finished nothing for
SPEED_MEMORY_S is taken as typical again rather than as slow forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from control_plane.observe.metrics_parser import ModelLoad

SPEED_TAU_S = 2.0
SPEED_MEMORY_S = 5.0


@dataclass(frozen=True)
class EndpointState:
    """What is known about one endpoint of a cluster (one backend serving one model)."""

    backend_id: str
    base_weight: int = 1
    load: ModelLoad | None = None  # from the last good scrape; None: never scraped
    age_s: float | None = None  # since that scrape
    seconds_per_request: float | None = None  # measured speed; None: unknown yet
    failure_ratio: float = 0.0  # recent tries the engine failed, as Envoys saw them (outcomes.py)
    audio_in_flight: float = 0.0  # audio-seconds sent to it and not yet answered (ledger.py)
    requests_in_flight: int = 0  # the engine requests (30 s chunks) those make
    audio_per_request: float | None = None  # audio-seconds an engine request sent here lately carried
    audio_rate: float | None = None  # audio-seconds it answers per busy second; None: not measured


@dataclass
class Track:
    load: ModelLoad | None = None
    scraped_at: float | None = None
    speed_at: float | None = None
    decayed: tuple[float, float] = (0.0, 0.0)  # (inference seconds, count), time-decayed sums
    counters: tuple[float, float] | None = None  # (inference seconds, count) at the last scrape
    error: str | None = None

    @property
    def seconds_per_request(self) -> float | None:
        return self.decayed[0] / self.decayed[1] if self.decayed[1] else None


class LoadTracker:
    def __init__(self) -> None:
        self.tracks: dict[tuple[str, str], Track] = {}

    def record_load(self, backend_id: str, model: str, load: ModelLoad, now: float) -> None:
        track = self.tracks.setdefault((backend_id, model), Track())
        counters = (load.inference_seconds, load.inference_count)
        if track.counters is not None:
            seconds, count = counters[0] - track.counters[0], counters[1] - track.counters[1]
            if count > 0 and seconds >= 0:
                recent = track.speed_at is not None and now - track.speed_at <= SPEED_MEMORY_S
                decay = math.exp(-(now - track.speed_at) / SPEED_TAU_S) if recent else 0.0
                track.decayed = (track.decayed[0] * decay + seconds, track.decayed[1] * decay + count)
                track.speed_at = now
        track.counters = counters  # a restarted engine's counters start again from here
        track.load, track.scraped_at, track.error = load, now, None

    def record_failure(self, backend_id: str, model: str, error: str, now: float) -> None:
        track = self.tracks.setdefault((backend_id, model), Track())
        track.error = error

    def state(self, backend_id: str, model: str, base_weight: int, now: float) -> EndpointState:
        track = self.tracks.get((backend_id, model))
        if track is None or track.scraped_at is None:
            return EndpointState(backend_id, base_weight)
        speed = track.seconds_per_request if track.speed_at is not None and now - track.speed_at <= SPEED_MEMORY_S else None
        return EndpointState(backend_id, base_weight, track.load, now - track.scraped_at, speed)

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Forgets endpoints that left the fleet."""
        for key in set(self.tracks) - keys:
            del self.tracks[key]
