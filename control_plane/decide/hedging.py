"""Hedging by measured speed: how long a try may take before another engine is asked too.

A hung engine holds the requests on it until their try's deadline; then the route's hedge
policy asks another engine and the first answer wins (builders/routes.py). A fixed deadline is
either far too long for a voice command or too short for an hour of audio, so each model's
deadline follows what its engines have lately taken: `factor` x the 90th percentile of the
seconds per audio-second of recent answered tries (observe/ledger.py), times the upload's
audio-seconds, never under `resilience.hedge_floor_s` (envoy/routing.lua applies it).
Tries under MIN_SAMPLE_S of audio say more about a request's fixed cost than about speed, so
they are not evidence (the floor covers short clips). Published as whole milliseconds per
audio-second on a grid of steps of STEP, and only when a model's speed moved by MOVE_AT (slower
at once, faster at most every REPUBLISH_S: to_publish): the routes carry it to the Lua filter,
and each change is a route update. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from control_plane.observe.ledger import MIN_SAMPLE_S  # what the ledger keeps as evidence of speed

# A published deadline moves only when the measured one is this much off it (relative), and at
# most once per REPUBLISH_S: each change is a route update, which Envoy pays for (it compiles the
# Lua filter again in every worker) and which starts the routes' Lua states afresh.
MOVE_AT = 0.25
REPUBLISH_S = 30.0
MIN_SAMPLES = 8  # fewer: the configured size-based deadline stands
QUANTILE = 0.9
STEP = 1.1  # the grid: a published value moves only when the speed moves by a step


def on_grid(ms: float) -> int:
    """The smallest value of the grid (ceil(STEP ** k) ms for k = 0, 1, ...) at or above `ms`."""
    k = max(0, math.floor(math.log(max(ms, 1.0), STEP)) - 1)
    while math.ceil(STEP ** k) < ms:
        k += 1
    return math.ceil(STEP ** k)


def deadline_ms_per_audio_s(samples: Sequence[tuple[float, float]], factor: float) -> int | None:
    """(audio-seconds, seconds taken) of a model's recent answered tries -> the ms per
    audio-second a try may take before it is hedged; None until there is evidence enough."""
    ratios = sorted(taken / audio for audio, taken in samples if audio >= MIN_SAMPLE_S)
    if len(ratios) < MIN_SAMPLES:
        return None
    at = ratios[min(len(ratios) - 1, math.ceil(QUANTILE * len(ratios)) - 1)]
    return on_grid(factor * at * 1000)


def deadlines(samples: Mapping[str, Sequence[tuple[float, float]]], factor: float) -> dict[str, int]:
    """Each model with evidence enough -> its ms per audio-second (deadline_ms_per_audio_s)."""
    return {model: ms for model, taken in samples.items()
            if (ms := deadline_ms_per_audio_s(taken, factor)) is not None}


def to_publish(published: Mapping[str, int], measured: Mapping[str, int], now: float,
               last: float | None) -> dict[str, int] | None:
    """What to publish now (None: leave what is published): a model measured for the first time,
    or slower by MOVE_AT or more, at once (a deadline too short hedges tries that are only slow);
    faster by MOVE_AT or more once REPUBLISH_S has passed since the `last` publish."""
    moved = {model for model, ms in measured.items()
             if model in published and abs(ms - published[model]) >= MOVE_AT * published[model]}
    urgent = any(model not in published or (model in moved and ms > published[model])
                 for model, ms in measured.items())
    gone = any(model not in measured for model in published)
    if not (urgent or gone or (moved and (last is None or now - last >= REPUBLISH_S))):
        return None
    return {model: ms if model not in published or model in moved else published[model]
            for model, ms in measured.items()}
