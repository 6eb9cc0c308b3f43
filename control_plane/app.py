"""The control-plane process: config in, snapshots out, served to every Envoy over ADS."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from control_plane.admin import build_admin_app
from control_plane.balancer import Balancer
from control_plane.bootstrap import read_lua_filter
from control_plane.builders import build_load_assignments, build_resources
from control_plane.config import ConfigError, GatewayConfig, load_config
from control_plane.discovery import resolve_fleet
from control_plane.fleet import Fleet
from control_plane.xds.cache import InconsistentSnapshot, SnapshotCache
from control_plane.xds.server import start_ads_server
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import CLUSTER, ENDPOINT, ROUTE

log = logging.getLogger(__name__)

# How long a removal waits for every Envoy to stop routing to a cluster before deleting it.
REMOVAL_ACK_TIMEOUT_S = 5.0


class ControlPlane:
    def __init__(self, config: GatewayConfig, config_path: Path | None = None, lua_source: str | None = None):
        self.config = config
        self.config_path = config_path
        self.lua_source = lua_source if lua_source is not None else read_lua_filter()
        self.cache = SnapshotCache()
        self.fleet: Fleet | None = None
        self.balancer = Balancer(self, config.routing)
        self._server = None
        self._admin: web.AppRunner | None = None
        self._balancing: asyncio.Task | None = None
        self._publishing = asyncio.Lock()

    async def start(self) -> None:
        """Publishes the first snapshot before Envoy can connect, so no Envoy sees an empty one."""
        listen = self.config.listen
        await self.apply(self.config)
        self._admin = web.AppRunner(build_admin_app(self), access_log=None)
        await self._admin.setup()
        await web.TCPSite(self._admin, listen.admin_address, listen.admin_port).start()
        self._server = await start_ads_server(self.cache, listen.xds_address, listen.xds_port)
        self._balancing = asyncio.create_task(self.balancer.run())
        log.info("status on http://%s:%d/status", listen.admin_address, listen.admin_port)
        log.info("xDS (ADS) listening on %s:%d", listen.xds_address, listen.xds_port)

    async def stop(self, grace: float = 2.0) -> None:
        if self._balancing is not None:
            self._balancing.cancel()
            await asyncio.gather(self._balancing, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace)
        if self._admin is not None:
            await self._admin.cleanup()

    async def reload(self) -> bool:
        """Re-reads the config file; a bad file changes nothing."""
        try:
            config = load_config(self.config_path)
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s", error)
            return False
        running = self.config.listen
        fixed = {"xds_address": running.xds_address, "xds_port": running.xds_port,
                 "admin_address": running.admin_address, "admin_port": running.admin_port}
        if any(getattr(config.listen, key) != value for key, value in fixed.items()):
            log.warning("listen.xds_* and listen.admin_* changes take effect on restart only")
            config = replace(config, listen=replace(config.listen, **fixed))
        try:
            await self.apply(config)
        except InconsistentSnapshot as error:
            log.error("reload refused, keeping the running config: %s", error)
            return False
        self.balancer.configure(config.routing)
        log.info("config reloaded from %s", self.config_path)
        return True

    async def apply(self, config: GatewayConfig) -> None:
        fleet = await resolve_fleet(config)
        if self.fleet is not None:  # endpoints that stay keep their load-derived weights
            keep = fleet.endpoint_keys()
            fleet = replace(fleet, weights={k: w for k, w in self.fleet.weights.items() if k in keep})
        async with self._publishing:
            await self.publish(Snapshot.from_resources(build_resources(config, fleet, self.lua_source)))
            self.config, self.fleet = config, fleet

    async def set_weights(self, weights: dict[tuple[str, str], int]) -> None:
        """Publishes new endpoint weights; only the endpoints are rebuilt and sent."""
        async with self._publishing:
            fleet = self.fleet
            keep = fleet.endpoint_keys()
            fleet = replace(fleet, weights={k: w for k, w in weights.items() if k in keep})
            current = self.cache.snapshot
            self.cache.set_snapshot(current.with_type(ENDPOINT, build_load_assignments(fleet)))
            self.fleet = fleet

    async def publish(self, snapshot: Snapshot) -> None:
        """Make before break: a removed cluster goes only after every Envoy stopped routing to it."""
        current = self.cache.snapshot
        removed = current.names(CLUSTER) - snapshot.names(CLUSTER) if current else frozenset()
        if removed:
            resources = {t: list(snapshot.resources[t].values()) for t in snapshot.resources}
            resources[CLUSTER] += [current.resources[CLUSTER][name] for name in removed]
            resources[ENDPOINT] += [current.resources[ENDPOINT][name] for name in removed
                                    if name in current.resources[ENDPOINT]]
            bridge = Snapshot.from_resources(resources)
            if self.cache.set_snapshot(bridge):
                await self.cache.wait_for_acks(ROUTE, bridge.versions[ROUTE], REMOVAL_ACK_TIMEOUT_S)
        if self.cache.set_snapshot(snapshot):
            log.info("published snapshot %s", {k.rsplit(".", 1)[-1]: v for k, v in snapshot.versions.items()})


async def serve(config_path: Path | None) -> int:
    """`whisper-gateway serve`: runs until SIGTERM/SIGINT; SIGHUP reloads the config file."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    plane = ControlPlane(config, config_path)
    try:
        await plane.start()
    except OSError as error:
        log.error("cannot start: %s", error)
        await plane.stop(0)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        task = loop.create_task(plane.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await plane.stop()
    return 0
