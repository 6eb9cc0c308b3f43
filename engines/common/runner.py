"""Runs an engine app until SIGTERM/SIGINT, then drains: no new connections, in-flight finish."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 60.0


async def serve_until_signal(app: web.Application, host: str, port: int, description: str) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=DRAIN_TIMEOUT_S)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("%s on %s:%d", description, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda sig=sig: (log.info("%s: stopping", sig.name), stop.set()))
    await stop.wait()
    await runner.cleanup()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
