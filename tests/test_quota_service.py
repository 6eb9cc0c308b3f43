"""The RLQS side of the requests-in-flight limit (xds/quota_service.py): protocol rules on a fake
stream, in milliseconds. Real Envoy applying them is tests/test_in_flight.py."""

from __future__ import annotations

import asyncio

from envoy.service.rate_limit_quota.v3 import rlqs_pb2

from control_plane.decide.in_flight import split
from control_plane.xds.quota_service import ALLOW, ASSIGNMENT_TTL_S, DENY, QuotaServicer, Slots


def reports(*keys: str) -> rlqs_pb2.RateLimitQuotaUsageReports:
    usages = [rlqs_pb2.RateLimitQuotaUsageReports.BucketQuotaUsage(
        bucket_id=rlqs_pb2.BucketId(bucket={"group": k} if k else {"other": "x"}), num_requests_allowed=1) for k in keys]
    return rlqs_pb2.RateLimitQuotaUsageReports(domain="whisper_gateway", bucket_quota_usages=usages)


def told(response) -> dict[str, object]:
    """Key -> "allow", "deny" or the tokens granted, as Envoy ends up holding it (the last action wins)."""
    result = {}
    for action in (response.bucket_action if response is not None else []):
        assert action.quota_assignment_action.assignment_time_to_live.seconds == ASSIGNMENT_TTL_S
        strategy = action.quota_assignment_action.rate_limit_strategy
        key = action.bucket_id.bucket["group"]
        if strategy.HasField("token_bucket"):
            assert result.get(key) == "deny"  # a fresh bucket: Envoy keeps the old one unless a blanket rule came first
            bucket = strategy.token_bucket
            assert bucket.tokens_per_fill.value == bucket.max_tokens  # full again only after REFILL_S
            result[key] = bucket.max_tokens
        else:
            result[key] = {ALLOW: "allow", DENY: "deny"}[strategy.blanket_rule]
    return result


def test_every_reported_bucket_gets_its_part_and_an_unlimited_key_is_allowed():
    slots = Slots()
    slots.publish({"a": 3, "b": 0}, set())
    servicer, buckets = QuotaServicer(slots, split, "group"), {}
    response, moved = servicer.on_reports(1, buckets, reports("a", "b", "c"))
    assert told(response) == {"a": 3, "b": "deny", "c": "allow"} and moved == set()  # one Envoy: nobody else to tell
    assert told(servicer.on_reports(1, buckets, reports("a"))[0]) == {"a": 3}  # renewed at every report


def test_a_group_several_envoys_hold_is_split_afresh_for_all_at_each_report():
    slots = Slots()
    slots.publish({"a": 4}, set())
    servicer = QuotaServicer(slots, split, "group")
    first, second = {}, {}
    response, moved = servicer.on_reports(1, first, reports("a"))
    assert told(response) == {"a": 4} and moved == set()
    response, moved = servicer.on_reports(2, second, reports("a"))
    assert told(response) == {"a": 2} and moved == {"a"}  # stream 1 grants again: 2 of its 4
    assert told(servicer.answer(1, first, moved)) == {"a": 2}
    slots.publish({"a": 2}, set())  # stream 1's Envoy let two in: no grant needed, they took its tokens
    response, moved = servicer.on_reports(2, second, reports("a"))
    assert told(response) == {"a": 1} and moved == {"a"}  # and stream 1 is cut to 1, not left holding 2
    assert told(servicer.answer(1, first, moved)) == {"a": 1}


def test_only_the_keys_to_grant_again_wake_the_streams():
    slots = Slots()
    watcher = slots.watch()
    slots.publish({"a": 1, "b": 0}, {"b"})
    assert watcher.groups == {"b"} and watcher.event.is_set()
    assert slots.free == {"a": 1, "b": 0}
    slots.publish({"b": None}, {"b"})
    assert slots.free == {"a": 1}


def usage(group: str, denied: int) -> rlqs_pb2.RateLimitQuotaUsageReports:
    report = reports(group)
    report.bucket_quota_usages[0].num_requests_denied = denied
    return report


