"""The budget keeper: one budget per key across every Envoy (decide/budgets.py's decisions, made
each BUDGET_ROUND_S from what the access logs reported, observe/admissions.py) published through
the routes' key grants. Nothing here is in a request's path: an Envoy that hears nothing keeps
enforcing the whole budget with the charges it was last sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from control_plane.config import PlanConfig
from control_plane.decide.budgets import MINUTE_LIMITS, MOST_OWED_MINUTES, Ledger, charges, day_spent, moved
from control_plane.names import AUDIO_SECONDS_LIMIT, AUDIO_SECONDS_PER_DAY_LIMIT, REQUESTS_LIMIT
from control_plane.observe.admissions import Admissions
from control_plane.observe.usage import USAGE_FLUSH_S, utc_day
from control_plane.tenants.keys import Budget

log = logging.getLogger(__name__)
# Each round also counts today's usage: this plane's as metered (in memory), so a day's budget
# is overspent by what arrives in about a round; the other planes' records are read from the
# usage store every USAGE_FLUSH_S, as often as they are written.
BUDGET_ROUND_S = 1.0


def spent_by_key(rows: list[dict]) -> dict[str, float]:
    """Usage rows -> each key's audio-seconds that count against its day (received, less refused)."""
    spent: dict[str, float] = {}
    for row in rows:
        spent[row["key"]] = spent.get(row["key"], 0.0) + row["audio_received_s"] - row["audio_refused_s"]
    return spent


