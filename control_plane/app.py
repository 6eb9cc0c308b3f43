"""The control-plane process: config and runtime changes in, snapshots out, served over ADS."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import random
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TypeVar
from dataclasses import replace
from pathlib import Path

from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2_grpc

from control_plane.addresses import is_https, is_loopback
from control_plane.bootstrap import read_lua_filter
from control_plane.builders import build_load_assignments, build_resources
from control_plane.builders.routes import build_route_configuration
from control_plane.decide.hedging import deadlines
from control_plane.builders.secrets import build_secrets
from control_plane.certificates import AdminTls, CertificateFiles, CertificateProblem, TlsMaterial, engine_client_context
from control_plane.internal_pki import ServerCredentials
from control_plane.peers import authorize
from control_plane.names import IN_FLIGHT_BUCKET_ENTRY, LOCAL_CLUSTER, NO_ENGINE_CA, batch_lane, cluster_name
from control_plane.config import ConfigError, GatewayConfig, load_config
from control_plane.decide.ejection import Ejections
from control_plane.decide.in_flight import GroupSlots, batch_lane_limits, needs_new_grants, plane_share, split
from control_plane.decide.lanes import closed_to_batch, model_waits
from control_plane.decide.policy import decide_routing, is_fresh
from control_plane.fleet.dns_discovery import DnsDiscovery
from control_plane.fleet.dns_discovery import plan as plan_dns
from control_plane.fleet.registry import ACTIVE, DRAINED, DRAINING, Entry, Registry, Source, config_entries
from control_plane.fleet.resolve import HostCache, resolve_fleet
from control_plane.fleet.resolved import Fleet
from control_plane.fleet.etcd_state import Conflict, EtcdState, StateUnavailable
from control_plane.fleet.local_store import StateStore, configured_token, ensure_token, state_dir
from control_plane.observe import scraper
from control_plane.observe.load_tracker import LoadTracker
from control_plane.observe.access_logs import AccessLogServicer, Known
from control_plane.observe.in_flight import InFlight
from control_plane.observe.ledger import Ledger
from control_plane.observe.outcomes import Outcomes
from control_plane.operator.admin import build_admin_app
from control_plane.operator.audit import EtcdAudit, FileAudit, MemoryAudit
from control_plane.operator.tokens import TokenTable
from control_plane.operator import telemetry
from control_plane.operator.telemetry import WEIGHT_UPDATES, XdsMetrics, forget_fleet, watch_fleet
from control_plane.operator.view import PlaneView
from control_plane.tenants.keys import Access, KeyTable
from control_plane.xds.cache import InconsistentSnapshot, SnapshotCache
from control_plane.xds.quota_service import QuotaServicer, Slots
from control_plane.xds.server import start_ads_server
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import ENDPOINT, ROUTE, SECRET

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often a change is made again on top of another control plane's newer state before giving up
# (each try waits a little longer, at random, so two planes busy with changes take turns).
CONFLICT_RETRIES = 20
# How long a removal waits for every Envoy to stop routing to a cluster before deleting it.
REMOVAL_ACK_TIMEOUT_S = 5.0
# How long an admin change waits for every Envoy to apply it (a key works everywhere when the
# answer comes) before answering with the Envoys that have not yet (`not_applied_by`).
ADMIN_ACK_TIMEOUT_S = 2.0
# A draining engine is idle once this many scrapes in a row, after every Envoy applied the
# drain, show nothing running or waiting on it.
IDLE_SCRAPES_TO_FINISH_DRAIN = 2
# How often the certificate files are looked at: a replaced one is served within about this.
CERTIFICATE_POLL_S = 1.0


class StartupError(RuntimeError):
    """A reason not to start, said plainly."""


class ControlPlane:
    def __init__(self, config: GatewayConfig, config_path: Path | None = None, lua_source: str | None = None,
                 state_directory: Path | None = None):
        self.config = config
        self.config_path = config_path
        self.lua_source = lua_source if lua_source is not None else read_lua_filter()
        self.state_directory = state_directory
        self.store = StateStore(state_directory) if state_directory is not None else None
        # With state.etcd the state lives there, shared with the other control planes (not in the file).
        self.shared: EtcdState | None = None  # made at start
        self.revision = 0  # the shared state's revision this plane serves
        self.plane_id = f"{socket.gethostname()}-{os.getpid()}-{config.listen.xds_port}"
        self.leader = not config.state.etcd  # alone, a control plane leads
        self.registry = Registry.empty()
        self.keys = KeyTable()
        self.tokens = TokenTable()  # named admin tokens (control_plane/operator/tokens.py), kept with the keys
        self.audit = MemoryAudit()  # the admin changes' trail: in the state dir or etcd once started
        self.engine_key: str | None = None  # the engines' own --api-key (auth.engine_api_key_env)
        self.cache = SnapshotCache(XdsMetrics(), frozenset({LOCAL_CLUSTER}))
        self.envoys = 1  # LOCAL_CLUSTER's members as last published: the Envoys connected, at least one
        self.fleet: Fleet | None = None
        self.tracker = LoadTracker()  # what the scrapes said, per endpoint
        self.outcomes = Outcomes()  # what the Envoys saw of each engine's tries
        self.ejections = Ejections()  # engines out for failing their answers (decide/ejection.py)
        self.ledger = Ledger()  # audio-seconds in flight per engine, its speed, and metering
        self.in_flight = InFlight()  # requests in flight per key and per model's batch lane
        self.in_flight_limits: dict[str, int] = {}  # key id or batch lane -> its share of the limit on this plane
        self._limits_for: tuple[int, int] | None = None  # (Envoys here, Envoys in all) they were set for
        self.group_slots: dict[str, GroupSlots] = {}  # each limited group's limit and count, as last published
        self.slots = Slots()  # their free slots, which the Envoys admit (xds/quota_service.py)
        self.discovery = DnsDiscovery(self.on_dns_records)
        self.hosts = HostCache()  # backends' host names, resolved at most every HOST_TTL_S
        self.token: str | None = None
        self.token_path: Path | None = None
        self._server = None
        self._admin: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._publishing = asyncio.Lock()
        self._changing = asyncio.Lock()
        self._idle_scrapes: dict[str, int] = {}
        self.certificates = CertificateFiles(config.listen.tls, config.backend_tls)
        self.engine_tls: ssl.SSLContext | None = None  # the scrapes' TLS to https:// engines
        self._admin_tls: AdminTls | None = None
        self.xds_tls: ServerCredentials | None = None  # internal_tls: the xDS port's mutual TLS
        self.known = Known(frozenset(), frozenset(), frozenset(), frozenset(), config.limits.max_audio_s)
        self.view: PlaneView = OperatorView(self)  # all that operator/ (admin API, /status, /metrics) sees
        self._telemetry = None  # the /metrics collector over `view`, while serving

    async def start(self) -> None:
        """Restores saved state and publishes it before any Envoy can connect: none sees a partial set."""
        await self._restore_saved()
        if (name := self.config.auth.engine_api_key_env) is not None:
            self.engine_key = os.environ.get(name, "").strip() or None
            if self.engine_key is None:
                raise StartupError(f"auth.engine_api_key_env: the environment variable {name} is not set")
        material = self._load_certificates()
        https = any(is_https(e.url) for e in config_entries(self.config)) or \
            any(d.scheme == "https" for d in self.config.discovery)
        if https and not material.checks_engines:
            raise StartupError(NO_ENGINE_CA)
        await self.apply(self.config)
        self._check_admin_exposure()
        if self.state_directory is not None:
            self.token, self.token_path = ensure_token(self.state_directory)
        else:
            self.token = configured_token()
        self._telemetry = watch_fleet(self.view)
        await self._start_servers()
        self._tasks = [asyncio.create_task(self._load_loop()), asyncio.create_task(self._certificate_loop())]
        if self.shared is not None:
            self._tasks += [asyncio.create_task(self.shared.follow(self.revision, self._on_shared_state)),
                            asyncio.create_task(self.shared.presence(self.plane_id, self._on_leading,
                                                                     self.cache.envoy_count))]
        else:
            await self.discovery.restart(self.config.discovery)
        log.info("admin API on %s (token %s)", self.config.admin_url,
                 f"in {self.token_path}" if self.token_path else "from the environment")
        log.info("xDS (ADS) listening on %s:%d (%s)", self.config.listen.xds_address, self.config.listen.xds_port,
                 f"mutual TLS, internal CA in {self.config.internal_tls.dir}" if self.xds_tls else "plaintext, loopback")

    async def _restore_saved(self) -> None:
        """The saved state (etcd's, else the state file's) into the registry and the keys; the audit trail."""
        try:
            if (etcd := self.config.state).etcd:
                password = None
                if etcd.etcd_password_env and not (password := os.environ.get(etcd.etcd_password_env)):
                    raise StartupError(f"state.etcd_password_env: the environment variable {etcd.etcd_password_env} "
                                       "is not set")
                self.shared = EtcdState(etcd.etcd, etcd.prefix, etcd.timeout_s, tls=etcd.etcd_tls, user=etcd.etcd_user,
                                        password=password)
                saved, self.revision = await self.shared.load()
            else:
                saved = self.store.load() if self.store is not None else None
            self._restore(saved)
            self.audit = EtcdAudit(self.shared) if self.shared is not None else \
                FileAudit(self.state_directory) if self.state_directory is not None else MemoryAudit()
        except StateUnavailable as error:
            raise StartupError(f"state.etcd: {error}") from None
        except (ValueError, TypeError, KeyError) as error:
            raise StartupError(f"cannot restore state: {error}") from None

    def _load_certificates(self) -> TlsMaterial:
        """The TLS files read and checked: the engines' client context, the admin API's and the xDS port's."""
        try:
            material = self.certificates.load()
            self.engine_tls = engine_client_context(self.config.backend_tls, material)
            if (admin_files := self.config.admin_tls) is not None:
                self._admin_tls = AdminTls(*admin_files, label="internal_tls" if self.config.internal_tls else "listen.tls")
            if self.config.internal_tls is not None:
                self.xds_tls = ServerCredentials(self.config.internal_tls.dir)
        except (OSError, ValueError) as error:  # CertificateProblem, PkiProblem and ssl.SSLError among them
            raise StartupError(str(error)) from None
        return material

    async def _start_servers(self) -> None:
        """The admin API, and the xDS port (ADS, access logs, RLQS)."""
        listen = self.config.listen
        self._admin = web.AppRunner(build_admin_app(self.view), access_log=None)
        await self._admin.setup()
        await web.TCPSite(self._admin, listen.admin_address, listen.admin_port,
                          ssl_context=self._admin_tls.context if self._admin_tls else None).start()
        self._server = await start_ads_server(self.cache, listen.xds_address, listen.xds_port, [
            lambda server: als_pb2_grpc.add_AccessLogServiceServicer_to_server(
                AccessLogServicer(self.outcomes, self.ledger, self.in_flight, time.monotonic,
                                  self.update_slots, lambda: self.known, telemetry.REPORTS_DROPPED.on("access log"),
                                  authorize), server),
            lambda server: rlqs_pb2_grpc.add_RateLimitQuotaServiceServicer_to_server(
                QuotaServicer(self.slots, split, IN_FLIGHT_BUCKET_ENTRY, telemetry.REPORTS_DROPPED.on("quota report"),
                              authorize), server)], self.xds_tls.credentials if self.xds_tls else None, authorize)

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
        if self.shared is not None:
            await self.shared.step_down()
            await self.shared.close()
        if self._server is not None:
            await self._server.stop(grace)
        if self._admin is not None:
            await self._admin.cleanup()
        forget_fleet(self._telemetry)

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
        async with self._changing:
            try:
                await self.apply(config)
            except InconsistentSnapshot as error:
                log.error("reload refused, keeping the running config: %s", error)
                return False
        if self.leader:
            await self.discovery.restart(config.discovery)
        log.info("config reloaded from %s", self.config_path)
        return True

    async def apply(self, config: GatewayConfig) -> None:
        """Publishes `config` with the registry's runtime changes; on failure nothing changes."""
        previous = copy.deepcopy(self.registry)
        try:
            await self._publish_config(config)
        except Exception:
            self.registry = previous
            raise

    async def _publish_config(self, config: GatewayConfig) -> None:
        """apply() without its rollback: for callers that hold their own copy (change())."""
        self.registry.set_config(config_entries(config))
        fleet = await resolve_fleet(config, self.registry, self.hosts)
        async with self._publishing:
            if self.fleet is not None:  # endpoints that stay keep their load-derived weights, models their
                # lanes and their measured try deadlines
                fleet = fleet.with_routing(self.fleet.weights,
                                           self.fleet.long_uploads if config.routing.long_upload_bytes else frozenset())
                fleet = replace(fleet, hedge_ms={m: ms for m, ms in self.fleet.hedge_ms.items()
                                                 if m in fleet.model_names()})
                if config.auth.batch_above_wait_s is not None:
                    fleet = replace(fleet, batch_closed={m: s for m, s in self.fleet.batch_closed.items()
                                                         if m in fleet.model_names()})
            resources = build_resources(config, fleet, self.lua_source, self._access(config), self.envoys,
                                        self.certificates.current)
            await self.publish(Snapshot.from_resources(resources))
            self.config, self.fleet = config, fleet
            self.known = self._known()
            self._set_in_flight_limits(force=True)

    def _known(self) -> Known:
        """What the Envoys' reports may speak of: the fleet and keys just published (keys revoked or
        rotated out included, so their last requests are still metered)."""
        models = frozenset(self.fleet.model_names())
        return Known(models, frozenset(self.keys.by_id), frozenset(batch_lane(m) for m in models),
                     frozenset(b.endpoint for b in self.fleet.backends), self.config.limits.max_audio_s)

    def _routes(self, fleet: Fleet, envoys: int):
        """The route configuration alone, for changes that reach nothing else (lanes, the Envoys' count)."""
        return build_route_configuration(self.config, fleet, self.lua_source, self._access(self.config), envoys)

    def _access(self, config: GatewayConfig) -> Access:
        grants = self.keys.grants(set(config.auth.plans), config.auth.default_plan)
        return Access(config.auth.api_keys == "required", grants, self.engine_key)

    # -- requests in flight per key and batch lane: logs (observe) -> slots (decide) -> RLQS (publish)

    def _set_in_flight_limits(self, force: bool = False) -> None:
        """Each key's requests_in_flight and each model's batch lane, as this plane's share: after
        every published change (`force`: keys, config, fleet), and when the Envoys' count moved."""
        config, here = self.config, self.cache.envoy_count()
        if not force and (here, self.envoys) == self._limits_for:
            return
        self._limits_for = (here, self.envoys)
        limits: dict[str, int] = {}
        if config.auth.api_keys == "required":
            plans = {n: p.requests_in_flight for n, p in config.auth.plans.items() if p.requests_in_flight}
            grants = self._access(config).grants.values() if plans else ()
            limits = {g.id: plans[g.plan] for g in grants if g.plan in plans}
            if (per_engine := config.auth.batch_in_flight_per_engine) is not None and self.fleet is not None:
                limits |= batch_lane_limits(self.fleet, per_engine)
        before = self.in_flight_limits
        self.in_flight_limits = {group: plane_share(limit, here, self.envoys) for group, limit in limits.items()}
        self.update_slots(set(before) | set(self.in_flight_limits))

    def update_slots(self, groups: set[str] | None = None) -> None:
        """After the logs moved some groups' counts (None: those), or their limits changed: their
        slots, which the Envoys are told when one freed."""
        limits = self.in_flight_limits
        spent: set[str] = set()  # groups with a request that took a token and never reached an engine
        if groups is None:  # from the logs: only limited groups matter (ones that lost a limit come named)
            groups, spent = self.in_flight.take_changed()
            groups &= limits.keys()
        free, regrant = {}, {g for g in spent if g in limits}
        for group in groups:
            after = GroupSlots(limits[group], self.in_flight.count(group)) if group in limits else None
            if needs_new_grants(self.group_slots.get(group), after):
                regrant.add(group)
            if after is None:
                self.group_slots.pop(group, None)
            else:
                self.group_slots[group] = after
            free[group] = None if after is None else after.free
        self.slots.publish(free, regrant)

    # -- the load loop: observe -> decide -> publish, every routing.scrape_interval_s ------------

    async def _load_loop(self) -> None:
        loop = asyncio.get_running_loop()
        async with scraper.session() as client:
            while True:
                started, cpu = loop.time(), time.process_time()
                try:
                    await self.load_step(client)
                except Exception:  # a bug here must not stop routing updates for good
                    log.exception("load step failed")
                took = loop.time() - started
                telemetry.LOAD_ROUND_SECONDS.observe(took)
                await asyncio.sleep(next_round_in(self.config.routing.scrape_interval_s, took,
                                                  time.process_time() - cpu))

    async def load_step(self, client) -> None:
        """One round: scrape and record (observe), finish drains and weigh (decide), push (publish)."""
        fleet, routing = self.fleet, self.config.routing
        if fleet is None:
            return
        pages = await scraper.scrape_all(client, fleet, routing.scrape_timeout_s, telemetry.on_scrape, self.engine_tls)
        now = asyncio.get_running_loop().time()
        scraper.record(self.tracker, fleet, pages, now)
        self.outcomes.retain({b.endpoint for b in fleet.backends})
        self.ledger.retain({b.endpoint for b in fleet.backends})
        max_age_s = self.config.timeouts.route_s + 60  # no try, no request lasts longer
        self.ledger.expire(now, max_age_s)
        idle = {b.endpoint for b in fleet.backends  # an engine that holds nothing has no tries open
                if all(_idle(self.tracker.state(b.id, m, b.weight, now), self.config) for m in b.models)}
        for endpoint in idle:
            self.ledger.settle(endpoint, now)
        moved = self.in_flight.expire(now, max_age_s)
        if self.in_flight.settle(idle, now) or moved:
            self.update_slots()
        try:
            await self.check_drains()
        except Exception as error:  # the weights below come first; the drain is tried again next round
            log.warning("drains not finished this round: %s", error)
        await self._expire_secrets()
        await self._count_envoys()
        self._set_in_flight_limits()  # nothing to do unless the Envoys' count moved
        states = scraper.endpoint_states(self.fleet, self.tracker, self.outcomes, self.ledger, now)
        if (level := self.config.auth.batch_above_wait_s) is not None:
            closed = closed_to_batch(model_waits(self.fleet, states, routing), self.fleet.batch_closed, level)
            if closed != self.fleet.batch_closed:
                await self.set_lanes(closed)
        hedges = deadlines(self.ledger.answered, self.config.resilience.hedge_factor)
        if {m: ms for m, ms in hedges.items() if m in self.fleet.model_names()} != self.fleet.hedge_ms:
            await self.set_hedging(hedges)
        fleet = self.fleet  # a finished drain, a lane or a deadline may have changed it
        if not routing.load_aware:
            return
        weights, long_uploads = decide_routing(fleet, states, routing)
        ejected, returned = self.ejections.step(
            {model: [(s.backend_id, s.failure_ratio) for s in endpoints] for model, endpoints in states.items()}, now)
        for backend in {b for b in fleet.backends if any((b.id, m) in returned for m in b.models)}:
            self.outcomes.forget(backend.endpoint)
        if ejected != fleet.ejected:
            log.warning("engines ejected for failing their answers: %s", sorted(ejected) or "none")
        if weights != fleet.weights or long_uploads != fleet.long_uploads or ejected != fleet.ejected:
            WEIGHT_UPDATES.inc()
            await self.set_weights(weights, long_uploads, ejected)

    def serves_https_engines(self) -> bool:
        """Whether there is a CA to check https:// engines against (else none is taken)."""
        return self.certificates.current is not None and self.certificates.current.checks_engines

    async def _certificate_loop(self) -> None:
        while True:
            await asyncio.sleep(CERTIFICATE_POLL_S)
            try:
                if self.xds_tls is not None:
                    self.xds_tls.poll()
                await self.rotate_certificates()
            except Exception:
                log.exception("certificate check failed; trying again")

    async def rotate_certificates(self) -> None:
        """Replaced certificate files, once good as a whole, go to every Envoy as SDS secrets (no
        listener or cluster changes, so no connection is drained), and to the scrapes; a broken
        replacement changes nothing (CertificateFiles says why). The admin API watches its own
        files (listen.tls's or the internal certificate: AdminTls.poll)."""
        if self._admin_tls is not None:
            self._admin_tls.poll()
        material = self.certificates.poll()
        if material is None:
            return
        try:  # everything that can fail first: the files are served everywhere or nowhere
            if material.checks_engines != self.certificates.current.checks_engines:
                raise CertificateProblem("backend_tls.ca_file: the CA for https:// engines appeared or went away; "
                                         "that takes a restart")
            engine_tls = engine_client_context(self.config.backend_tls, material)
        except (OSError, ValueError) as error:  # CertificateProblem and ssl.SSLError among them
            self.certificates.reject(str(error))
            return
        async with self._publishing:
            self.cache.set_snapshot(self.cache.snapshot.with_type(SECRET, build_secrets(material)))
            self.certificates.accept(material)
        self.engine_tls = engine_tls

    async def _expire_secrets(self) -> None:
        """Rotated-out key secrets stop working at the end of their grace; without waiting for the
        Envoys' ACKs, as the loop must go on."""
        if self.leader and (ends := self.keys.next_expiry()) is not None and ends <= time.time():
            try:
                await self._change(lambda: self.keys.expire(time.time()))
            except Exception:
                log.exception("dropping expired key secrets failed; trying again next round")

    async def _count_envoys(self) -> None:
        """Quotas are split among the Envoys connected: when their number changes, their cluster
        (LOCAL_CLUSTER) and the Lua filter's count are published again."""
        envoys = self.cache.envoy_count()
        if self.shared is not None and self.shared.envoys_total is not None:
            envoys = max(envoys, self.shared.envoys_total)  # the other planes' Envoys share the budgets too
        if (envoys := max(1, envoys)) == self.envoys:
            return
        async with self._changing, self._publishing:  # only what the count is in: a failure is tried next round
            routes = self._routes(self.fleet, envoys)
            self.cache.set_snapshot(self.cache.snapshot.with_type(ENDPOINT, build_load_assignments(self.fleet, envoys))
                                    .with_type(ROUTE, [routes]))
            self.envoys = envoys

    async def set_weights(self, weights: dict[tuple[str, str], int],
                          long_uploads: frozenset[tuple[str, str]] = frozenset(),
                          ejected: frozenset[tuple[str, str]] | None = None) -> None:
        """Publishes new endpoint weights (and long-upload endpoints, ejections); only the endpoints
        are rebuilt and sent."""
        async with self._publishing:
            fleet = self.fleet.with_routing(weights, long_uploads, ejected)
            self.cache.set_snapshot(self.cache.snapshot.with_type(ENDPOINT, build_load_assignments(fleet, self.envoys)))
            self.fleet = fleet

    async def set_lanes(self, closed: dict[str, int]) -> None:
        """Publishes which models refuse batch keys (decide/lanes.py)."""
        if await self._set_route_facts(lambda fleet, models: replace(
                fleet, batch_closed={m: s for m, s in closed.items() if m in models}),
                lambda: self.config.auth.batch_above_wait_s is not None):  # a reload may have turned lanes off
            log.info("batch lanes: refused for %s", sorted(closed) or "no model")

    async def set_hedging(self, deadlines: dict[str, int]) -> None:
        """Publishes each model's try deadline per audio-second (decide/hedging.py)."""
        if await self._set_route_facts(lambda fleet, models: replace(
                fleet, hedge_ms={m: ms for m, ms in deadlines.items() if m in models})):
            log.info("hedging deadlines (ms per audio-second): %s", deadlines)

    async def _set_route_facts(self, change: Callable[[Fleet, set[str]], Fleet],
                               still: Callable[[], bool] = lambda: True) -> bool:
        """Publishes a fact the routes carry to the Lua filter; only the routes are rebuilt and sent.
        Not while a change is being made: the routes carry the keys, which it may yet undo."""
        async with self._changing, self._publishing:
            if not still():
                return False
            fleet = change(self.fleet, set(self.fleet.model_names()))
            self.cache.set_snapshot(self.cache.snapshot.with_type(ROUTE, [self._routes(fleet, self.envoys)]))
            self.fleet = fleet
        return True

    async def publish(self, snapshot: Snapshot) -> None:
        """Serves `snapshot` (the cache checks it once and removes clusters make-before-break)."""
        if await self.cache.publish(snapshot, REMOVAL_ACK_TIMEOUT_S):
            log.info("published snapshot %s", {k.rsplit(".", 1)[-1]: v for k, v in snapshot.versions.items()})

    # -- runtime changes (the admin API, DNS discovery, finished drains) ---------------------

    async def change(self, mutate: Callable[[Registry], None]) -> None:
        """Applies a registry change whole or not at all: saved durably, then published."""
        await self._change(lambda: mutate(self.registry))

    async def change_tokens(self, mutate: Callable[[TokenTable], T]) -> T:
        """The same for the named admin tokens (nothing an Envoy sees): returns what `mutate` returned."""
        return await self._change(lambda: mutate(self.tokens), publish=False)

    async def change_keys(self, mutate: Callable[[KeyTable], T]) -> tuple[T, list[str]]:
        """The same for the API keys: what `mutate` returned, once every responsive Envoy applied the
        change (so a secret handed out works at once) or ADMIN_ACK_TIMEOUT_S passed, and the node
        ids of the Envoys that had not applied it when the wait timed out (a lagging one is not waited
        for, and not named once it is lagging: /status names it)."""
        result = await self._change(lambda: mutate(self.keys))
        version = self.cache.snapshot.versions[ROUTE]
        behind = [] if await self.cache.wait_for_acks(ROUTE, version, ADMIN_ACK_TIMEOUT_S) else \
            self.cache.not_applied(ROUTE, version)  # a lagging Envoy was not waited for: not named
        if behind:
            log.warning("a key change is not yet applied by %s after %.0f s", ", ".join(behind), ADMIN_ACK_TIMEOUT_S)
        return result, behind

    def saved_state(self) -> dict:
        return self.registry.to_json() | {"keys": self.keys.to_state(), "admin_tokens": self.tokens.to_state()}

    async def _change(self, mutate: Callable[[], T], publish: bool = True) -> T:
        """`publish`: the change reaches the Envoys (False: admin tokens, which no Envoy sees)."""
        async with self._changing:
            for attempt in range(CONFLICT_RETRIES):
                before = copy.deepcopy(self.registry), copy.deepcopy(self.keys), copy.deepcopy(self.tokens)
                change_id = uuid.uuid4().hex  # tells a write of ours whose answer was lost
                try:
                    result = mutate()
                    if self.shared is not None:
                        written = await self._save_shared(change_id)
                    elif self.store is not None:
                        await asyncio.to_thread(self.store.save, self.saved_state())
                    if publish:
                        await self._publish_config(self.config)
                    if self.shared is not None:
                        self.revision = written
                    return result
                except Conflict as newer:  # another control plane changed the state first: on top of theirs
                    self.registry, self.keys, self.tokens = before
                    await self._adopt(*newer.args)
                    await asyncio.sleep(random.uniform(0, 0.005 * attempt))
                except Exception:
                    saved = self.saved_state()
                    self.registry, self.keys, self.tokens = before
                    if self.shared is None and self.store is not None and saved != self.saved_state():
                        await asyncio.to_thread(self.store.save, self.saved_state())
                    raise
            raise StateUnavailable("the state kept changing on other control planes; try again")

    async def _save_shared(self, change_id: str) -> int:
        """Writes the changed state to etcd on the revision served; its new revision. A write whose
        answer was lost and that etcd took anyway (its change id is there) counts as done; any
        other Conflict carries the newer state and its revision, for the change to be made on."""
        try:
            return await self.shared.save(self.saved_state() | {"change": change_id}, self.revision)
        except Conflict:
            saved, revision = await self.shared.load()
            if saved is not None and saved.get("change") == change_id:
                return revision
            raise Conflict(saved, revision) from None

    # -- several control planes (state.etcd) --------------------------------------------------

    def _restore(self, saved: dict | None) -> None:
        """The saved state into a fresh registry, key table and admin tokens (the config's backends join on publish)."""
        self.registry = Registry.empty()
        self.keys = KeyTable()
        self.tokens = TokenTable()
        if saved is not None:
            self.registry.restore(saved)
            self.keys = KeyTable.from_state(saved.get("keys", []))
            self.tokens = TokenTable.from_state(saved.get("admin_tokens", []))
            names = {item.name for item in self.config.discovery}
            for entry in [e for e in self.registry.entries() if e.source is Source.DNS and e.dns_name not in names]:
                self.registry.remove(entry.id)  # found under a name the config no longer lists

    async def _adopt(self, saved: dict | None, revision: int) -> bool:
        """Serves the shared state as another control plane left it (called holding `_changing`);
        False when this plane already serves that revision or a newer one."""
        if revision <= self.revision:
            return False
        registry, keys, tokens = self.registry, self.keys, self.tokens
        try:
            self._restore(saved)
            await self._publish_config(self.config)
            self.revision = revision
        except Exception:
            self.registry, self.keys, self.tokens = registry, keys, tokens
            raise
        return True

    async def _on_shared_state(self, saved: dict, revision: int) -> None:
        async with self._changing:
            try:
                if await self._adopt(saved, revision):
                    log.info("state revision %d from another control plane applied", revision)
            except Exception:
                log.exception("state revision %d from another control plane could not be applied; trying again",
                              revision)
                raise

    async def _on_leading(self, leading: bool) -> None:
        """The leader alone runs DNS discovery, finishes drains and expires key secrets: each then
        happens once, written to the shared state for all. A plane that stops leading leaves
        what its discovery found in place for the next leader."""
        self.leader = leading
        if leading:
            await self.discovery.restart(self.config.discovery)
        else:
            await self.discovery.pause()

    async def add_backend(self, entry: Entry) -> Entry:
        served = {m.name for m in self.fleet.models}

        def add(registry: Registry) -> None:
            registry.add(entry)
            registry.api_models += [m for m in entry.models if m not in served and m not in registry.api_models]

        await self.change(add)
        return self.registry.get(entry.id)

    async def drain(self, entry_id: str, timeout_s: float) -> Entry:
        entry = self.registry.get(entry_id)
        if entry.state != DRAINING:
            await self.change(lambda r: r.set_state(entry_id, DRAINING, time.time() + timeout_s))
            log.info("draining %s (%s), at most %.0f s", entry_id, entry.url, timeout_s)
        return self.registry.get(entry_id)

    async def resume(self, entry_id: str) -> Entry:
        if self.registry.get(entry_id).state != ACTIVE:
            await self.change(lambda r: r.set_state(entry_id, ACTIVE))
        return self.registry.get(entry_id)

    async def remove_now(self, entry_id: str) -> None:
        await self.change(lambda r: r.remove(entry_id))
        self._idle_scrapes.pop(entry_id, None)
        log.info("removed %s", entry_id)

    async def on_dns_records(self, item, addresses: list[str]) -> None:
        """DNS discovery reports a name's records; they become registry changes here."""
        if plan_dns(self.registry, item, addresses, self.config.drain_timeout_s) is None:
            return
        log.info("DNS %s now has %s", item.name, addresses or "no records")

        def replan(registry: Registry) -> None:  # planned again on the state it is made on (state.etcd)
            if (change := plan_dns(registry, item, addresses, self.config.drain_timeout_s)) is not None:
                change(registry)
        await self.change(replan)

    async def check_drains(self) -> None:
        """Finishes drains: when the engine is idle for every Envoy, or when its time is up (the
        leader only, so each finishes once)."""
        if not self.leader:
            return
        for entry_id in [e.id for e in self.registry.entries() if e.state == DRAINING]:
            entry = self.registry.get(entry_id)  # re-read: an earlier finish awaited, things move
            if entry is None or entry.state != DRAINING:
                self._idle_scrapes.pop(entry_id, None)
                continue
            if entry.drain_deadline is not None and time.time() >= entry.drain_deadline:
                log.warning("drain of %s timed out with requests possibly in flight", entry.id)
                await self._finish_drain(entry)
                continue
            now = asyncio.get_running_loop().time()
            # Applied by every Envoy (ACKed, not just sent) in the content that drains it.
            applied = self.cache.applied_everywhere(ENDPOINT, {cluster_name(m) for m in entry.models})
            idle = applied and all(_idle(self.tracker.state(entry.id, m, 1, now), self.config) for m in entry.models)
            self._idle_scrapes[entry.id] = self._idle_scrapes.get(entry.id, 0) + 1 if idle else 0
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
        await self.change(finish)
        log.info("drain of %s (%s) finished", entry.id, entry.url)


