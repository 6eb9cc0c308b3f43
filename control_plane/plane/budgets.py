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
from datetime import datetime, timedelta, timezone

from control_plane.config import PlanConfig
from control_plane.decide.budgets import MINUTE_LIMITS, Ledger, charges, day_spent, moved
from control_plane.names import AUDIO_SECONDS_LIMIT, AUDIO_SECONDS_PER_DAY_LIMIT, REQUESTS_LIMIT
from control_plane.observe.admissions import Admissions
from control_plane.tenants.keys import Budget

log = logging.getLogger(__name__)
BUDGET_ROUND_S = 1.0
# How often today's usage is read (this plane's as metered; other planes' as last written, every
# USAGE_FLUSH_S): a day's budget is overspent by what arrives in about this long.
DAY_CHECK_S = 1.0


def next_midnight(wall: float) -> tuple[str, int]:
    """Today's UTC date and the epoch second its day ends."""
    day = datetime.fromtimestamp(wall, timezone.utc).date()
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), timezone.utc)
    return day.isoformat(), int(end.timestamp())


class BudgetKeeper:
    def __init__(self, admissions: Admissions, plans: Callable[[], Mapping[str, PlanConfig]],
                 envoys: Callable[[], int], usage_rows: Callable[[str], Awaitable[list[dict]]],
                 publish: Callable[[dict[str, Budget]], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 share: Callable[[], float] = lambda: 1.0):
        """`plans`: each key's plan now (key id -> PlanConfig; keys without one absent);
        `envoys`: how many there are; `usage_rows`: a day's durable usage rows (every plane's);
        `publish`: serves the keys' budgets; `share`: this plane's part of every budget (with
        several planes, its Envoys' part of all Envoys: each plane sees only its own Envoys' logs)."""
        self.admissions, self.plans, self.envoys, self.usage_rows = admissions, plans, envoys, usage_rows
        self.share = share
        self.publish, self.clock, self.wall = publish, clock, wall
        self.ledgers: dict[str, dict[str, Ledger]] = {}  # key id -> limit name -> its exact budget
        self.published: dict[str, Budget] = {}
        self.day_refused: dict[str, int] = {}  # key id -> until (epoch s)
        self.started = clock()
        self._day_checked = -DAY_CHECK_S

    def _ledgers(self, key: str, plan: PlanConfig, now: float) -> dict[str, Ledger]:
        ledgers, share = self.ledgers.setdefault(key, {}), self.share()
        for name, (field, _) in MINUTE_LIMITS.items():
            amount = getattr(plan, field) * share
            if name not in ledgers or ledgers[name].per_minute != amount:  # a new key, its plan or share changed
                ledgers[name] = Ledger.full(amount, now)
        return ledgers

    def bill(self, plans: Mapping[str, PlanConfig], now: float) -> None:
        """Every admission the logs reported since the last round, into its key's ledgers."""
        for arrival in self.admissions.take_unbilled():
            if (plan := plans.get(arrival.key)) is not None:
                ledgers = self._ledgers(arrival.key, plan, arrival.at)
                ledgers[REQUESTS_LIMIT].take(1 if arrival.request else 0, arrival.at)
                ledgers[AUDIO_SECONDS_LIMIT].take(arrival.seconds, arrival.at)

    def decide(self, plans: Mapping[str, PlanConfig], now: float, wall: float) -> dict[str, Budget]:
        """Each key's budget now: its charges where it has demand, and a refusal where its day is spent."""
        demand = self.admissions.demand(now, self.started)
        for key in [k for k in self.ledgers if k not in plans]:
            del self.ledgers[key]
        budgets = {}
        for key, plan in plans.items():
            ledgers = self._ledgers(key, plan, now)
            buckets = {name: getattr(plan, field) for name, (field, _) in MINUTE_LIMITS.items()}
            decided = charges(demand[key], ledgers, buckets, self.envoys(), now) if key in demand else {}
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

    async def check_days(self, plans: Mapping[str, PlanConfig], wall: float) -> None:
        """Which keys have spent today's audio-seconds, by every plane's durable usage."""
        daily = {key: plan.audio_seconds_per_day for key, plan in plans.items() if plan.audio_seconds_per_day}
        if not daily:
            self.day_refused = {}
            return
        day, until = next_midnight(wall)
        spent: dict[str, float] = {}
        for row in await self.usage_rows(day):
            spent[row["key"]] = spent.get(row["key"], 0.0) + row["audio_received_s"] - row["audio_refused_s"]
        self.day_refused = {key: until for key, per_day in daily.items() if day_spent(spent.get(key, 0.0), per_day)}

    async def round(self, check_days: bool = False) -> None:
        """Bills what the logs reported, and publishes the budgets if any changed; `check_days`:
        reads today's usage now (otherwise every DAY_CHECK_S). The plane runs one before its
        first publish, so a key whose day is spent is refused from the start."""
        plans, now, wall = self.plans(), self.clock(), self.wall()
        self.bill(plans, now)
        if check_days or now - self._day_checked >= DAY_CHECK_S:
            self._day_checked = now
            try:
                await self.check_days(plans, wall)
            except Exception as error:  # noqa: BLE001 - the store away: the last refusals stand
                log.warning("today's usage not read: %s", error)
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
