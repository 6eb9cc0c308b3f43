"""Audio-seconds, the unit of Whisper's work: in flight per engine, its speed, and what was metered.

vLLM runs one engine request per 30 s chunk, so request counts say little about how much work
an engine holds: a ten-minute recording is twenty of them, a voice command one. Every Envoy's
Lua filter reads each upload's duration (envoy/audio_duration.lua), and every Envoy logs each
try at an engine over gRPC twice, when its stream to the engine starts and when it ends, and
each failed request at its end (control_plane/observe/access_logs.py). From those the ledger knows,
over all Envoys and with no call in the request path:

- per engine: the audio-seconds sent and not yet answered, and the audio-seconds it answers
  per second of having work in flight (decayed sums, time constant RATE_TAU_S): its measured
  speed, which does not depend on how long the clips it happened to get were;
- per model, the audio-seconds and the time taken of its latest answered tries: the evidence
  each model's hedging deadline follows (decide/hedging.py);
- per model, and per API key and model: audio-seconds received, served and failed (each request
  once, at its end; "" is the key of requests made without one).

Pure: no I/O, and time is passed in.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from control_plane.observe.load_tracker import SPEED_MEMORY_S
from control_plane.observe.usage import UsageBook

RATE_TAU_S = 10.0  # how fast old evidence of an engine's speed fades
CHUNK_S = 30.0  # Whisper's window: vLLM makes one engine request per started 30 s of audio
# A try this old that its engine does not hold (running + waiting 0) is over: longer than an
# upload takes to reach the engine on a slow link.
SETTLE_AFTER_S = 5.0
RECENT_TRIES = 64  # answered tries kept per model as evidence of its speed
MIN_SAMPLE_S = 2.0  # audio-seconds a try must carry to be that evidence (shorter: its fixed cost)
# The open tries kept per engine, whatever the Envoys report (a flood of made-up request ids from an
# authenticated Envoy): past it a new try is not counted rather than memory growing. Far above
# what any engine holds (Envoy's circuit breaker allows max_requests_per_model per cluster).
MOST_TRIES = 50_000


@dataclass
class _Try:
    seconds: float
    started: float
    open: int = 1  # tries of one request at one engine at once (a hedge to the only engine)
    piece: bool = False  # a piece of a long recording (control_plane/longform/), not a client's own request


@dataclass
class _Engine:
    tries: dict[tuple[int, str], _Try] = field(default_factory=dict)  # (log stream, request id) ->
    done: float = 0.0  # decayed audio-seconds answered, as of `at`
    busy: float = 0.0  # decayed seconds with work in flight, as of `at`
    at: float | None = None
    last_event: float | None = None  # the last try that started or ended here
    per_request: float | None = None  # recent audio-seconds per engine request (moving average)

    def decayed(self, now: float) -> tuple[float, float]:
        """(done, busy) brought forward to `now`: the time since `at` counts as busy if work was in flight."""
        if self.at is None or now <= self.at:
            return self.done, self.busy
        elapsed = now - self.at
        factor = math.exp(-elapsed / RATE_TAU_S)
        return self.done * factor, self.busy * factor + (elapsed if self.tries else 0.0)

    def advance(self, now: float) -> None:
        self.done, self.busy = self.decayed(now)
        self.at = now if self.at is None else max(self.at, now)


# A recording whose log names no model: one streamed to its worker unread (envoy/longform.lua), whose
# model only its worker reads (decide/longform.py counts it at every model).
UNKNOWN_MODEL = ""
OUTCOMES = ("served", "failed", "refused")  # how a metered request ended; received is all three


@dataclass
class Metered:
    """A model's audio-seconds, each request counted once when it ends."""

    received: float = 0.0
    served: float = 0.0
    failed: float = 0.0
    refused: float = 0.0  # a key's quota said no (429): received, never sent to an engine
    estimated: float = 0.0  # of received: from a size estimate, not a header
    requests: int = 0
    longest: float = 0.0  # the longest single upload
    # Of received and served: what the engines' figures added to the edge's, and took off it
    # (each only grows, as Prometheus counters must; corrected is the difference).
    corrected_up: float = 0.0
    corrected_down: float = 0.0
    mismatches: int = 0  # answers whose engine figure differed from the edge's

    @property
    def corrected(self) -> float:
        return self.corrected_up - self.corrected_down

    def figures(self) -> dict:
        """As `/status`, the admin API and the CLI show them."""
        return {"requests": self.requests, "audio_received_s": round(self.received, 3)} | {
            f"audio_{outcome}_s": round(getattr(self, outcome), 3) for outcome in OUTCOMES} | {
            "audio_corrected_s": round(self.corrected, 3), "mismatches": self.mismatches}


