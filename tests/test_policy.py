"""The weight policy, case by case."""

from __future__ import annotations

import math

import pytest

from control_plane.config import RoutingConfig, parse_config
from control_plane.fleet.resolved import Backend, Fleet
from control_plane.observe.load_tracker import SPEED_TAU_S, LoadTracker
from control_plane.observe.metrics_parser import ModelLoad
from control_plane.decide import policy as steps  # each step by name (`fresh` below builds states)
from control_plane.decide.policy import compute_weights, decide_routing, long_upload_endpoints
from control_plane.observe.load_tracker import EndpointState

S = RoutingConfig(stale_after_s=1.0, hysteresis=0.2)


def fresh(backend_id, running=0, waiting=0, kv=0.0, spr=None, base=1):
    return EndpointState(backend_id, base, ModelLoad(running=running, waiting=waiting, kv_cache_usage=kv), 0.1, spr)


def stale(backend_id, running=0, base=1, age=5.0):
    return EndpointState(backend_id, base, ModelLoad(running=running), age, None)


def new(backend_id, base=1):
    return EndpointState(backend_id, base)


def working(backend_id, audio=0.0, rate=None, requests=None, running=0, waiting=0, kv=0.0, per_request=None):
    """Fresh, with the Envoys' view of its audio (observe/ledger.py); lately, requests carried
    what the ones in flight do."""
    chunks = requests if requests is not None else (math.ceil(audio / 30) if audio else 0)
    per_request = per_request or (audio / chunks if chunks else None)
    return EndpointState(backend_id, 1, ModelLoad(running=running, waiting=waiting, kv_cache_usage=kv), 0.1, None,
                         audio_in_flight=audio, requests_in_flight=chunks, audio_rate=rate,
                         audio_per_request=per_request)


CASES = [
    # (what it shows, endpoints, previous weights, expected weights)
    ("idle equals get the top weight", [fresh("a"), fresh("b")], {}, {"a": 128, "b": 128}),
    ("a busy engine gets less", [fresh("a", running=3), fresh("b")], {}, {"a": 32, "b": 128}),
    ("waiting counts like running", [fresh("a", waiting=3), fresh("b")], {}, {"a": 32, "b": 128}),
    ("a slow engine gets less at equal load", [fresh("a", spr=0.5), fresh("b", spr=0.25)], {}, {"a": 64, "b": 128}),
    ("unmeasured speed is taken as the median", [fresh("a", spr=0.5), fresh("b")], {}, {"a": 128, "b": 128}),
    ("a full KV cache halves the weight", [fresh("a", kv=1.0), fresh("b")], {}, {"a": 64, "b": 128}),
    ("KV use under 80% does not count", [fresh("a", kv=0.7), fresh("b")], {}, {"a": 128, "b": 128}),
    ("base weights scale the result", [fresh("a", base=2), fresh("b", base=1)], {}, {"a": 128, "b": 64}),
    ("weights never drop below 1", [fresh("a", running=1000), fresh("b")], {}, {"a": 1, "b": 128}),
    ("a new engine starts at the median", [fresh("a"), fresh("b", running=1), new("c")], {}, {"a": 128, "b": 64, "c": 96}),
    ("stale metrics: no better than the median",
     [fresh("a"), fresh("b", running=1), stale("c")], {"c": 128}, {"a": 128, "b": 64, "c": 96}),
    ("stale metrics: a low weight stays low",
     [fresh("a"), fresh("b", running=1), stale("c")], {"c": 10}, {"a": 128, "b": 64, "c": 10}),
    ("long-missing metrics: the median again",
     [fresh("a"), fresh("b", running=1), stale("c", age=11.0)], {"c": 10}, {"a": 128, "b": 64, "c": 96}),
    ("all stale: the base weights (plain least request)",
     [stale("a", running=9), stale("b")], {"a": 5, "b": 128}, {"a": 128, "b": 128}),
    ("all stale, unequal bases", [stale("a", base=4), new("b", base=1)], {}, {"a": 128, "b": 32}),
    ("small changes are held", [fresh("a", running=1), fresh("b")], {"a": 70, "b": 128}, {"a": 70, "b": 128}),
    ("large changes go through", [fresh("a", running=1), fresh("b")], {"a": 100, "b": 128}, {"a": 64, "b": 128}),
    ("no endpoints, no weights", [], {}, {}),
    # Audio-seconds: once speeds are measured, the weight is 1 / seconds to finish a 30 s clip.
    ("an engine twice as fast gets twice the weight", [working("a", rate=20), working("b", rate=10)], {},
     {"a": 128, "b": 64}),
    ("held audio counts at the engine's speed", [working("a", 90, 20), working("b", 0, 10)], {},
     {"a": 64, "b": 128}),
    ("the engine's own queue shows load the Envoys did not send",
     [working("a", 30, 10, running=4), working("b", 30, 10)], {}, {"a": 51, "b": 128}),
    ("an engine not yet measured is taken at the median speed", [working("a", 0, 10), working("b", 30, None)], {},
     {"a": 128, "b": 64}),
    ("speeds unmeasured everywhere: engine requests as before", [working("a", 60, None), working("b")], {},
     {"a": 43, "b": 128}),
]


