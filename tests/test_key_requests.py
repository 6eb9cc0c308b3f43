"""A key's requests in flight, counted from the access logs (observe/key_requests.py), and who is at
the limit (decide/in_flight.py): table tests on log entries as Envoy sends them."""

from __future__ import annotations

import pytest

from control_plane.decide.in_flight import KeySlots, needs_new_grants, plane_share, split
from control_plane.observe.access_logs import REQUEST_ENDED, TRY_ENDED, TRY_STARTED, record
from control_plane.observe.key_requests import ENDED_KEPT_S, KeyRequests
from control_plane.observe.ledger import Ledger
from control_plane.observe.outcomes import Outcomes
from tests.test_ledger import entry

K = "key-1"


def started(rid="r1", key=K):
    return entry(TRY_STARTED, key=key, request_id=rid)


def try_ended(status, rid="r1", key=K, reset=False):
    return entry(TRY_ENDED, status=status, key=key, request_id=rid, reset=reset)


def request_ended(status, rid="r1", key=K):
    return entry(REQUEST_ENDED, endpoint=None, status=status, key=key, request_id=rid)


CASES = [
    ("a try started: one in flight", [started()], {K: 1}),
    ("two requests", [started("r1"), started("r2")], {K: 2}),
    ("answered: none", [started(), try_ended(200)], {}),
    ("a hedge or retry of the same request counts once", [started(), started(), try_ended(503)], {K: 1}),
    ("a retried request answered by its second try", [started(), try_ended(503), started(), try_ended(200)], {}),
    ("a request that failed for good ends with its own log", [started(), try_ended(503), request_ended(503)], {}),
    ("an answer cut short is still in flight until its request's log",
     [started(), try_ended(200, reset=True)], {K: 1}),
    ("... which ends it", [started(), try_ended(200, reset=True), request_ended(200)], {}),
    ("the request's end logged before its start: the late start is ignored",
     [request_ended(503), started()], {}),
    ("a request without a key is not counted", [entry(TRY_STARTED, request_id="r9")], {}),
    ("keys are counted apart", [started("r1"), started("r2", key="key-2"), try_ended(200, "r1")], {"key-2": 1}),
]


@pytest.mark.parametrize("what,entries,counts", CASES, ids=[c[0] for c in CASES])
def test_requests_in_flight_per_key(what, entries, counts):
    keys = KeyRequests()
    for item in entries:
        record(item, 1, Outcomes(), Ledger(), keys, now=1.0)
    assert keys.counts() == counts


def test_a_change_is_reported_only_when_a_count_moves():
    keys, ledger, outcomes = KeyRequests(), Ledger(), Outcomes()
    assert record(started(), 1, outcomes, ledger, keys, now=1.0) is True
    assert record(started(), 1, outcomes, ledger, keys, now=1.0) is False  # a hedge
    assert record(try_ended(503), 1, outcomes, ledger, keys, now=1.0) is False  # to be retried
    assert record(try_ended(200), 1, outcomes, ledger, keys, now=1.0) is True


def test_a_closed_stream_or_an_old_request_frees_its_slot():
    keys = KeyRequests(max_age_s=100.0)
    keys.started(K, "r1", stream=1, now=0.0)
    keys.started(K, "r2", stream=2, now=50.0)
    assert keys.stream_closed(1) is True and keys.counts() == {K: 1}
    assert keys.expire(now=140.0) is False
    assert keys.expire(now=151.0) is True and keys.counts() == {}


def test_ended_ids_are_forgotten_after_a_while():
    keys = KeyRequests()
    keys.ended(K, "r1", now=0.0)
    assert keys.started(K, "r1", stream=1, now=1.0) is False
    keys.expire(now=ENDED_KEPT_S + 1)
    assert keys.started(K, "r1", stream=1, now=ENDED_KEPT_S + 2) is True


def test_changed_keys_are_taken_once():
    keys = KeyRequests()
    keys.started(K, "r1", stream=1, now=0.0)
    keys.started("key-2", "r2", stream=1, now=0.0)
    assert keys.take_changed() == {K, "key-2"} and keys.take_changed() == set()
    keys.ended(K, "r1", now=1.0)
    assert keys.take_changed() == {K}


GRANTS = [
    # (what, before, after, tell the Envoys again)
    ("a slot freed", KeySlots(2, 2), KeySlots(2, 1), True),
    ("a request started: its token was taken in Envoy", KeySlots(3, 1), KeySlots(3, 2), False),
    ("the last slot taken: every Envoy is told none is left", KeySlots(2, 1), KeySlots(2, 2), True),
    ("over the limit, one ended, still none free", KeySlots(2, 4), KeySlots(2, 3), False),
    ("the limit changed", KeySlots(2, 0), KeySlots(3, 0), True),
    ("a key newly limited", None, KeySlots(2, 0), True),
    ("a key no longer limited", KeySlots(2, 0), None, True),
    ("never limited", None, None, False),
]


@pytest.mark.parametrize("what,before,after,tell", GRANTS, ids=[g[0] for g in GRANTS])
def test_when_the_envoys_are_granted_again(what, before, after, tell):
    assert needs_new_grants(before, after) is tell


@pytest.mark.parametrize("free,holders,turn,parts", [
    (4, [1], 0, {1: 4}),
    (4, [2, 1], 0, {1: 2, 2: 2}),
    (3, [1, 2], 0, {1: 2, 2: 1}),
    (3, [1, 2], 1, {1: 1, 2: 2}),  # the remainder rotates
    (1, [1, 2, 3], 2, {1: 0, 2: 0, 3: 1}),
    (0, [1, 2], 0, {1: 0, 2: 0}),
    (5, [], 0, {}),
])
def test_free_slots_split_over_the_envoys_holding_the_key(free, holders, turn, parts):
    assert split(free, holders, turn) == parts
    assert sum(parts.values()) == (free if holders else 0)


@pytest.mark.parametrize("limit,here,total,share", [
    (4, 1, 1, 4), (4, 1, 2, 2), (3, 1, 2, 2), (1, 1, 3, 1), (10, 2, 3, 7), (4, 0, 2, 4), (4, 3, 2, 4)])
def test_plane_share(limit, here, total, share):
    assert plane_share(limit, here, total) == share
