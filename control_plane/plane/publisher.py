"""What the Envoys are served: the xDS cache and everything the plane puts into it.

The config and the fleet last published, and the facts each round's decisions change in them:
endpoint weights, long-upload endpoints and ejections (EDS), which models refuse batch keys and
their hedging deadlines (the route facts, RDS), the certificates (SDS), and the Envoys' count
(the Lua filter's, in the routes). One lock (`publishing`) orders every write
into the cache; route facts and the Envoys' count also wait for a runtime change to finish (the
state keeper's `changing` lock), as the routes carry the keys it may yet undo.

It reads the API keys through `keys` (the state keeper's, whichever table is current) and is told
the registry to publish; it knows nothing else of the plane. Each write into the cache is a
`publish` span (control_plane/traces.py) under whatever the plane was doing (an admin change, a
load round), naming the types it changed and their versions: the Envoys' ACKs join it there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from control_plane.builders import build_load_assignments, build_resources
from control_plane.builders.routes import build_route_configuration
from control_plane.builders.secrets import build_secrets
from control_plane.certificates import CertificateFiles, TlsMaterial
from control_plane.config import GatewayConfig
from control_plane.fleet.registry import Registry
from control_plane.fleet.resolve import HostCache, resolve_fleet
from control_plane.fleet.resolved import Fleet
from control_plane.names import batch_lane
from control_plane.observe.access_logs import Known
from control_plane.tenants.keys import Access, Budget, KeyTable
from control_plane.traces import PlaneTracer, published_versions
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import ENDPOINT, ROUTE, SECRET

log = logging.getLogger(__name__)

# How long a removal waits for every Envoy to stop routing to a cluster before deleting it.
REMOVAL_ACK_TIMEOUT_S = 5.0


class Publisher:
    def __init__(self, config: GatewayConfig, lua_source: str, cache: SnapshotCache, certificates: CertificateFiles,
                 keys: Callable[[], KeyTable], changing: asyncio.Lock, published: Callable[[], None],
                 tracer: PlaneTracer | None = None):
        """`keys`: the API keys now; `changing`: held while a runtime change is made; `published`:
        called after each whole publish (config, registry or keys), holding the publish lock;
        `tracer`: the plane's (none: no spans)."""
        self.config = config  # the config last published (the one started with, before the first)
        self.lua_source = lua_source
        self.cache = cache
        self.certificates = certificates  # read and watched by plane/tls.py; served here as SDS secrets
        self.fleet: Fleet | None = None  # the fleet last published
        self.envoys = 1  # the Lua filter's count as last published (CONTEXT.envoys): the Envoys connected, at least one
        self.budgets: dict[str, Budget] = {}  # key id -> its budget's state (plane/budgets.py), in its grant
        self.engine_key: str | None = None  # the engines' own --api-key (auth.engine_api_key_env), set at start
        self.known = Known(frozenset(), frozenset(), frozenset(), frozenset(), config.limits.max_audio_s)
        self.hosts = HostCache()  # backends' host names, resolved at most every HOST_TTL_S
        self._key_plans: dict | None = None  # key id -> its PlanConfig, as last published
        self._keys = keys
        self._changing = changing
        self._published = published
        self._publishing = asyncio.Lock()
        self.tracer = tracer or PlaneTracer()

    # -- a whole publish: config, registry and keys -----------------------------------------------

    async def publish_config(self, config: GatewayConfig, registry: Registry) -> None:
        """Resolves the registry's fleet and serves everything built from `config`; raises (and
        changes nothing here) when the cache refuses it."""
        fleet = await resolve_fleet(config, registry, self.hosts)
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
            resources = build_resources(config, fleet, self.lua_source, self.access(config), self.envoys,
                                        self.certificates.current)
            await self.publish(Snapshot.from_resources(resources), "config")
            self.config, self.fleet = config, fleet
            self.known = self._known()
            self._key_plans = self._plans_of(config)
            self._published()

    async def publish(self, snapshot: Snapshot, what: str) -> None:
        """Serves `snapshot` (the cache checks it once and removes clusters make-before-break)."""
        with self._span(snapshot, what):
            if await self.cache.publish(snapshot, REMOVAL_ACK_TIMEOUT_S):
                log.info("published snapshot %s", {k.rsplit(".", 1)[-1]: v for k, v in snapshot.versions.items()})

    def _serve(self, snapshot: Snapshot, what: str) -> None:
        """Serves a snapshot that changes only what a round decided or the certificates (no removal)."""
        with self._span(snapshot, what):
            self.cache.set_snapshot(snapshot)

    def _span(self, snapshot: Snapshot, what: str):
        """The publish span: `what` was published, and the versions of the types it changed."""
        before = self.cache.snapshot.versions if self.cache.snapshot is not None else {}
        return self.tracer.span("publish", {"whisper.publish": what} | published_versions(before, snapshot.versions))

    def access(self, config: GatewayConfig) -> Access:
        """Who may call, as the routes carry it: the keys' grants under `config`'s plans."""
        grants = self._keys().grants(set(config.auth.plans), config.auth.default_plan)
        if self.budgets:
            grants = {digest: replace(grant, budget=self.budgets[grant.id]) if grant.id in self.budgets else grant
                      for digest, grant in grants.items()}
        return Access(config.auth.api_keys == "required", grants, self.engine_key)

    def key_plans(self) -> dict:
        """Each key with a plan under the config last published: key id -> its PlanConfig. Kept
        from the last whole publish (every key change and reload is one), so a budget round reads
        it without rebuilding any grant; before the first, taken from the keys as they are."""
        if self._key_plans is None:
            return self._plans_of(self.config)
        return self._key_plans

    def _plans_of(self, config: GatewayConfig) -> dict:
        plans = config.auth.plans
        return {key: plans[name] for key, name in self._keys().plans(set(plans), config.auth.default_plan).items()}

    def _known(self) -> Known:
        """What the Envoys' reports may speak of: the fleet and keys just published (keys revoked or
        rotated out included, so their last requests are still metered), the longform workers."""
        models = frozenset(self.fleet.model_names())
        return Known(models, frozenset(self._keys().by_id), frozenset(batch_lane(m) for m in models),
                     frozenset(b.endpoint for b in self.fleet.backends) | self.config.longform.worker_endpoints,
                     self.config.limits.max_audio_s)

    def _routes(self, fleet: Fleet, envoys: int):
        """The route configuration alone, for changes that reach nothing else (lanes, the Envoys' count)."""
        return build_route_configuration(self.config, fleet, self.lua_source, self.access(self.config), envoys)

    # -- what each round decides ------------------------------------------------------------------

    async def set_weights(self, weights: dict[tuple[str, str], int],
                          long_uploads: frozenset[tuple[str, str]] = frozenset(),
                          ejected: frozenset[tuple[str, str]] | None = None) -> None:
        """Publishes new endpoint weights (and long-upload endpoints, ejections); only the endpoints
        are rebuilt and sent."""
        async with self._publishing:
            fleet = self.fleet.with_routing(weights, long_uploads, ejected)
            self._serve(self.cache.snapshot.with_type(ENDPOINT, build_load_assignments(fleet)), "weights")
            self.fleet = fleet

    async def set_lanes(self, closed: dict[str, int]) -> None:
        """Publishes which models refuse batch keys (decide/lanes.py)."""
        if await self._set_route_facts("lanes", lambda fleet, models: replace(
                fleet, batch_closed={m: s for m, s in closed.items() if m in models}),
                lambda: self.config.auth.batch_above_wait_s is not None):  # a reload may have turned lanes off
            log.info("batch lanes: refused for %s", sorted(closed) or "no model")

    async def set_hedging(self, deadlines: dict[str, int]) -> None:
        """Publishes each model's try deadline per audio-second (decide/hedging.py)."""
        if await self._set_route_facts("hedging", lambda fleet, models: replace(
                fleet, hedge_ms={m: ms for m, ms in deadlines.items() if m in models})):
            log.info("hedging deadlines (ms per audio-second): %s", deadlines)

    async def set_budgets(self, budgets: dict[str, Budget]) -> None:
        """Publishes the keys' budgets: what each Envoy charges them, and which are refused
        (decide/budgets.py); only the routes are rebuilt and sent (before the first publish, kept
        for it)."""
        async with self._changing, self._publishing:
            self.budgets = budgets
            if self.fleet is not None:
                self._serve(self.cache.snapshot.with_type(ROUTE, [self._routes(self.fleet, self.envoys)]), "budgets")

    async def set_longform(self, parallel: dict[str, int]) -> None:
        """Publishes how many of one recording's pieces may be at each model's engines (decide/longform.py)."""
        await self._set_route_facts("longform", lambda fleet, models: replace(
            fleet, longform_parallel={m: n for m, n in parallel.items() if m in models}),
            lambda: self.config.longform.enabled)

    async def _set_route_facts(self, what: str, change: Callable[[Fleet, set[str]], Fleet],
                               still: Callable[[], bool] = lambda: True) -> bool:
        """Publishes a fact the routes carry to the Lua filter; only the routes are rebuilt and sent.
        Not while a change is being made: the routes carry the keys, which it may yet undo."""
        async with self._changing, self._publishing:
            if not still():
                return False
            fleet = change(self.fleet, set(self.fleet.model_names()))
            self._serve(self.cache.snapshot.with_type(ROUTE, [self._routes(fleet, self.envoys)]), what)
            self.fleet = fleet
        return True

    async def count_envoys(self, all_planes: int | None) -> None:
        """The Lua filter charges a key by the Envoys connected until its budget has a charge of its
        own (envoy/plans.lua): when their number changes, the routes carrying the count are
        published again. `all_planes`: the Envoys of every plane (state.etcd), which share the
        budgets too; None when not known."""
        envoys = self.cache.envoy_count()
        if all_planes is not None:
            envoys = max(envoys, all_planes)
        if (envoys := max(1, envoys)) == self.envoys:
            return
        async with self._changing, self._publishing:  # only what the count is in: a failure is tried next round
            self._serve(self.cache.snapshot.with_type(ROUTE, [self._routes(self.fleet, envoys)]), "envoys")
            self.envoys = envoys

    def envoys_here(self) -> int:
        """The Envoys connected to this plane now."""
        return self.cache.envoy_count()

    # -- certificates, and what the Envoys applied ------------------------------------------------

    async def publish_secrets(self, material: TlsMaterial) -> None:
        """Replaced certificate files as SDS secrets (no listener or cluster changes, so no
        connection is drained); from then on they are the ones every publish builds with."""
        async with self._publishing:
            self._serve(self.cache.snapshot.with_type(SECRET, build_secrets(material)), "certificates")
            self.certificates.accept(material)

    def applied_everywhere(self, clusters: set[str]) -> bool:
        """Whether every Envoy applied (ACKed, not just was sent) these clusters' endpoints as served."""
        return self.cache.applied_everywhere(ENDPOINT, clusters)

    async def routes_not_applied(self, timeout_s: float) -> list[str]:
        """The Envoys that have not applied the routes served now when every responsive one has, or
        `timeout_s` passed (a lagging Envoy is not waited for, and not named: /status names it)."""
        version = self.cache.snapshot.versions[ROUTE]
        return [] if await self.cache.wait_for_acks(ROUTE, version, timeout_s) else \
            self.cache.not_applied(ROUTE, version)