@pytest.mark.parametrize("what,endpoints,previous,expected", CASES, ids=[c[0] for c in CASES])
def test_policy(what, endpoints, previous, expected):
    weights = compute_weights(endpoints, previous, S)
    assert weights == expected
    assert all(1 <= w <= 128 for w in weights.values())



LONG_CASES = [
    # (what it shows, endpoints, the endpoints long uploads go to; empty: all)
    ("the fastest of idle engines", [fresh("a", spr=1.0), fresh("b", spr=0.25), fresh("c", spr=0.3)], {"b", "c"}),
    ("never fewer than two (retries need another)",
     [fresh("a", spr=1.0), fresh("b", spr=0.25), fresh("c", spr=1.0), fresh("d", spr=1.0)], {"a", "b"}),
    ("a fast engine's queue counts",
     [fresh("a", spr=1.0), fresh("b", spr=0.25, waiting=60), fresh("c", spr=1.0)], {"a", "c"}),
    ("two engines: both, so no subset", [fresh("a", spr=1.0), fresh("b", spr=0.25)], set()),
    ("unmeasured speed is taken as the median",
     [fresh("a", spr=1.0), fresh("b"), fresh("c", spr=0.25)], {"b", "c"}),
    ("no speeds at all: no subset", [fresh("a"), fresh("b"), fresh("c")], set()),
    ("stale metrics: never marked", [fresh("a", spr=1.0), fresh("b", spr=0.25), stale("c")], {"a", "b"}),
    ("one fresh endpoint: no subset", [fresh("a", spr=1.0), stale("b")], set()),
]


@pytest.mark.parametrize("what,endpoints,expected", LONG_CASES, ids=[c[0] for c in LONG_CASES])
def test_long_uploads(what, endpoints, expected):
    assert long_upload_endpoints(endpoints, S) == expected


EJECTED_CASES = [
    # (what it shows, the endpoints out for failing their answers, the endpoints long uploads go to; empty: all)
    ("none out: the fastest two", set(), {"a", "b"}),
    ("one of them out: the next fastest instead", {"a"}, {"b", "c"}),
    # Ejected engines are UNHEALTHY in EDS and the panic threshold is 0: a subset of only them
    # would answer every long upload 503 (no healthy upstream) while c and d serve.
    ("both out: no subset, the engines still in", {"a", "b"}, set()),
]


@pytest.mark.parametrize("what,ejected,expected", EJECTED_CASES, ids=[c[0] for c in EJECTED_CASES])
def test_long_uploads_never_go_only_to_ejected_engines(what, ejected, expected):
    config = parse_config({"models": ["m"]})
    backends = tuple(Backend(name, "10.0.0.1", 9000 + i, ("m",)) for i, name in enumerate("abcd"))
    fleet = Fleet(models=config.models, backends=backends)
    states = {"m": [fresh("a", spr=0.25), fresh("b", spr=0.25), fresh("c", spr=0.5), fresh("d", spr=1.0)]}
    settings = RoutingConfig(stale_after_s=1.0, hysteresis=0.2, long_upload_kb=1000)
    _, long_uploads = decide_routing(fleet, states, settings, frozenset((b, "m") for b in ejected))
    assert long_uploads == {(b, "m") for b in expected}

