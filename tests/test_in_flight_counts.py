"""Requests in flight per key and batch lane, counted from the access logs (observe/in_flight.py),
and when and how the Envoys get slots (decide/in_flight.py): table tests on log entries as Envoy
sends them."""

from __future__ import annotations

import pytest

from control_plane.decide.in_flight import GroupSlots, batch_lane_limits, needs_new_grants, plane_share, split
from control_plane.config import ModelConfig
from control_plane.fleet.resolved import Backend, Fleet
from control_plane.observe.access_logs import REQUEST_ENDED, TRY_ENDED, TRY_STARTED, record
from control_plane.observe.in_flight import ENDED_KEPT_S, RETRY_GRACE_S, InFlight
from control_plane.observe.ledger import Ledger
from control_plane.observe.outcomes import Outcomes
from tests.test_ledger import entry

K = "key-1"
LANE = "batch:m"


def started(rid="r1", key=K, lane=None):
    logged = entry(TRY_STARTED, key=key, request_id=rid)
    if lane:
        logged.request.request_headers["x-whisper-batch-lane"] = lane
    return logged


def try_ended(status, rid="r1", key=K, reset=False, endpoint="10.0.0.1:8000"):
    return entry(TRY_ENDED, status=status, key=key, request_id=rid, reset=reset, endpoint=endpoint)


def request_ended(status, rid="r1", key=K, tried=True, details=""):
    """The request's own log; `tried`: it names the engine its last try went to."""
    return entry(REQUEST_ENDED, endpoint="10.0.0.1:8000" if tried else None, status=status, key=key, request_id=rid,
                 details=details)


CASES = [
    ("a try started: one in flight", [started()], {K: 1}),
    ("two requests", [started("r1"), started("r2")], {K: 2}),
    ("answered: none", [started(), try_ended(200)], {}),
    ("a hedge or retry of the same request counts once", [started(), started(), try_ended(503)], {K: 1}),
    ("an end logged for a try that never started (could not connect) is not one of its tries",
     [started(), try_ended(503, endpoint="10.0.0.9:8000")], {K: 1}),
    ("a retried request answered by its second try", [started(), try_ended(503), started(), try_ended(200)], {}),
    ("a request that failed for good ends with its own log", [started(), try_ended(503), request_ended(503)], {}),
    ("a failed try leaves its request open for a retry", [started(), try_ended(503)], {K: 1}),
    ("an answer cut short is still in flight until its request's log",
     [started(), try_ended(200, reset=True)], {K: 1}),
    ("... which ends it", [started(), try_ended(200, reset=True), request_ended(200)], {}),
    ("the request's end logged before its start: the late start is ignored",
     [request_ended(503), started()], {}),
    ("a request without a key is not counted", [entry(TRY_STARTED, request_id="r9")], {}),
    ("keys are counted apart", [started("r1"), started("r2", key="key-2"), try_ended(200, "r1")], {"key-2": 1}),
    ("a batch key's request counts in its key and its model's batch lane",
     [started("r1", lane=LANE), started("r2", key="key-2", lane=LANE)], {K: 1, "key-2": 1, LANE: 2}),
    ("... and leaves both when it ends", [started("r1", lane=LANE), request_ended(504, "r1")], {}),
]


@pytest.mark.parametrize("what,entries,counts", CASES, ids=[c[0] for c in CASES])
def test_requests_in_flight_per_group(what, entries, counts):
    in_flight = InFlight()
    for item in entries:
        record(item, 1, Outcomes(), Ledger(), in_flight, now=1.0)
    assert in_flight.counts() == counts


def test_a_change_is_reported_only_when_a_count_moves():
    in_flight, ledger, outcomes = InFlight(), Ledger(), Outcomes()
    assert record(started(), 1, outcomes, ledger, in_flight, now=1.0) is True
    assert record(started(), 1, outcomes, ledger, in_flight, now=1.0) is False  # a hedge
    assert record(try_ended(503), 1, outcomes, ledger, in_flight, now=1.0) is False  # the hedge may answer
    assert record(try_ended(200), 1, outcomes, ledger, in_flight, now=1.0) is True


