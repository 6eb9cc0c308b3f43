"""Load to weights: a pure function, so every rule here is a row in a table test.

Envoy balances each model's cluster by least request: it prefers an endpoint in proportion to
weight / (its own requests in flight + 1). That local count is instant but blind to load that
did not come through this Envoy. The weight adds what only the engine knows: its whole queue
(other Envoys, direct clients) and how fast it works.

For an endpoint with fresh metrics the expected time to get through its queue is

    score = (running + waiting + 1) x seconds_per_request x kv_pressure

where seconds_per_request is the engine's measured time per engine request (its speed; the
cluster's median when not yet measured) and kv_pressure grows from 1 to 2 as KV-cache use
goes from 80% to 100% (vLLM starts queueing there). Weights are base_weight / score, scaled so
that the best endpoint of the cluster gets 128, and never below 1.

Stale or failing metrics (no good scrape within `stale_after_s`) are neither trusted nor
punished: such an endpoint gets min(its last weight, the median weight of the fresh ones), so it
is never preferred on old news; once its metrics have been missing for FORGET_AFTER stale
periods the old news is dropped and it gets the median. It is never removed: reachability is
for Envoy's health checks. A new endpoint starts at the median. When no endpoint of a cluster
has fresh metrics, weights fall back to the configured base weights (plain least request).

Hysteresis: a weight moves only when it changes by at least `hysteresis` (relative), so noise
does not cause pushes.

Long uploads: weights split requests in proportion, so an engine four times slower still gets
some of them. For a short clip that costs little; a ten-minute clip (twenty engine requests)
landing there becomes the latency tail. So uploads of at least `long_upload_kb` go to a subset:
the engines whose estimate for such a clip, (running + waiting + LONG_UPLOAD_REQUESTS) x
seconds_per_request x kv_pressure, is within PREFER_WITHIN of the best, and never fewer than two.
No subset (every engine) while speeds are unknown or every engine qualifies.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace

from control_plane.config import RoutingConfig
from control_plane.fleet.resolved import Fleet
from control_plane.observe.ledger import CHUNK_S
from control_plane.observe.load_tracker import EndpointState
from control_plane.xds.snapshot import MAX_WEIGHT, MIN_WEIGHT

FORGET_AFTER = 10  # stale periods after which an endpoint's last weight no longer holds it down
KV_PRESSURE_FROM = 0.8  # KV-cache use above which an engine counts as more loaded
LONG_UPLOAD_REQUESTS = 8  # engine requests (30 s chunks) a long upload is reckoned to make
NEW_CLIP_S = CHUNK_S  # the clip a weight is the expected finishing time of: one engine request's worth
PREFER_WITHIN = 1.5
MIN_LONG_UPLOAD_ENDPOINTS = 2


# -- the steps, each with a one-line contract and its own table test (tests/test_policy.py) ------

def clamp(weight: float) -> int:
    """Clamp: a real weight to Envoy's 1..128 (0 is refused by Envoy, so never below 1)."""
    return max(MIN_WEIGHT, min(MAX_WEIGHT, round(weight)))


def normalise(raw: Mapping[str, float]) -> dict[str, int]:
    """Normalise: the best endpoint gets 128, the others in proportion, at least 1."""
    top = max(raw.values())
    if top <= 0:  # every endpoint failing alike: none is better than another
        return {key: MAX_WEIGHT for key in raw}
    return {key: clamp(MAX_WEIGHT * value / top) for key, value in raw.items()}


def kv_pressure(usage: float) -> float:
    """Scorer: 1 up to 80% KV-cache use, rising to 2 at 100% (vLLM starts queueing there)."""
    return 1.0 + min(1.0, max(0.0, usage - KV_PRESSURE_FROM) / (1.0 - KV_PRESSURE_FROM))


def reliability(endpoint: EndpointState) -> float:
    """Scorer: 1 for an engine whose tries succeed, falling to 0 as they fail (never gains share)."""
    return (1.0 - min(1.0, max(0.0, endpoint.failure_ratio))) ** 2


