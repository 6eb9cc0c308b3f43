"""Long recordings split across the fleet (control_plane/longform/, docs/architecture.md)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StrictFloat
from pydantic.dataclasses import dataclass

from control_plane.config.fields import SECTION, HostPort, Port, seconds
from control_plane.validation import within


@dataclass(frozen=True, config=SECTION)
class LongformConfig:
    """An admitted upload longer than `split_above_s` goes to a longform worker, which cuts it
    at quiet points into pieces of at most 30 s and sends them to the model's engines at once,
    each through Envoy's routing, retries and hedging, then answers as one engine would have."""

    # host:port of each worker; none: recordings go whole to one engine, as before. `up` starts
    # one on each loopback address listed; elsewhere (compose, Kubernetes) they run as their own
    # service (`whisper-gateway longform-worker`).
    workers: tuple[HostPort, ...] = ()
    # Uploads longer than this many audio-seconds (as the edge measured them) are split.
    split_above_s: seconds(30, 86400) = 180.0
    # Where Envoy takes the workers' pieces: loopback (the pieces listener admits no client).
    pieces_port: Port = 8092
    # The most of a model's engines (by count) one recording's pieces may hold at once; at least one.
    max_share: Annotated[StrictFloat, within(0.01, 1)] = 0.5
    # How long a recording may take, from its last byte received to its answer's end.
    timeout_s: seconds(1, 86400) = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.workers)
