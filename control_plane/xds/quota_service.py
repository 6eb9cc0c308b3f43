"""Requests-in-flight slots for every Envoy over RLQS (Envoy's rate_limit_quota filter).

Envoy's rate_limit_quota filters (control_plane/builders/quotas.py) put each request in a bucket
named by its group, a key's id or a model's batch lane, and ask this service how to treat each
bucket. For a group with a limit the answer is a token bucket holding the Envoy's part of the
group's free slots (split as control_plane/decide/in_flight.py decides), refilled by the control
plane, not by time: each request takes a token in Envoy, at once and across its worker threads,
and when the access logs show one of the group's requests ended, every Envoy holding the group
gets a fresh bucket with its part of the slots then free. A group without a limit gets ALLOW_ALL.

Envoy 1.40 keeps a bucket's token bucket when it is assigned another, but builds a fresh one
after a blanket rule, so a grant is sent as DENY_ALL followed by the token bucket in the same
message (applied together). No request waits on this service: a bucket Envoy has not heard
about yet is allowed (so the first requests of a group at an Envoy are not counted against it),
each report (every few seconds: builders/quotas.py) is answered with fresh grants, and an assignment lapses
ASSIGNMENT_TTL_S after that, so a control plane that is gone refuses no one for long.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.type.v3 import ratelimit_strategy_pb2

from control_plane.xds.server import Authorize, allow_all, read_into

log = logging.getLogger(__name__)

# Each report (every IN_FLIGHT_REPORT_S) renews every bucket's assignment; one that is not renewed
# lapses after this, and Envoy falls back to its no_assignment_behavior, ALLOW_ALL (builders/quotas.py):
# a control plane that is gone (stopped, restarting, cut off) refuses no one for longer than this.
# Fail-open: while no plane answers, in-flight limits are not enforced (rates and budgets still are).
# Two reports and a second (names.IN_FLIGHT_REPORT_S is 2; tests/test_quota_service.py holds them together).
ASSIGNMENT_TTL_S = 5
ALLOW, DENY = ratelimit_strategy_pb2.RateLimitStrategy.ALLOW_ALL, ratelimit_strategy_pb2.RateLimitStrategy.DENY_ALL
# A granted bucket refills itself fully in REFILL_S (Envoy's token buckets need a rate): slow
# next to the grants, which replace it whenever a slot frees and at every report, so a part
# below REFILL_S / (2 x the report interval) never gains a token on its own. Envoy 1.40 starts a
# bucket empty (and logs a bug) when size / rate, here REFILL_S, exceeds the host's uptime.
REFILL_S = 300
# Buckets one stream may report (an Envoy has one per key and model's batch lane it saw): what
# an authenticated Envoy reports is still bounded; more are not granted, and counted.
MAX_BUCKETS_PER_STREAM = 200_000


@dataclass(eq=False)  # watched by identity
class _Watcher:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    groups: set[str] = field(default_factory=set)  # groups to grant again


class Slots:
    """Each limited group's free slots, as decided: all the servicer reads. A stream watching is told
    which groups to grant again."""

    def __init__(self) -> None:
        self.free: dict[str, int] = {}  # limited group -> its free slots on this plane
        self._watchers: set[_Watcher] = set()

    def publish(self, free: Mapping[str, int | None], regrant: set[str]) -> None:
        """New free slots for these groups (None: no limit now); the Envoys holding `regrant` are told."""
        for group, slots in free.items():
            if slots is None:
                self.free.pop(group, None)
            else:
                self.free[group] = slots
        self.tell(regrant)

    def tell(self, groups: set[str], skip: _Watcher | None = None) -> None:
        """Has every stream (but `skip`'s) grant these groups again: the parts moved."""
        if groups:
            for watcher in self._watchers:
                if watcher is not skip:
                    watcher.groups |= groups
                    watcher.event.set()

    def watch(self) -> _Watcher:
        watcher = _Watcher()
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: _Watcher) -> None:
        self._watchers.discard(watcher)


def grant(bucket: rlqs_pb2.BucketId, tokens: int | None) -> list[rlqs_pb2.RateLimitQuotaResponse.BucketAction]:
    """The actions that give a bucket `tokens` requests (0: refuse all; None: no limit, allow all)."""
    def blanket(rule: int) -> rlqs_pb2.RateLimitQuotaResponse.BucketAction:
        action = rlqs_pb2.RateLimitQuotaResponse.BucketAction(bucket_id=bucket)
        action.quota_assignment_action.assignment_time_to_live.seconds = ASSIGNMENT_TTL_S
        action.quota_assignment_action.rate_limit_strategy.blanket_rule = rule
        return action

    if tokens is None:
        return [blanket(ALLOW)]
    if tokens == 0:
        return [blanket(DENY)]
    bucket_action = blanket(DENY)  # then the token bucket: Envoy builds a fresh one after a blanket rule
    fresh = rlqs_pb2.RateLimitQuotaResponse.BucketAction(bucket_id=bucket)
    fresh.quota_assignment_action.assignment_time_to_live.seconds = ASSIGNMENT_TTL_S
    tokens_bucket = fresh.quota_assignment_action.rate_limit_strategy.token_bucket
    tokens_bucket.max_tokens = tokens
    tokens_bucket.tokens_per_fill.value = tokens
    tokens_bucket.fill_interval.seconds = REFILL_S
    return [bucket_action, fresh]


