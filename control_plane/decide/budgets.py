"""One budget per key, whatever the number of Envoys: what each Envoy charges a key's requests,
and when a key is refused outright. Pure: figures and time in, decisions out.

Every Envoy's per-minute bucket holds the key's whole budget (builders/quotas.py); a request
costs its units times the key's charge. With the key's demand at each Envoy (observe/admissions.py)
the charge is the one that shares the budget out as water fills vessels: the level c at which
sum(min(demand_e, c)) is the budget, each Envoy admitting up to c a minute, so charge = budget / c
(at least 1, at most the Envoys' count). Spread evenly over N Envoys that is N; all through one,
1; an Envoy that wants less than its even share leaves the rest to the others. When the key wants
less than its budget, c is the largest demand plus what is left over, so a shift of traffic
finds room at once.

The exact figure is a token bucket per key and limit (`Ledger`), charged with every admission
the access logs report: what the Envoys admitted beyond it (their buckets refilled by a restart,
a charge that lagged a shift of traffic) is debt, repaid by sharing out less of the budget over
the next REPAY_S. What they leave unspent is not given back later: a key gets at most its
budget's rate, and a catch-up would show as more than the plan in any minute. A day's budget is the UTC day's durable usage: once it is spent, the key is
refused until midnight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from control_plane.names import AUDIO_SECONDS_LIMIT, BUDGET_SCALE, MINUTE_S, REQUESTS_LIMIT

# Debt is repaid over this long (sharing out less of the budget meanwhile), and at most this
# much of the budget is held back for it. Debt up to one unit and DEBT_SLACK of the budget is
# not repaid: admissions are billed when their log arrives, a little after Envoy charged them.
REPAY_S = 30.0
MOST_HELD_BACK = 0.9
DEBT_SLACK = 0.02
# The most a key's ledger owes, in minutes of its plan's budget per Envoy: every Envoy's bucket
# refilled at once (a restart) admits a minute's budget there; whatever the logs claim beyond it
# is not repaid, so no report keeps a key's charges raised for longer than that takes.
MOST_OWED_MINUTES = 1.0
# A charge moves only when the new one is this far from the one published (each move is a route
# update, which every Envoy's Lua filter recompiles; a wider step leaves a charge stuck that far off).
CHARGE_STEP = 0.02


def water_level(demands: Iterable[float], budget: float) -> float:
    """The level c, per Envoy, at which sum(min(d, c)) over the demands is `budget`; when they
    all sum to less, the largest demand plus what is left over. Contract: 0 < c <= budget."""
    wanted = sorted(d for d in demands if d > 0)
    total = sum(wanted)
    if total < budget:
        return (wanted[-1] if wanted else 0.0) + (budget - total)
    left = budget
    for i, demand in enumerate(wanted):
        share = left / (len(wanted) - i)
        if demand >= share:
            return share
        left -= demand
    return wanted[-1]


def charge(demands: Iterable[float], shared: float, bucket: float, envoys: int) -> int:
    """What each Envoy charges per unit, in BUDGET_SCALE tokens, so that together they admit
    `shared` a minute from buckets refilling `bucket` a minute: bucket / water level; at least
    once, at most the Envoys' count (more only while debt holds `shared` below `bucket`)."""
    level = water_level(demands, shared)
    most = max(1, envoys) * bucket / min(shared, bucket)
    return math.ceil(min(max(1.0, bucket / level), most) * BUDGET_SCALE)


def moved(new: int, published: int | None) -> bool:
    """Whether a charge is far enough from the published one to publish."""
    return published is None or abs(new - published) > CHARGE_STEP * published


@dataclass
class Ledger:
    """A key's exact budget for one limit: `per_minute` units, refilled continuously, holding at
    most a minute's; charged with what the Envoys admitted, whatever they charged."""

    per_minute: float
    tokens: float
    at: float

    @classmethod
    def full(cls, per_minute: float, now: float) -> "Ledger":
        """A key's first budget (or a restarted plane's): assumed full, as a new key's buckets are."""
        return cls(per_minute, per_minute, now)

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.per_minute, self.tokens + (now - self.at) * self.per_minute / MINUTE_S)
            self.at = now

    def take(self, units: float, now: float, most_owed: float = math.inf) -> None:
        """Charges `units`; what is owed beyond `most_owed` is not kept (see MOST_OWED_MINUTES)."""
        self._refill(now)
        self.tokens = max(-most_owed, self.tokens - units)

    def debt(self, now: float) -> float:
        self._refill(now)
        return max(0.0, -self.tokens)

    def refilled(self, now: float) -> bool:
        """Whether it holds its whole minute again: the same as a new key's (`full`)."""
        self._refill(now)
        return self.tokens >= self.per_minute

    def shared_out(self, now: float) -> float:
        """The budget a minute to share among the Envoys now: the plan's, less the repayment of
        the debt beyond a slack (one unit and DEBT_SLACK), continuous in it, so a debt that
        hovers at the slack moves no charge."""
        self._refill(now)
        slack = 1 + DEBT_SLACK * self.per_minute
        repay = max(0.0, -self.tokens - slack) * MINUTE_S / REPAY_S
        return max(self.per_minute * (1 - MOST_HELD_BACK), self.per_minute - repay)


# The per-minute limits, by name: the PlanConfig field and which figure of a demand counts.
MINUTE_LIMITS = {REQUESTS_LIMIT: ("requests_per_minute", 0), AUDIO_SECONDS_LIMIT: ("audio_seconds_per_minute", 1)}


def charges(demand: Mapping[str, tuple[float, float]], ledgers: Mapping[str, Ledger], buckets: Mapping[str, float],
            envoys: int, now: float) -> dict[str, int]:
    """A key's charge per limit name, from its demand at each Envoy ({envoy: (requests,
    audio-seconds) a minute}), its ledgers ({limit name: Ledger}: what this plane's Envoys may
    admit) and its Envoys' buckets ({limit name: the plan's amount a minute})."""
    out = {}
    for name, (_, figure) in MINUTE_LIMITS.items():
        if name in ledgers:
            out[name] = charge((d[figure] for d in demand.values()), ledgers[name].shared_out(now), buckets[name],
                               envoys)
    return out


def day_spent(spent: float, per_day: int | None) -> bool:
    """Whether a key's audio-seconds today (every plane's, durable) leave nothing of its day."""
    return per_day is not None and spent >= per_day
