"""How requests are spread over the engines and kept away from failing ones."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass

from control_plane.config.fields import SECTION, seconds
from control_plane.validation import matching, within


@dataclass(frozen=True, config=SECTION)
class RoutingConfig:
    """How engine load becomes endpoint weights (see control_plane/decide/policy.py)."""

    load_aware: StrictBool = True
    # Envoy's balancer within a model's cluster. least_request (weight / (own in-flight + 1))
    # combines the weights with this Envoy's instant view; round_robin ignores in-flight counts
    # and is there for comparison (bench/routing), not for production.
    lb_policy: Literal["least_request", "round_robin"] = "least_request"
    scrape_interval_s: seconds(0.05, 60) = 0.25
    scrape_timeout_s: seconds(0.01, 60) = 0.2
    stale_after_s: seconds(0.05, 3600) = 1.0
    hysteresis: seconds(0, 0.9) = 0.2
    # Envoy holds weight-only updates this long to merge them; its 1 s default delays reactions.
    update_merge_window_s: seconds(0, 10) = 0.0
    # Uploads at least this large (0: off) go to the engines that would finish them soonest
    # (control_plane/decide/policy.py). 2 MB is about a minute of 16 kHz WAV or two of MP3.
    long_upload_kb: seconds(0, 10**7) = 2048.0

    @property
    def long_upload_bytes(self) -> int:
        """The Lua filter's threshold; 0: long uploads are not routed apart (also when not load-aware)."""
        return int(self.long_upload_kb * 1024) if self.load_aware else 0


@dataclass(frozen=True, config=SECTION)
class ResilienceConfig:
    """Health checks, outlier detection and retries, tuned for fleets of 1 to 10 engines."""

    health_path: Annotated[StrictStr, matching(re.compile(r"/.*"), "expected a path starting with /, got {!r}")] = "/health"
    # vLLM's /health can take many seconds on a busy engine: a short timeout would eject the busiest.
    health_interval_s: seconds(0.1, 3600) = 3.0
    health_timeout_s: seconds(0.1, 600) = 10.0
    unhealthy_threshold: Annotated[StrictInt, within(1, 100)] = 3
    healthy_threshold: Annotated[StrictInt, within(1, 100)] = 1
    consecutive_gateway_failures: Annotated[StrictInt, within(1, 1000)] = 3
    # Plain 500s eject an engine only when this is set (0: never): a client's odd upload can make
    # vLLM answer 500, and nobody may get healthy engines ejected by sending such uploads.
    consecutive_5xx: Annotated[StrictInt, within(0, 1000)] = 0
    ejection_s: seconds(0.1, 3600) = 5.0
    max_ejection_percent: Annotated[StrictInt, within(0, 100)] = 50
    retries: Annotated[StrictInt, within(0, 10)] = 2
    # Cuts an attempt that sends and receives nothing this long (0: off). Requests already on an
    # engine that hangs otherwise wait out timeouts.route_s; keep it above the longest silent
    # transcription (non-streamed answers come only at the end).
    per_try_idle_s: seconds(0, 86400) = 0.0
    # A transcription has no side effects: a request cut by an engine that died is retried on
    # another (within the retry budget), so an engine crash loses nothing.
    retry_after_reset: StrictBool = True
    # A try that has not answered within its deadline is hedged: another engine is asked too and
    # the first answer wins. This bounds what an engine that hangs costs the requests it holds.
    # Once a model's speed is measured (decide/hedging.py) the deadline is hedge_factor x what its
    # recent tries took per audio-second (90th percentile) x the upload's audio-seconds, at least
    # hedge_floor_s; until then hedge_after_s + hedge_per_mb_s x the upload's MiB (0 and 0: never
    # hedge). Needs retries and retry_after_reset.
    hedge_after_s: seconds(0, 86400) = 30.0
    hedge_per_mb_s: seconds(0, 86400) = 30.0
    hedge_factor: Annotated[StrictFloat, within(1, 100)] = 1.25
    hedge_floor_s: seconds(0.1, 86400) = 2.0