def test_speed_is_measured_from_counter_deltas():
    tracker = LoadTracker()
    tracker.record_load("a", "m", ModelLoad(inference_seconds=10.0, inference_count=20), now=0.0)
    assert tracker.state("a", "m", 1, now=0.0).seconds_per_request is None  # one reading: no rate yet
    tracker.record_load("a", "m", ModelLoad(inference_seconds=12.0, inference_count=24), now=0.25)
    assert tracker.state("a", "m", 1, now=0.25).seconds_per_request == pytest.approx(0.5)
    # Ten requests of 0.1 s outweigh the four of 0.5 s (decayed by e^(-0.25/2)): completions count.
    tracker.record_load("a", "m", ModelLoad(inference_seconds=13.0, inference_count=34), now=0.5)
    decay = math.exp(-0.25 / SPEED_TAU_S)
    assert tracker.state("a", "m", 1, now=0.5).seconds_per_request == pytest.approx((2 * decay + 1) / (4 * decay + 10))
    # An engine restart resets its counters: the estimate is kept, not spoiled by a negative delta.
    tracker.record_load("a", "m", ModelLoad(inference_seconds=0.5, inference_count=1), now=0.75)
    assert tracker.state("a", "m", 1, now=0.75).seconds_per_request == pytest.approx((2 * decay + 1) / (4 * decay + 10))
    # An engine that finished nothing for a while is typical again, not slow forever.
    tracker.record_load("a", "m", ModelLoad(inference_seconds=0.5, inference_count=1), now=6.0)
    assert tracker.state("a", "m", 1, now=6.0).seconds_per_request is None
    tracker.record_load("a", "m", ModelLoad(inference_seconds=0.7, inference_count=2), now=6.25)
    assert tracker.state("a", "m", 1, now=6.25).seconds_per_request == pytest.approx(0.2)  # a fresh start



def test_old_completions_fade_with_time_not_with_scrapes():
    tracker = LoadTracker()
    tracker.record_load("a", "m", ModelLoad(inference_seconds=0.0, inference_count=0), now=0.0)
    tracker.record_load("a", "m", ModelLoad(inference_seconds=100.0, inference_count=100), now=0.25)
    for idle in (0.5, 1.0, 2.0, 4.0):  # scrapes that saw nothing finish
        tracker.record_load("a", "m", ModelLoad(inference_seconds=100.0, inference_count=100), now=idle)
    tracker.record_load("a", "m", ModelLoad(inference_seconds=100.1, inference_count=101), now=4.75)
    decay = math.exp(-4.5 / SPEED_TAU_S)
    assert tracker.state("a", "m", 1, now=4.75).seconds_per_request == pytest.approx((100 * decay + 0.1) / (100 * decay + 1))

def test_failures_age_the_last_good_reading():
    tracker = LoadTracker()
    tracker.record_load("a", "m", ModelLoad(running=2), now=10.0)
    tracker.record_failure("a", "m", "timeout", now=12.0)
    state = tracker.state("a", "m", 1, now=12.0)
    assert state.age_s == 2.0 and state.load.running == 2
    assert tracker.state("b", "m", 1, now=12.0).load is None
    tracker.retain({("b", "m")})
    assert ("a", "m") not in tracker.tracks


# -- each step on its own ------------------------------------------------------------------------


@pytest.mark.parametrize("weight,expected", [(0.2, 1), (0, 1), (-5, 1), (64.4, 64), (127.6, 128), (500, 128)])
def test_clamp(weight, expected):
    assert steps.clamp(weight) == expected


@pytest.mark.parametrize("raw,expected", [
    ({"a": 2.0, "b": 1.0}, {"a": 128, "b": 64}),
    ({"a": 1000.0, "b": 1.0}, {"a": 128, "b": 1}),
    ({"a": 0.0, "b": 0.0}, {"a": 128, "b": 128}),  # all failing alike: none preferred
    ({"a": 3.0}, {"a": 128}),
])
def test_normalise(raw, expected):
    assert steps.normalise(raw) == expected


@pytest.mark.parametrize("usage,expected", [(0.0, 1.0), (0.8, 1.0), (0.9, 1.5), (1.0, 2.0), (1.2, 2.0)])
def test_kv_pressure(usage, expected):
    assert steps.kv_pressure(usage) == pytest.approx(expected)


