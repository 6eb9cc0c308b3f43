"""The load loop: every routing.scrape_interval_s, one way: observe -> decide -> publish.

`load_step` is the round, step by step: observe (scrape every engine, record its load, keep
what the Envoys reported of the fleet's engines only, settle what finished), finish drains,
expire key secrets, count the Envoys, decide (lanes, hedging deadlines, weights and ejections)
and publish each decision that changed something. Each round is a trace, `load round`
(control_plane/traces.py): its scrapes, failed scrapes and seconds, and what it published.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from control_plane.builders.routes import longform_parallel
from control_plane.config.routing import RoutingConfig
from control_plane.decide.ejection import Ejections
from control_plane.decide.hedging import deadlines, to_publish
from control_plane.decide.lanes import closed_to_batch, model_waits
from control_plane.decide.longform import clips_waiting, levels, pieces_at_once, seen_busy
from control_plane.decide.policy import decide_routing
from control_plane.fleet.resolved import Fleet
from control_plane.observe import scraper
from control_plane.observe.ledger import Ledger
from control_plane.observe.load_tracker import EndpointState, LoadTracker
from control_plane.observe.outcomes import Outcomes
from control_plane.plane.drains import Drains, idle
from control_plane.plane.in_flight import InFlightLimits
from control_plane.plane.publisher import Publisher
from control_plane.plane.state_keeper import StateKeeper
from control_plane.traces import PlaneTracer, annotate, failed

log = logging.getLogger(__name__)

Weights = tuple[dict[tuple[str, str], int], frozenset[tuple[str, str]], frozenset[tuple[str, str]]]


def next_round_in(interval: float, took: float, cpu: float) -> float:
    """The pause before the next round: the interval's rest, but never less than the CPU the round
    used, so a fleet too large for the interval is scraped every round + its CPU time, at half a
    core at most (bench/scale.py: 1000 engines take 0.25 s of one core), rather than back to
    back. A slow engine (a scrape waiting out its timeout) costs no CPU and changes nothing."""
    return max(interval - took, min(took, cpu))


class LoadLoop:
    def __init__(self, publisher: Publisher, state: StateKeeper, drains: Drains, limits: InFlightLimits,
                 tracker: LoadTracker, outcomes: Outcomes, ledger: Ledger, ejections: Ejections,
                 engine_tls: Callable[[], ssl.SSLContext | None], on_scrape: Callable, on_round: Callable[[float], None],
                 on_new_weights: Callable[[], None], tracer: PlaneTracer | None = None):
        """Observed here: `tracker` (scrapes), `outcomes` and `ledger` (the Envoys' logs, which also
        feed them on their own); `engine_tls`: the TLS the scrapes use now; `on_scrape` (each
        scrape's time and failure), `on_round` (each round's seconds) and `on_new_weights`: telemetry;
        `tracer`: the plane's (none: no spans)."""
        self.publisher, self.state, self.drains, self.limits = publisher, state, drains, limits
        self.tracker, self.outcomes, self.ledger, self.ejections = tracker, outcomes, ledger, ejections
        self.engine_tls = engine_tls
        self.on_scrape, self.on_round, self.on_new_weights = on_scrape, on_round, on_new_weights
        self.hedges_published_at: float | None = None
        self.longform_seen: dict[str, float] = {}  # model -> when its engines last held a client's request
        self.longform_levels: dict[str, float] = {}  # model -> pieces per engine the clips' waits leave
        self.tracer = tracer or PlaneTracer()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with scraper.session() as client:
            while True:
                started, cpu = loop.time(), time.process_time()
                with self.tracer.span("load round", {"whisper.load_round.scrapes": 0}, root=True) as span:
                    try:
                        await self.load_step(client)
                    except Exception as error:  # a bug here must not stop routing updates for good
                        log.exception("load step failed")
                        failed(error)
                    took = loop.time() - started
                    span.set_attribute("whisper.load_round.duration_s", took)
                self.on_round(took)
                await asyncio.sleep(next_round_in(self.publisher.config.routing.scrape_interval_s, took,
                                                  time.process_time() - cpu))

    async def load_step(self, client) -> None:
        """One round: observe, finish drains, expire secrets, count the Envoys, decide, publish."""
        fleet, routing = self.publisher.fleet, self.publisher.config.routing
        if fleet is None:
            return
        now = await self.observe(client, fleet, routing)
        await self.finish_drains()
        await self.state.expire_secrets()
        await self.count_envoys()
        states = scraper.endpoint_states(self.publisher.fleet, self.tracker, self.outcomes, self.ledger, now)
        if (closed := self.decide_lanes(states, routing)) is not None:
            await self.publisher.set_lanes(closed)
        if (parallel := self.decide_longform(states, now)) is not None:
            await self.publisher.set_longform(parallel)
        if (hedges := self.decide_hedging(now)) is not None:
            self.hedges_published_at = now
            await self.publisher.set_hedging(hedges)
        if not routing.load_aware:
            return
        # a finished drain, a lane or a deadline may have changed the fleet
        if (weights := self.decide_weights(self.publisher.fleet, states, routing, now)) is not None:
            self.on_new_weights()
            await self.publisher.set_weights(*weights)

    # -- observe ----------------------------------------------------------------------------------

    async def observe(self, client, fleet: Fleet, routing: RoutingConfig) -> float:
        """Scrapes every engine and records its load; what the Envoys reported is kept for the fleet's
        engines only and expires; an idle engine's tries and requests are settled. The time it read."""
        pages = await scraper.scrape_all(client, fleet, routing.scrape_timeout_s, self.on_scrape, self.engine_tls())
        annotate({"whisper.load_round.scrapes": len(pages),
                  "whisper.load_round.scrape_failures": sum(isinstance(p, scraper.ScrapeFailure) for p in pages)})
        now = asyncio.get_running_loop().time()
        scraper.record(self.tracker, fleet, pages, now)
        self.outcomes.retain({b.endpoint for b in fleet.backends})
        self.ledger.retain({b.endpoint for b in fleet.backends})
        max_age_s = self.publisher.config.timeouts.route_s + 60  # no try, no request lasts longer
        self.ledger.expire(now, max_age_s, self.publisher.config.longform.timeout_s + 60)
        idle_now = {b.endpoint for b in fleet.backends  # an engine that holds nothing has no tries open
                    if all(idle(self.tracker.state(b.id, m, b.weight, now), self.publisher.config) for m in b.models)}
        for endpoint in idle_now:
            self.ledger.settle(endpoint, now)
        self.limits.settle(idle_now, now, max_age_s)
        return now

    # -- what the registry and the Envoys' count make of the round --------------------------------

    async def finish_drains(self) -> None:
        try:
            await self.drains.check_drains()
        except Exception as error:  # the weights come first; the drain is tried again next round
            log.warning("drains not finished this round: %s", error)

    async def count_envoys(self) -> None:
        await self.publisher.count_envoys(self.state.envoys_total())
        self.limits.set_limits()  # nothing to do unless the Envoys' count moved

    # -- decide: each answer is None when nothing is to be published ------------------------------

    def decide_lanes(self, states: dict[str, list[EndpointState]], routing: RoutingConfig) -> dict[str, int] | None:
        """Which models refuse batch keys now (decide/lanes.py), when that changed."""
        if (level := self.publisher.config.auth.batch_above_wait_s) is None:
            return None
        fleet = self.publisher.fleet
        closed = closed_to_batch(model_waits(fleet, states, routing), fleet.batch_closed, level)
        return closed if closed != fleet.batch_closed else None

    def decide_longform(self, states: dict[str, list[EndpointState]], now: float) -> dict[str, int] | None:
        """How many of one recording's pieces may be at each model's engines (decide/longform.py),
        when that changed."""
        config, fleet = self.publisher.config, self.publisher.fleet
        if not config.longform.enabled:
            return None
        engines = {model: len(fleet.backends_for(model)) for model in fleet.model_names()}
        clients = {model: sum(self.ledger.clients_in_flight(b.endpoint) for b in fleet.backends_for(model))
                   for model in fleet.model_names()}
        queued = {model: sum(s.load.waiting for s in states.get(model, ()) if s.load is not None) for model in engines}
        self.longform_seen = seen_busy(self.longform_seen, clients, queued, now)
        self.longform_levels = levels(config.longform, self.longform_levels, set(engines), clips_waiting(clients, queued))
        parallel = pieces_at_once(config.longform, engines, set(self.longform_seen), self.ledger.recordings_at(),
                                  self.longform_levels)
        return parallel if parallel != longform_parallel(config, fleet) else None

    def decide_hedging(self, now: float) -> dict[str, int] | None:
        """Each model's try deadline per audio-second (decide/hedging.py), when it should move."""
        fleet = self.publisher.fleet
        measured = {m: ms for m, ms in deadlines(self.ledger.answered, self.publisher.config.resilience.hedge_factor)
                    .items() if m in fleet.model_names()}
        return to_publish(fleet.hedge_ms, measured, now, self.hedges_published_at)

    def decide_weights(self, fleet: Fleet, states: dict[str, list[EndpointState]], routing: RoutingConfig,
                       now: float) -> Weights | None:
        """The endpoints' weights and long-upload endpoints (decide/policy.py) and the engines out
        for failing their answers (decide/ejection.py), when any of them changed. An engine back
        from ejection starts with no failures; one out takes no long uploads."""
        ejected, returned = self.ejections.step(
            {model: [(s.backend_id, s.failure_ratio) for s in endpoints] for model, endpoints in states.items()}, now)
        weights, long_uploads = decide_routing(fleet, states, routing, ejected)
        for backend in {b for b in fleet.backends if any((b.id, m) in returned for m in b.models)}:
            self.outcomes.forget(backend.endpoint)
        if ejected != fleet.ejected:
            log.warning("engines ejected for failing their answers: %s", sorted(ejected) or "none")
        if weights != fleet.weights or long_uploads != fleet.long_uploads or ejected != fleet.ejected:
            return weights, long_uploads, ejected
        return None
