"""The control plane's own HTTP API."""

from __future__ import annotations

import asyncio

from aiohttp import web

from control_plane.status import status_report


def build_admin_app(plane) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        now = asyncio.get_running_loop().time()
        report = status_report(plane.fleet, plane.balancer.tracker, plane.cache,
                               plane.config.routing.stale_after_s, now)
        return web.json_response(report)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_get("/healthz", healthz)
    return app
