"""Faults a test can switch on and off at runtime: `POST /_sim/faults {"metrics": "hang"}`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass

from aiohttp import web

from engines.common.errors import EngineError

CHOICES = {"metrics": ("ok", "error", "hang")}


@dataclass
class Faults:
    metrics: str = "ok"  # ok | error (HTTP 500) | hang (never answers)

    def update(self, changes: dict) -> None:
        for key, value in changes.items():
            if key not in CHOICES:
                raise EngineError(400, f"unknown fault {key!r}; known: {sorted(CHOICES)}", param=key)
            if value not in CHOICES[key]:
                raise EngineError(400, f"fault {key} must be one of {list(CHOICES[key])}, got {value!r}", param=key)
        for key, value in changes.items():
            setattr(self, key, value)


def install_faults(app: web.Application, faults: Faults) -> None:
    """Adds the switch and the behaviour to an engine app before it starts."""
    stopping = asyncio.Event()  # a hang lasts until the engine stops, so stopping stays quick

    async def on_shutdown(app: web.Application) -> None:
        stopping.set()

    @web.middleware
    async def inject(request: web.Request, handler):
        if request.path == "/metrics" and faults.metrics != "ok":
            if faults.metrics == "hang":
                await stopping.wait()
            return web.Response(status=500, text="metrics unavailable (simulated fault)")
        return await handler(request)

    async def show(request: web.Request) -> web.Response:
        return web.json_response(asdict(faults))

    async def change(request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except json.JSONDecodeError:
            raise EngineError(400, "body must be a JSON object") from None
        if not isinstance(changes, dict):
            raise EngineError(400, "body must be a JSON object")
        faults.update(changes)
        return web.json_response(asdict(faults))

    app.on_shutdown.append(on_shutdown)
    app.middlewares.insert(0, inject)
    app.router.add_get("/_sim/faults", show)
    app.router.add_post("/_sim/faults", change)
