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

from control_plane.config import DiscoveryConfig
from control_plane.dns_client import lookup
from control_plane.registry import ACTIVE, DRAINING, Entry, Registry

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


def url_for(address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"http://{host}:{port}"


def plan(registry: Registry, item: DiscoveryConfig, addresses: list[str], drain_timeout_s: float):
    """The registry change that makes `item`'s backends match `addresses` (pure)."""
    source = f"dns:{item.name}"
    wanted = {url_for(a, item.port) for a in addresses}

    def apply(r: Registry) -> None:
        current = {e.url: e for e in r.dns_entries.values() if e.source == source}
        for url in wanted - set(current):
            entry = Entry.create(url, item.models, item.weight, source)
            r.dns_entries[entry.id] = entry
            r.overrides.pop(entry.id, None)
        for url, entry in current.items():
            state = r.overrides[entry.id].state if entry.id in r.overrides else ACTIVE
            if url in wanted and state == DRAINING:
                r.set_state(entry.id, ACTIVE)
            elif url not in wanted and state == ACTIVE:
                r.set_state(entry.id, DRAINING, time.time() + drain_timeout_s)

    current = {e.url for e in registry.dns_entries.values() if e.source == source}
    draining = {e.url for e in registry.entries() if e.source == source and e.state == DRAINING}
    changed = bool(wanted - current) or bool((current - wanted) - draining) or bool(wanted & draining)
    return apply if changed else None


class DnsDiscovery:
    def __init__(self, plane):
        self.plane = plane

    def start(self, items: tuple[DiscoveryConfig, ...]) -> list[asyncio.Task]:
        return [asyncio.create_task(self._watch(item)) for item in items]

    async def _watch(self, item: DiscoveryConfig) -> None:
        while True:
            try:
                addresses = await resolve_all(item)
                change = plan(self.plane.registry, item, addresses, self.plane.config.drain_timeout_s)
                if change is not None:
                    log.info("DNS %s now has %s", item.name, addresses or "no records")
                    await self.plane.change(change)
            except OSError as error:
                log.warning("DNS lookup of %s failed, keeping its backends: %s", item.name, error)
            except Exception:
                log.exception("DNS discovery of %s failed", item.name)
            await asyncio.sleep(item.interval_s)
