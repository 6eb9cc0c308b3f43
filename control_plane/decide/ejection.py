"""Engines whose answers keep failing are taken out for a while (EDS health UNHEALTHY).

Envoy's outlier detection sees statuses: an engine that sends 200 and then cuts the body looks
healthy to it, and a lowered weight (policy.reliability) still sends it a share of the traffic,
whose answers a client gets cut (a cut after the headers cannot be retried). So once the
Envoys' try logs show an endpoint failing at least EJECT_AT of its recent tries (with
outcomes.MIN_EVIDENCE tries at least), it is ejected for EJECTION_S, doubled each time it is
ejected again (at most MAX_EJECTION_S), as Envoy's own ejections back off; after FORGIVE_AFTER_S
without one it starts from EJECTION_S again. At most half of a model's endpoints are out at
once (rounded down: a model with one engine keeps it), so a fault that hits every engine alike
(a bad client, the network) never empties a model. Pure: time is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

EJECT_AT = 0.3  # failure ratio
EJECTION_S = 10.0
MAX_EJECTION_S = 300.0
FORGIVE_AFTER_S = 120.0

Key = tuple[str, str]  # (backend id, model)


@dataclass
class Ejections:
    until: dict[Key, float] = field(default_factory=dict)  # ejected endpoints -> when they come back
    times: dict[Key, int] = field(default_factory=dict)  # ejections in a row (for the back-off)
    last: dict[Key, float] = field(default_factory=dict)  # when each was last ejected

    def step(self, ratios: Mapping[str, Sequence[tuple[str, float]]], now: float) -> tuple[frozenset[Key], set[Key]]:
        """`ratios`: per model, each endpoint's (backend id, failure ratio). The endpoints out now,
        and those that just came back (their old evidence is to be forgotten: they start afresh)."""
        returned = {key for key, until in self.until.items() if until <= now}
        for key in returned:
            del self.until[key]
        for key in [k for k, at in self.last.items() if now - at > FORGIVE_AFTER_S and k not in self.until]:
            self.times.pop(key, None)
            self.last.pop(key, None)
        for model, endpoints in ratios.items():
            out = sum((backend, model) in self.until for backend, _ in endpoints)
            room = len(endpoints) // 2 - out
            failing = sorted((-ratio, backend) for backend, ratio in endpoints  # the worst first
                             if ratio >= EJECT_AT and (backend, model) not in self.until and
                             (backend, model) not in returned)
            for _, backend in failing[:max(0, room)]:
                key = (backend, model)
                self.times[key] = self.times.get(key, 0) + 1
                self.last[key] = now
                self.until[key] = now + min(MAX_EJECTION_S, EJECTION_S * 2 ** (self.times[key] - 1))
        known = {(backend, model) for model, endpoints in ratios.items() for backend, _ in endpoints}
        for key in set(self.until) - known:  # left the fleet
            del self.until[key]
        return frozenset(self.until), returned
