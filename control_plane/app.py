"""The control-plane process (`serve`): the composition root. It builds the plane's parts
(control_plane/plane/), wires them, starts and stops the servers (admin API; xDS port: ADS,
access logs, RLQS) and the loops, and reloads the config on SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path

from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2_grpc
from grpc_health.v1 import health_pb2_grpc

from control_plane.addresses import is_https, is_loopback
from control_plane.bootstrap import read_lua_filter
from control_plane.config import ConfigError, GatewayConfig, load_config
from control_plane.decide.ejection import Ejections
from control_plane.decide.in_flight import split
from control_plane.fleet.dns_discovery import DnsDiscovery
from control_plane.fleet.local_store import StateStore, configured_token, ensure_token, state_dir
from control_plane.fleet.registry import Entry, config_entries
from control_plane.names import IN_FLIGHT_BUCKET_ENTRY, NO_ENGINE_CA
from control_plane.observe.access_logs import AccessLogServicer
from control_plane.observe.admissions import Admissions
from control_plane.observe.ledger import Ledger
from control_plane.observe.load_tracker import LoadTracker
from control_plane.observe.outcomes import Outcomes
from control_plane.operator import telemetry
from control_plane.operator.admin import build_admin_app
from control_plane.operator.audit import EtcdAudit, FileAudit, MemoryAudit
from control_plane.operator.telemetry import WEIGHT_UPDATES, XdsMetrics, forget_fleet, watch_fleet
from control_plane.operator.view import AuditTrail, PlaneView
from control_plane.peers import authorize
from control_plane.plane import StartupError
from control_plane.fleet.usage_store import EtcdUsageStore, FileUsageStore, MemoryUsageStore
from control_plane.plane.budgets import BudgetKeeper
from control_plane.plane.drains import Drains
from control_plane.plane.in_flight import InFlightLimits
from control_plane.plane.load_loop import LoadLoop
from control_plane.plane.operator_view import OperatorView
from control_plane.plane.publisher import Publisher
from control_plane.plane.state_keeper import StateKeeper
from control_plane.plane.tls import Tls
from control_plane.plane.usage import UsageKeeper
from control_plane.traces import PlaneTracer
from control_plane.xds.cache import AllCallbacks, InconsistentSnapshot, SnapshotCache
from control_plane.xds.quota_service import QuotaServicer
from control_plane.xds.server import start_ads_server

log = logging.getLogger(__name__)
# How long a stopping plane waits for each access-log stream to end after its next message:
# Envoy sends each worker's entries every 0.1 s (builders/listener.py), an idle worker none.
LOG_DRAIN_S = 0.5
# How long it answers Envoy's health checks NOT_SERVING first, reading its log streams as
# before: two of their intervals (0.2 s, envoy/bootstrap.yaml), so no Envoy starts a new log
# stream to it once it ends them.
HEALTH_NOTICED_S = 0.5


class ControlPlane:
    def __init__(self, config: GatewayConfig, config_path: Path | None = None, lua_source: str | None = None,
                 state_directory: Path | None = None):
        self.config_path = config_path
        self.state_directory = state_directory
        self.traces = PlaneTracer()  # the plane's own traces (observability.tracing), from start on
        self.cache = SnapshotCache(AllCallbacks(XdsMetrics(), self.traces))
        self.tls = Tls(config)
        changing = asyncio.Lock()  # held while a runtime change is made (the state keeper's)
        self.publisher = Publisher(config, lua_source if lua_source is not None else read_lua_filter(), self.cache,
                                   self.tls.certificates, keys=lambda: self.state.keys, changing=changing,
                                   published=lambda: self.limits.set_limits(force=True), tracer=self.traces)
        self.state = StateKeeper(self.publisher, StateStore(state_directory) if state_directory is not None else None,
                                 f"{socket.gethostname()}-{os.getpid()}-{config.listen.xds_port}", changing,
                                 on_leading=self._on_leading)
        self.limits = InFlightLimits(lambda: self.publisher.config, lambda: self.publisher.fleet,
                                     lambda c: self.publisher.access(c).grants.values(),
                                     lambda: (self.publisher.envoys_here(), self.publisher.envoys))
        # What the rounds observe and decide from (the access logs feed outcomes and the ledger too).
        self.tracker = LoadTracker()  # what the scrapes said, per endpoint
        self.outcomes = Outcomes()  # what the Envoys saw of each engine's tries
        self.ledger = Ledger()  # audio-seconds in flight per engine, its speed, and metering
        self.ejections = Ejections()  # engines out for failing their answers (decide/ejection.py)
        self.drains = Drains(self.state, self.tracker, self.publisher.applied_everywhere)
        self.load_loop = LoadLoop(self.publisher, self.state, self.drains, self.limits, self.tracker, self.outcomes,
                                  self.ledger, self.ejections, lambda: self.tls.engine_tls, telemetry.on_scrape,
                                  telemetry.LOAD_ROUND_SECONDS.observe, WEIGHT_UPDATES.inc, self.traces)
        self.discovery = DnsDiscovery(self.state.on_dns_records)
        # The metering by day, written for billing: in memory until start picks the state dir or etcd.
        # Its records' writer: this process alone (a restarted one keeps its host name and pid 1).
        self.usage = UsageKeeper(self.ledger.usage, MemoryUsageStore(), f"{self.state.plane_id}-{uuid.uuid4().hex[:8]}",
                                 lambda: self.publisher.config.state.usage_days, lambda: self.state.leader)
        # One budget per key across the Envoys: where its requests arrive, and what each Envoy charges them.
        self.admissions = Admissions(lambda: self.publisher.config.timeouts.route_s)
        self.budgets = BudgetKeeper(self.admissions, self.publisher.key_plans, lambda: self.publisher.envoys,
                                    self.usage.own_rows, self.usage.other_rows, self.publisher.set_budgets,
                                    share=self._budget_share)
        self.audit: AuditTrail = MemoryAudit()  # the admin changes' trail: in the state dir or etcd once started
        self.token: str | None = None
        self.token_path: Path | None = None
        # all that operator/ (admin API, /status, /metrics) sees
        self.view: PlaneView = OperatorView(
            publisher=self.publisher, state=self.state, drains=self.drains, limits=self.limits, tls=self.tls,
            tracker=self.tracker, outcomes=self.outcomes, ledger=self.ledger, ejections=self.ejections,
            bootstrap_token=lambda: self.token, audit=lambda: self.audit, usage=self.usage)
        self._server = None
        self._access_logs: AccessLogServicer | None = None
        self._admin: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._telemetry = None  # the /metrics collector over `view`, while serving

    def _budget_share(self) -> float:
        """This plane's part of every key's per-minute budget: its Envoys' part of all planes' Envoys."""
        here, total = self.publisher.envoys_here(), self.state.envoys_total()
        return 1.0 if total is None or here <= 0 or total <= here else here / total

    # What tests and tools read of the running plane: each part's own.
    config = property(lambda self: self.publisher.config)  # the config last published
    fleet = property(lambda self: self.publisher.fleet)
    lua_source = property(lambda self: self.publisher.lua_source)
    registry = property(lambda self: self.state.registry)
    certificates = property(lambda self: self.tls.certificates)

    async def start(self) -> None:
        """Restores saved state and publishes it before any Envoy can connect: none sees a partial set."""
        await self.traces.configure(self.config.observability.tracing)
        await self.state.restore_saved()
        self.audit = EtcdAudit(self.state.shared) if self.state.shared is not None else \
            FileAudit(self.state_directory) if self.state_directory is not None else MemoryAudit()
        if (shared := self.state.shared) is not None:
            self.usage.store = EtcdUsageStore(shared.prefix, shared.call, lambda: shared.client)
        elif self.state_directory is not None:
            self.usage.store = FileUsageStore(self.state_directory)
        if (name := self.config.auth.engine_api_key_env) is not None:
            self.publisher.engine_key = os.environ.get(name, "").strip() or None
            if self.publisher.engine_key is None:
                raise StartupError(f"auth.engine_api_key_env: the environment variable {name} is not set")
        material = self.tls.load()
        https = any(is_https(e.url) for e in config_entries(self.config)) or \
            any(d.scheme == "https" for d in self.config.discovery)
        if https and not material.checks_engines:
            raise StartupError(NO_ENGINE_CA)
        await self.budgets.round(check_days=True)  # a day spent before a restart stays spent
        await self.state.apply(self.config)
        self._check_admin_exposure()
        if self.state_directory is not None:
            self.token, self.token_path = ensure_token(self.state_directory)
        else:
            self.token = configured_token()
        self._telemetry = watch_fleet(self.view)
        await self._start_servers()
        self._tasks = [asyncio.create_task(task) for task in (
            self.load_loop.run(), self.tls.watch(self.publisher.publish_secrets), self.usage.run(),
            self.budgets.run(),
            *self.state.shared_tasks(self.publisher.envoys_here))]
        if self.state.shared is None:
            await self.discovery.restart(self.config.discovery)
        log.info("admin API on %s (token %s)", self.config.admin_url,
                 f"in {self.token_path}" if self.token_path else "from the environment")
        log.info("xDS (ADS) listening on %s:%d (%s)", self.config.listen.xds_address, self.config.listen.xds_port,
                 f"mutual TLS, internal CA in {self.config.internal_tls.dir}" if self.tls.xds else "plaintext, loopback")

    async def _start_servers(self) -> None:
        """The admin API, and the xDS port (ADS, access logs, RLQS)."""
        listen, limits = self.config.listen, self.limits
        self._admin = web.AppRunner(build_admin_app(self.view, self.traces), access_log=None)
        await self._admin.setup()
        await web.TCPSite(self._admin, listen.admin_address, listen.admin_port,
                          ssl_context=self.tls.admin.context if self.tls.admin else None).start()
        self._access_logs = AccessLogServicer(self.outcomes, self.ledger, limits.counts, time.monotonic,
                                              limits.update_slots, lambda: self.publisher.known,
                                              telemetry.REPORTS_DROPPED.on("access log"), authorize,
                                              self.admissions.arrived, self.admissions.charged_after)
        self._server = await start_ads_server(self.cache, listen.xds_address, listen.xds_port, [
            lambda server: als_pb2_grpc.add_AccessLogServiceServicer_to_server(self._access_logs, server),
            lambda server: health_pb2_grpc.add_HealthServicer_to_server(self._access_logs.health, server),
            lambda server: rlqs_pb2_grpc.add_RateLimitQuotaServiceServicer_to_server(
                QuotaServicer(limits.slots, split, IN_FLIGHT_BUCKET_ENTRY, telemetry.REPORTS_DROPPED.on("quota report"),
                              authorize), server)], self.tls.xds.credentials if self.tls.xds else None, authorize)

    def _check_admin_exposure(self) -> None:
        address = self.config.listen.admin_address
        if not is_loopback(address) and configured_token() is None:
            raise StartupError(f"listen.admin_address {address} is not loopback: set WHISPER_GATEWAY_ADMIN_TOKEN "
                               "(or WHISPER_GATEWAY_ADMIN_TOKEN_FILE) before exposing the admin API")

    async def stop(self, grace: float = 0.2) -> None:
        """Stops serving. ADS and access-log streams never end on their own, so a long gRPC grace
        would only be waited out in full: `grace` lets responses being written finish, and each
        Envoy reconnects (to this plane restarted, or another) and keeps its last config meanwhile."""
        await self.discovery.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._access_logs is not None:
            # Each log stream ends after its next entries, once every Envoy saw NOT_SERVING:
            # Envoy holds what it logs next and sends it to the plane that comes back.
            await self._access_logs.drain(LOG_DRAIN_S, HEALTH_NOTICED_S)
        if self._server is not None:
            await self._server.stop(grace)
        await self.usage.flush()  # what the logs metered up to the end, before the store closes
        await self.state.close()
        if self._admin is not None:
            await self._admin.cleanup()
        forget_fleet(self._telemetry)
        await self.traces.close()  # what is left exported, at most traces.EXPORT_TIMEOUT_S

    async def _on_leading(self, leading: bool) -> None:
        """The leader alone runs DNS discovery. A plane that stops leading leaves what its
        discovery found in place for the next leader."""
        if leading:
            await self.discovery.restart(self.config.discovery)
        else:
            await self.discovery.pause()

    # -- config ------------------------------------------------------------------------------

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
        if config.state != self.config.state:
            log.warning("state changes take effect on restart only")
            config = replace(config, state=self.config.state)
        if config.listen.tls != self.config.listen.tls or config.backend_tls != self.config.backend_tls:
            log.warning("listen.tls and backend_tls changes take effect on restart only; replacing the files "
                        "they name rotates certificates live")
            config = replace(config, listen=replace(config.listen, tls=self.config.listen.tls),
                             backend_tls=self.config.backend_tls)
        if config.internal_tls != self.config.internal_tls:
            log.warning("internal_tls changes take effect on restart only; replacing the files in its folder "
                        "rotates certificates live")
            config = replace(config, internal_tls=self.config.internal_tls)
        if config.auth.engine_api_key_env != self.config.auth.engine_api_key_env:
            log.warning("auth.engine_api_key_env changes take effect on restart only")
            config = replace(config, auth=replace(config.auth, engine_api_key_env=self.config.auth.engine_api_key_env))
        try:
            await self.state.reload(config)  # once no runtime change is being made
        except InconsistentSnapshot as error:
            log.error("reload refused, keeping the running config: %s", error)
            return False
        await self.traces.configure(config.observability.tracing)
        if self.state.leader:
            await self.discovery.restart(config.discovery)
        log.info("config reloaded from %s", self.config_path)
        return True

    async def apply(self, config: GatewayConfig) -> None:
        """Publishes `config` with the registry's runtime changes; on failure nothing changes."""
        await self.state.apply(config)

    async def drain(self, entry_id: str, timeout_s: float) -> Entry:
        return await self.drains.drain(entry_id, timeout_s)

    async def check_drains(self) -> None:
        await self.drains.check_drains()


async def serve(config_path: Path | None, state_directory: Path | None = None) -> int:
    """`whisper-gateway serve`: runs until SIGTERM/SIGINT; SIGHUP reloads the config file."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    plane = ControlPlane(config, config_path, state_directory=state_dir(state_directory))
    try:
        await plane.start()
    except (OSError, StartupError) as error:
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
