"""decide/hedging.py: each model's try deadline from its measured speed."""

import pytest

from control_plane.decide.hedging import MIN_SAMPLES, REPUBLISH_S, deadline_ms_per_audio_s, deadlines, on_grid, to_publish


@pytest.mark.parametrize("ms,expected", [(0.2, 1), (1, 1), (1.1, 2), (2, 2), (100, 107), (107, 107), (108, 118)])
def test_the_grid_rounds_up_to_its_next_step(ms, expected):
    assert on_grid(ms) == expected


@pytest.mark.parametrize("why,samples,factor,expected", [
    ("too few tries: the configured deadline stands", [(10.0, 1.0)] * (MIN_SAMPLES - 1), 1.5, None),
    ("short clips are not evidence of speed", [(1.0, 0.5)] * 50, 1.5, None),
    ("0.1 s per audio-second, x1.5 -> 150 ms, on the grid", [(10.0, 1.0)] * MIN_SAMPLES, 1.5, 157),
    ("the 90th percentile, not the mean: two slow tries in ten count",
     [(10.0, 1.0)] * 8 + [(10.0, 4.0)] * 2, 1.0, 406),
    ("one slow try in twenty does not", [(10.0, 1.0)] * 19 + [(10.0, 40.0)], 1.0, 107),
    ("a busier engine (queueing) raises it", [(10.0, 3.0)] * 10, 1.0, 305),
])
def test_deadline_per_audio_second(why, samples, factor, expected):
    assert deadline_ms_per_audio_s(samples, factor) == expected, why


def test_only_models_with_evidence_get_a_deadline():
    assert deadlines({"fast": [(30.0, 3.0)] * 10, "new": [(30.0, 3.0)]}, 2.0) == {"fast": 208}


@pytest.mark.parametrize("why,published,measured,now,last,expected", [
    ("a model measured for the first time: at once", {}, {"m": 100}, 5.0, None, {"m": 100}),
    ("a flap of a grid step (1 <-> 2 ms, or 100 <-> 107) moves nothing", {"m": 100, "n": 1}, {"m": 107, "n": 1},
     100.0, 0.0, None),
    ("slower by 25% or more: at once (a short deadline hedges slow tries)", {"m": 100, "n": 10},
     {"m": 130, "n": 11}, 1.0, 0.0, {"m": 130, "n": 10}),
    ("faster by 25% or more, once REPUBLISH_S passed", {"m": 100}, {"m": 70}, REPUBLISH_S, 0.0, {"m": 70}),
    ("... and not before", {"m": 100}, {"m": 70}, REPUBLISH_S - 1, 0.0, None),
    ("a model with no evidence any more is dropped", {"m": 100, "gone": 50}, {"m": 100}, 1.0, 0.0, {"m": 100}),
    ("nothing measured, nothing published", {}, {}, 1.0, None, None),
])
def test_a_published_deadline_moves_only_with_the_speed_and_not_often(why, published, measured, now, last, expected):
    assert to_publish(published, measured, now, last) == expected, why
