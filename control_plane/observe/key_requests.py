"""Requests in flight per API key, from the access logs: what a key's `requests_in_flight` limit counts.

A request is in flight from the log of its first try's start (the upstream-try log) until the
log that says it is over: a try that delivered its 2xx, or the request's own log, which comes
for every routed request that did not end in a 2xx (control_plane/builders/listener.py). Hedged
and retried tries of one request share its request id, so it counts once. The two logs travel on
different streams and may arrive in either order, so a request whose end came first is
remembered for a while and its late start ignored. A request is dropped when its stream closes
or after `max_age_s` (longer than any request may last), so a lost log cannot hold a key's slot.

Pure: no I/O, and time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENDED_KEPT_S = 60.0  # how long an ended request's id is kept, against its start logged late


@dataclass
class KeyRequests:
    max_age_s: float = 3600.0
    _open: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)  # key -> request id -> (stream, since)
    _ended: dict[str, float] = field(default_factory=dict)  # request id -> when its end was seen
    _changed: set[str] = field(default_factory=set)  # keys whose count moved since take_changed()

    def started(self, key: str, request_id: str, stream: int, now: float) -> bool:
        """A try of `request_id` started; True when that changed the key's count."""
        if not key or not request_id or request_id in self._ended:
            return False
        requests = self._open.setdefault(key, {})
        if request_id in requests:
            return False
        requests[request_id] = (stream, now)
        self._changed.add(key)
        return True

    def ended(self, key: str, request_id: str, now: float, logged_apart: bool = True) -> bool:
        """`request_id` is over (answered, or failed for good); True when that changed the key's count.
        `logged_apart`: the end came on another stream than the starts (the request's own log), so
        a start may still be on its way."""
        if not request_id:
            return False
        if logged_apart:
            self._ended[request_id] = now
        requests = self._open.get(key)
        if requests is None or requests.pop(request_id, None) is None:
            return False
        if not requests:
            del self._open[key]
        self._changed.add(key)
        return True

    def stream_closed(self, stream: int) -> bool:
        """An Envoy's log stream ended (it restarted, or reconnected elsewhere): its requests' ends will
        not come here. True when a count changed."""
        return self._drop(lambda s, since: s == stream)

    def expire(self, now: float) -> bool:
        """Forgets requests older than `max_age_s` and ended ids older than ENDED_KEPT_S; True when a count changed."""
        self._ended = {r: at for r, at in self._ended.items() if now - at <= ENDED_KEPT_S}
        return self._drop(lambda s, since: now - since > self.max_age_s)

    def _drop(self, gone) -> bool:
        changed = False
        for key in list(self._open):
            kept = {r: v for r, v in self._open[key].items() if not gone(*v)}
            if len(kept) != len(self._open[key]):
                changed = True
                self._changed.add(key)
                if kept:
                    self._open[key] = kept
                else:
                    del self._open[key]
        return changed

    def take_changed(self) -> set[str]:
        """The keys whose count moved since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def count(self, key: str) -> int:
        return len(self._open.get(key, ()))

    def counts(self) -> dict[str, int]:
        """Key id -> its requests in flight (keys with none are absent)."""
        return {key: len(requests) for key, requests in self._open.items()}
