"""Holds the snapshot every Envoy is served, wakes streams on change, and records ACKs and NACKs."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import CLUSTER, ENDPOINT, ROUTE, SHORT_NAMES

log = logging.getLogger(__name__)


class InconsistentSnapshot(ValueError):
    """A snapshot that Envoy must not see (a route to a missing cluster, a zero weight...)."""


@dataclass(frozen=True)
class Nack:
    type_url: str
    version: str
    message: str
    at: float


@dataclass
class EnvoyStatus:
    """One connected ADS stream, as the status page and tests see it."""

    stream_id: int
    node_id: str
    cluster: str
    peer: str
    identity: str = ""  # the certificate's identity (internal TLS), or "local <address>"
    acked: dict[str, str] = field(default_factory=dict)
    last_nack: Nack | None = None
    # Types fetched by name: the content hash of each resource this Envoy ACKed, and the
    # resources it refused (by type and name), with the reason, until a good one replaces them.
    applied: dict[str, dict[str, str]] = field(default_factory=dict)
    rejected: dict[tuple[str, str], Nack] = field(default_factory=dict)
    # Per type: when (monotonic) the oldest response it has not answered (ACK or NACK) was sent;
    # absent while it has answered every one. Types it never asked for are never behind.
    behind_since: dict[str, float] = field(default_factory=dict)

    def lagging(self, now: float, after_s: float) -> bool:
        """A response unanswered for longer than `after_s`: a stuck or overloaded Envoy."""
        return any(now - since > after_s for since in self.behind_since.values())


class Callbacks(Protocol):
    """What the xDS layer reports to whoever listens (telemetry, traces), as go-control-plane's
    Callbacks: the layer itself depends on nothing above it."""

    def on_serve(self, versions: dict[str, str]) -> None:
        """The types whose version changed, and their new versions: called by the task that serves
        them (the publisher's), so a listener may take its context along (control_plane/traces.py)."""

    def on_push(self, type_url: str) -> None: ...

    def on_ack(self, type_url: str, version: str, node: str, push_to_ack_s: float | None) -> None:
        """Envoy `node` applied `version`; `push_to_ack_s`: since it was served, at its first ACK
        of the version served now (else None)."""

    def on_nack(self, type_url: str, version: str, node: str, message: str) -> None:
        """Envoy `node` refused `version`, saying why."""


class NoCallbacks:
    def on_serve(self, versions: dict[str, str]) -> None:
        pass

    def on_push(self, type_url: str) -> None:
        pass

    def on_ack(self, type_url: str, version: str, node: str, push_to_ack_s: float | None) -> None:
        pass

    def on_nack(self, type_url: str, version: str, node: str, message: str) -> None:
        pass


class AllCallbacks:
    """Several listeners, each told everything, in order."""

    def __init__(self, *listeners: Callbacks):
        self.listeners = listeners

    def on_serve(self, versions: dict[str, str]) -> None:
        for listener in self.listeners:
            listener.on_serve(versions)

    def on_push(self, type_url: str) -> None:
        for listener in self.listeners:
            listener.on_push(type_url)

    def on_ack(self, type_url: str, version: str, node: str, push_to_ack_s: float | None) -> None:
        for listener in self.listeners:
            listener.on_ack(type_url, version, node, push_to_ack_s)

    def on_nack(self, type_url: str, version: str, node: str, message: str) -> None:
        for listener in self.listeners:
            listener.on_nack(type_url, version, node, message)


# An Envoy that has not applied a version for this long is lagging: named on /status, and not
# waited for by changes that wait for every Envoy's ACK (keys, drains), so it holds up nobody.
LAGGING_AFTER_S = 10.0


class SnapshotCache:
    def __init__(self, callbacks: Callbacks | None = None) -> None:
        self.callbacks: Callbacks = callbacks or NoCallbacks()
        self._snapshot: Snapshot | None = None
        self._watchers: set[asyncio.Event] = set()
        self._acks = asyncio.Condition()
        self.envoys: dict[int, EnvoyStatus] = {}
        self.nacks_total = 0
        self.last_nack: Nack | None = None
        self._published_at: dict[str, tuple[str, float]] = {}  # type -> (version, when)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def set_snapshot(self, snapshot: Snapshot) -> bool:
        """Serves `snapshot` from now on; False when nothing changed. Refuses inconsistent ones."""
        self._check(snapshot)
        return self._serve(snapshot)

    async def publish(self, snapshot: Snapshot, removal_ack_timeout_s: float = 5.0) -> bool:
        """set_snapshot, make before break: a removed cluster goes only after every Envoy stopped
        routing to it (the routes without it ACKed, or the timeout), so no request meets a missing cluster."""
        self._check(snapshot)  # once, before anything of it goes out
        current = self._snapshot
        removed = current.names(CLUSTER) - snapshot.names(CLUSTER) if current else frozenset()
        if removed:  # the new snapshot plus the removed clusters and their endpoints: consistent too
            resources = {t: list(snapshot.resources[t].values()) for t in snapshot.resources}
            resources[CLUSTER] += [current.resources[CLUSTER][name] for name in removed]
            resources[ENDPOINT] += [current.resources[ENDPOINT][name] for name in removed
                                    if name in current.resources[ENDPOINT]]
            bridge = Snapshot.from_resources(resources)
            if self._serve(bridge):
                await self.wait_for_acks(ROUTE, bridge.versions[ROUTE], removal_ack_timeout_s)
        return self._serve(snapshot)

    def _check(self, snapshot: Snapshot) -> None:
        errors = snapshot.consistency_errors()
        if errors:
            raise InconsistentSnapshot("; ".join(errors))

    def _serve(self, snapshot: Snapshot) -> bool:
        if self._snapshot is not None and self._snapshot.versions == snapshot.versions:
            return False
        now = time.monotonic()
        changed = {t: v for t, v in snapshot.versions.items() if self._snapshot is None or self._snapshot.versions.get(t) != v}
        for type_url, version in changed.items():
            self._published_at[type_url] = (version, now)
        self._snapshot = snapshot
        self.callbacks.on_serve(changed)
        for event in self._watchers:
            event.set()
        return True

    def watch(self) -> asyncio.Event:
        event = asyncio.Event()
        self._watchers.add(event)
        if self._snapshot is not None:
            event.set()
        return event

    def unwatch(self, event: asyncio.Event) -> None:
        self._watchers.discard(event)

    def stream_opened(self, status: EnvoyStatus) -> None:
        self.envoys[status.stream_id] = status
        log.info("envoy %s (%s, %s) connected", status.node_id, status.identity or "?", status.peer)

    def stream_closed(self, stream_id: int) -> None:
        status = self.envoys.pop(stream_id, None)
        if status is not None:
            log.info("envoy %s (%s) disconnected", status.node_id, status.peer)

    async def record_ack(self, stream_id: int, type_url: str, version: str,
                         hashes: dict[str, str] | None = None) -> None:
        status = self.envoys.get(stream_id)
        if status is not None:
            if hashes:
                status.applied.setdefault(type_url, {}).update(hashes)
            first = status.acked.get(type_url) != version and self._published_at.get(type_url, ("",))[0] == version
            self.callbacks.on_ack(type_url, version, status.node_id,
                                  time.monotonic() - self._published_at[type_url][1] if first else None)
            status.acked[type_url] = version
        async with self._acks:
            self._acks.notify_all()

    def record_nack(self, stream_id: int, type_url: str, version: str, message: str) -> None:
        nack = Nack(type_url=type_url, version=version, message=message, at=time.time())
        self.nacks_total += 1
        self.last_nack = nack
        status = self.envoys.get(stream_id)
        if status is not None:
            status.last_nack = nack
        node = status.node_id if status else "?"
        self.callbacks.on_nack(type_url, version, node, message)
        log.warning("envoy %s rejected %s version %s: %s", node, SHORT_NAMES.get(type_url, type_url), version, message)

    def record_rejection(self, stream_id: int, type_url: str, name: str, message: str | None,
                         version: str = "") -> None:
        """One resource an Envoy refused (message), or accepted again (None)."""
        status = self.envoys.get(stream_id)
        if status is None:
            return
        if message is None:
            status.rejected.pop((type_url, name), None)
            log.info("envoy %s applied %s %s again", status.node_id, SHORT_NAMES.get(type_url, type_url), name)
            return
        status.rejected[(type_url, name)] = Nack(type_url=type_url, version=version, message=message, at=time.time())
        log.error("envoy %s refused %s %s; it keeps its last good one: %s", status.node_id,
                  SHORT_NAMES.get(type_url, type_url), name, message)

    def envoy_count(self) -> int:
        """The Envoys connected (each stream authorized as its node): a node's several streams count once."""
        return len({status.node_id for status in self.envoys.values()})

    def record_sent(self, stream_id: int, type_url: str) -> None:
        """A response went to this Envoy: it is behind on the type until it answers (record_settled)."""
        if (status := self.envoys.get(stream_id)) is not None:
            status.behind_since.setdefault(type_url, time.monotonic())

    def record_settled(self, stream_id: int, type_url: str) -> None:
        """The Envoy answered every response of the type it was sent."""
        if (status := self.envoys.get(stream_id)) is not None:
            status.behind_since.pop(type_url, None)

    def responsive(self) -> list[EnvoyStatus]:
        """The connected Envoys that are not lagging (LAGGING_AFTER_S)."""
        now = time.monotonic()
        return [s for s in self.envoys.values() if not s.lagging(now, LAGGING_AFTER_S)]

    def not_applied(self, type_url: str, version: str) -> list[str]:
        """Node ids of the connected Envoys that have not applied `version` of a type."""
        return sorted({s.node_id for s in self.envoys.values() if s.acked.get(type_url) != version})

    def applied_everywhere(self, type_url: str, names: set[str] | frozenset[str]) -> bool:
        """Every responsive Envoy ACKed the current content of each named resource (not just got it)."""
        current = self._snapshot.hashes[type_url] if self._snapshot else {}
        return all(status.applied.get(type_url, {}).get(name) == current.get(name)
                   for status in self.responsive() for name in names)

    async def wait_for_acks(self, type_url: str, version: str, timeout: float) -> bool:
        """Waits until every responsive Envoy has applied `version` of a type (or the timeout): one
        already lagging is not waited for."""

        def applied() -> bool:
            return all(s.acked.get(type_url) == version for s in self.responsive())

        async with self._acks:
            try:
                await asyncio.wait_for(self._acks.wait_for(applied), timeout)
                return True
            except TimeoutError:
                return False
