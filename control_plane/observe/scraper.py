"""Observe: fetch every engine's /metrics and record what each page says.

One aiohttp session for all scrapes, a bounded number at once, each with a timeout shorter
than the interval, so one hung engine delays nothing. What is observed goes into the load
tracker; nothing here decides or publishes (control_plane/plane/load_loop.py runs the loop).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, replace
from typing import Callable

import aiohttp

from control_plane.fleet.resolved import Backend, Fleet
from control_plane.observe.ledger import Ledger
from control_plane.observe.load_tracker import EndpointState, LoadTracker
from control_plane.observe.metrics_parser import load_for_model, parse_loads
from control_plane.observe.outcomes import Outcomes

MAX_CONCURRENT_SCRAPES = 64
MAX_PAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ScrapeFailure:
    reason: str


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_CONCURRENT_SCRAPES))


# Told of each scrape: the backend, how long it took, and whether it failed (telemetry listens).
OnScrape = Callable[[Backend, float, bool], None]


async def scrape_all(client: aiohttp.ClientSession, fleet: Fleet, timeout: float,
                     on_scrape: OnScrape | None = None, tls: ssl.SSLContext | None = None) -> list[str | ScrapeFailure]:
    """Every backend's page (or why there is none), in fleet order; `tls` checks https:// engines."""
    return await asyncio.gather(*(scrape(client, b, timeout, on_scrape, tls) for b in fleet.backends))


async def scrape(client: aiohttp.ClientSession, backend: Backend, timeout: float,
                 on_scrape: OnScrape | None = None, tls: ssl.SSLContext | None = None) -> str | ScrapeFailure:
    started = time.perf_counter()
    result = await _fetch(client, backend, timeout, tls)
    if on_scrape is not None:
        on_scrape(backend, time.perf_counter() - started, isinstance(result, ScrapeFailure))
    return result


async def _fetch(client: aiohttp.ClientSession, backend: Backend, timeout: float,
                 tls: ssl.SSLContext | None) -> str | ScrapeFailure:
    try:
        # An https:// engine's certificate is checked for the name Envoy sends as SNI (a DNS-discovered
        # engine's URL holds its address, not that name).
        async with client.get(f"{backend.url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout), ssl=tls or True,
                              server_hostname=backend.host if backend.tls else None) as response:
            if response.status != 200:
                return ScrapeFailure(f"HTTP {response.status}")
            body = await response.content.read(MAX_PAGE_BYTES)
            return body.decode("utf-8", errors="replace")
    except TimeoutError:
        return ScrapeFailure("timeout")
    except aiohttp.ClientError as error:
        return ScrapeFailure(tls_problem(error) or type(error).__name__)


def tls_problem(error: BaseException) -> str | None:
    """Why TLS to an engine failed, as /status shows it ("TLS: certificate has expired")."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        cause = error.certificate_error
        return f"TLS: {getattr(cause, 'verify_message', None) or cause}"
    if isinstance(error, aiohttp.ClientConnectorSSLError):
        return f"TLS: {getattr(error.os_error, 'reason', None) or error.os_error}"
    return None


def record(tracker: LoadTracker, fleet: Fleet, pages: list[str | ScrapeFailure], now: float) -> None:
    """Each page's loads, per model the backend serves, into the tracker; failures as failures."""
    for backend, page in zip(fleet.backends, pages):
        if isinstance(page, ScrapeFailure):
            for model in backend.models:
                tracker.record_failure(backend.id, model, page.reason, now)
            continue
        loads = parse_loads(page)
        for model in backend.models:
            load = load_for_model(loads, model)
            if load is None:
                tracker.record_failure(backend.id, model, f"no vLLM metrics for {model}", now)
            else:
                tracker.record_load(backend.id, model, load, now)
    tracker.retain(fleet.endpoint_keys())


def endpoint_states(fleet: Fleet, tracker: LoadTracker, outcomes: Outcomes, ledger: Ledger,
                    now: float) -> dict[str, list[EndpointState]]:
    """What is known of every endpoint, by model (in fleet order): the policy's input."""
    return {model: [replace(tracker.state(b.id, model, b.weight, now),
                            failure_ratio=outcomes.failure_ratio(b.endpoint, now),
                            audio_in_flight=ledger.in_flight(b.endpoint),
                            requests_in_flight=ledger.requests_in_flight(b.endpoint),
                            audio_per_request=ledger.audio_per_request(b.endpoint),
                            audio_rate=ledger.rate(b.endpoint, now))
                    for b in fleet.backends_for(model)]
            for model in fleet.model_names()}
