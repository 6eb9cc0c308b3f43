"""Long recordings split across the fleet (control_plane/longform/, docs/architecture.md)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass

from control_plane.config.fields import SECTION, seconds
from control_plane.validation import fail, within

MAX_WORKERS = 64
# A Unix socket's path has at most 107 bytes (sun_path); the longest one made in socket_dir.
MAX_SOCKET_PATH = 107


def worker_socket(socket_dir: str, index: int) -> str:
    return f"{socket_dir}/worker-{index}.sock"


def pieces_socket(socket_dir: str) -> str:
    return f"{socket_dir}/pieces.sock"


def _count(value):
    if isinstance(value, list):  # the form before sockets: a loopback host:port per worker
        fail("is a count now (the workers beside each Envoy; they listen on Unix sockets in "
             "longform.socket_dir): write `workers: N`")
    return value


def _socket_dir(value: str) -> str:
    value = value.rstrip("/") or "/"
    if not value.startswith("/"):
        fail(f"{value!r}: expected an absolute path (Envoy and the workers may start in different directories)")
    if len(worker_socket(value, MAX_WORKERS - 1).encode()) > MAX_SOCKET_PATH:
        fail(f"{value!r} is too long for a Unix socket's path: at most "
             f"{MAX_SOCKET_PATH - len(worker_socket('', MAX_WORKERS - 1))} characters")
    return value


@dataclass(frozen=True, config=SECTION)
class LongformConfig:
    """An admitted upload longer than `split_above_s` goes to a longform worker, which cuts it
    at quiet points into pieces of at most 30 s and sends them to the model's engines at once,
    each through Envoy's routing, retries and hedging, then answers as one engine would have."""

    # How many workers run beside each Envoy (`up` starts them, and so does `whisper-gateway envoy`,
    # as in compose's and the Helm chart's Envoy containers). 0: recordings go whole to one engine.
    workers: Annotated[StrictInt, BeforeValidator(_count), within(0, MAX_WORKERS)] = 0
    # Where the workers and Envoy's pieces listener meet: Unix sockets in this directory, which
    # only the gateway's own user may enter (made so, and checked, at start): no other process, on
    # the host or in the pod, can hand a worker a recording or send a piece past admission.
    socket_dir: Annotated[StrictStr, AfterValidator(_socket_dir)] = "/tmp/whisper-gateway"
    # Uploads longer than this many audio-seconds (as the edge measured them) are split.
    split_above_s: seconds(30, 86400) = 180.0
    # How many of a recording's pieces each of a model's engines may hold at once while no short
    # clip waits there: about an engine's batch (vLLM runs many requests at once), a few more so
    # that each engine has the next piece queued when one ends (docs/benchmarks.md: 0.33x of whole
    # on an idle fleet at 12, 0.36x at 8).
    pieces_per_engine: Annotated[StrictInt, within(1, 1024)] = 12
    # While short clips wait at the model, recordings' pieces may hold this share of its slots
    # (4 of 12 per engine), and less where the clips still queue (decide/longform.py: levels).
    max_share: Annotated[StrictFloat, within(0.01, 1)] = 0.34
    # How long a recording may take, from its last byte received to its answer's end.
    timeout_s: seconds(1, 86400) = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.workers)

    def parallel(self, engines: int, busy: bool, recordings: int, level: float | None = None) -> int:
        """How many of one recording's pieces may be at a model's `engines` at once: their slots
        (pieces_per_engine each), all of them while no short clip waits at the model (`busy`:
        one does), max_share of them while one does, no more than `level` per engine (what the
        clips' waits leave: decide/longform.py), shared by the model's `recordings`; at least one."""
        per_engine = self.pieces_per_engine * (self.max_share if busy else 1.0)
        if level is not None:
            per_engine = min(per_engine, level)
        return max(1, int(max(1, engines) * per_engine / max(1, recordings)))

    @property
    def pieces_socket(self) -> str:
        """Where Envoy's pieces listener takes the workers' pieces."""
        return pieces_socket(self.socket_dir)

    @property
    def worker_sockets(self) -> tuple[str, ...]:
        """Where each worker takes the recordings Envoy sends it."""
        return tuple(worker_socket(self.socket_dir, i) for i in range(self.workers))

    @property
    def worker_endpoints(self) -> frozenset[str]:
        """The workers as Envoy's logs name an upstream host: their sockets' paths."""
        return frozenset(self.worker_sockets)
