"""Requests in flight per group, from the access logs: what the requests_in_flight limits count.

A group is an API key's id (its plan's `requests_in_flight`) or a model's batch lane,
`names.batch_lane(model)` (`auth.batch_in_flight_per_engine`); a request counts in each group it
belongs to. It is in flight from the log of its first try's start until one of:
- a try that delivered its 2xx;
- its last open try ended without one and no other try started within RETRY_GRACE_S (Envoy
  starts a retry within that): both come on the upstream-try log, which one Envoy worker sends
  to one control plane, so a plane never waits on a log another plane got;
- the request's own log (every routed request that did not end in a 2xx logs one,
  control_plane/builders/listener.py), which may come first, on another stream: a request whose
  end came that way is remembered for a while and a late start of it ignored.
Hedged and retried tries of one request share its request id, so it counts once; its open tries
are counted per engine (an end logged for a try that never started, one that could not connect,
is ignored). Lost logs cannot hold a slot for long: a stream that closes takes its requests with
it, `settle` drops a request whose engines with open tries all hold nothing (and whose last try
started a while ago), and `expire` those older than any request lasts.

A request that ended without Envoy ever picking an engine for it (refused by a limit after the
in-flight filters, or no engine healthy) took a token in Envoy that no start accounts for:
`ended` says so, so its groups are granted again. (One whose try could not connect has an engine
in its log and gives its token back at the next report instead.)

Pure: no I/O, and time is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from control_plane.observe.ledger import SETTLE_AFTER_S

ENDED_KEPT_S = 60.0  # how long an ended request's id is kept, against its start logged late
# What an Envoy's reports can make us keep, whoever it is (a flood of made-up request ids from an
# authenticated Envoy): past these, a new request is not counted (its limit is less strict for
# it) rather than memory growing. Far above what real Envoys hold in flight at once.
MOST_OPEN = 200_000
MOST_ENDED = 200_000
RETRY_GRACE_S = 1.0  # after a request's last try failed: the time Envoy has to start another


@dataclass
class _Open:
    groups: tuple[str, ...]
    stream: int
    since: float
    last_start: float
    tries: dict[str, int] = field(default_factory=dict)  # engine -> its tries open there
    idle_since: float | None = None  # when its last open try ended without an answer


@dataclass
class InFlight:
    _open: dict[str, _Open] = field(default_factory=dict)  # request id ->
    _counts: dict[str, int] = field(default_factory=dict)  # group -> requests open
    _ended: dict[str, float] = field(default_factory=dict)  # request id -> when its own log ended it
    _changed: set[str] = field(default_factory=set)  # groups whose count moved since take_changed()
    _spent: set[str] = field(default_factory=set)  # groups with a request that ended without a try

    def started(self, groups: Sequence[str], request_id: str, stream: int, endpoint: str, now: float) -> bool:
        """A try of `request_id`, a request of `groups`, started on `endpoint`; True when a count moved."""
        groups = tuple(g for g in groups if g)
        if not groups or not request_id or request_id in self._ended:
            return False
        request = self._open.get(request_id)
        moved = request is None
        if request is None:
            if len(self._open) >= MOST_OPEN:
                return False
            request = self._open[request_id] = _Open(groups, stream, now, now)
            self._move(groups, +1)
        request.tries[endpoint] = request.tries.get(endpoint, 0) + 1  # a retry or a hedge: one more
        request.last_start, request.idle_since = now, None
        return moved

    def try_ended(self, request_id: str, endpoint: str, answered: bool, now: float) -> bool:
        """A try at `endpoint` ended: with the request's 2xx (it is over), or without (over unless
        another starts within RETRY_GRACE_S). True when a count moved."""
        request = self._open.get(request_id)
        if request is None:
            return False
        if answered:
            return self._close(request_id)
        if request.tries.get(endpoint, 0) == 0:
            return False  # a try that never started (it could not connect)
        request.tries[endpoint] -= 1
        if not request.tries[endpoint]:
            del request.tries[endpoint]
        if not request.tries:
            request.idle_since = now
        return False

    def ended(self, request_id: str, groups: Sequence[str], now: float, tried: bool) -> bool:
        """The request's own log: it is over. `tried`: a try of it started (its start may still be on
        its way); without one, it took a token of its `groups` that no start accounts for. True when
        a count moved or tokens were spent."""
        if not request_id:
            return False
        if tried and any(groups) and len(self._ended) < MOST_ENDED:
            self._ended[request_id] = now
        elif not tried and request_id not in self._open and any(groups):
            self._spent |= {g for g in groups if g}
            return True
        return self._close(request_id)

    def _close(self, request_id: str) -> bool:
        request = self._open.pop(request_id, None)
        if request is None:
            return False
        self._move(request.groups, -1)
        return True

    def stream_closed(self, stream: int) -> bool:
        """An Envoy's log stream ended (it restarted, or reconnected elsewhere): its requests' ends will
        not come here. True when a count moved."""
        return self._drop(lambda r: r.stream == stream)

    def settle(self, idle: set[str], now: float) -> bool:
        """`idle`: engines that hold nothing (their metrics say so). A request whose engines with open
        tries are all idle, its last try started a while ago, is over, whatever log of it was lost.
        True when a count moved."""
        return self._drop(lambda r: now - r.last_start > SETTLE_AFTER_S and r.tries.keys() <= idle)

    def expire(self, now: float, max_age_s: float) -> bool:
        """Ends requests whose last try failed RETRY_GRACE_S ago and those older than `max_age_s`;
        forgets ended ids older than ENDED_KEPT_S. True when a count moved."""
        self._ended = {r: at for r, at in self._ended.items() if now - at <= ENDED_KEPT_S}
        return self._drop(lambda r: now - r.since > max_age_s
                          or (r.idle_since is not None and now - r.idle_since >= RETRY_GRACE_S))

    def _drop(self, gone) -> bool:
        dropped = [rid for rid, request in self._open.items() if gone(request)]
        for rid in dropped:
            self._close(rid)
        return bool(dropped)

    def _move(self, groups: tuple[str, ...], step: int) -> None:
        for group in groups:
            count = self._counts.get(group, 0) + step
            if count:
                self._counts[group] = count
            else:
                del self._counts[group]
            self._changed.add(group)

    def take_changed(self) -> tuple[set[str], set[str]]:
        """(groups whose count moved, groups a request ended in without a try) since the last call."""
        changed, spent = self._changed | self._spent, self._spent
        self._changed, self._spent = set(), set()
        return changed, spent

    def count(self, group: str) -> int:
        return self._counts.get(group, 0)

    def counts(self) -> dict[str, int]:
        """Group -> its requests in flight (groups with none are absent)."""
        return dict(self._counts)
