"""decide/ejection.py: which failing endpoints go out, for how long, and never more than half a model."""

from __future__ import annotations

import pytest

from control_plane.decide.ejection import EJECTION_S, FORGIVE_AFTER_S, MAX_EJECTION_S, Ejections


@pytest.mark.parametrize("ratios, out", [
    ({"m": [("a", 0.0), ("b", 0.9)]}, {("b", "m")}),                        # one of two may go
    ({"m": [("a", 0.9)]}, set()),                                            # a model's only engine stays
    ({"m": [("a", 0.5), ("b", 0.9), ("c", 0.0)]}, {("b", "m")}),           # one of three: the worst
    ({"m": [("a", 0.5), ("b", 0.9), ("c", 0.0), ("d", 0.1)]}, {("a", "m"), ("b", "m")}),
    ({"m": [("a", 0.29), ("b", 0.0)]}, set()),                               # under EJECT_AT
    ({"m": [("a", 0.9), ("b", 0.9)]}, {("a", "m")}),                        # all failing alike: half
])
def test_who_goes_out(ratios, out):
    ejected, returned = Ejections().step(ratios, now=0.0)
    assert set(ejected) == out and returned == set()


def test_ejections_back_off_and_are_forgiven():
    ejections, failing = Ejections(), {"m": [("a", 0.0), ("b", 0.9)]}
    now = 0.0
    for expected in (EJECTION_S, 2 * EJECTION_S, 4 * EJECTION_S):
        ejected, _ = ejections.step(failing, now)
        assert ejections.until[("b", "m")] == now + expected
        now += expected
        ejected, returned = ejections.step({"m": [("a", 0.0), ("b", 0.0)]}, now)  # back, evidence forgotten
        assert returned == {("b", "m")} and not ejected
    ejections.times[("b", "m")] = 20
    ejections.step(failing, now)
    assert ejections.until[("b", "m")] == now + MAX_EJECTION_S
    now += MAX_EJECTION_S + FORGIVE_AFTER_S + 1
    ejections.step({"m": [("a", 0.0), ("b", 0.0)]}, now)
    ejections.step(failing, now)
    assert ejections.until[("b", "m")] == now + EJECTION_S  # forgiven: from the start again


def test_an_endpoint_that_left_the_fleet_is_dropped():
    ejections = Ejections()
    ejections.step({"m": [("a", 0.0), ("b", 0.9)]}, 0.0)
    ejected, _ = ejections.step({"m": [("a", 0.0)]}, 1.0)
    assert not ejected