@pytest.mark.parametrize("ratio,expected", [(0.0, 1.0), (0.5, 0.25), (1.0, 0.0), (1.5, 0.0), (-1.0, 1.0)])
def test_reliability(ratio, expected):
    assert steps.reliability(EndpointState("a", failure_ratio=ratio)) == pytest.approx(expected)


def test_fresh_filter():
    endpoints = [fresh("ok"), stale("old", age=1.5), new("never"), fresh("edge")]
    edge = EndpointState("edge", 1, ModelLoad(), 1.0)
    assert [e.backend_id for e in steps.fresh(endpoints[:3] + [edge], S)] == ["ok", "edge"]


@pytest.mark.parametrize("endpoints,requests,expected", [
    ([fresh("a", running=1, waiting=2, spr=0.5)], 1, {"a": 2.0}),
    ([fresh("a", spr=0.5), fresh("b")], 1, {"a": 0.5, "b": 0.5}),  # unknown speed: the median
    ([fresh("a")], 8, {"a": 8.0}),  # nothing measured: 1 s a request
    ([fresh("a", kv=1.0, spr=1.0)], 1, {"a": 2.0}),
])
def test_queue_seconds(endpoints, requests, expected):
    assert steps.queue_seconds(endpoints, requests) == pytest.approx(expected)


@pytest.mark.parametrize("endpoint,previous,expected", [
    (stale("c"), 128, 96),  # old news is not better than the median
    (stale("c"), 10, 10),  # a low weight stays low
    (stale("c", age=11.0), 10, 96),  # forgotten after FORGET_AFTER stale periods
    (new("c"), None, 96),  # new: the median
    (EndpointState("c", 1, ModelLoad(), 5.0, None, 0.5), 100, 24),  # failing too
])
def test_hold_stale(endpoint, previous, expected):
    assert steps.hold_stale(endpoint, previous, 96, S) == expected


@pytest.mark.parametrize("target,previous,expected", [(70, None, 70), (80, 70, 70), (90, 70, 90), (60, 70, 70),
                                                      (52, 64, 64), (40, 64, 40)])
def test_hysteresis(target, previous, expected):
    assert steps.hysteresis(target, previous, S) == expected


FINISH = [
    # (what, endpoint, clip seconds, expected seconds to finish)
    ("unmeasured: no estimate", working("a", 30, None), 30, None),
    ("idle: the clip at its speed", working("a", 0, 15), 30, 2.0),
    ("held audio first", working("a", 60, 15), 30, 6.0),
]


@pytest.mark.parametrize("what,endpoint,clip,expected", FINISH, ids=[c[0] for c in FINISH])
def test_finish_seconds(what, endpoint, clip, expected):
    assert steps.finish_seconds(endpoint, clip) == expected


HELD = [
    # (what, endpoint, expected audio-seconds held)
    ("the Envoys' count", working("a", 45), 45),
    ("the engine's larger queue, at the Envoys' audio per request", working("a", 45, requests=3, running=6), 90),
    ("nothing in flight: what requests carried lately", working("a", running=2, per_request=4.0), 8),
    ("nothing ever sent: half a chunk per queued request", working("a", running=2), 30),
]


@pytest.mark.parametrize("what,endpoint,expected", HELD, ids=[c[0] for c in HELD])
def test_held_audio(what, endpoint, expected):
    assert steps.held_audio(endpoint) == expected


def test_queued_requests_takes_the_larger_view():
    assert steps.queued_requests(working("a", 95, running=1)) == 4  # 95 s sent: four 30 s chunks
    assert steps.queued_requests(working("a", 10, running=3, waiting=2)) == 5


def test_the_load_loop_adapts_its_interval_to_the_fleet():
    """A round that uses more than half the interval's CPU is followed by a pause as long as that."""
    from control_plane.plane.load_loop import next_round_in

    assert next_round_in(0.25, 0.01, 0.01) == pytest.approx(0.24)
    assert next_round_in(0.25, 0.2, 0.2) == 0.2  # 1000 engines at the default interval: every 0.4 s
    assert next_round_in(1.0, 0.25, 0.25) == 0.75
    assert next_round_in(0.25, 0.2, 0.01) == pytest.approx(0.05)  # a scrape waiting out its timeout costs no CPU