def engine_requests(seconds: float) -> int:
    """The engine requests vLLM makes of an upload: one per started 30 s, at least one."""
    return max(1, math.ceil(seconds / CHUNK_S))


class Ledger:
    def __init__(self) -> None:
        self.engines: dict[str, _Engine] = {}
        self.metered: dict[str, Metered] = {}
        self.metered_by_key: dict[tuple[str, str], Metered] = {}  # (key id, model) ->
        self.answered: dict[str, deque[tuple[float, float]]] = {}  # model -> (audio-seconds, seconds taken)
        self.usage = UsageBook(Metered)  # the same metering by UTC day, for billing
        # Long recordings at their workers (no engine's work): (log stream, request id) -> (model, since).
        self.recordings: dict[tuple[int, str], tuple[str, float]] = {}

    def started(self, stream: int, request_id: str, endpoint: str, seconds: float, now: float,
                piece: bool = False) -> None:
        """A try of `seconds` of audio began at `endpoint` ("ip:port"), logged on Envoy stream
        `stream`; `piece`: of a long recording a worker split."""
        engine = self.engines.setdefault(endpoint, _Engine())
        engine.advance(now)
        engine.last_event = now
        share = seconds / engine_requests(seconds)
        engine.per_request = share if engine.per_request is None else 0.8 * engine.per_request + 0.2 * share
        key = (stream, request_id)
        if key in engine.tries:
            engine.tries[key].open += 1
        elif len(engine.tries) < MOST_TRIES:
            engine.tries[key] = _Try(seconds, now, piece=piece)

    def recording_started(self, stream: int, request_id: str, model: str, now: float) -> None:
        """A long recording of `model` went to a longform worker."""
        if len(self.recordings) < MOST_TRIES:
            self.recordings[(stream, request_id)] = (model, now)

    def recording_ended(self, stream: int, request_id: str) -> None:
        self.recordings.pop((stream, request_id), None)

    def recordings_at(self) -> dict[str, int]:
        """Each model's long recordings at their workers now (UNKNOWN_MODEL: those streamed unread)."""
        counts: dict[str, int] = {}
        for model, _ in self.recordings.values():
            counts[model] = counts.get(model, 0) + 1
        return counts

    def ended(self, stream: int, request_id: str, endpoint: str, answered: bool, now: float) -> None:
        """That try ended; answered: the engine transcribed it (its audio counts as done)."""
        engine = self.engines.get(endpoint)
        entry = engine.tries.get((stream, request_id)) if engine else None
        if entry is None:
            return
        engine.advance(now)
        engine.last_event = now
        entry.open -= 1
        if entry.open <= 0:
            del engine.tries[(stream, request_id)]
        if answered:
            engine.done += entry.seconds

    def took(self, model: str, seconds: float, taken_s: float) -> None:
        """A try of `seconds` of audio was answered whole `taken_s` after the upload reached the
        engine. Only tries long enough to be evidence of speed are kept (decide/hedging.py), so
        short clips never push the evidence out."""
        if seconds >= MIN_SAMPLE_S:
            self.answered.setdefault(model, deque(maxlen=RECENT_TRIES)).append((seconds, taken_s))

    def _books(self, model: str, key: str, day: str | None) -> list[Metered]:
        """Where a request's metering goes: its model's, its key's, and its day's (observe/usage.py)."""
        books = [self.metered.setdefault(model, Metered()), self.metered_by_key.setdefault((key, model), Metered())]
        return books + ([self.usage.entry(day, key, model)] if day is not None else [])

    def meter(self, model: str, seconds: float, estimated: bool, outcome: str, key: str = "",
              day: str | None = None) -> None:
        """A request the filter routed to `model` ended, one of OUTCOMES: served (a whole 2xx),
        failed (whoever failed it) or refused (the gateway's own 429); `day`: the UTC day its
        Envoy started it (for billing)."""
        for metered in self._books(model, key, day):
            metered.requests += 1
            metered.received += seconds
            metered.longest = max(metered.longest, seconds)
            metered.estimated += seconds if estimated else 0.0
            setattr(metered, outcome, getattr(metered, outcome) + seconds)

    def correct(self, model: str, edge_s: float, engine_s: float | None, key: str = "", day: str | None = None) -> None:
        """A served request whose container lied about its length, or whose engine said its audio
        was `engine_s` where the edge had metered `edge_s` (a lie, or an estimate): a mismatch,
        and the engine's figure, when there is one, stands (the difference shows as corrected)."""
        delta = 0.0 if engine_s is None else engine_s - edge_s
        for metered in self._books(model, key, day):
            metered.received += delta
            metered.served += delta
            metered.corrected_up += max(delta, 0.0)
            metered.corrected_down += max(-delta, 0.0)
            metered.mismatches += 1
            metered.longest = max(metered.longest, edge_s + delta)

    def usage_of(self, key: str) -> dict[str, dict]:
        """A key's metering per model, as the admin API shows it."""
        return {model: m.figures() for (owner, model), m in sorted(self.metered_by_key.items()) if owner == key}

    def _drop(self, now: float, gone, engine: _Engine | None = None) -> None:
        """Removes the tries `gone(key, try)` picks, of one engine or all."""
        for engine in [engine] if engine is not None else self.engines.values():
            keys = [k for k, entry in engine.tries.items() if gone(k, entry)]
            if keys:
                engine.advance(now)
                for key in keys:
                    del engine.tries[key]

    def stream_closed(self, stream: int, now: float) -> None:
        """An Envoy's log stream ended: its open tries will not be reported as ended there, so they
        leave the ledger rather than count for ever."""
        self._drop(now, lambda key, _: key[0] == stream)
        self.recordings = {key: r for key, r in self.recordings.items() if key[0] != stream}

    def expire(self, now: float, max_age_s: float, recording_max_age_s: float | None = None) -> None:
        """Forgets tries older than any request may last (an end lost on the way), and recordings
        older than `recording_max_age_s` (default the same)."""
        self._drop(now, lambda _, entry: now - entry.started > max_age_s)
        oldest = recording_max_age_s if recording_max_age_s is not None else max_age_s
        self.recordings = {key: r for key, r in self.recordings.items() if now - r[1] <= oldest}

    def settle(self, endpoint: str, now: float) -> None:
        """The engine says it holds nothing (running + waiting 0): tries it was sent more than
        SETTLE_AFTER_S ago are over, whatever became of their end entries (Envoy drops log
        entries when its buffer is full)."""
        self._drop(now, lambda _, entry: now - entry.started > SETTLE_AFTER_S, self.engines.get(endpoint))

    def in_flight(self, endpoint: str) -> float:
        """Audio-seconds sent to `endpoint` and not yet answered, over every Envoy."""
        engine = self.engines.get(endpoint)
        return sum(t.seconds * t.open for t in engine.tries.values()) if engine else 0.0

    def clients_in_flight(self, endpoint: str) -> float:
        """Of those, the audio-seconds of clients' own requests: not long recordings' pieces."""
        engine = self.engines.get(endpoint)
        return sum(t.seconds * t.open for t in engine.tries.values() if not t.piece) if engine else 0.0

    def requests_in_flight(self, endpoint: str) -> int:
        """The engine requests those make."""
        engine = self.engines.get(endpoint)
        return sum(engine_requests(t.seconds) * t.open for t in engine.tries.values()) if engine else 0

    def audio_per_request(self, endpoint: str) -> float | None:
        """The audio-seconds an engine request sent here lately carried (a moving average)."""
        engine = self.engines.get(endpoint)
        return engine.per_request if engine else None

    def rate(self, endpoint: str, now: float) -> float | None:
        """Audio-seconds `endpoint` answers per second of having work in flight; None until
        measured, and again once it has been idle for SPEED_MEMORY_S (a speed measured under a
        batch that is gone would hold it down; the scrapes' speed is forgotten the same way)."""
        engine = self.engines.get(endpoint)
        if engine is None or engine.last_event is None:
            return None
        if not engine.tries and now - engine.last_event > SPEED_MEMORY_S:
            return None
        done, busy = engine.decayed(now)
        return done / busy if busy > 0 and done > 0 else None

    def retain(self, endpoints: set[str]) -> None:
        """Forgets engines that left the fleet."""
        for key in set(self.engines) - endpoints:
            del self.engines[key]
