"""Where each key's requests arrive: what every Envoy admitted and refused of a key, from the access
logs, for the budgets that hold across Envoys (decide/budgets.py).

A request is admitted when its first try starts (the quota filters charged it then; a retry or
a hedge is the same request and charges nothing), refused when the gateway's own 429 ends it.
Both are demand at that Envoy; only admissions are charged to the key's exact budget, and with
them what the engine's own figure of an upload's audio added to it after the answer. Pure.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

# How far back demand is measured (per minute: scaled from this window), in whole seconds.
DEMAND_WINDOW_S = 20.0
# A request id is remembered, so its retries and hedges (always at the same Envoy) are not
# counted again, for as long as the request may last (timeouts.route_s) and this margin (its
# tries' logs arriving late); at most SEEN_MOST of every Envoy together, the oldest of the Envoy
# that reported the most forgotten first (a retry of one forgotten is charged again: a charge too
# many, never one too few).
SEEN_MARGIN_S = 10.0
SEEN_MOST = 200_000
# Envoys told apart (by node id); what further node ids report counts as one more, OTHER_ENVOYS.
MOST_ENVOYS = 1024
OTHER_ENVOYS = ""


@dataclass
class Billed:
    """What one key's admissions of one second charge its budget; `at`: the last of them."""

    at: float
    key: str
    requests: int  # 0 for audio-seconds charged after the fact (the engine's figure)
    seconds: float  # whole audio-seconds, each upload's at least 1 (its cost)


class Admissions:
    """Whatever the Envoys report, what this holds is bounded: a count per second, key and Envoy
    over the window, a charge per key and second until the budgets take it, SEEN_MOST request ids,
    MOST_ENVOYS (and one) Envoys."""

    def __init__(self, route_s: Callable[[], float] = lambda: 600.0) -> None:
        """`route_s`: the longest a request may last now (the config's timeouts.route_s)."""
        self.route_s = route_s
        # The last DEMAND_WINDOW_S, oldest first: (second, {(key, envoy): [requests, audio-seconds]})
        self.window: deque[tuple[int, dict[tuple[str, str], list[float]]]] = deque()
        self.unbilled: dict[tuple[str, int], Billed] = {}  # (key, second) -> not yet taken by the budgets
        self._envoys: dict[str, float] = {}  # node id -> its last arrival
        # node id -> request id -> its first try's start, oldest first (an OrderedDict forgets its
        # oldest in constant time; a dict's first item is found past every one deleted before it)
        self._seen: dict[str, OrderedDict[str, float]] = {}
        self._seen_count = 0
        self._most_seen = OTHER_ENVOYS  # the node id with the most request ids remembered (as last found)

    def arrived(self, request_id: str, key: str, envoy: str, seconds: float, admitted: bool, now: float) -> None:
        """One request of `key` at `envoy`: admitted (a first try started; a request id that Envoy
        reported before is a retry or hedge and counts nothing), or refused."""
        if envoy not in self._envoys and len(self._envoys) >= MOST_ENVOYS:
            envoy = OTHER_ENVOYS
        self._envoys[envoy] = now
        if admitted and not self._first(envoy, request_id, now):
            return
        self._forget(now)
        second = math.floor(now)
        if not self.window or self.window[-1][0] < second:
            self.window.append((second, {}))
        count = self.window[-1][1].setdefault((key, envoy), [0.0, 0.0])
        count[0] += 1
        count[1] += seconds
        if admitted:
            self._bill(key, 1, seconds, now)

    def charged_after(self, key: str, seconds: float, now: float) -> None:
        """Audio-seconds the engine's figure added to a request of `key` already admitted: billed,
        not demand (the request was counted where it arrived)."""
        self._bill(key, 0, seconds, now)

    def _bill(self, key: str, requests: int, seconds: float, now: float) -> None:
        billed = self.unbilled.setdefault((key, math.floor(now)), Billed(now, key, 0, 0.0))
        billed.at, billed.requests, billed.seconds = max(billed.at, now), billed.requests + requests, \
            billed.seconds + seconds

    def _first(self, envoy: str, request_id: str, now: float) -> bool:
        """Whether `request_id` is new at `envoy` (and remembered from now)."""
        seen = self._seen.setdefault(envoy, OrderedDict())
        self._forget_seen(seen, now)
        if request_id in seen:
            return False
        seen[request_id] = now
        self._seen_count += 1
        if len(seen) > len(self._seen.get(self._most_seen, ())):
            self._most_seen = envoy
        if self._seen_count > SEEN_MOST:
            self._seen[self._most_seen].popitem(last=False)
            self._seen_count -= 1
        return True

    def _forget(self, now: float) -> None:
        while self.window and self.window[0][0] < now - DEMAND_WINDOW_S:
            self.window.popleft()

    def _forget_seen(self, seen: OrderedDict[str, float], now: float) -> None:
        """An Envoy's request ids older than any request lasts."""
        since = now - self.route_s() - SEEN_MARGIN_S
        while seen:
            if next(iter(seen.values())) >= since:
                break
            seen.popitem(last=False)
            self._seen_count -= 1

    def seen(self) -> int:
        """How many request ids are remembered, of every Envoy."""
        return self._seen_count

    def envoys(self) -> int:
        """How many Envoys are told apart now."""
        return len(self._envoys)

    def demand(self, now: float, since: float) -> dict[str, dict[str, tuple[float, float]]]:
        """key -> envoy -> (requests, audio-seconds) a minute, admitted and refused, over the last
        DEMAND_WINDOW_S (or since `since`, when the window reaches back before it). Forgets what
        no longer counts."""
        self._forget(now)
        for envoy, seen in list(self._seen.items()):
            self._forget_seen(seen, now)
            if not seen:
                del self._seen[envoy]
        self._most_seen = max(self._seen, key=lambda e: len(self._seen[e]), default=OTHER_ENVOYS)
        gone = now - max(DEMAND_WINDOW_S, self.route_s() + SEEN_MARGIN_S)
        self._envoys = {envoy: at for envoy, at in self._envoys.items() if at >= gone}
        span = max(1.0, min(DEMAND_WINDOW_S, now - since))
        counts: dict[str, dict[str, list[float]]] = {}
        for _, second in self.window:
            for (key, envoy), (requests, seconds) in second.items():
                count = counts.setdefault(key, {}).setdefault(envoy, [0.0, 0.0])
                count[0] += requests
                count[1] += seconds
        per_minute = 60.0 / span
        return {key: {envoy: (c[0] * per_minute, c[1] * per_minute) for envoy, c in envoys.items()}
                for key, envoys in counts.items()}

    def take_unbilled(self) -> list[Billed]:
        taken, self.unbilled = sorted(self.unbilled.values(), key=lambda b: b.at), {}
        return taken
