"""vLLM's error shape, so clients and the gateway see one format whichever engine answers."""

from __future__ import annotations

import json

from aiohttp import web


def error_body(message: str, error_type: str, param: str | None, code: int) -> dict:
    """The `{"error": {...}}` object vLLM and OpenAI answer with."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class EngineError(Exception):
    """A request the engine refuses; carries what the client is told."""

    def __init__(self, status: int, message: str, error_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(error_body(self.message, self.error_type, self.param, self.status)),
            content_type="application/json",
        )


def missing_field(field: str, items: int) -> EngineError:
    """vLLM's pydantic message for a required form field that is absent."""
    message = (
        "1 validation error:\n"
        f"  {{'type': 'missing', 'loc': 'body.{field}', 'msg': 'Field required', 'input': '<dict of {items} items>'}}"
    )
    return EngineError(400, message, "Bad Request", f"body.{field}")


INVALID_AUDIO = (
    "Invalid or corrupted audio data. Ensure the input is a valid audio or video file "
    "(e.g. a complete WAV, MP3, or MP4)."
)
