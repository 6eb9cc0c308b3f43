"""Audio-seconds, the unit of Whisper's work: in flight per engine, its speed, and what was metered.

vLLM runs one engine request per 30 s chunk, so request counts say little about how much work
an engine holds: a ten-minute recording is twenty of them, a voice command one. Every Envoy's
Lua filter reads each upload's duration (envoy/audio_duration.lua) and puts it in a header,
and every Envoy logs each try at an engine over gRPC twice, when its stream to the engine
starts and when it ends (control_plane/observe/outcomes.py). From those the ledger knows, over
all Envoys and with no call in the request path:

- per engine: the audio-seconds sent and not yet answered, and the audio-seconds it finishes
  per second of being busy (decayed sums, time constant RATE_TAU_S): its measured speed, which
  does not depend on how long the clips it happened to get were;
- per model: audio-seconds received, served and failed (each request once, at its end).

Pure: no I/O, and time is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

RATE_TAU_S = 10.0  # how fast old evidence of an engine's speed fades
RATE_MEMORY_S = 5.0  # an engine that answered nothing for this long has no measured speed
CHUNK_S = 30.0  # Whisper's window: vLLM makes one engine request per 30 s of audio


@dataclass
class _Engine:
    tries: dict[tuple[int, str], tuple[float, float]] = field(default_factory=dict)  # -> (seconds, started)
    done: float = 0.0  # decayed audio-seconds answered
    busy: float = 0.0  # decayed seconds with work in flight
    at: float | None = None
    answered_at: float | None = None

    def advance(self, now: float) -> None:
        """Counts the time since the last event as busy when work was in flight, and decays."""
        if self.at is not None and now > self.at:
            elapsed = now - self.at
            factor = math.exp(-elapsed / RATE_TAU_S)
            self.done *= factor
            self.busy = self.busy * factor + (elapsed if self.tries else 0.0)
        self.at = now if self.at is None else max(self.at, now)


@dataclass
class Metered:
    """A model's audio-seconds, each request counted once when it ends."""

    received: float = 0.0
    served: float = 0.0
    failed: float = 0.0
    estimated: float = 0.0  # of received: from a size estimate, not a header
    requests: int = 0
    longest: float = 0.0  # the longest single upload


class Ledger:
    def __init__(self) -> None:
        self.engines: dict[str, _Engine] = {}
        self.metered: dict[str, Metered] = {}

    def started(self, stream: int, request_id: str, endpoint: str, seconds: float, now: float) -> None:
        """A try of `seconds` of audio began at `endpoint` ("ip:port"), logged by Envoy stream `stream`."""
        engine = self.engines.setdefault(endpoint, _Engine())
        engine.advance(now)
        key = (stream, request_id)
        engine.tries.setdefault(key, (seconds, now))

    def ended(self, stream: int, request_id: str, endpoint: str, answered: bool, now: float) -> None:
        """That try ended; answered: the engine transcribed it (its audio counts as done)."""
        engine = self.engines.get(endpoint)
        if engine is None:
            return
        engine.advance(now)
        entry = engine.tries.pop((stream, request_id), None)
        if entry is None:
            return
        if answered:
            engine.done += entry[0]
            engine.answered_at = now

    def meter(self, model: str, seconds: float, estimated: bool, served: bool) -> None:
        """A request for `model` ended: served (2xx) or failed, whoever failed it."""
        metered = self.metered.setdefault(model, Metered())
        metered.requests += 1
        metered.received += seconds
        metered.longest = max(metered.longest, seconds)
        metered.estimated += seconds if estimated else 0.0
        if served:
            metered.served += seconds
        else:
            metered.failed += seconds

    def stream_closed(self, stream: int, now: float) -> None:
        """An Envoy's log stream ended: its tries will not be reported as ended (it restarted, or
        will resend nothing of them), so they leave the ledger rather than count for ever."""
        for engine in self.engines.values():
            engine.advance(now)
            for key in [k for k in engine.tries if k[0] == stream]:
                del engine.tries[key]

    def expire(self, now: float, max_age_s: float) -> None:
        """Forgets tries older than any request may last (an end event lost on the way)."""
        for engine in self.engines.values():
            for key in [k for k, (_, started) in engine.tries.items() if now - started > max_age_s]:
                del engine.tries[key]

    def in_flight(self, endpoint: str) -> float:
        """Audio-seconds sent to `endpoint` and not yet answered, over every Envoy."""
        engine = self.engines.get(endpoint)
        return sum(seconds for seconds, _ in engine.tries.values()) if engine else 0.0

    def requests_in_flight(self, endpoint: str) -> int:
        """Engine requests those make: vLLM runs one per started 30 s of audio (at least one)."""
        engine = self.engines.get(endpoint)
        return sum(max(1, math.ceil(seconds / CHUNK_S)) for seconds, _ in engine.tries.values()) if engine else 0

    def rate(self, endpoint: str, now: float) -> float | None:
        """Audio-seconds `endpoint` answers per second of being busy; None until measured, and
        again once it answered nothing for RATE_MEMORY_S: a speed measured under a batch that
        is gone would hold it down for ever (the scrapes' speed is forgotten the same way)."""
        engine = self.engines.get(endpoint)
        if engine is None or engine.answered_at is None or now - engine.answered_at > RATE_MEMORY_S:
            return None
        engine.advance(now)
        return engine.done / engine.busy if engine.busy > 0 and engine.done > 0 else None

    def retain(self, endpoints: set[str]) -> None:
        """Forgets engines that left the fleet."""
        for key in set(self.engines) - endpoints:
            del self.engines[key]
