"""What every Envoy saw happen on each try at each engine, as decayed failure ratios.

Engine metrics say how busy an engine is, not whether its answers arrive. An engine that sends
200 headers and then cuts the connection, or answers every request at once with a 503, looks
idle on /metrics, finishes fastest, and so would win least-request picks; Envoy itself counts
such a cut as a success (its host stats, load reports and outlier detection all see the 200).
Each Envoy's router therefore logs every upstream try over gRPC (the access log service) to
the control plane (control_plane/observe/access_logs.py), which classifies it and sums
outcomes per endpoint across Envoys with exponential decay. The policy holds a failing endpoint's weight down by its failure ratio.

A failure is what only the engine or the path to it causes: no response, a reset or a cut
stream, a timeout, 502/503/504. Plain 500s are not counted: a client's odd upload can make
vLLM answer 500, and nobody may lower a healthy engine's share by sending such uploads.

A try Envoy ends itself counts neither way: it logs it with no status and no flag, whether
another try of its request answered first (the loser of a hedge: the router resets every other
try at the winner's headers) or its client went away. The route's timeout ends a try so too; the
request's own entry says so (`route_timed_out`), and names the engine of its last try. A try past
its per-try deadline (the hedge's: `upstream_request_timeout`) failed if it then never answered
(it lost the hedge, or held its request to the end), not if it answered: Envoy flags the late
winner too. Envoy 1.40's entries, as seen with a real one: tests/test_outcomes.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.names import cluster_name

OUTCOMES_TAU_S = 5.0  # how fast old outcomes fade
MIN_EVIDENCE = 3.0  # decayed tries before a failure ratio counts
FAILED_STATUSES = frozenset({502, 503, 504})
MODEL_CLUSTER_PREFIX = cluster_name("")  # an engine's (not a longform worker's)
FAILURE_FLAGS = ("upstream_remote_reset", "upstream_connection_failure", "upstream_connection_termination",
                 "upstream_protocol_error", "upstream_max_stream_duration_reached", "stream_idle_timeout",
                 "duration_timeout")
ROUTE_TIMEOUT = "response_timeout"  # the details of a request the route's timeout ended


def failed(entry: accesslog_pb2.HTTPAccessLogEntry) -> bool | None:
    """True when the engine (or the way to it) failed this try, False when it answered, None when
    the try says nothing of the engine: Envoy ended it with no answer and no flag (another try won,
    or the client went away; the client's doing never counts)."""
    flags = entry.common_properties.response_flags
    if any(getattr(flags, name) for name in FAILURE_FLAGS):
        return True
    status = entry.response.response_code.value
    if status:
        return status in FAILED_STATUSES  # a per-try deadline passed before it does not count
    return True if flags.ListFields() else None  # flagged: past its per-try deadline, overflowed, reset here...


def route_timed_out(entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
    """A request's entry (DownstreamEnd) that the route's timeout ended while a try at an engine
    (its last, which the entry names) was in flight: that try's entry carries no flag of it (one
    already past its per-try deadline counts twice: slow twice over)."""
    common = entry.common_properties
    return (entry.response.response_code_details == ROUTE_TIMEOUT and common.response_flags.upstream_request_timeout
            and common.upstream_cluster.startswith(MODEL_CLUSTER_PREFIX))


@dataclass
class _Tally:
    ok: float = 0.0
    failed: float = 0.0
    at: float = 0.0

    def decay_to(self, now: float) -> None:
        factor = math.exp(-max(0.0, now - self.at) / OUTCOMES_TAU_S)
        self.ok, self.failed, self.at = self.ok * factor, self.failed * factor, now


class Outcomes:
    """Decayed counts of good and failed tries per endpoint ("ip:port"), over every Envoy."""

    def __init__(self) -> None:
        self._tallies: dict[str, _Tally] = {}

    def record(self, endpoint: str, ok: bool, now: float) -> None:
        tally = self._tallies.setdefault(endpoint, _Tally(at=now))
        tally.decay_to(now)
        if ok:
            tally.ok += 1
        else:
            tally.failed += 1

    def failure_ratio(self, endpoint: str, now: float) -> float:
        """Recent failed tries / recent tries; 0 until there is enough evidence."""
        tally = self._tallies.get(endpoint)
        if tally is None:
            return 0.0
        tally.decay_to(now)
        total = tally.ok + tally.failed
        return tally.failed / total if total >= MIN_EVIDENCE else 0.0

    def forget(self, endpoint: str) -> None:
        """Its evidence so far (an ejected engine that comes back starts afresh: decide/ejection.py)."""
        self._tallies.pop(endpoint, None)

    def retain(self, endpoints: set[str]) -> None:
        """Forgets endpoints that left the fleet."""
        for key in set(self._tallies) - endpoints:
            del self._tallies[key]
