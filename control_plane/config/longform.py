"""Long recordings split across the fleet (control_plane/longform/, docs/architecture.md)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StrictFloat, StrictInt
from pydantic.dataclasses import dataclass

from control_plane.config.fields import SECTION, HostPort, Port, seconds
from control_plane.validation import within


@dataclass(frozen=True, config=SECTION)
class LongformConfig:
    """An admitted upload longer than `split_above_s` goes to a longform worker, which cuts it
    at quiet points into pieces of at most 30 s and sends them to the model's engines at once,
    each through Envoy's routing, retries and hedging, then answers as one engine would have."""

    # host:port of each worker, a loopback address: a worker runs beside its Envoy (`up` starts
    # one on each address listed; so does `whisper-gateway envoy`, as in compose's and the Helm
    # chart's Envoy containers). None: recordings go whole to one engine, as before.
    workers: tuple[HostPort, ...] = ()
    # Uploads longer than this many audio-seconds (as the edge measured them) are split.
    split_above_s: seconds(30, 86400) = 180.0
    # Where Envoy takes the workers' pieces: loopback (the pieces listener admits no client).
    pieces_port: Port = 8092
    # How many of a recording's pieces each of a model's engines may hold at once while no short
    # clip waits there: about an engine's batch (vLLM runs many requests at once), a few more so
    # that each engine has the next piece queued when one ends (docs/benchmarks.md: 0.33x of whole
    # on an idle fleet at 12, 0.36x at 8).
    pieces_per_engine: Annotated[StrictInt, within(1, 1024)] = 12
    # While short clips wait at the model, recordings' pieces may hold this share of its slots
    # (4 of 12 per engine: a clip waits behind no more of them than at 8 x 0.5).
    max_share: Annotated[StrictFloat, within(0.01, 1)] = 0.34
    # How long a recording may take, from its last byte received to its answer's end.
    timeout_s: seconds(1, 86400) = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.workers)

    def parallel(self, engines: int, busy: bool, recordings: int) -> int:
        """How many of one recording's pieces may be at a model's `engines` at once: their slots
        (pieces_per_engine each), all of them while no short clip waits at the model (`busy`:
        one does), max_share of them while one does, shared by the model's `recordings`; at least one."""
        slots = max(1, engines) * self.pieces_per_engine * (self.max_share if busy else 1.0)
        return max(1, int(slots / max(1, recordings)))

    @property
    def worker_endpoints(self) -> frozenset[str]:
        """The workers as Envoy's logs name an upstream host: "ip:port", an IPv6 address unbracketed."""
        return frozenset(f"{host.strip('[]')}:{port}" for host, _, port in (w.rpartition(":") for w in self.workers))
