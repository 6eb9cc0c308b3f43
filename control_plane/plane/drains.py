"""Drains: a backend drained (published DRAINING: no new requests), resumed, or removed, and each
drain finished once the engine is idle for every Envoy, or at its deadline.

A drain is a registry change (the state keeper's); finishing one reads the scrapes (the load
tracker) and whether every Envoy applied the draining endpoints (the publisher's cache).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from control_plane.config import GatewayConfig
from control_plane.decide.policy import is_fresh
from control_plane.fleet.registry import ACTIVE, DRAINED, DRAINING, Entry, Registry, Source
from control_plane.names import cluster_name
from control_plane.observe.load_tracker import EndpointState, LoadTracker
from control_plane.plane.state_keeper import StateKeeper

log = logging.getLogger(__name__)

# A draining engine is idle once this many scrapes in a row, after every Envoy applied the
# drain, show nothing running or waiting on it.
IDLE_SCRAPES_TO_FINISH_DRAIN = 2


def idle(state: EndpointState, config: GatewayConfig) -> bool:
    """An endpoint whose fresh scrape shows nothing running or waiting."""
    return is_fresh(state, config.routing) and state.load.running == 0 and state.load.waiting == 0


class Drains:
    def __init__(self, state: StateKeeper, tracker: LoadTracker, applied_everywhere: Callable[[set[str]], bool]):
        """`applied_everywhere`: whether every Envoy applied these clusters' endpoints as served."""
        self.state = state
        self.tracker = tracker
        self.applied_everywhere = applied_everywhere
        self._idle_scrapes: dict[str, int] = {}

    async def drain(self, entry_id: str, timeout_s: float) -> Entry:
        entry = self.state.registry.get(entry_id)
        if entry.state != DRAINING:
            await self.state.change(lambda r: r.set_state(entry_id, DRAINING, time.time() + timeout_s))
            log.info("draining %s (%s), at most %.0f s", entry_id, entry.url, timeout_s)
        return self.state.registry.get(entry_id)

    async def resume(self, entry_id: str) -> Entry:
        if self.state.registry.get(entry_id).state != ACTIVE:
            await self.state.change(lambda r: r.set_state(entry_id, ACTIVE))
        return self.state.registry.get(entry_id)

    async def remove_now(self, entry_id: str) -> None:
        await self.state.change(lambda r: r.remove(entry_id))
        self._idle_scrapes.pop(entry_id, None)
        log.info("removed %s", entry_id)

    async def check_drains(self) -> None:
        """Finishes drains: when the engine is idle for every Envoy, or when its time is up (the
        leader only, so each finishes once)."""
        if not self.state.leader:
            return
        for entry_id in [e.id for e in self.state.registry.entries() if e.state == DRAINING]:
            entry = self.state.registry.get(entry_id)  # re-read: an earlier finish awaited, things move
            if entry is None or entry.state != DRAINING:
                self._idle_scrapes.pop(entry_id, None)
                continue
            if entry.drain_deadline is not None and time.time() >= entry.drain_deadline:
                log.warning("drain of %s timed out with requests possibly in flight", entry.id)
                await self._finish_drain(entry)
                continue
            now = asyncio.get_running_loop().time()
            # Applied by every Envoy (ACKed, not just sent) in the content that drains it.
            applied = self.applied_everywhere({cluster_name(m) for m in entry.models})
            idle_now = applied and all(idle(self.tracker.state(entry.id, m, 1, now), self.state.config)
                                      for m in entry.models)
            self._idle_scrapes[entry.id] = self._idle_scrapes.get(entry.id, 0) + 1 if idle_now else 0
            if self._idle_scrapes[entry.id] >= IDLE_SCRAPES_TO_FINISH_DRAIN:
                await self._finish_drain(entry)

    async def _finish_drain(self, entry: Entry) -> None:
        self._idle_scrapes.pop(entry.id, None)
        # Config backends, and DNS backends an operator drained while their record stays, are
        # parked; API backends and vanished DNS records go.
        def finish(registry: Registry) -> None:
            # The same drain, on the state the change is made on: a resume made meanwhile on another
            # control plane wins.
            if (now := registry.get(entry.id)) is None or now.drain != entry.drain:
                return
            if entry.source is Source.CONFIG or (entry.source is Source.DNS and entry.drain_reason != "dns"):
                registry.set_state(entry.id, DRAINED)
            else:
                registry.remove(entry.id)
        await self.state.change(finish)
        log.info("drain of %s (%s) finished", entry.id, entry.url)
