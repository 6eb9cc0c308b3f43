"""The admin API: read and change the fleet at runtime. JSON in and out, OpenAI-style errors.

Every route but /healthz and /openapi.json needs `Authorization: Bearer <token>` (compared in
constant time). Bodies are small, strictly typed, and unknown fields are refused, so a typo
never turns into a silent default. A change is saved durably before the answer is sent.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from control_plane.fleet.addresses import AddressError, is_https, parse_backend_url
from control_plane.config import ConfigError, DrainTimeout, ModelName, RotationGrace, Weight, check
from control_plane.fleet.resolve import dialable_address, read_engine_models
from control_plane.fleet.shared_state import StateUnavailable
from control_plane.names import NO_ENGINE_CA
from control_plane.observe.scraper import tls_problem
from control_plane.operator.openapi import OPENAPI
from control_plane.fleet.registry import Entry, Source
from control_plane.operator.status import endpoint_rows, status_report
from control_plane.operator.telemetry import render as render_metrics
from control_plane.tenants.keys import ApiKey, KeyClass, KeyProblem

if TYPE_CHECKING:
    from control_plane.app import ControlPlane

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
MAX_MODELS = 32
# Open: liveness, the API description, Prometheus metrics, and the status page (whose script
# asks for the token and sends it with every call).
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/metrics", "/", "/ui"})
STATUS_PAGE = Path(__file__).parent / "static" / "status.html"


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.status}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return web.json_response(body, status=self.status, headers=headers)


def _authorized(request: web.Request, token: str | None) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if token is None or scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


async def _json_object(request: web.Request, allowed: set[str], required: set[str] = frozenset()) -> dict:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body is over {MAX_BODY_BYTES} bytes", "request_too_large") from None
    if not raw.strip():
        body = {}
    else:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as error:  # ValueError: bad JSON, or a 4,300-digit number
            raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    for key in sorted(set(body) - allowed):
        raise ApiError(400, f"unknown field {key!r} (allowed: {', '.join(sorted(allowed))})", param=key)
    for key in sorted(required - set(body)):
        raise ApiError(400, f"field {key!r} is required", param=key)
    return body


def _field(kind, body: dict, key: str):
    """One field, checked as the config file checks the same setting (control_plane/config.py)."""
    try:
        return check(kind, body[key], key)
    except ConfigError as error:
        raise ApiError(400, str(error), param=key) from None


PLANE: web.AppKey["ControlPlane"] = web.AppKey("plane")
routes = web.RouteTableDef()


def _plane(request: web.Request) -> "ControlPlane":
    return request.app[PLANE]


def _entry_or_404(request: web.Request) -> Entry:
    entry = _plane(request).registry.get(request.match_info["id"])
    if entry is None:
        raise ApiError(404, f"no backend with id {request.match_info['id']!r}", "not_found_error", "id")
    return entry


def _view(plane: "ControlPlane", entry: Entry) -> dict:
    """A backend as the API shows it: its record and, per model, its live endpoint figures."""
    now = asyncio.get_running_loop().time()
    rows = [row for row in endpoint_rows(plane, now) if row["id"] == entry.id]
    return entry.to_json() | {"endpoints": [{k: row[k] for k in (
        "model", "health", "running", "waiting", "kv_cache_usage", "weight", "scrape_age_s")} for row in rows]}


@web.middleware
async def guard(request: web.Request, handler):
    """Auth first; every error answered in OpenAI's shape, saying what failed."""
    try:
        if request.path not in OPEN_PATHS and not _authorized(request, _plane(request).token):
            raise ApiError(401, "missing or wrong bearer token", "authentication_error")
        return await handler(request)
    except ApiError as error:
        return error.response()
    except StateUnavailable as error:  # etcd away (state.etcd): nothing changed, the gateway keeps serving
        return ApiError(503, f"the change was not applied: {error}", "service_unavailable_error").response()
    except web.HTTPMethodNotAllowed as error:
        return ApiError(405, f"{request.method} is not allowed here (allowed: {', '.join(sorted(error.allowed_methods))})",
                        "method_not_allowed").response()
    except web.HTTPNotFound:
        return ApiError(404, f"no such path: {request.path}", "not_found_error").response()
    except Exception as error:  # changes roll back whole (ControlPlane.change): say which kind of call failed
        log.exception("admin request %s %s failed", request.method, request.path)
        what = "the change was not applied" if request.method not in ("GET", "HEAD") else \
            f"cannot answer {request.method} {request.path}"
        return ApiError(500, f"{what}: {type(error).__name__}: {error}", "server_error").response()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=render_metrics(), content_type="text/plain", charset="utf-8")