def is_fresh(endpoint: EndpointState, settings: RoutingConfig) -> bool:
    """Whether an endpoint's last good scrape is at most `stale_after_s` old: the one definition."""
    return endpoint.load is not None and endpoint.age_s is not None and endpoint.age_s <= settings.stale_after_s


def fresh(endpoints: Sequence[EndpointState], settings: RoutingConfig) -> list[EndpointState]:
    """Filter: the endpoints whose metrics are fresh (`is_fresh`)."""
    return [e for e in endpoints if is_fresh(e, settings)]


def queue_seconds(endpoints: Sequence[EndpointState], engine_requests: int) -> dict[str, float]:
    """Scorer: seconds until a new request of `engine_requests` would be through each fresh
    endpoint's queue, at its measured speed (the median of the measured when unknown)."""
    measured = [e.seconds_per_request for e in endpoints if e.seconds_per_request]
    typical = statistics.median(measured) if measured else 1.0
    return {e.backend_id: (queued_requests(e) + engine_requests) * (e.seconds_per_request or typical)
            * kv_pressure(e.load.kv_cache_usage) for e in endpoints}


def queued_requests(endpoint: EndpointState) -> int:
    """Scorer: the engine requests an endpoint holds, the larger of two views: its own count
    (running + waiting: every client's, as of the last scrape) and the Envoys' (the 30 s chunks
    of the audio they sent it and have no answer for: instant, and before the engine sees it)."""
    return max(endpoint.load.running + endpoint.load.waiting, endpoint.requests_in_flight)


def finish_seconds(endpoint: EndpointState, clip_s: float) -> float | None:
    """Scorer: seconds until a new clip of `clip_s` audio-seconds would be answered, from the
    audio-seconds the engine holds and its measured audio-seconds per second; None unmeasured."""
    if not endpoint.audio_rate:
        return None
    return (endpoint.audio_in_flight + clip_s) / endpoint.audio_rate


def held_audio(endpoint: EndpointState) -> float:
    """Scorer: the audio-seconds an endpoint holds, the larger of two views: the Envoys' (sent, not
    answered: instant) and the engine's own (running + waiting engine requests, at the audio the
    ones sent there lately carried; half a chunk when none was): load from other clients shows
    only there."""
    per_request = endpoint.audio_per_request or CHUNK_S / 2
    return max(endpoint.audio_in_flight, (endpoint.load.running + endpoint.load.waiting) * per_request)


def work_seconds(endpoints: Sequence[EndpointState], clip_s: float) -> dict[str, float] | None:
    """Scorer: `finish_seconds` of a clip for each fresh endpoint, x kv_pressure, with the median
    measured speed where an engine has none yet; None while no engine's speed is measured."""
    rates = [e.audio_rate for e in endpoints if e.audio_rate]
    if not rates:
        return None
    typical = statistics.median(rates)
    return {e.backend_id: finish_seconds(replace(e, audio_in_flight=held_audio(e), audio_rate=e.audio_rate or typical),
                                         clip_s)
            * kv_pressure(e.load.kv_cache_usage) for e in endpoints}


def hold_stale(endpoint: EndpointState, previous: int | None, neutral: int, settings: RoutingConfig) -> int:
    """Stale rule: no better than the fresh median (`neutral`) on old news; the median once forgotten."""
    forgotten = endpoint.age_s is None or endpoint.age_s > FORGET_AFTER * settings.stale_after_s
    held = neutral if forgotten or previous is None else min(previous, neutral)
    return clamp(held * reliability(endpoint))


def hysteresis(target: int, previous: int | None, settings: RoutingConfig) -> int:
    """Hysteresis: the previous weight stays unless the target moved by `hysteresis` or more."""
    if previous is not None and abs(target - previous) < settings.hysteresis * max(target, previous):
        return previous
    return target


# -- the steps put together ----------------------------------------------------------------------