class OperatorView:
    """operator/view.py's PlaneView over a ControlPlane: the questions the operator's side asks of
    it and the changes it makes, each answered from the plane's parts; nothing else of the plane."""

    def __init__(self, plane: ControlPlane):
        self._plane = plane

    # -- what it was told and serves

    config = property(lambda self: self._plane.config)
    fleet = property(lambda self: self._plane.fleet)

    def backends(self) -> list[Entry]:
        return self._plane.registry.entries()

    def backend(self, backend_id: str) -> Entry | None:
        return self._plane.registry.get(backend_id)

    def backend_at(self, url: str) -> Entry | None:
        return self._plane.registry.find_url(url)

    def api_keys(self) -> list:
        return list(self._plane.keys.by_id.values())

    def api_key(self, key_id: str):
        return self._plane.keys.get(key_id)

    # -- who may call the admin API, and where its changes are written down

    bootstrap_token = property(lambda self: self._plane.token)
    audit = property(lambda self: self._plane.audit)

    def admin_tokens(self) -> Mapping:
        return MappingProxyType(self._plane.tokens.by_id)

    def admin_token_for(self, secret: str):
        return self._plane.tokens.find(secret)

    # -- the engines

    engine_key = property(lambda self: self._plane.engine_key)
    engine_tls = property(lambda self: self._plane.engine_tls)

    def serves_https_engines(self) -> bool:
        return self._plane.serves_https_engines()

    # -- what it observed

    def scrape(self, backend_id: str, model: str):
        return self._plane.tracker.tracks.get((backend_id, model))

    def endpoint_state(self, backend_id: str, model: str, base_weight: int, now: float):
        return self._plane.tracker.state(backend_id, model, base_weight, now)

    def endpoint_states(self, now: float) -> dict:
        plane = self._plane
        return scraper.endpoint_states(plane.fleet, plane.tracker, plane.outcomes, plane.ledger, now)

    def ejected_until(self, backend_id: str, model: str) -> float | None:
        return self._plane.ejections.until.get((backend_id, model))

    def failure_ratio(self, endpoint: str, now: float) -> float:
        return self._plane.outcomes.failure_ratio(endpoint, now)

    def audio_in_flight(self, endpoint: str) -> float:
        return self._plane.ledger.in_flight(endpoint)

    def audio_rate(self, endpoint: str, now: float) -> float | None:
        return self._plane.ledger.rate(endpoint, now)

    def metered(self, model: str):
        return self._plane.ledger.metered.get(model)

    def metered_by_key(self) -> Mapping:
        return MappingProxyType(self._plane.ledger.metered_by_key)

    def usage_of(self, key_id: str) -> dict[str, dict]:
        return self._plane.ledger.usage_of(key_id)

    def requests_in_flight(self, group: str) -> int:
        return self._plane.in_flight.count(group)

    def requests_in_flight_by_group(self) -> dict[str, int]:
        return self._plane.in_flight.counts()

    def in_flight_limits(self) -> Mapping[str, int]:
        return MappingProxyType(self._plane.in_flight_limits)

    def no_slot_free(self, group: str) -> bool:
        return self._plane.slots.free.get(group) == 0

    # -- what it serves the Envoys, and how

    def envoys(self) -> list:
        return list(self._plane.cache.envoys.values())

    def served_versions(self) -> Mapping[str, str]:
        snapshot = self._plane.cache.snapshot
        return MappingProxyType(snapshot.versions) if snapshot else MappingProxyType({})

    def nacks_total(self) -> int:
        return self._plane.cache.nacks_total

    def certificate_status(self) -> dict:
        return self._plane.certificates.status()

    def internal_tls_status(self) -> dict | None:
        tls = self._plane.xds_tls
        return None if tls is None else {"dir": str(tls.folder), "problem": tls.problem}

    def state_status(self) -> dict:
        plane = self._plane
        return {"store": "etcd" if plane.shared is not None else "file", "revision": plane.revision,
                "leader": plane.leader, "plane": plane.plane_id}

    # -- the changes the admin API makes

    async def add_backend(self, entry: Entry) -> Entry:
        return await self._plane.add_backend(entry)

    async def drain(self, entry_id: str, timeout_s: float) -> Entry:
        return await self._plane.drain(entry_id, timeout_s)

    async def resume(self, entry_id: str) -> Entry:
        return await self._plane.resume(entry_id)

    async def remove_now(self, entry_id: str) -> None:
        await self._plane.remove_now(entry_id)

    async def change_keys(self, mutate: Callable[[KeyTable], T]) -> tuple[T, list[str]]:
        return await self._plane.change_keys(mutate)

    async def change_tokens(self, mutate: Callable[[TokenTable], T]) -> T:
        return await self._plane.change_tokens(mutate)


def next_round_in(interval: float, took: float, cpu: float) -> float:
    """The pause before the next round: the interval's rest, but never less than the CPU the round
    used, so a fleet too large for the interval is scraped every round + its CPU time, at half a
    core at most (bench/scale.py: 1000 engines take 0.25 s of one core), rather than back to
    back. A slow engine (a scrape waiting out its timeout) costs no CPU and changes nothing."""
    return max(interval - took, min(took, cpu))


def _idle(state, config: GatewayConfig) -> bool:
    return is_fresh(state, config.routing) and state.load.running == 0 and state.load.waiting == 0


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
