"""Requests-in-flight limits as slots: how many more requests of a group each Envoy may admit.

A group is an API key (its limit: its plan's `requests_in_flight`) or a model's batch lane (its
limit: `auth.batch_in_flight_per_engine` x the model's serving engines, all batch keys
together). The control plane counts the group's requests from the access logs; the slots still
free are split among the Envoys that have seen the group, and each Envoy admits at most its part
(a token bucket of that many, refilled by the control plane, not by time:
control_plane/xds/quota_service.py). Several control planes each count the requests logged to
them, so each holds the share of a limit its Envoys are of all the planes' Envoys (rounded up:
never below one request). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from control_plane.fleet.resolved import Fleet
from control_plane.names import batch_lane


def plane_share(limit: int, envoys_here: int, envoys_total: int) -> int:
    """The part of a group's limit this control plane enforces over the Envoys that log to it."""
    if envoys_total <= envoys_here or envoys_here <= 0:
        return limit
    return max(1, math.ceil(limit * envoys_here / envoys_total))


def batch_lane_limits(fleet: Fleet, per_engine: int) -> dict[str, int]:
    """Each model's batch lane -> the batch requests its engines may hold: `per_engine` for each
    engine serving it (not draining); a model with none gets one, so batch work is never shut
    out for good."""
    serving: dict[str, int] = {}
    for backend in fleet.backends:
        if not backend.draining:
            for model in backend.models:
                serving[model] = serving.get(model, 0) + 1
    return {batch_lane(model): per_engine * max(1, serving.get(model, 0)) for model in fleet.model_names()}


@dataclass(frozen=True)
class GroupSlots:
    """A limited group: its limit on this plane and its requests in flight now."""

    limit: int
    in_flight: int

    @property
    def free(self) -> int:
        return max(0, self.limit - self.in_flight)


def needs_new_grants(before: GroupSlots | None, after: GroupSlots | None) -> bool:
    """Whether the Envoys must be told the group's slots again: a slot freed, the limit moved, the
    group gained or lost its limit, or its last slot was taken. A request that started took its
    token in Envoy already, so a count that rose changes nothing there, except that requests an
    Envoy let through before its first grant took none: once the group is at its limit, every
    Envoy is told so, whatever tokens it has left."""
    if before is None or after is None:
        return before != after
    return after.limit != before.limit or after.free > before.free or after.free == 0 < before.free


def split(free: int, holders: Sequence[int], first: int) -> dict[int, int]:
    """`free` slots over the Envoys (streams) holding the group: equal parts, and the remainder one
    each to the Envoys from the `first`-th on (the one that last asked for more)."""
    ordered = sorted(holders)
    if not ordered:
        return {}
    part, rest = divmod(free, len(ordered))
    start = first % len(ordered)
    return {stream: part + (1 if (i - start) % len(ordered) < rest else 0) for i, stream in enumerate(ordered)}
