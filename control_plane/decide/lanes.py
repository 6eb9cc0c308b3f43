"""Priority lanes: while a model's engines are backed up, batch keys wait and interactive ones flow.

Each API key is `interactive` (the default) or `batch`. When the expected wait for a new 30 s
clip on a model (the number an autoscaler scales on) passes `auth.batch_above_wait_s`, the
control plane tells every Envoy to answer that model's batch requests 429 with Retry-After
(envoy/lanes.lua), and opens the lane again once the wait is back under REOPEN_AT of
the level: engines are FIFO, so the only way to keep interactive clips from queueing behind a
flood of batch work is not to admit the flood. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from control_plane.config import RoutingConfig
from control_plane.decide.policy import fresh, held_audio, work_seconds
from control_plane.fleet.resolved import Fleet
from control_plane.observe.ledger import CHUNK_S
from control_plane.observe.load_tracker import EndpointState

REOPEN_AT = 0.5  # of the level: a lane that closed opens once the wait has halved, not at once


def expected_wait(endpoints: Sequence[EndpointState], settings: RoutingConfig) -> float | None:
    """Seconds until a new 30 s clip would be answered on the model's best fresh engine: 0 when
    they all hold nothing (their speed may be unmeasured: idle is idle); None when none is fresh,
    or none's speed is measured yet while some hold work."""
    live = fresh(endpoints, settings)
    waits = work_seconds(live, CHUNK_S)
    if waits:
        return min(waits.values())
    return 0.0 if live and not any(held_audio(e) for e in live) else None


def model_waits(fleet: Fleet, states: Mapping[str, Sequence[EndpointState]],
                settings: RoutingConfig) -> dict[str, float | None]:
    """Each model's `expected_wait` over its engines that are not draining: what `/status` shows
    and the lanes decide on."""
    serving = {b.id for b in fleet.backends if not b.draining}
    return {model: expected_wait([s for s in states[model] if s.backend_id in serving], settings)
            for model in fleet.model_names()}


def closed_to_batch(waits: Mapping[str, float | None], closed: Mapping[str, int], level: float) -> dict[str, int]:
    """Models refusing batch keys -> the Retry-After (s) they give. A lane closes when the wait
    passes `level` and opens below REOPEN_AT x level; an unknown wait leaves it as it was."""
    result = {}
    for model, wait in waits.items():
        if wait is None:
            if model in closed:
                result[model] = closed[model]
        elif wait > level or (model in closed and wait > REOPEN_AT * level):
            result[model] = closed.get(model) or max(1, math.ceil(wait - REOPEN_AT * level))
    return result
