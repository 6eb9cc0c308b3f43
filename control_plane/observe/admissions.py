"""Where each key's requests arrive: what every Envoy admitted and refused of a key, from the access
logs, for the budgets that hold across Envoys (decide/budgets.py).

A request is admitted when its first try starts (the quota filters charged it then; a retry or
a hedge is the same request and charges nothing), refused when the gateway's own 429 ends it.
Both are demand at that Envoy; only admissions are charged to the key's exact budget, and with
them what the engine's own figure of an upload's audio added to it after the answer. Pure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# How far back demand is measured (per minute: scaled from this window).
DEMAND_WINDOW_S = 20.0
# A request id is remembered, so its retries and hedges (always at the same Envoy) are not
# counted again, for as long as the request may last (timeouts.route_s) and this margin (its
# tries' logs arriving late); at most SEEN_MOST per Envoy, the oldest forgotten first (a retry of
# one forgotten is charged again: a charge too many, never one too few, and only that Envoy's).
SEEN_MARGIN_S = 10.0
SEEN_MOST = 100_000


@dataclass(frozen=True)
class Arrival:
    at: float
    key: str
    envoy: str
    seconds: float  # the upload's whole audio-seconds, at least 1 (its cost)
    admitted: bool
    request: bool = True  # False: audio-seconds charged after the fact (the engine's figure), no request


class Admissions:
    def __init__(self, route_s: Callable[[], float] = lambda: 600.0) -> None:
        """`route_s`: the longest a request may last now (the config's timeouts.route_s)."""
        self.route_s = route_s
        self.window: deque[Arrival] = deque()  # the last DEMAND_WINDOW_S, oldest first
        self.unbilled: list[Arrival] = []  # admissions not yet taken by the budgets
        # Envoy -> request id -> when its first try started (insertion order)
        self._seen: dict[str, dict[str, float]] = {}

    def arrived(self, request_id: str, key: str, envoy: str, seconds: float, admitted: bool, now: float) -> None:
        """One request of `key` at `envoy`: admitted (a first try started; a request id that Envoy
        reported before is a retry or hedge and counts nothing), or refused."""
        if admitted:
            seen = self._seen.setdefault(envoy, {})
            self._forget_seen(seen, now)
            if request_id in seen:
                return
            seen[request_id] = now
            if len(seen) > SEEN_MOST:
                del seen[next(iter(seen))]
        arrival = Arrival(now, key, envoy, seconds, admitted)
        self.window.append(arrival)
        if admitted:
            self.unbilled.append(arrival)
        self._forget(now)

    def charged_after(self, key: str, seconds: float, now: float) -> None:
        """Audio-seconds the engine's figure added to a request of `key` already admitted: billed,
        not demand (the request was counted where it arrived)."""
        self.unbilled.append(Arrival(now, key, "", seconds, True, request=False))

    def _forget(self, now: float) -> None:
        while self.window and self.window[0].at < now - DEMAND_WINDOW_S:
            self.window.popleft()

    def _forget_seen(self, seen: dict[str, float], now: float) -> None:
        """An Envoy's request ids older than any request lasts."""
        since = now - self.route_s() - SEEN_MARGIN_S
        while seen:
            request_id, at = next(iter(seen.items()))
            if at >= since:
                break
            del seen[request_id]

    def seen(self) -> int:
        """How many request ids are remembered, of every Envoy."""
        return sum(len(ids) for ids in self._seen.values())

    def demand(self, now: float, since: float) -> dict[str, dict[str, tuple[float, float]]]:
        """key -> envoy -> (requests, audio-seconds) a minute, admitted and refused, over the last
        DEMAND_WINDOW_S (or since `since`, when the window reaches back before it)."""
        self._forget(now)
        for envoy, seen in list(self._seen.items()):
            self._forget_seen(seen, now)
            if not seen:
                del self._seen[envoy]
        span = max(1.0, min(DEMAND_WINDOW_S, now - since))
        counts: dict[str, dict[str, list[float]]] = {}
        for arrival in self.window:
            count = counts.setdefault(arrival.key, {}).setdefault(arrival.envoy, [0.0, 0.0])
            count[0] += 1
            count[1] += arrival.seconds
        per_minute = 60.0 / span
        return {key: {envoy: (c[0] * per_minute, c[1] * per_minute) for envoy, c in envoys.items()}
                for key, envoys in counts.items()}

    def take_unbilled(self) -> list[Arrival]:
        taken, self.unbilled = self.unbilled, []
        return taken
