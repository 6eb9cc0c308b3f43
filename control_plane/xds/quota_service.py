"""Requests-in-flight slots for every Envoy over RLQS (Envoy's rate_limit_quota filter).

Envoy's rate_limit_quota filter (control_plane/builders/quotas.py) puts each request made with a
key in a bucket named by the key's id and asks this service how to treat each bucket. For a key
with a requests_in_flight limit the answer is a token bucket holding the Envoy's part of the
key's free slots (split as control_plane/decide/in_flight.py decides), refilled by the control plane, not by
time: each request takes a token in Envoy, at once and across its worker threads, and when the
access logs show one of the key's requests ended, every Envoy holding the key gets a fresh
bucket with its part of the slots then free. A key without a limit gets ALLOW_ALL.

Envoy 1.40 keeps a bucket's token bucket when it is assigned another, but builds a fresh one
after a blanket rule, so a grant is sent as DENY_ALL followed by the token bucket in the same
message (applied together). No request waits on this service: a bucket Envoy has not heard
about yet is allowed (so the first requests of a key at an Envoy are not counted against it),
each report (every REPORT_INTERVAL_S) is answered with fresh grants, and an assignment lapses
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

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 5  # Envoy reports every bucket this often; each report is answered with fresh grants
ASSIGNMENT_TTL_S = 3 * REPORT_INTERVAL_S
BUCKET_KEY = "key"  # the bucket id's entry that holds the key id
ALLOW, DENY = ratelimit_strategy_pb2.RateLimitStrategy.ALLOW_ALL, ratelimit_strategy_pb2.RateLimitStrategy.DENY_ALL
# A granted bucket refills one token per REFILL_S on its own (Envoy's token buckets need a rate):
# slow next to the grants, which replace it whenever a slot frees and at every report. Envoy
# starts a bucket full only if its size / rate is less than the host's uptime.
REFILL_S = 30


@dataclass(eq=False)  # watched by identity
class _Watcher:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    keys: set[str] = field(default_factory=set)  # keys to grant again


class Slots:
    """Each limited key's free slots, as decided: all the servicer reads. A stream watching is told
    which keys to grant again."""

    def __init__(self) -> None:
        self.free: dict[str, int] = {}  # limited key -> its free slots on this plane
        self.turns: dict[str, int] = {}  # per key: which Envoy gets the remainder of the next split
        self._watchers: set[_Watcher] = set()

    def publish(self, free: Mapping[str, int | None], regrant: set[str]) -> None:
        """New free slots for these keys (None: no limit now); the Envoys holding `regrant` are told."""
        for key, slots in free.items():
            if slots is None:
                self.free.pop(key, None)
            else:
                self.free[key] = slots
        for key in regrant:
            self.turns[key] = self.turns.get(key, 0) + 1
        self.tell(regrant)

    def tell(self, keys: set[str]) -> None:
        """Has every stream grant these keys again (an Envoy came to hold one: the parts moved)."""
        if keys:
            for watcher in self._watchers:
                watcher.keys |= keys
                watcher.event.set()

    def refused(self) -> frozenset[str]:
        """The limited keys with no slot free."""
        return frozenset(k for k, free in self.free.items() if free == 0)

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
    tokens_bucket.tokens_per_fill.value = 1
    tokens_bucket.fill_interval.seconds = REFILL_S
    return [bucket_action, fresh]


Split = Callable[[int, Sequence[int], int], dict[int, int]]  # (free, streams holding the key, turn) -> parts


class QuotaServicer(rlqs_pb2_grpc.RateLimitQuotaServiceServicer):
    """Every Envoy's RLQS stream. Knows which streams hold which key's bucket, so each gets its part."""

    def __init__(self, slots: Slots, split: Split):
        self.slots, self.split = slots, split
        self.holders: dict[str, set[int]] = {}  # key -> the streams that reported its bucket
        self._ids = itertools.count(1)

    def part(self, key: str, stream: int) -> int | None:
        """This stream's tokens for the key now (None: the key has no limit)."""
        free = self.slots.free.get(key)
        if free is None:
            return None
        return self.split(free, list(self.holders.get(key, {stream})), self.slots.turns.get(key, 0)).get(stream, 0)

    def answer(self, stream: int, buckets: Mapping[str, rlqs_pb2.BucketId],
               keys: Iterable[str]) -> rlqs_pb2.RateLimitQuotaResponse | None:
        actions = [action for key in keys if key in buckets for action in grant(buckets[key], self.part(key, stream))]
        return rlqs_pb2.RateLimitQuotaResponse(bucket_action=actions) if actions else None

    def on_reports(self, stream: int, buckets: dict[str, rlqs_pb2.BucketId],
                   reports: rlqs_pb2.RateLimitQuotaUsageReports) -> rlqs_pb2.RateLimitQuotaResponse | None:
        """Every reported bucket gets a fresh grant: a new one learns its part, an old one is renewed
        (and loses any tokens it refilled on its own)."""
        reported, joined = [], set()
        for usage in reports.bucket_quota_usages:
            key = usage.bucket_id.bucket.get(BUCKET_KEY)
            if key:
                buckets[key] = usage.bucket_id
                holders = self.holders.setdefault(key, set())
                if stream not in holders:
                    holders.add(stream)
                    if key in self.slots.free and len(holders) > 1:
                        joined.add(key)
                reported.append(key)
        self.slots.tell(joined)  # the other Envoys' parts shrink
        return self.answer(stream, buckets, reported)

    async def StreamRateLimitQuotas(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        stream = next(self._ids)
        buckets: dict[str, rlqs_pb2.BucketId] = {}
        inbox: deque = deque()
        watcher = self.slots.watch()

        async def read() -> None:
            try:
                async for reports in request_iterator:
                    inbox.append(reports)
                    watcher.event.set()
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                inbox.append(None)
                watcher.event.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                await watcher.event.wait()
                watcher.event.clear()
                responses = []
                while inbox:
                    reports = inbox.popleft()
                    if reports is None:
                        return
                    responses.append(self.on_reports(stream, buckets, reports))
                keys, watcher.keys = watcher.keys, set()
                responses.append(self.answer(stream, buckets, sorted(keys)))
                for response in responses:
                    if response is not None:
                        await context.write(response)
        finally:
            reader.cancel()
            self.slots.unwatch(watcher)
            for key in buckets:
                self.holders.get(key, set()).discard(stream)
