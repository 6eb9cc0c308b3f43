"""Turns configured backend URLs into the IP addresses Envoy's EDS needs."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable

import aiohttp

from urllib.parse import urlsplit

from control_plane.addresses import AddressError, check_resolved, is_ip_address, own_port_problem
from control_plane.config import GatewayConfig, ListenConfig, ModelConfig
from control_plane.fleet.resolved import Backend, Fleet
from control_plane.fleet.registry import DRAINED, DRAINING, Entry, Registry

log = logging.getLogger(__name__)
# How long a backend's resolved host name is used before it is looked up again.
HOST_TTL_S = 30.0


async def resolve_host(host: str, port: int) -> str:
    """One address for `host`, IPv4 first; raises OSError when it does not resolve."""
    if is_ip_address(host):
        return host
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no addresses")
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0]


class HostCache:
    """Host names resolved in the last `ttl_s`: a change to one backend of a thousand named ones
    does not look up every other name again (bench/scale.py measured 0.5 s for that). A name
    that fails is not remembered, and a name is looked up again once its entry is older."""

    def __init__(self, ttl_s: float = HOST_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._entries: dict[tuple[str, int], tuple[str, float]] = {}

    async def address(self, host: str, port: int) -> str:
        if is_ip_address(host):
            return host
        now = self.clock()
        hit = self._entries.get((host, port))
        if hit is not None and now - hit[1] < self.ttl_s:
            return hit[0]
        address = await resolve_host(host, port)
        self._entries[(host, port)] = (address, now)
        return address


async def dialable_address(url: str, listen: ListenConfig, hosts: HostCache | None = None) -> str:
    """The IP Envoy will dial for a backend URL; AddressError when there is none it may dial."""
    parts = urlsplit(url)
    try:
        address = await (hosts.address(parts.hostname, parts.port) if hosts else resolve_host(parts.hostname, parts.port))
    except (OSError, UnicodeError) as error:
        raise AddressError(f"{parts.hostname} does not resolve ({error})") from None
    check_resolved(address)
    problem = own_port_problem(address, parts.port, listen.own_endpoints())
    if problem:
        raise AddressError(problem)
    return address


async def _resolve(entry: Entry, listen: ListenConfig, hosts: HostCache | None) -> Backend | None:
    parts = urlsplit(entry.url)
    try:
        address = await dialable_address(entry.url, listen, hosts)
    except AddressError as error:
        # Left out until it resolves to a good address (next change or reload); the others keep serving.
        log.warning("backend %s left out: %s", entry.url, error)
        return None
    return Backend(id=entry.id, address=address, port=parts.port, models=entry.models, weight=entry.weight,
                   draining=entry.state == DRAINING, url=entry.url, host=entry.dns_name or parts.hostname)


def served_models(config: GatewayConfig, registry: Registry) -> tuple[ModelConfig, ...]:
    """The config's models, then those first seen through the API."""
    known = {m.name for m in config.models}
    return config.models + tuple(ModelConfig(name=name) for name in registry.api_models if name not in known)


async def resolve_fleet(config: GatewayConfig, registry: Registry, hosts: HostCache | None = None) -> Fleet:
    """The registry's backends with the addresses Envoy dials (`hosts`: names resolved lately)."""
    entries = [e for e in registry.entries() if e.state != DRAINED]
    resolved = await asyncio.gather(*(_resolve(e, config.listen, hosts) for e in entries))
    return Fleet(models=served_models(config, registry), backends=tuple(b for b in resolved if b is not None))


async def read_engine_models(url: str, api_key: str | None = None, tls: ssl.SSLContext | None = None,
                             timeout: float = 5.0) -> list[str]:
    """The model names an engine serves, from its OpenAI-style /v1/models (behind its --api-key, if
    any; `tls` checks an https:// engine's certificate)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.get(f"{url}/v1/models", headers=headers, ssl=tls or True) as response:
            if response.status != 200:
                raise ValueError(f"{url}/v1/models answered HTTP {response.status}")
            body = await response.json(content_type=None)
    models = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
    if not models or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"{url}/v1/models lists no models")
    return models