@routes.get("/")
@routes.get("/ui")
async def page(request: web.Request) -> web.Response:
    return web.Response(text=STATUS_PAGE.read_text(), content_type="text/html")


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(status_report(_plane(request), asyncio.get_running_loop().time()))


@routes.get("/backends")
async def list_backends(request: web.Request) -> web.Response:
    plane = _plane(request)
    return web.json_response({"object": "list", "data": [_view(plane, e) for e in plane.registry.entries()]})


@routes.get("/backends/{id}")
async def get_backend(request: web.Request) -> web.Response:
    return web.json_response(_view(_plane(request), _entry_or_404(request)))


async def _models_of(plane: "ControlPlane", url: str, body: dict) -> list[str]:
    """The models a new backend serves: given, or read from its /v1/models; checked as names."""
    if "models" in body:
        models = _model_list(body["models"], at_least=1)
    else:
        try:
            models = await read_engine_models(url, plane.engine_key, plane.engine_tls)
        except (ValueError, aiohttp.ClientError, asyncio.TimeoutError) as error:
            why = tls_problem(error) or error or type(error).__name__
            raise ApiError(400, f"cannot read the engine's models ({why}); "
                                "give them as `models`", param="models") from None
    aliases = {alias: m.name for m in plane.config.models for alias in m.aliases}
    for i, model in enumerate(models):
        try:
            check(ModelName, model, f"models[{i}]")
        except ConfigError as error:
            raise ApiError(400, str(error), param="models") from None
        if model in aliases:
            raise ApiError(400, f"models[{i}]: {model!r} is an alias of {aliases[model]!r}; use the model's name",
                           param="models")
    if len(set(models)) != len(models):
        raise ApiError(400, "models lists a name twice", param="models")
    return models


def _model_list(value, at_least: int) -> list:
    """`models` as a list of at_least..MAX_MODELS strings; what they name is the caller's to check."""
    if not isinstance(value, list) or not at_least <= len(value) <= MAX_MODELS or not all(
            isinstance(m, str) for m in value):
        raise ApiError(400, f"models must be a list of {at_least} to {MAX_MODELS} model names", param="models")
    return value


@routes.post("/backends")
async def add_backend(request: web.Request) -> web.Response:
    plane = _plane(request)
    body = await _json_object(request, {"url", "models", "weight"}, {"url"})
    try:
        url = parse_backend_url(body["url"])[0]
        await dialable_address(url, plane.config.listen)
    except AddressError as error:
        raise ApiError(400, str(error), param="url") from None
    if is_https(url) and not plane.serves_https_engines():
        raise ApiError(400, NO_ENGINE_CA, param="url")
    if (existing := plane.registry.find_url(url)) is not None:
        raise ApiError(409, f"{url} is already backend {existing.id} ({existing.origin})", "conflict_error", "url")
    weight = _field(Weight, body, "weight") if "weight" in body else 1
    models = await _models_of(plane, url, body)
    entry = await plane.add_backend(Entry.create(url, models, weight, Source.API))
    return web.json_response(_view(plane, entry), status=201)


@routes.post("/backends/{id}/drain")
async def drain(request: web.Request) -> web.Response:
    plane, entry = _plane(request), _entry_or_404(request)
    body = await _json_object(request, {"timeout_s"})
    timeout = _field(DrainTimeout, body, "timeout_s") if "timeout_s" in body else plane.config.drain_timeout_s
    return web.json_response(_view(plane, await plane.drain(entry.id, timeout)), status=202)


@routes.post("/backends/{id}/resume")
async def resume(request: web.Request) -> web.Response:
    plane, entry = _plane(request), _entry_or_404(request)
    await _json_object(request, set())
    return web.json_response(_view(plane, await plane.resume(entry.id)))


@routes.delete("/backends/{id}")
async def delete(request: web.Request) -> web.Response:
    plane, entry = _plane(request), _entry_or_404(request)
    force = request.query.get("force", "false").lower()
    if force not in ("true", "false") or set(request.query) - {"force"}:
        raise ApiError(400, "the only query parameter is force=true|false", param="force")
    if entry.source is Source.CONFIG:
        raise ApiError(409, f"{entry.id} is defined in the config file: remove it there, or drain it",
                       "conflict_error", "id")
    if entry.source is Source.DNS:
        raise ApiError(409, f"{entry.id} comes from DNS ({entry.dns_name}): remove its record, or drain it",
                       "conflict_error", "id")
    if force == "true":
        await plane.remove_now(entry.id)
        return web.json_response(entry.to_json() | {"state": "removed"})
    return web.json_response(_view(plane, await plane.drain(entry.id, plane.config.drain_timeout_s)), status=202)


# --- API keys (control_plane/tenants/keys.py): secrets are in the answers of create and rotate only


