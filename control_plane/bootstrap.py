"""Envoy's bootstrap: the only file Envoy reads; it points Envoy at the control plane."""

from __future__ import annotations

import socket
from pathlib import Path
from string import Template

from control_plane.config import GatewayConfig

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
BOOTSTRAP_TEMPLATE = ENVOY_DIR / "bootstrap.yaml"
# The Lua filter is one source: the key check's and the duration reader's functions, then the
# router that calls them.
LUA_FILTER_PATHS = (ENVOY_DIR / "api_keys.lua", ENVOY_DIR / "audio_duration.lua", ENVOY_DIR / "model_router.lua")


def xds_endpoints(xds_host: str | None, config: GatewayConfig) -> list[tuple[str, int]]:
    """`host[:port],...` (several control planes) -> (host, port) pairs; the port defaults to
    listen.xds_port, the host to where the control plane listens."""
    endpoints = []
    for item in (xds_host or config.listen.xds_address).split(","):
        host, port = item.strip(), ""
        if host.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
            host, port = host.split(":")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        endpoints.append((host, int(port) if port else config.listen.xds_port))
    return endpoints


def render_bootstrap(template: str, config: GatewayConfig, node_id: str, xds_host: str | None = None,
                     admin_port: int | None = None) -> str:
    """Fills the template; `xds_host` (comma-separated for several control planes) defaults to
    where the control plane listens."""
    endpoints = "\n".join(f"        - endpoint:\n            address:\n              socket_address: "
                          f"{{address: {host}, port_value: {port}}}" for host, port in xds_endpoints(xds_host, config))
    return Template(template).substitute(
        node_id=node_id,
        admin_port=admin_port if admin_port is not None else config.listen.envoy_admin_port,
        xds_endpoints=endpoints,
        metrics_address=config.listen.address,
        metrics_port=config.listen.envoy_metrics_port,
        max_heap_bytes=config.limits.max_heap_mb * 1024 * 1024,
        max_connections=config.limits.max_connections,
    )


def default_node_id() -> str:
    return f"envoy-{socket.gethostname()}"


def read_lua_filter(paths: tuple[Path, ...] = LUA_FILTER_PATHS) -> str:
    return "\n".join(path.read_text() for path in paths)
