"""A long recording's share of a model's engines (decide/longform.py, builders/routes.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from control_plane.builders.routes import longform_parallel
from control_plane.config import parse_config
from control_plane.decide.longform import HOLD_S, pieces_at_once, seen_busy
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
