"""A long recording's share of a model's engines (decide/longform.py, builders/routes.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from control_plane.builders.routes import longform_parallel
from control_plane.config import parse_config
from control_plane.decide.longform import HOLD_S, clips_waiting, levels, pieces_at_once, seen_busy
from control_plane.fleet.resolved import Backend, Fleet
from control_plane.observe.ledger import UNKNOWN_MODEL


@pytest.mark.parametrize("last_seen,clients,waiting,now,expected", [
    ({}, {"m": 0.0}, {"m": 3}, 10.0, {}),  # only pieces at the model (queued or not): no clip waits
    ({}, {"m": 3.5}, {"m": 0}, 10.0, {}),  # a client's clip there, but room for it: no clip waits
    ({}, {"m": 3.5, "n": 2.0}, {"m": 2, "n": 0}, 10.0, {"m": 10.0}),  # a clip and a queue: busy from now
    ({"m": 8.0}, {"m": 0.0}, {"m": 0}, 10.0, {"m": 8.0}),  # still within the hold
    ({"m": 10.0 - HOLD_S - 0.1}, {"m": 0.0}, {}, 10.0, {}),  # the hold is over
    ({"gone": 9.0}, {}, {}, 10.0, {"gone": 9.0}),  # a model the round did not see keeps its hold
])
def test_a_model_is_busy_while_clips_wait_there_and_a_little_after(last_seen, clients, waiting, now, expected):
    assert seen_busy(last_seen, clients, waiting, now) == expected


def test_pieces_fill_idle_engines_slots_and_a_busy_models_share_divided_among_its_recordings():
    settings = parse_config({"models": ["m"], "longform": {"workers": 1, "pieces_per_engine": 8,
                                                           "max_share": 0.3}}).longform
    engines = {"m": 7, "one": 1, "none": 0}
    assert pieces_at_once(settings, engines, set(), {}) == {"m": 56, "one": 8, "none": 8}
    assert pieces_at_once(settings, engines, {"m", "one"}, {}) == {"m": 16, "one": 2, "none": 8}
    # Three recordings at a busy model share its share; one at an idle model takes all of it.
    assert pieces_at_once(settings, engines, {"m"}, {"m": 3, "one": 1}) == {"m": 5, "one": 8, "none": 8}
    assert pieces_at_once(settings, {"m": 1}, {"m"}, {"m": 10}) == {"m": 1}  # at least one each
    # A recording streamed to its worker unread names no model in the logs: it shares every model's.
    assert pieces_at_once(settings, engines, {"m"}, {"m": 1, UNKNOWN_MODEL: 2}) == {"m": 5, "one": 4, "none": 4}


def test_the_routes_carry_the_decision_or_else_every_slot():
    config = parse_config({"models": ["m", "n"], "longform": {"workers": 1, "pieces_per_engine": 4}})
    fleet = Fleet(models=config.models, backends=tuple(Backend(f"e{i}", "10.0.0.1", 9000 + i, ("m", "n")) for i in range(3)))
    assert longform_parallel(config, fleet) == {"m": 12, "n": 12}
    assert longform_parallel(config, replace(fleet, longform_parallel={"m": 5})) == {"m": 5, "n": 12}


@pytest.mark.parametrize("last,waiting,expected", [
    ({}, set(), {"m": 12.0}),  # a model not seen before: every slot
    ({}, {"m"}, {"m": 6.0}),  # clips wait: half of it
    ({"m": 6.0}, {"m"}, {"m": 3.0}),  # and half again the next round
    ({"m": 1.5}, {"m"}, {"m": 1.0}),  # never under one piece per engine
    ({"m": 3.0}, set(), {"m": 4.0}),  # no clip waits: one more per engine
    ({"m": 11.5}, set(), {"m": 12.0}),  # up to pieces_per_engine
])
def test_the_room_recordings_take_halves_while_clips_wait_and_grows_back_by_one(last, waiting, expected):
    settings = parse_config({"models": ["m"], "longform": {"workers": 1}}).longform
    assert levels(settings, last, {"m"}, waiting) == expected


def test_a_level_lowers_a_recordings_pieces_below_the_share_never_above_it():
    settings = parse_config({"models": ["m"], "longform": {"workers": 1, "pieces_per_engine": 8,
                                                           "max_share": 0.5}}).longform
    engines = {"m": 4}
    assert pieces_at_once(settings, engines, set(), {}, {"m": 8.0}) == {"m": 32}
    assert pieces_at_once(settings, engines, {"m"}, {}, {"m": 8.0}) == {"m": 16}  # the share caps it
    assert pieces_at_once(settings, engines, {"m"}, {"m": 2}, {"m": 1.0}) == {"m": 2}  # 4 per level 1, two recordings
    assert pieces_at_once(settings, engines, {"m"}, {"m": 8}, {"m": 1.0}) == {"m": 1}  # at least one each
    # The clips' wait is the same signal the share's hold starts from.
    assert clips_waiting({"m": 3.5, "n": 0.0, "o": 2.0}, {"m": 2, "n": 4, "o": 0}) == {"m"}
