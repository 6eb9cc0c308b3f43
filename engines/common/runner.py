"""Runs an engine app until SIGTERM/SIGINT, then drains: no new connections, in-flight finish."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl

from aiohttp import web

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 60.0


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's own flags for serving HTTPS, so the engines are started alike."""
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--ssl-keyfile", default=None, help="and this private key (PEM)")
    parser.add_argument("--ssl-ca-certs", default=None, help="require client certificates from this CA (PEM)")


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.ssl_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    if args.ssl_ca_certs:
        context.load_verify_locations(args.ssl_ca_certs)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve_until_signal(app: web.Application, host: str, port: int, description: str,
                             tls: ssl.SSLContext | None = None, path: str | None = None) -> None:
    """`path`: on this Unix socket (mode 0600) instead of host:port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=DRAIN_TIMEOUT_S)
    await runner.setup()
    if path is not None:
        await web.UnixSite(runner, path).start()
        os.chmod(path, 0o600)
        log.info("%s on unix:%s", description, path)
    else:
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
        log.info("%s on %s://%s:%d", description, "https" if tls else "http", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda sig=sig: (log.info("%s: stopping", sig.name), stop.set()))
    await stop.wait()
    await runner.cleanup()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