def test_a_failed_try_ends_its_request_unless_a_retry_starts_in_time():
    in_flight = InFlight()
    in_flight.started([K], "r1", 1, "e:1", now=0.0)
    in_flight.try_ended("r1", "e:1", answered=False, now=1.0)
    assert in_flight.expire(now=1.0 + RETRY_GRACE_S / 2, max_age_s=600) is False
    in_flight.started([K], "r1", 1, "e:2", now=1.0 + RETRY_GRACE_S / 2)  # the retry
    assert in_flight.expire(now=3.0 + RETRY_GRACE_S, max_age_s=600) is False and in_flight.counts() == {K: 1}
    in_flight.try_ended("r1", "e:9", answered=False, now=4.0)  # a try that never started
    assert in_flight.expire(now=4.0 + RETRY_GRACE_S, max_age_s=600) is False
    in_flight.try_ended("r1", "e:2", answered=False, now=4.0)
    assert in_flight.expire(now=4.0 + RETRY_GRACE_S, max_age_s=600) is True and in_flight.counts() == {}


def test_an_idle_engine_settles_only_requests_with_no_try_open_elsewhere():
    in_flight = InFlight()
    in_flight.started([K], "r1", 1, "e:1", now=0.0)
    in_flight.started([K], "r1", 1, "e:2", now=31.0)  # hedged: a second try on e:2
    in_flight.started([K, LANE], "r2", 2, "e:2", now=20.0)
    assert in_flight.settle({"e:2"}, now=31.2) is True and in_flight.counts() == {K: 1}  # r2 only
    assert in_flight.settle({"e:2"}, now=40.0) is False  # r1's first try still runs on e:1
    assert in_flight.settle({"e:1", "e:2"}, now=33.0) is False  # its hedge started too lately to be sure
    assert in_flight.settle({"e:1", "e:2"}, now=40.0) is True and in_flight.counts() == {}


def test_a_closed_stream_or_an_old_request_frees_its_slot():
    in_flight = InFlight()
    in_flight.started([K], "r1", 1, "e:1", now=0.0)
    in_flight.started([K, LANE], "r2", 2, "e:1", now=50.0)
    assert in_flight.stream_closed(1) is True and in_flight.counts() == {K: 1, LANE: 1}
    assert in_flight.expire(now=140.0, max_age_s=100.0) is False
    assert in_flight.expire(now=151.0, max_age_s=100.0) is True and in_flight.counts() == {}


def test_ended_ids_are_forgotten_after_a_while():
    in_flight = InFlight()
    in_flight.ended("r1", [K], now=0.0, tried=True)
    assert in_flight.started([K], "r1", 1, "e:1", now=1.0) is False
    in_flight.expire(now=ENDED_KEPT_S + 1, max_age_s=600)
    assert in_flight.started([K], "r1", 1, "e:1", now=ENDED_KEPT_S + 2) is True


SPENT = [
    # (what, the request's log, its x-whisper-limited, a Lua filter's own answer, groups whose
    # tokens were spent with nothing to show)
    ("refused by a rate limit after the in-flight filters", request_ended(429, tried=False), None, False,
     ({K, LANE}, {K, LANE})),
    ("a batch request refused by the key's in-flight filter spent its lane's",
     request_ended(429, tried=False, details="rate_limited_by_quota"), "requests_in_flight", False, ({LANE}, {LANE})),
    ("one that reached an engine is accounted for by its start", request_ended(503), None, False, (set(), set())),
    ("the Lua filter's own answer came before every quota filter", request_ended(429, tried=False), None, True,
     (set(), set())),
]


@pytest.mark.parametrize("what,logged,limited,lua_reply,spent", SPENT, ids=[c[0] for c in SPENT])
def test_a_request_that_never_reached_an_engine_has_its_groups_granted_again(what, logged, limited, lua_reply, spent):
    logged.common_properties.metadata.filter_metadata["whisper_gateway"].update({"batch_lane": LANE})
    if limited:
        logged.response.response_headers["x-whisper-limited"] = limited
    if lua_reply:
        logged.common_properties.metadata.filter_metadata["whisper_gateway"].update({"lua_reply": "1"})
    in_flight = InFlight()
    record(logged, 1, Outcomes(), Ledger(), in_flight, now=1.0)
    assert in_flight.take_changed() == spent


