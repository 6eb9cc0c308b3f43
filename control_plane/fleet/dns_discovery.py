"""Backends from DNS: each A/AAAA record of a name is an engine; vanished records are drained.

Re-resolved every `interval_s`. A failed lookup changes nothing (engines are not cut because
DNS hiccupped); a record that disappears is drained, not cut, and comes back if it reappears.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from control_plane.config import DiscoveryConfig
from control_plane.fleet.dns_client import lookup
from control_plane.fleet.registry import ACTIVE, DRAINING, Entry, Registry, Source

log = logging.getLogger(__name__)


async def resolve_all(item: DiscoveryConfig) -> list[str]:
    if item.nameserver is not None:
        return await lookup(item.name, item.nameserver)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(item.name, item.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            return []
        raise OSError(str(error)) from None
    return sorted({info[4][0] for info in infos})


def url_for(address: str, port: int, scheme: str) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"{scheme}://{host}:{port}"


def plan(registry: Registry, item: DiscoveryConfig, addresses: list[str], drain_timeout_s: float):
    """The registry change that makes `item`'s backends match `addresses` (pure)."""
    wanted = {url_for(a, item.port, item.scheme) for a in addresses}

    def is_mine(entry: Entry) -> bool:
        return entry.source is Source.DNS and entry.dns_name == item.name

    # An address another source (the config, the API, another name) already serves stays theirs.
    wanted -= {e.url for e in registry.entries() if not is_mine(e)}
    mine = {e.url: e for e in registry.entries() if is_mine(e)}
    added = wanted - set(mine)
    vanished = {url for url, e in mine.items() if url not in wanted and e.state == ACTIVE}
    # Only drains DNS started itself are undone by the record coming back; an operator's stay.
    returned = {url for url, e in mine.items() if url in wanted and e.state == DRAINING and e.drain_reason == "dns"}

    def apply(r: Registry) -> None:
        for url in added:
            entry = Entry.create(url, item.models, item.weight, Source.DNS, dns_name=item.name)
            r.parked.pop(entry.id, None)  # newly seen: whatever drain was kept for it is over
            r.add(entry)
        for url in vanished:
            r.set_state(mine[url].id, DRAINING, time.time() + drain_timeout_s, reason="dns")
        for url in returned:
            r.set_state(mine[url].id, ACTIVE)

    return apply if added or vanished or returned else None


class DnsDiscovery:
    """Watches DNS names and reports each one's records; it changes nothing itself."""

    def __init__(self, on_records: Callable[[DiscoveryConfig, list[str]], Awaitable[None]]):
        self.on_records = on_records
        self.items: tuple[DiscoveryConfig, ...] = ()
        self._tasks: list[asyncio.Task] = []
        self._restarting = asyncio.Lock()  # a reload and a change of leader may restart it at once

    async def restart(self, items: tuple[DiscoveryConfig, ...]) -> None:
        """Watches `items` from now on; names no longer listed are reported with no records."""
        async with self._restarting:
            await self.stop()
            for gone in {i.name for i in self.items} - {i.name for i in items}:
                await self.on_records(next(i for i in self.items if i.name == gone), [])
            self.items = items
            self._tasks = [asyncio.create_task(self._watch(item)) for item in items]

    async def pause(self) -> None:
        """Stops watching and forgets the names, reporting nothing: what was found stays (another
        control plane, now leading, watches them)."""
        async with self._restarting:
            await self.stop()
            self.items = ()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _watch(self, item: DiscoveryConfig) -> None:
        while True:
            try:
                await self.on_records(item, await resolve_all(item))
            except OSError as error:
                log.warning("DNS lookup of %s failed, keeping its backends: %s", item.name, error)
            except Exception:
                log.exception("DNS discovery of %s failed", item.name)
            await asyncio.sleep(item.interval_s)
