"""A long recording's share of a model's engines (decide/longform.py, builders/routes.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from control_plane.builders.routes import longform_parallel
from control_plane.config import parse_config
from control_plane.decide.longform import HOLD_S, seen_busy
from control_plane.fleet.resolved import Backend, Fleet


@pytest.mark.parametrize("last_seen,clients,now,expected", [
    ({}, {"m": 0.0}, 10.0, {}),  # only pieces (or nothing) at the model: not busy
    ({}, {"m": 3.5, "n": 0.0}, 10.0, {"m": 10.0}),  # a client's clip at it: busy from now
    ({"m": 8.0}, {"m": 0.0}, 10.0, {"m": 8.0}),  # still within the hold
    ({"m": 10.0 - HOLD_S - 0.1}, {"m": 0.0}, 10.0, {}),  # the hold is over
    ({"gone": 9.0}, {}, 10.0, {"gone": 9.0}),  # a model the round did not see keeps its hold
])
def test_a_model_is_busy_while_clients_requests_are_there_and_a_little_after(last_seen, clients, now, expected):
    assert seen_busy(last_seen, clients, now) == expected


def test_pieces_take_every_idle_engine_and_the_share_of_a_busy_models():
    config = parse_config({"models": ["m", "one"], "longform": {"workers": ["127.0.0.1:8093"], "max_share": 0.3}})
    engines = tuple(Backend(f"e{i}", "10.0.0.1", 9000 + i, ("m",)) for i in range(7)) + (
        Backend("o", "10.0.0.2", 9000, ("one",)),)
    fleet = Fleet(models=config.models, backends=engines)
    assert longform_parallel(config, fleet) == {"m": 7, "one": 1}
    assert longform_parallel(config, replace(fleet, longform_busy=frozenset({"m", "one"}))) == {"m": 2, "one": 1}
    assert longform_parallel(config, Fleet(models=config.models, backends=())) == {"m": 1, "one": 1}
