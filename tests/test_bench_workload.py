"""The routing benchmark's pure parts: same seed, same requests; the oracle's scheduler copy."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.workload import VirtualEngine, arrivals, engine_capacity, oracle_choice, percentile, request_work
from engines.simulated.queue_model import GpuProfile

PROFILE = GpuProfile(max_num_seqs=2, batch_penalty=0.5, seconds_per_request=0.1, seconds_per_chunk=0.15)


def test_the_same_seed_gives_every_policy_the_same_requests():
    first = arrivals(3, 60.0, lambda t: 5.0, foreign_share=0.2)
    assert first == arrivals(3, 60.0, lambda t: 5.0, foreign_share=0.2)
    assert first != arrivals(4, 60.0, lambda t: 5.0, foreign_share=0.2)
    assert 200 < len(first) < 400 and all(a.at < 60.0 for a in first)
    assert 0.1 < sum(a.foreign for a in first) / len(first) < 0.3
    lengths = sorted(a.audio_s for a in first)
    assert lengths[0] >= 1.0 and lengths[-1] <= 600.0 and lengths[len(lengths) // 2] < 30.0 < lengths[-1]


def test_a_clip_becomes_one_engine_request_per_30_s_chunk():
    assert request_work(PROFILE, 75.0) == pytest.approx([0.25, 0.25, 0.175])


def test_the_virtual_engine_schedules_like_the_simulated_one():
    engine = VirtualEngine(replace(PROFILE, speed=2.0))
    engine.submit([1.0, 1.0, 1.0], at=0.0)
    # Two run at 2 / 1.5 work-s per second each and finish at 0.75 s; the third waits for a slot,
    # then runs alone at 2 work-s per second.
    engine.advance(0.7)
    assert engine.running == pytest.approx([1 / 15, 1 / 15]) and engine.waiting == [1.0]
    engine.advance(1.0)
    assert engine.waiting == [] and engine.running == pytest.approx([0.5])
    engine.advance(1.25)
    assert engine.running == [] and engine.waiting == []
    assert engine_capacity(replace(PROFILE, speed=2.0)) == pytest.approx(2.0 * 2 / 1.5)


def test_the_oracle_joins_the_engine_that_finishes_soonest():
    slow, fast = VirtualEngine(replace(PROFILE, speed=1.0)), VirtualEngine(replace(PROFILE, speed=3.0))
    assert oracle_choice([slow, fast], 0.0, [0.25]) == 1
    fast.submit([1.0] * 6, at=0.0)
    assert oracle_choice([slow, fast], 0.0, [0.25]) == 0


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (50, 99, 100)