def target_weights(endpoints: Sequence[EndpointState], previous: Mapping[str, int],
                   settings: RoutingConfig) -> dict[str, int]:
    """Weights before hysteresis: fresh endpoints by base x reliability / queue seconds,
    normalised; the others held by the stale rule; none fresh: the base weights."""
    if not endpoints:
        return {}
    trusted = fresh(endpoints, settings)
    if not trusted:
        return normalise({e.backend_id: e.base_weight * reliability(e) for e in endpoints})
    by_id = {e.backend_id: e for e in endpoints}
    expected = work_seconds(trusted, NEW_CLIP_S) or queue_seconds(trusted, 1)
    weights = normalise({key: by_id[key].base_weight * reliability(by_id[key]) / seconds
                         for key, seconds in expected.items()})
    neutral = clamp(statistics.median(weights.values()))
    for e in endpoints:
        if e.backend_id not in weights:
            weights[e.backend_id] = hold_stale(e, previous.get(e.backend_id), neutral, settings)
    return weights


def long_upload_endpoints(endpoints: Sequence[EndpointState], settings: RoutingConfig) -> frozenset[str]:
    """Picker: the endpoints long uploads go to (those within PREFER_WITHIN of the soonest to
    finish one); empty: all of them.

    Never fewer than two: inside the subset a retry must have another engine to go to, and one
    marked engine that dies would fail every long upload until its metrics went stale.
    Endpoints without fresh metrics (a dead engine's stop within `stale_after_s`) and draining
    ones (left out by the caller) are never marked.
    """
    trusted = fresh(endpoints, settings)
    finish = work_seconds(trusted, LONG_UPLOAD_REQUESTS * CHUNK_S)
    if finish is None:
        if not any(e.seconds_per_request for e in trusted):
            return frozenset()
        finish = queue_seconds(trusted, LONG_UPLOAD_REQUESTS)
    ranked = sorted(finish, key=finish.__getitem__)
    chosen = {key for key in ranked if finish[key] <= PREFER_WITHIN * finish[ranked[0]]} | set(ranked[:MIN_LONG_UPLOAD_ENDPOINTS])
    return frozenset() if len(chosen) < MIN_LONG_UPLOAD_ENDPOINTS or len(chosen) == len(endpoints) else frozenset(chosen)


def decide_routing(fleet: Fleet, states: Mapping[str, Sequence[EndpointState]], settings: RoutingConfig,
                   ejected: frozenset[tuple[str, str]] = frozenset()
                   ) -> tuple[dict[tuple[str, str], int], frozenset[tuple[str, str]]]:
    """Every endpoint's new weight, and the endpoints for long uploads, cluster by cluster.

    `states` holds each model's endpoints in `fleet.backends_for(model)` order. Endpoints out for
    failing their answers (`ejected`, decide/ejection.py: EDS health UNHEALTHY) are never marked
    for long uploads: with the panic threshold at 0, a subset whose every engine is out answers
    every long upload 503 (no healthy upstream) while the rest of the model serves.
    """
    weights, long_uploads = {}, set()
    for model, endpoints in states.items():
        backends = fleet.backends_for(model)
        previous = {b.id: fleet.weights[(b.id, model)] for b in backends if (b.id, model) in fleet.weights}
        for backend_id, weight in compute_weights(endpoints, previous, settings).items():
            weights[(backend_id, model)] = weight
        if settings.long_upload_bytes:
            serving = [s for s, b in zip(endpoints, backends) if not b.draining and (b.id, model) not in ejected]
            long_uploads |= {(backend_id, model) for backend_id in long_upload_endpoints(serving, settings)}
    return weights, frozenset(long_uploads)


def compute_weights(endpoints: Sequence[EndpointState], previous: Mapping[str, int],
                    settings: RoutingConfig) -> dict[str, int]:
    """The weights to publish for one cluster: targets, held where the change is too small."""
    return {backend_id: hysteresis(target, previous.get(backend_id), settings)
            for backend_id, target in target_weights(endpoints, previous, settings).items()}