Split = Callable[[int, Sequence[int], int], dict[int, int]]  # (free, streams holding the group, first) -> parts


class QuotaServicer(rlqs_pb2_grpc.RateLimitQuotaServiceServicer):
    """Every Envoy's RLQS stream. Knows which streams hold which group's bucket, so each gets its
    part, and which last asked for more: where the slots do not go round, the rest goes there."""

    def __init__(self, slots: Slots, split: Split, bucket_entry: str,
                 dropped: Callable[[str, str], None] = lambda reason, peer: None, authorize: Authorize = allow_all):
        self.slots, self.split = slots, split
        self.authorize = authorize  # only Envoys report quotas (RLQS streams name no node)
        self.dropped = dropped  # (reason, peer) of each bucket report not taken
        self.bucket_entry = bucket_entry  # the bucket id's entry that names the group
        self.peers: dict[int, str] = {}  # stream -> the peer's label (its certificate's identity)
        self.holders: dict[str, set[int]] = {}  # group -> the streams that reported its bucket
        self.wanting: dict[str, int] = {}  # group -> the stream that last reported refusals with no part
        self._ids = itertools.count(1)

    def part(self, group: str, stream: int) -> int | None:
        """This stream's tokens for the group now (None: the group has no limit)."""
        free = self.slots.free.get(group)
        if free is None:
            return None
        holders = sorted(self.holders.get(group) or {stream})
        wanting = self.wanting.get(group)
        first = holders.index(wanting) if wanting in holders else 0
        return self.split(free, holders, first).get(stream, 0)

    def answer(self, stream: int, buckets: Mapping[str, rlqs_pb2.BucketId],
               groups: Iterable[str]) -> rlqs_pb2.RateLimitQuotaResponse | None:
        actions = [action for group in groups if group in buckets for action in grant(buckets[group], self.part(group, stream))]
        return rlqs_pb2.RateLimitQuotaResponse(bucket_action=actions) if actions else None

    def on_reports(self, stream: int, buckets: dict[str, rlqs_pb2.BucketId],
                   reports: rlqs_pb2.RateLimitQuotaUsageReports
                   ) -> tuple[rlqs_pb2.RateLimitQuotaResponse | None, set[str]]:
        """Every reported bucket gets a fresh grant: a new one learns its part, an old one is renewed
        (and loses any tokens it refilled on its own). Returns that, and the groups the other
        Envoys holding them must be granted again: a group several hold is split afresh at each
        report, since the others' parts were cut from a count that has moved since."""
        reported, moved = [], set()
        for usage in reports.bucket_quota_usages:
            group = usage.bucket_id.bucket.get(self.bucket_entry)
            if group and group not in buckets and len(buckets) >= MAX_BUCKETS_PER_STREAM:
                self.dropped("too many buckets", self.peers.get(stream, f"stream {stream}"))
                continue
            if group:
                buckets[group] = usage.bucket_id
                holders = self.holders.setdefault(group, set())
                holders.add(stream)
                if (usage.num_requests_denied and self.slots.free.get(group) and self.part(group, stream) == 0
                        and self.wanting.get(group) != stream):
                    self.wanting[group] = stream  # refused here while a slot is free elsewhere: it moves here
                if len(holders) > 1 and group in self.slots.free:
                    moved.add(group)
                reported.append(group)
        return self.answer(stream, buckets, reported), moved

    def closed(self, stream: int, buckets: Mapping[str, rlqs_pb2.BucketId]) -> None:
        """A stream ended: its parts go to the other Envoys holding its groups."""
        for group in buckets:
            holders = self.holders.get(group, set())
            holders.discard(stream)
            if not holders:
                self.holders.pop(group, None)
            if self.wanting.get(group) == stream:
                del self.wanting[group]
        self.slots.tell({g for g in buckets if g in self.slots.free and g in self.holders})

    async def StreamRateLimitQuotas(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        label = await self.authorize(context, None)
        stream = next(self._ids)
        self.peers[stream] = label
        buckets: dict[str, rlqs_pb2.BucketId] = {}
        inbox: deque = deque()
        watcher = self.slots.watch()
        reader = asyncio.create_task(read_into(request_iterator, inbox, watcher.event))
        try:
            while True:
                await watcher.event.wait()
                watcher.event.clear()
                responses = []
                while inbox:
                    reports = inbox.popleft()
                    if reports is None:
                        return
                    response, moved = self.on_reports(stream, buckets, reports)
                    responses.append(response)
                    self.slots.tell(moved, skip=watcher)
                groups, watcher.groups = watcher.groups, set()
                responses.append(self.answer(stream, buckets, sorted(groups)))
                for response in responses:
                    if response is not None:
                        await context.write(response)
        finally:
            reader.cancel()
            self.slots.unwatch(watcher)
            self.closed(stream, buckets)
            self.peers.pop(stream, None)
