"""operator/view.py's PlaneView over the plane's parts: the questions the operator's side asks and
the changes it makes, each answered by the part that owns it; nothing else of the plane."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

from control_plane.decide.ejection import Ejections
from control_plane.fleet.registry import Entry
from control_plane.names import AUDIO_SECONDS_LIMIT, BUDGET_SCALE, REQUESTS_LIMIT
from control_plane.observe import scraper
from control_plane.observe.ledger import Ledger
from control_plane.observe.load_tracker import LoadTracker
from control_plane.observe.outcomes import Outcomes
from control_plane.operator.tokens import TokenTable
from control_plane.operator.view import AuditTrail
from control_plane.plane.drains import Drains
from control_plane.plane.in_flight import InFlightLimits
from control_plane.plane.publisher import Publisher
from control_plane.plane.state_keeper import StateKeeper
from control_plane.plane.tls import Tls
from control_plane.plane.usage import UsageKeeper
from control_plane.tenants.keys import KeyTable

T = TypeVar("T")


class OperatorView:
    """control_plane/operator/view.py's PlaneView: all that operator/ (admin API, /status, /metrics) sees."""

    def __init__(self, *, publisher: Publisher, state: StateKeeper, drains: Drains, limits: InFlightLimits, tls: Tls,
                 tracker: LoadTracker, outcomes: Outcomes, ledger: Ledger, ejections: Ejections,
                 bootstrap_token: Callable[[], str | None], audit: Callable[[], AuditTrail], usage: UsageKeeper):
        """`bootstrap_token` and `audit`: the plane's, once started."""
        self._publisher, self._state, self._drains, self._limits, self._tls = publisher, state, drains, limits, tls
        self._tracker, self._outcomes, self._ledger, self._ejections = tracker, outcomes, ledger, ejections
        self._bootstrap_token, self._audit, self._usage = bootstrap_token, audit, usage

    # -- what it was told and serves

    config = property(lambda self: self._publisher.config)
    fleet = property(lambda self: self._publisher.fleet)

    def backends(self) -> list[Entry]:
        return self._state.registry.entries()

    def backend(self, backend_id: str) -> Entry | None:
        return self._state.registry.get(backend_id)

    def backend_at(self, url: str) -> Entry | None:
        return self._state.registry.find_url(url)

    def api_keys(self) -> list:
        return list(self._state.keys.by_id.values())

    def api_key(self, key_id: str):
        return self._state.keys.get(key_id)

    # -- who may call the admin API, and where its changes are written down

    bootstrap_token = property(lambda self: self._bootstrap_token())
    audit = property(lambda self: self._audit())

    def admin_tokens(self) -> Mapping:
        return MappingProxyType(self._state.tokens.by_id)

    def admin_token_for(self, secret: str):
        return self._state.tokens.find(secret)

    # -- the engines

    engine_key = property(lambda self: self._publisher.engine_key)
    engine_tls = property(lambda self: self._tls.engine_tls)

    def serves_https_engines(self) -> bool:
        return self._tls.serves_https_engines()

    # -- what it observed

    def scrape(self, backend_id: str, model: str):
        return self._tracker.tracks.get((backend_id, model))

    def endpoint_state(self, backend_id: str, model: str, base_weight: int, now: float):
        return self._tracker.state(backend_id, model, base_weight, now)

    def endpoint_states(self, now: float) -> dict:
        return scraper.endpoint_states(self._publisher.fleet, self._tracker, self._outcomes, self._ledger, now)

    def ejected_until(self, backend_id: str, model: str) -> float | None:
        return self._ejections.until.get((backend_id, model))

    def failure_ratio(self, endpoint: str, now: float) -> float:
        return self._outcomes.failure_ratio(endpoint, now)

    def audio_in_flight(self, endpoint: str) -> float:
        return self._ledger.in_flight(endpoint)

    def audio_rate(self, endpoint: str, now: float) -> float | None:
        return self._ledger.rate(endpoint, now)

    def metered(self, model: str):
        return self._ledger.metered.get(model)

    def metered_by_key(self) -> Mapping:
        return MappingProxyType(self._ledger.metered_by_key)

    def usage_of(self, key_id: str) -> dict[str, dict]:
        return self._ledger.usage_of(key_id)

    async def usage(self, first: str, last: str, key_id: str | None) -> list[dict]:
        return await self._usage.rows(first, last, key_id)

    def budget_of(self, key_id: str) -> dict:
        budget = self._publisher.budgets.get(key_id)
        if budget is None:
            return {}
        charges = {name: round(charge / BUDGET_SCALE, 3) for name, charge in
                   ((REQUESTS_LIMIT, budget.requests_charge), (AUDIO_SECONDS_LIMIT, budget.audio_charge))
                   if charge is not None}
        return ({"charge": charges} if charges else {}) | (
            {"refused": budget.refused, "refused_until": budget.refused_until} if budget.refused else {})

    def requests_in_flight(self, group: str) -> int:
        return self._limits.counts.count(group)

    def requests_in_flight_by_group(self) -> dict[str, int]:
        return self._limits.counts.counts()

    def in_flight_limits(self) -> Mapping[str, int]:
        return MappingProxyType(self._limits.limits)

    def no_slot_free(self, group: str) -> bool:
        return self._limits.slots.free.get(group) == 0

    # -- what it serves the Envoys, and how

    def envoys(self) -> list:
        return list(self._publisher.cache.envoys.values())

    def served_versions(self) -> Mapping[str, str]:
        snapshot = self._publisher.cache.snapshot
        return MappingProxyType(snapshot.versions) if snapshot else MappingProxyType({})

    def nacks_total(self) -> int:
        return self._publisher.cache.nacks_total

    def certificate_status(self) -> dict:
        return self._tls.certificates.status()

    def internal_tls_status(self) -> dict | None:
        return self._tls.internal_status()

    def state_status(self) -> dict:
        return self._state.status()

    # -- the changes the admin API makes

    async def add_backend(self, entry: Entry) -> Entry:
        return await self._state.add_backend(entry)

    async def drain(self, entry_id: str, timeout_s: float) -> Entry:
        return await self._drains.drain(entry_id, timeout_s)

    async def resume(self, entry_id: str) -> Entry:
        return await self._drains.resume(entry_id)

    async def remove_now(self, entry_id: str) -> None:
        await self._drains.remove_now(entry_id)

    async def change_keys(self, mutate: Callable[[KeyTable], T]) -> tuple[T, list[str]]:
        return await self._state.change_keys(mutate)

    async def change_tokens(self, mutate: Callable[[TokenTable], T]) -> T:
        return await self._state.change_tokens(mutate)