class BudgetKeeper:
    def __init__(self, admissions: Admissions, plans: Callable[[], Mapping[str, PlanConfig]],
                 envoys: Callable[[], int], own_rows: Callable[[str], list[dict]],
                 other_rows: Callable[[str], Awaitable[list[dict]]],
                 publish: Callable[[dict[str, Budget]], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 share: Callable[[], float] = lambda: 1.0):
        """`plans`: each key's plan now (key id -> PlanConfig; keys without one absent);
        `envoys`: how many there are; `own_rows`: a day's usage rows as this plane metered them;
        `other_rows`: the day's durable rows of every other writer (the usage store);
        `publish`: serves the keys' budgets; `share`: this plane's part of every budget (with
        several planes, its Envoys' part of all Envoys: each plane sees only its own Envoys' logs)."""
        self.admissions, self.plans, self.envoys = admissions, plans, envoys
        self.own_rows, self.other_rows = own_rows, other_rows
        self.share = share
        self.publish, self.clock, self.wall = publish, clock, wall
        self.ledgers: dict[str, dict[str, Ledger]] = {}  # key id -> limit name -> its exact budget
        self.published: dict[str, Budget] = {}
        self.day_refused: dict[str, int] = {}  # key id -> until (epoch s)
        self.started = clock()
        # The other writers' audio-seconds by key, of the day named, as last read (at `_others_read`).
        self._others: tuple[str, dict[str, float]] = ("", {})
        self._others_read = -USAGE_FLUSH_S

    def _ledgers(self, key: str, plan: PlanConfig, now: float) -> dict[str, Ledger]:
        ledgers, share = self.ledgers.setdefault(key, {}), self.share()
        for name, (field, _) in MINUTE_LIMITS.items():
            amount = getattr(plan, field) * share
            if name not in ledgers or ledgers[name].per_minute != amount:  # a new key, its plan or share changed
                ledgers[name] = Ledger.full(amount, now)
        return ledgers

    def bill(self, plans: Mapping[str, PlanConfig], now: float) -> None:
        """Every admission the logs reported since the last round, into its key's ledgers (of keys
        with a plan; each owing at most MOST_OWED_MINUTES of its plan per Envoy)."""
        envoys = max(1, self.envoys())
        for billed in self.admissions.take_unbilled():
            if (plan := plans.get(billed.key)) is not None:
                ledgers = self._ledgers(billed.key, plan, billed.at)
                for name, units in ((REQUESTS_LIMIT, billed.requests), (AUDIO_SECONDS_LIMIT, billed.seconds)):
                    most_owed = MOST_OWED_MINUTES * envoys * getattr(plan, MINUTE_LIMITS[name][0])
                    ledgers[name].take(units, billed.at, most_owed)

    def decide(self, plans: Mapping[str, PlanConfig], now: float, wall: float) -> dict[str, Budget]:
        """Each key's budget now: its charges where it has demand, and a refusal where its day is
        spent. Ledgers are kept for keys billed or with demand, until they are full again."""
        demand = self.admissions.demand(now, self.started)
        for key in [k for k in self.ledgers if k not in plans]:
            del self.ledgers[key]
        budgets = {}
        for key, plan in plans.items():
            decided = {}
            if key in demand:
                buckets = {name: getattr(plan, field) for name, (field, _) in MINUTE_LIMITS.items()}
                decided = charges(demand[key], self._ledgers(key, plan, now), buckets, self.envoys(), now)
            elif key in self.ledgers and all(ledger.refilled(now) for ledger in self._ledgers(key, plan, now).values()):
                del self.ledgers[key]  # no demand, nothing owed: as a new key's, made again when it is next billed
            before = self.published.get(key, Budget())
            requests, audio = decided.get(REQUESTS_LIMIT), decided.get(AUDIO_SECONDS_LIMIT)
            budget = Budget(
                requests if requests is None or moved(requests, before.requests_charge) else before.requests_charge,
                audio if audio is None or moved(audio, before.audio_charge) else before.audio_charge,
                *((AUDIO_SECONDS_PER_DAY_LIMIT, self.day_refused[key]) if self.day_refused.get(key, 0) > wall
                  else (None, 0)))
            if budget != Budget():
                budgets[key] = budget
        return budgets

    async def check_days(self, plans: Mapping[str, PlanConfig], now: float, wall: float,
                         read_others: bool = True) -> None:
        """Which keys have spent today's audio-seconds: this plane's metering, and the other
        writers' durable records (read again when `read_others`, or when the day changed)."""
        daily = {key: plan.audio_seconds_per_day for key, plan in plans.items() if plan.audio_seconds_per_day}
        if not daily:
            self.day_refused = {}
            return
        today, until = utc_day(wall)
        day = today.isoformat()
        if read_others or self._others[0] != day:
            if self._others[0] != day:
                self._others = (day, {})  # a new day: nothing of the last one counts
            self._others_read = now
            try:
                self._others = (day, spent_by_key(await self.other_rows(day)))
            except Exception as error:  # noqa: BLE001 - the store away: the other planes' usage as last read
                log.warning("today's usage of other planes not read: %s", error)
        spent = spent_by_key(self.own_rows(day))
        for key, seconds in self._others[1].items():
            spent[key] = spent.get(key, 0.0) + seconds
        self.day_refused = {key: until for key, per_day in daily.items() if day_spent(spent.get(key, 0.0), per_day)}

    async def round(self, check_days: bool = False) -> None:
        """Bills what the logs reported, counts today's usage, and publishes the budgets if any
        changed; `check_days`: reads the other planes' usage now (otherwise every USAGE_FLUSH_S).
        The plane runs one before its first publish, so a key whose day is spent is refused from
        the start."""
        plans, now, wall = self.plans(), self.clock(), self.wall()
        self.bill(plans, now)
        await self.check_days(plans, now, wall, check_days or now - self._others_read >= USAGE_FLUSH_S)
        budgets = self.decide(plans, now, wall)
        if budgets != self.published:
            log.debug("budgets: %s", budgets)
            await self.publish(budgets)
            self.published = budgets

    async def run(self) -> None:
        while True:
            await asyncio.sleep(BUDGET_ROUND_S)
            try:
                await self.round()
            except Exception:  # noqa: BLE001 - tried again next round
                log.exception("budget round failed")