def test_changed_groups_are_taken_once():
    in_flight = InFlight()
    in_flight.started([K, LANE], "r1", 1, "e:1", now=0.0)
    assert in_flight.take_changed() == ({K, LANE}, set()) and in_flight.take_changed() == (set(), set())
    in_flight.try_ended("r1", "e:1", answered=True, now=1.0)
    assert in_flight.take_changed() == ({K, LANE}, set())


GRANTS = [
    # (what, before, after, tell the Envoys again)
    ("a slot freed", GroupSlots(2, 2), GroupSlots(2, 1), True),
    ("a request started: its token was taken in Envoy", GroupSlots(3, 1), GroupSlots(3, 2), False),
    ("the last slot taken: every Envoy is told none is left", GroupSlots(2, 1), GroupSlots(2, 2), True),
    ("over the limit, one ended, still none free", GroupSlots(2, 4), GroupSlots(2, 3), False),
    ("the limit changed", GroupSlots(2, 0), GroupSlots(3, 0), True),
    ("a key newly limited", None, GroupSlots(2, 0), True),
    ("a key no longer limited", GroupSlots(2, 0), None, True),
    ("never limited", None, None, False),
]


@pytest.mark.parametrize("what,before,after,tell", GRANTS, ids=[g[0] for g in GRANTS])
def test_when_the_envoys_are_granted_again(what, before, after, tell):
    assert needs_new_grants(before, after) is tell


@pytest.mark.parametrize("free,holders,first,parts", [
    (4, [1], 0, {1: 4}),
    (4, [2, 1], 0, {1: 2, 2: 2}),
    (3, [1, 2], 0, {1: 2, 2: 1}),
    (3, [1, 2], 1, {1: 1, 2: 2}),  # the remainder starts at the one that asked for more
    (1, [1, 2, 3], 2, {1: 0, 2: 0, 3: 1}),
    (0, [1, 2], 0, {1: 0, 2: 0}),
    (5, [], 0, {}),
])
def test_free_slots_split_over_the_envoys_holding_the_group(free, holders, first, parts):
    assert split(free, holders, first) == parts


@pytest.mark.parametrize("limit,here,total,share", [
    (4, 1, 1, 4), (4, 1, 2, 2), (3, 1, 2, 2), (1, 1, 3, 1), (10, 2, 3, 7), (4, 0, 2, 4), (4, 3, 2, 4)])
def test_plane_share(limit, here, total, share):
    assert plane_share(limit, here, total) == share


def test_a_batch_lane_holds_per_engine_slots_for_each_serving_engine():
    def backend(name, models, draining=False):
        return Backend(id=name, url=f"http://{name}:8000", address="10.0.0.1", port=8000, models=models,
                       draining=draining)
    fleet = Fleet(models=tuple(ModelConfig(name) for name in ("m", "n", "idle")), backends=(backend("a", ("m",)), backend("b", ("m", "n")),
                                                       backend("c", ("m",), draining=True)))
    assert batch_lane_limits(fleet, 2) == {"batch:m": 4, "batch:n": 2, "batch:idle": 2}  # none serving: still one


def test_an_envoy_flooding_made_up_requests_cannot_grow_the_counts_without_bound(monkeypatch):
    """Past MOST_OPEN requests open (and MOST_ENDED ended ids kept), a new one is not counted:
    its key's limit is less strict for it, and memory stays bounded."""
    monkeypatch.setattr("control_plane.observe.in_flight.MOST_OPEN", 50)
    monkeypatch.setattr("control_plane.observe.in_flight.MOST_ENDED", 20)
    flight = InFlight()
    moved = [flight.started(("key-1",), f"fake-{n}", 1, "10.0.0.1:1", now=1.0) for n in range(500)]
    assert sum(moved) == 50 and len(flight._open) == 50 and flight._counts["key-1"] == 50
    for n in range(500):
        flight.ended(f"late-{n}", ("key-1",), now=1.0, tried=True)
    assert len(flight._ended) == 20
    assert flight.ended("fake-0", ("key-1",), now=1.0, tried=True)  # a real one's end still closes it
    assert flight._counts["key-1"] == 49
