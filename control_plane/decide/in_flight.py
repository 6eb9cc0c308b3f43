"""Requests-in-flight limits as slots: how many more requests of a key each Envoy may admit.

A key's limit is its plan's `requests_in_flight`. The control plane counts the key's requests
from the access logs; the slots still free are split among the Envoys that have seen the key,
and each Envoy admits at most its part (a token bucket of that many, refilled by the control
plane, not by time: control_plane/xds/quota_service.py). Several control planes each count the
requests logged to them, so each holds the share of a limit its Envoys are of all the planes'
Envoys (rounded up: never below one request). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def plane_share(limit: int, envoys_here: int, envoys_total: int) -> int:
    """The part of a key's limit this control plane enforces over the Envoys that log to it."""
    if envoys_total <= envoys_here or envoys_here <= 0:
        return limit
    return max(1, math.ceil(limit * envoys_here / envoys_total))


@dataclass(frozen=True)
class KeySlots:
    """A limited key: its limit on this plane and its requests in flight now."""

    limit: int
    in_flight: int

    @property
    def free(self) -> int:
        return max(0, self.limit - self.in_flight)


def needs_new_grants(before: KeySlots | None, after: KeySlots | None) -> bool:
    """Whether the Envoys must be told the key's slots again: a slot freed, the limit moved, the
    key gained or lost its limit, or its last slot was taken. A request that started took its
    token in Envoy already, so a count that rose changes nothing there, except that requests an
    Envoy let through before its first grant took none: once the key is at its limit, every
    Envoy is told so, whatever tokens it has left."""
    if before is None or after is None:
        return before != after
    return after.limit != before.limit or after.free > before.free or after.free == 0 < before.free


def split(free: int, holders: Sequence[int], turn: int) -> dict[int, int]:
    """`free` slots over the Envoys (streams) holding the key: equal parts, and the remainder one
    each to the next Envoys in `turn`'s rotation, so no Envoy always gets it."""
    ordered = sorted(holders)
    if not ordered:
        return {}
    part, rest = divmod(free, len(ordered))
    start = turn % len(ordered)
    return {stream: part + (1 if (i - start) % len(ordered) < rest else 0) for i, stream in enumerate(ordered)}