def test_a_slot_that_does_not_go_round_moves_to_the_envoy_refusing_for_want_of_it():
    slots = Slots()
    slots.publish({"a": 1}, set())
    servicer, first, second = QuotaServicer(slots, split, "group"), {}, {}
    assert told(servicer.on_reports(1, first, reports("a"))[0]) == {"a": 1}
    assert told(servicer.on_reports(2, second, reports("a"))[0]) == {"a": "deny"}  # one slot, two Envoys
    response, moved = servicer.on_reports(2, second, usage("a", denied=3))
    assert told(response) == {"a": 1} and moved == {"a"}  # stream 2 asked: the slot moves, stream 1 is told
    assert told(servicer.answer(1, first, moved)) == {"a": "deny"}
    assert told(servicer.on_reports(2, second, usage("a", denied=0))[0]) == {"a": 1}  # stays while unasked
    servicer.closed(2, second)
    assert told(servicer.answer(1, first, {"a"})) == {"a": 1} and servicer.holders == {"a": {1}}
    servicer.closed(1, first)
    assert servicer.holders == {} and servicer.wanting == {}


def test_a_bucket_without_a_key_is_ignored():
    assert QuotaServicer(Slots(), split, "group").on_reports(1, {}, reports("")) == (None, set())


class FakeContext:
    def __init__(self):
        self.written: list = []
        self.wrote = asyncio.Event()

    async def write(self, response):
        self.written.append(response)
        self.wrote.set()

    def peer(self):
        return "ipv4:127.0.0.1:40000"


def test_the_servicer_grants_again_the_moment_a_slot_frees():
    asyncio.run(servicer_grants())


async def servicer_grants():
    slots, inbox = Slots(), asyncio.Queue()
    slots.publish({"a": 0}, set())

    async def requests():
        while (item := await inbox.get()) is not None:
            yield item

    context = FakeContext()
    servicer = QuotaServicer(slots, split, "group")
    serving = asyncio.create_task(servicer.StreamRateLimitQuotas(requests(), context))
    await inbox.put(reports("a"))
    await asyncio.wait_for(context.wrote.wait(), 1)
    assert told(context.written[-1]) == {"a": "deny"}
    context.wrote.clear()
    slots.publish({"a": 1}, {"a"})  # one ended
    await asyncio.wait_for(context.wrote.wait(), 1)
    assert told(context.written[-1]) == {"a": 1}
    await inbox.put(None)  # Envoy closes the stream
    await asyncio.wait_for(serving, 1)
    assert len(context.written) == 2 and servicer.holders == {}


def test_an_assignment_outlives_two_reports_and_lapses_soon_after():
    """Renewed at every report, so it never lapses while a plane answers; gone soon after one stops
    answering, so a plane's outage refuses a key for at most this long (fail-open after)."""
    from control_plane.names import IN_FLIGHT_REPORT_S
    from control_plane.xds.quota_service import ASSIGNMENT_TTL_S

    assert 2 * IN_FLIGHT_REPORT_S < ASSIGNMENT_TTL_S <= 2 * IN_FLIGHT_REPORT_S + 1


def test_an_envoy_reporting_absurdly_many_buckets_is_bounded(monkeypatch):
    """An authenticated Envoy that reports made-up groups without end: a stream keeps at most
    MAX_BUCKETS_PER_STREAM, the rest are counted as dropped and neither granted nor held."""
    import control_plane.xds.quota_service as quota_service

    monkeypatch.setattr(quota_service, "MAX_BUCKETS_PER_STREAM", 3)
    slots, dropped = Slots(), []
    slots.publish({"g0": 1}, set())
    servicer, buckets = QuotaServicer(slots, split, "group", lambda reason, peer: dropped.append(reason)), {}
    response, _ = servicer.on_reports(1, buckets, reports(*[f"g{i}" for i in range(10)]))
    assert told(response) == {"g0": 1, "g1": "allow", "g2": "allow"}
    assert len(buckets) == 3 and dropped == ["too many buckets"] * 7
    assert set(servicer.holders) == {"g0", "g1", "g2"}
    servicer.on_reports(1, buckets, reports("g0"))  # buckets already held still report as before
    assert len(dropped) == 7
