"""Requests in flight per key and per model's batch lane: the feature's home in the plane.

A plan's `requests_in_flight` limits a key's requests being answered at once, and
`auth.batch_in_flight_per_engine` a model's batch lane (all batch keys' requests to it). Here the
plane holds the counts, each limited group's limit as this plane's share, and the free slots
the Envoys admit; it sets the limits after every whole publish and when the Envoys' count moved,
and refreshes the slots when the access logs move a count.

Where the rest of the feature lives, in the order a request meets it:
- envoy/model_router.lua: on a batch key's request, the model's batch lane header
  (`x-whisper-batch-lane`, names.batch_lane); the key's id travels as `x-whisper-key-id`.
- control_plane/builders/quotas.py: the rate limit quota filters, a bucket per batch lane and
  per key id, that ask the plane over RLQS (`limits_in_flight`: whether there are any).
- control_plane/xds/quota_service.py: RLQS, each Envoy's part of a group's free slots as a token
  bucket (`Slots`, published here; `QuotaServicer`, started by app.py on the xDS port).
- control_plane/observe/access_logs.py and observe/in_flight.py: the counts, from the access
  logs (first try's start to answered or failed for good); a refusal that never reached an
  engine gives its token back.
- control_plane/decide/in_flight.py: pure: the limits (`batch_lane_limits`), a plane's share of
  one (`plane_share`), when the Envoys must be granted again (`needs_new_grants`), the split of
  free slots among them (`split`).
- control_plane/operator/status.py: what /status shows of them (through the view).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from control_plane.config import GatewayConfig
from control_plane.decide.in_flight import GroupSlots, batch_lane_limits, needs_new_grants, plane_share
from control_plane.fleet.resolved import Fleet
from control_plane.observe.in_flight import InFlight
from control_plane.tenants.keys import Grant
from control_plane.xds.quota_service import Slots


class InFlightLimits:
    def __init__(self, config: Callable[[], GatewayConfig], fleet: Callable[[], Fleet | None],
                 grants: Callable[[GatewayConfig], Iterable[Grant]], envoys: Callable[[], tuple[int, int]]):
        """What was published: `config`, `fleet`, the keys' `grants` under a config, and `envoys`:
        (the Envoys connected here, the Envoys counted in all as last published)."""
        self._config, self._fleet, self._grants, self._envoys = config, fleet, grants, envoys
        self.counts = InFlight()  # requests in flight per key and per model's batch lane
        self.limits: dict[str, int] = {}  # key id or batch lane -> its share of the limit on this plane
        self._limits_for: tuple[int, int] | None = None  # (Envoys here, Envoys in all) they were set for
        self.group_slots: dict[str, GroupSlots] = {}  # each limited group's limit and count, as last published
        self.slots = Slots()  # their free slots, which the Envoys admit (xds/quota_service.py)

    def set_limits(self, force: bool = False) -> None:
        """Each key's requests_in_flight and each model's batch lane, as this plane's share: after
        every published change (`force`: keys, config, fleet), and when the Envoys' count moved."""
        config = self._config()
        here, total = self._envoys()
        if not force and (here, total) == self._limits_for:
            return
        self._limits_for = (here, total)
        limits: dict[str, int] = {}
        if config.auth.api_keys == "required":
            plans = {n: p.requests_in_flight for n, p in config.auth.plans.items() if p.requests_in_flight}
            grants = self._grants(config) if plans else ()
            limits = {g.id: plans[g.plan] for g in grants if g.plan in plans}
            if (per_engine := config.auth.batch_in_flight_per_engine) is not None and (fleet := self._fleet()) is not None:
                limits |= batch_lane_limits(fleet, per_engine)
        before = self.limits
        self.limits = {group: plane_share(limit, here, total) for group, limit in limits.items()}
        self.update_slots(set(before) | set(self.limits))

    def update_slots(self, groups: set[str] | None = None) -> None:
        """After the logs moved some groups' counts (None: those), or their limits changed: their
        slots, which the Envoys are told when one freed."""
        limits = self.limits
        spent: set[str] = set()  # groups with a request that took a token and never reached an engine
        if groups is None:  # from the logs: only limited groups matter (ones that lost a limit come named)
            groups, spent = self.counts.take_changed()
            groups &= limits.keys()
        free, regrant = {}, {g for g in spent if g in limits}
        for group in groups:
            after = GroupSlots(limits[group], self.counts.count(group)) if group in limits else None
            if needs_new_grants(self.group_slots.get(group), after):
                regrant.add(group)
            if after is None:
                self.group_slots.pop(group, None)
            else:
                self.group_slots[group] = after
            free[group] = None if after is None else after.free
        self.slots.publish(free, regrant)

    def settle(self, idle: set[str], now: float, max_age_s: float) -> None:
        """Each round: requests older than any request lasts, and those whose engines all hold
        nothing (`idle` endpoints), no longer count; their groups' slots are refreshed."""
        moved = self.counts.expire(now, max_age_s)
        if self.counts.settle(idle, now) or moved:
            self.update_slots()
