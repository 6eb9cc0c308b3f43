"""The load loop: scrape every engine's /metrics, turn loads into weights, push what changed.

One aiohttp session for all scrapes, a bounded number at once, each with a timeout shorter
than the interval, so one hung engine delays nothing. Weight changes go out as endpoint-only
snapshots, at most once per interval (pushes are coalesced by construction).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

import aiohttp

from control_plane.config import RoutingConfig
from control_plane.fleet import Backend, Fleet
from control_plane.load_tracker import LoadTracker
from control_plane.metrics_parser import load_for_model, parse_loads
from control_plane.outcomes import Outcomes
from control_plane.policy import compute_weights, long_upload_endpoints
from control_plane.telemetry import SCRAPE_FAILURES, SCRAPE_SECONDS, WEIGHT_UPDATES

log = logging.getLogger(__name__)

MAX_CONCURRENT_SCRAPES = 64
MAX_PAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ScrapeFailure:
    reason: str


async def scrape(session: aiohttp.ClientSession, backend: Backend, timeout: float) -> str | ScrapeFailure:
    with SCRAPE_SECONDS.time():
        result = await _fetch(session, backend, timeout)
    if isinstance(result, ScrapeFailure):
        SCRAPE_FAILURES.labels(backend.id).inc()
    return result


async def _fetch(session: aiohttp.ClientSession, backend: Backend, timeout: float) -> str | ScrapeFailure:
    try:
        async with session.get(f"{backend.url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return ScrapeFailure(f"HTTP {response.status}")
            body = await response.content.read(MAX_PAGE_BYTES)
            return body.decode("utf-8", errors="replace")
    except TimeoutError:
        return ScrapeFailure("timeout")
    except aiohttp.ClientError as error:
        return ScrapeFailure(type(error).__name__)


def routing_for(fleet: Fleet, tracker: LoadTracker, outcomes: Outcomes, settings: RoutingConfig,
                now: float) -> tuple[dict[tuple[str, str], int], frozenset[tuple[str, str]]]:
    """Every endpoint's new weight, and the endpoints for long uploads, cluster by cluster."""
    weights, long_uploads = {}, set()
    for model in fleet.model_names():
        backends = fleet.backends_for(model)
        states = [replace(tracker.state(b.id, model, b.weight, now),
                          failure_ratio=outcomes.failure_ratio(f"{b.address}:{b.port}", now)) for b in backends]
        previous = {b.id: fleet.weights[(b.id, model)] for b in backends if (b.id, model) in fleet.weights}
        for backend_id, weight in compute_weights(states, previous, settings).items():
            weights[(backend_id, model)] = weight
        if settings.long_upload_bytes:
            serving = [s for s, b in zip(states, backends) if not b.draining]
            long_uploads |= {(backend_id, model) for backend_id in long_upload_endpoints(serving, settings)}
    return weights, frozenset(long_uploads)


class Balancer:
    def __init__(self, plane, routing: RoutingConfig):
        self.plane = plane
        self.tracker = LoadTracker()
        self.outcomes = Outcomes()
        self.configure(routing)

    def configure(self, routing: RoutingConfig) -> None:
        self.routing = routing

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=MAX_CONCURRENT_SCRAPES)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                started = loop.time()
                try:
                    await self.step(session)
                except Exception:  # a bug here must not stop routing updates for good
                    log.exception("load step failed")
                await asyncio.sleep(max(0.0, self.routing.scrape_interval_s - (loop.time() - started)))

    async def step(self, session: aiohttp.ClientSession) -> None:
        fleet = self.plane.fleet
        if fleet is None:
            return
        timeout = self.routing.scrape_timeout_s
        pages = await asyncio.gather(*(scrape(session, b, timeout) for b in fleet.backends))
        now = asyncio.get_running_loop().time()
        self.record(fleet, pages, now)
        await self.plane.check_drains()
        if not self.routing.load_aware:
            return
        fleet = self.plane.fleet  # a finished drain may have changed it
        weights, long_uploads = routing_for(fleet, self.tracker, self.outcomes, self.routing, now)
        if weights != fleet.weights or long_uploads != fleet.long_uploads:
            WEIGHT_UPDATES.inc()
            await self.plane.set_weights(weights, long_uploads)

    def record(self, fleet: Fleet, pages: list, now: float) -> None:
        for backend, page in zip(fleet.backends, pages):
            if isinstance(page, ScrapeFailure):
                for model in backend.models:
                    self.tracker.record_failure(backend.id, model, page.reason, now)
                continue
            loads = parse_loads(page)
            for model in backend.models:
                load = load_for_model(loads, model)
                if load is None:
                    self.tracker.record_failure(backend.id, model, f"no vLLM metrics for {model}", now)
                else:
                    self.tracker.record_load(backend.id, model, load, now)
        self.tracker.retain(fleet.endpoint_keys())
        self.outcomes.retain({f"{b.address}:{b.port}" for b in fleet.backends})
