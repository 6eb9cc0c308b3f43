"""Faults a test switches on and off at runtime, e.g. `POST /_sim/faults {"requests": "503"}`.

- metrics: ok | error (HTTP 500) | hang (never answers)
- health:  ok | error (HTTP 503) | hang
- requests (transcriptions and translations): ok | 500 | 503 (vLLM's queue-full answer) |
  hang | drop (answer begins, then the connection is cut)
- slowdown: 1 or more; the simulated GPU works that many times slower
- crash: true ends the process at once, as a killed engine would

`GET /_sim/traceparents`: the W3C traceparent of each speech request received (the last 100,
oldest first; null where none came), as a tracing engine would continue it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from dataclasses import asdict, dataclass

from aiohttp import web

from engines.common.errors import EngineError

CHOICES = {
    "metrics": ("ok", "error", "hang"),
    "health": ("ok", "error", "hang"),
    "requests": ("ok", "500", "503", "hang", "drop"),
}
SPEECH_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")


@dataclass
class Faults:
    metrics: str = "ok"
    health: str = "ok"
    requests: str = "ok"
    slowdown: float = 1.0

    def update(self, changes: dict) -> bool:
        """Applies a change whole or not at all; True when it asks for a crash."""
        for key, value in changes.items():
            if key == "crash":
                if value is not True:
                    raise EngineError(400, "crash must be true", param=key)
            elif key == "slowdown":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 1000:
                    raise EngineError(400, f"slowdown must be a number from 1 to 1000, got {value!r}", param=key)
            elif key not in CHOICES:
                raise EngineError(400, f"unknown fault {key!r}; known: {sorted([*CHOICES, 'crash', 'slowdown'])}",
                                  param=key)
            elif value not in CHOICES[key]:
                raise EngineError(400, f"fault {key} must be one of {list(CHOICES[key])}, got {value!r}", param=key)
        for key, value in changes.items():
            if key != "crash":
                setattr(self, key, float(value) if key == "slowdown" else value)
        return changes.get("crash") is True


def install_faults(app: web.Application, faults: Faults, on_slowdown) -> None:
    """Adds the switch and the behaviour to an engine app before it starts."""
    stopping = asyncio.Event()  # a hang lasts until the engine stops, so stopping stays quick
    traceparents: deque[str | None] = deque(maxlen=100)

    async def on_shutdown(app: web.Application) -> None:
        stopping.set()

    def fault_for(path: str) -> str:
        if path == "/metrics":
            return faults.metrics
        if path == "/health":
            return faults.health
        if path in SPEECH_PATHS:
            return faults.requests
        return "ok"

    @web.middleware
    async def inject(request: web.Request, handler):
        if request.path in SPEECH_PATHS:
            traceparents.append(request.headers.get("traceparent"))
        fault = fault_for(request.path)
        if fault == "ok":
            return await handler(request)
        if fault == "hang":
            await stopping.wait()
            raise EngineError(503, "engine stopping")
        if fault == "drop":
            await request.read()
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"text": "cut off in the mid')
            request.transport.abort()
            return response
        if fault in ("503", "error") and request.path != "/metrics":
            raise EngineError(503, "The engine is overloaded: its request queue is full.", "ServiceUnavailableError")
        if request.path == "/metrics":
            return web.Response(status=500, text="metrics unavailable (simulated fault)")
        raise EngineError(500, "Simulated engine failure.", "InternalServerError")

    async def show(request: web.Request) -> web.Response:
        return web.json_response(asdict(faults))

    async def change(request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except json.JSONDecodeError:
            raise EngineError(400, "body must be a JSON object") from None
        if not isinstance(changes, dict):
            raise EngineError(400, "body must be a JSON object")
        crash = faults.update(changes)
        on_slowdown(faults.slowdown)
        if crash:
            asyncio.get_running_loop().call_later(0.05, os._exit, 137)
        return web.json_response(asdict(faults))

    app.on_shutdown.append(on_shutdown)
    app.middlewares.append(inject)  # inside the error middleware, which shapes EngineError answers
    app.router.add_get("/_sim/faults", show)
    app.router.add_post("/_sim/faults", change)
    app.router.add_get("/_sim/traceparents", lambda request: web.json_response(list(traceparents)))
