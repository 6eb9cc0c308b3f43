"""Turns configured backend URLs into the IP addresses Envoy's EDS needs."""

from __future__ import annotations

import asyncio
import logging
import socket

from control_plane.config import BackendConfig, GatewayConfig, is_ip_address
from control_plane.fleet import Backend, Fleet

log = logging.getLogger(__name__)


async def resolve_host(host: str, port: int) -> str:
    """One address for `host`, IPv4 first; raises OSError when it does not resolve."""
    if is_ip_address(host):
        return host
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no addresses")
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0]


async def _resolve(backend: BackendConfig) -> Backend | None:
    try:
        address = await resolve_host(backend.host, backend.port)
    except OSError as error:
        # Left out until it resolves (next reload); the other backends keep serving.
        log.warning("backend %s left out: cannot resolve %s: %s", backend.url, backend.host, error)
        return None
    return Backend(id=backend.url, address=address, port=backend.port, models=backend.models, weight=backend.weight)


async def resolve_fleet(config: GatewayConfig) -> Fleet:
    resolved = await asyncio.gather(*(_resolve(b) for b in config.all_backends()))
    return Fleet(models=config.models, backends=tuple(b for b in resolved if b is not None))