def _key_view(plane: "ControlPlane", key: ApiKey) -> dict:
    return key.to_json() | {"usage": plane.ledger.usage_of(key.id),
                            "requests_in_flight": plane.in_flight.count(key.id)}


def _key_fields(plane: "ControlPlane", body: dict) -> dict:
    """name, models and class as given, checked; models by their names as the config has them."""
    given = {}
    if "name" in body:
        given["name"] = body["name"]
    if "models" in body:
        served = plane.fleet.model_names()
        models = _model_list([] if body["models"] is None else body["models"], at_least=0)  # null, []: all
        for model in models:
            if model not in served:
                raise ApiError(400, f"models: {model!r} is not a model this gateway serves (known: "
                                    f"{', '.join(sorted(served))}; use names, not aliases)", param="models")
        if len(set(models)) != len(models):
            raise ApiError(400, "models lists a name twice", param="models")
        given["models"] = tuple(models)
    if "plan" in body and body["plan"] is None:
        given["plan"] = ""  # back to auth.default_plan
    elif "plan" in body:
        if not isinstance(body["plan"], str) or body["plan"] not in plane.config.auth.plans:
            known = ", ".join(sorted(plane.config.auth.plans)) or "none configured"
            raise ApiError(400, f"plan must be one of auth.plans ({known}), got {body['plan']!r}", param="plan")
        given["plan"] = body["plan"]
    if "class" in body:
        given["key_class"] = _field(KeyClass, body, "class")
    return given


async def _key_change(plane: "ControlPlane", mutate):
    try:
        return await plane.change_keys(mutate)
    except KeyProblem as problem:
        error_type = {404: "not_found_error", 409: "conflict_error"}.get(problem.status, "invalid_request_error")
        raise ApiError(problem.status, str(problem), error_type, problem.param) from None


@routes.get("/keys")
async def list_keys(request: web.Request) -> web.Response:
    plane = _plane(request)
    return web.json_response({"object": "list", "data": [_key_view(plane, k) for k in plane.keys.by_id.values()]})


@routes.post("/keys")
async def create_key(request: web.Request) -> web.Response:
    plane = _plane(request)
    body = await _json_object(request, {"name", "models", "class", "plan"}, {"name"})
    given = _key_fields(plane, body)
    key, secret = await _key_change(plane, lambda keys: keys.create(
        given["name"], given.get("models", ()), given.get("key_class", "interactive"), time.time(),
        plane.config.auth.max_keys, given.get("plan")))
    log.info("API key %s (%s) created", key.id, key.name)
    return web.json_response(_key_view(plane, key) | {"secret": secret}, status=201)


def _key_or_404(request: web.Request) -> ApiKey:
    try:
        return _plane(request).keys.get(request.match_info["id"])
    except KeyProblem as problem:
        raise ApiError(404, str(problem), "not_found_error", "id") from None


@routes.get("/keys/{id}")
async def get_key(request: web.Request) -> web.Response:
    return web.json_response(_key_view(_plane(request), _key_or_404(request)))


@routes.patch("/keys/{id}")
async def set_key(request: web.Request) -> web.Response:
    plane, key_id = _plane(request), _key_or_404(request).id
    given = _key_fields(plane, await _json_object(request, {"name", "models", "class", "plan"}))
    key = await _key_change(plane, lambda keys: keys.update(key_id, **given))
    log.info("API key %s (%s) changed: %s", key.id, key.name, ", ".join(sorted(given)) or "nothing")
    return web.json_response(_key_view(plane, key))


@routes.post("/keys/{id}/rotate")
async def rotate_key(request: web.Request) -> web.Response:
    plane, key_id = _plane(request), _key_or_404(request).id
    body = await _json_object(request, {"grace_s"})
    grace = _field(RotationGrace, body, "grace_s") if "grace_s" in body else plane.config.auth.rotation_grace_s
    key, secret = await _key_change(plane, lambda keys: keys.rotate(key_id, grace, time.time()))
    log.info("API key %s (%s) rotated; the previous secret works for %g s more", key.id, key.name, grace)
    return web.json_response(_key_view(plane, key) | {"secret": secret})


@routes.delete("/keys/{id}")
async def revoke_key(request: web.Request) -> web.Response:
    plane, key_id = _plane(request), _key_or_404(request).id
    if request.query:
        raise ApiError(400, "DELETE /keys/{id} takes no query parameters")
    key = await _key_change(plane, lambda keys: keys.revoke(key_id, time.time()))
    log.info("API key %s (%s) revoked", key.id, key.name)
    return web.json_response(_key_view(plane, key))


def build_admin_app(plane: "ControlPlane") -> web.Application:
    """The admin API over `plane`, which handlers reach through the PLANE app key."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[guard])
    app[PLANE] = plane
    app.add_routes(routes)
    return app
