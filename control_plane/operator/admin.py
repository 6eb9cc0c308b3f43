"""The admin API: read and change the fleet at runtime. JSON in and out, OpenAI-style errors.

Every route but the open ones (/healthz, /openapi.json, /metrics, the status page) needs
`Authorization: Bearer <token>`: the token the control plane starts with (an admin called
"bootstrap"), or a named token with a role (control_plane/operator/tokens.py), compared in
constant time. Each route names the least role it needs in one table, ROUTE_ROLES; a token
with less gets 403. An address that failed authentication too often gets 429 for a while.
Bodies are small, strictly typed, and unknown fields are refused, so a typo never turns into a
silent default. A change is saved durably before the answer is sent, and then written to the
audit trail (control_plane/operator/audit.py) with who made it. Each authenticated change (POST,
PATCH, DELETE) is a trace of the plane's (control_plane/traces.py): `admin <method> <route>`,
naming the resource, its id and the caller's token name and role; never a header or a body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time

from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import aiohttp
from aiohttp import web

from control_plane.addresses import AddressError, is_https, parse_backend_url
from control_plane.config import ConfigError, DrainTimeout, ModelName, RotationGrace, Weight, check
from control_plane.fleet.resolve import dialable_address, read_engine_models
from control_plane.fleet.etcd_state import StateUnavailable
from control_plane.names import NO_ENGINE_CA
from control_plane.observe.scraper import tls_problem
from control_plane.observe.usage import as_csv
from control_plane.openai_errors import openai_error
from control_plane.operator import audit
from control_plane.operator.openapi import OPENAPI
from control_plane.fleet.registry import Entry, Source
from control_plane.operator.status import endpoint_rows, status_report
from control_plane.operator.telemetry import AUDIT_WRITE_FAILURES, render as render_metrics
from control_plane.operator.tokens import ADMIN, BOOTSTRAP, OPERATOR, ROLES, VIEWER, AdminToken, allows
from control_plane.operator.view import PlaneView
from control_plane.tenants.keys import ApiKey, KeyClass, KeyProblem
from control_plane.traces import PlaneTracer, annotate

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
MAX_MODELS = 32
# Failed authentications: an address with FAILED_AUTH_LIMIT failures within FAILED_AUTH_WINDOW_S
# gets 429 until the oldest of them is out of the window (AuthFailures).
FAILED_AUTH_LIMIT = 10
FAILED_AUTH_WINDOW_S = 60.0
FAILED_AUTH_ADDRESSES = 10_000  # addresses remembered at most
STATUS_PAGE = Path(__file__).parent / "static" / "status.html"


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = openai_error(self.message, self.error_type, self.param, self.status)
        headers = ({"WWW-Authenticate": "Bearer"} if self.status == 401 else {}) | self.headers
        return web.json_response(body, status=self.status, headers=headers or None)


@dataclass(frozen=True)
class Caller:
    """Who made a request: the token's name and role (and id; None for the bootstrap token)."""

    name: str
    role: str
    token_id: str | None = None


def _caller(request: web.Request) -> Caller | None:
    """The caller the bearer token names, None when it names none. The bootstrap token and every
    named token's digest are compared in constant time, whichever matches."""
    plane = _plane(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return None
    token = plane.bootstrap_token
    bootstrap = token is not None and hmac.compare_digest(given.encode(), token.encode())
    named: AdminToken | None = plane.admin_token_for(given)
    if bootstrap:
        return Caller(BOOTSTRAP, ADMIN)
    return Caller(named.name, named.role, named.id) if named is not None else None


class AuthFailures:
    """Failed authentications per client address, time passed in. An address with `limit`
    failures within `window_s` is refused (429) until the oldest of them leaves the window: then
    its token is not even looked at, so a right token is refused too. Were a right token let
    through, the 429 would not slow guessing at all (the guess that works would stand out by its
    200), and guessing is what this is for: a configured token may be weak. The price: someone
    sharing the address (a NAT, the same host) waits out the window, at most `window_s`.
    Bounded: at most `max_addresses` are remembered, the one that failed longest ago forgotten
    first, with at most `limit` times each."""

    def __init__(self, limit: int = FAILED_AUTH_LIMIT, window_s: float = FAILED_AUTH_WINDOW_S,
                 max_addresses: int = FAILED_AUTH_ADDRESSES):
        self.limit, self.window_s, self.max_addresses = limit, window_s, max_addresses
        self.by_address: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked_for(self, address: str, now: float) -> int | None:
        """Seconds until `address` may try again (Retry-After); None when it may now."""
        times = self.by_address.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self.by_address[address]
            return None
        if len(times) < self.limit:
            return None
        return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, address: str, now: float) -> None:
        times = self.by_address.pop(address, None) or deque(maxlen=self.limit)
        times.append(now)
        self.by_address[address] = times  # the newest failure last
        while len(self.by_address) > self.max_addresses:
            self.by_address.popitem(last=False)


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
    """One field, checked as the config file checks the same setting (control_plane/config/)."""
    try:
        return check(kind, body[key], key)
    except ConfigError as error:
        raise ApiError(400, str(error), param=key) from None


PLANE: web.AppKey[PlaneView] = web.AppKey("plane")
TRACER: web.AppKey[PlaneTracer] = web.AppKey("tracer", PlaneTracer)
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})  # the methods that change something: traced
FAILURES: web.AppKey[AuthFailures] = web.AppKey("auth_failures", AuthFailures)
CALLER = "whisper_gateway.caller"  # the request's Caller, once authenticated
routes = web.RouteTableDef()
# (method, path) -> the least role that may call it (roles rank viewer < operator < admin); None:
# open to anyone (liveness, this API's description, Prometheus's /metrics, and the status page,
# whose script asks for a token and sends it with every call). Filled by `route`, the one place
# a route and its role are declared; the guard checks it, and tests walk it.
ROUTE_ROLES: dict[tuple[str, str], str | None] = {}


def route(method: str, path: str, role: str | None):
    """Registers the handler for `method path`, open (role None) or for `role` and above."""
    assert role is None or role in ROLES

    def register(handler):
        getattr(routes, method.lower())(path)(handler)  # GET routes answer HEAD too
        ROUTE_ROLES[(method, path)] = role
        return handler
    return register


def _route_of(request: web.Request) -> tuple[str, str]:
    """(method, the route's path as declared: /keys/{id}); the path "" where no route matched."""
    resource = request.match_info.route.resource
    return "GET" if request.method == "HEAD" else request.method, resource.canonical if resource else ""


def _needed_role(request: web.Request) -> str | None:
    """The role the request's route needs; a path or method with no route needs a token (any), so
    that only callers learn what exists."""
    key = _route_of(request)
    return ROUTE_ROLES[key] if key in ROUTE_ROLES else VIEWER


def _authenticate(request: web.Request) -> Caller:
    """The caller, or 401 for a wrong or missing token; 429 while the address is refused (AuthFailures).
    A request without a token guesses nothing and is not counted."""
    failures, source, now = request.app[FAILURES], request.remote or "", time.monotonic()
    if (wait := failures.blocked_for(source, now)) is not None:
        raise ApiError(429, f"too many failed authentications from {source}: try again in {wait} s",
                       "rate_limit_error", headers={"Retry-After": str(wait)})
    caller = _caller(request)
    if caller is None:
        if request.headers.get("Authorization", "").strip():
            failures.failed(source, now)
        raise ApiError(401, "missing or wrong bearer token", "authentication_error")
    return caller


async def _audit(request: web.Request, action: str, target: str, before: dict | None, after: dict | None,
                 changed: bool = False) -> None:
    """Writes an applied change to the audit trail before the answer; a call that changed nothing
    (before == after, unless `changed` says otherwise) writes nothing. A write that fails is
    logged and counted (whisper_gateway_audit_write_failures) and the answer still goes: the
    change stands, and an answer may hold a secret shown only once."""
    annotate({"whisper.admin.action": action, "whisper.admin.resource_id": target})
    if before == after and not changed:
        return
    caller: Caller = request[CALLER]
    record = audit.make_record(caller.name, caller.token_id, caller.role, request.remote or "", action, target,
                               before, after)
    try:
        await _plane(request).audit.append(record)
    except Exception as error:  # noqa: BLE001 - StateUnavailable, OSError: the change was made all the same
        AUDIT_WRITE_FAILURES.inc()
        log.error("the audit record of %s %s by %s could not be written: %s", action, target, caller.name, error)


def _plane(request: web.Request) -> PlaneView:
    return request.app[PLANE]


def _entry_or_404(request: web.Request) -> Entry:
    entry = _plane(request).backend(request.match_info["id"])
    if entry is None:
        raise ApiError(404, f"no backend with id {request.match_info['id']!r}", "not_found_error", "id")
    annotate({"whisper.admin.resource_id": entry.id})
    return entry


def _view(plane: PlaneView, entry: Entry) -> dict:
    """A backend as the API shows it: its record and, per model, its live endpoint figures."""
    now = asyncio.get_running_loop().time()
    rows = [row for row in endpoint_rows(plane, now) if row["id"] == entry.id]
    return entry.to_json() | {"endpoints": [{k: row[k] for k in (
        "model", "health", "running", "waiting", "kv_cache_usage", "weight", "scrape_age_s")} for row in rows]}


@web.middleware
async def guard(request: web.Request, handler):
    """Auth and role first; every error answered in OpenAI's shape, saying what failed."""
    try:
        if (needed := _needed_role(request)) is not None:
            caller = _authenticate(request)
            if not allows(caller.role, needed):
                above = " or admin" if needed == OPERATOR else ""
                raise ApiError(403, f"{request.method} {request.path} needs the {needed} role{above}; the token "
                                    f"{caller.name!r} has the {caller.role} role", "permission_error")
            request[CALLER] = caller
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
    except Exception as error:  # changes roll back whole (StateKeeper.change): say which kind of call failed
        log.exception("admin request %s %s failed", request.method, request.path)
        what = "the change was not applied" if request.method not in ("GET", "HEAD") else \
            f"cannot answer {request.method} {request.path}"
        return ApiError(500, f"{what}: {type(error).__name__}: {error}", "server_error").response()


@web.middleware
async def traced(request: web.Request, handler):
    """A change that passed the guard is a trace's root span, `admin <method> <route>` (an ApiError
    is its answer here, as in the guard; any other error is recorded on the span and goes on). The
    resource's id is added once a handler found it (never the path as sent: a secret pasted there
    for an id stays out)."""
    method, path = _route_of(request)
    if method not in CHANGES or (method, path) not in ROUTE_ROLES:
        return await handler(request)
    attributes = {"http.request.method": method, "http.route": path,
                  "whisper.admin.resource": path.strip("/").split("/")[0]}
    if (caller := request.get(CALLER)) is not None:  # the token's name and role, never its secret
        attributes |= {"whisper.admin.caller": caller.name, "whisper.admin.role": caller.role}
    with request.app[TRACER].span(f"admin {method} {path}", attributes, root=True) as span:
        try:
            response = await handler(request)
        except ApiError as error:
            response = error.response()
        span.set_attribute("http.response.status_code", response.status)
        return response


@route("GET", "/healthz", None)
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@route("GET", "/openapi.json", None)
async def openapi(request: web.Request) -> web.Response:
    """OPENAPI, each operation with the least role it needs (x-required-role) from ROUTE_ROLES."""
    document = json.loads(json.dumps(OPENAPI))
    for (method, path), role in ROUTE_ROLES.items():
        operation = document["paths"].get(path, {}).get(method.lower())
        if operation is not None and role is not None:
            operation["x-required-role"] = role
    return web.json_response(document)


@route("GET", "/metrics", None)
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=render_metrics(), content_type="text/plain", charset="utf-8")


@route("GET", "/", None)
@route("GET", "/ui", None)
async def page(request: web.Request) -> web.Response:
    return web.Response(text=STATUS_PAGE.read_text(), content_type="text/html")


@route("GET", "/status", VIEWER)
async def status(request: web.Request) -> web.Response:
    return web.json_response(status_report(_plane(request), asyncio.get_running_loop().time()))


@route("GET", "/backends", VIEWER)
async def list_backends(request: web.Request) -> web.Response:
    plane = _plane(request)
    return web.json_response({"object": "list", "data": [_view(plane, e) for e in plane.backends()]})


@route("GET", "/backends/{id}", VIEWER)
async def get_backend(request: web.Request) -> web.Response:
    return web.json_response(_view(_plane(request), _entry_or_404(request)))


async def _models_of(plane: PlaneView, url: str, body: dict) -> list[str]:
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


@route("POST", "/backends", OPERATOR)
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
    if (existing := plane.backend_at(url)) is not None:
        raise ApiError(409, f"{url} is already backend {existing.id} ({existing.origin})", "conflict_error", "url")
    weight = _field(Weight, body, "weight") if "weight" in body else 1
    models = await _models_of(plane, url, body)
    entry = await plane.add_backend(Entry.create(url, models, weight, Source.API))
    await _audit(request, "backends.add", entry.id, None, entry.to_json())
    return web.json_response(_view(plane, entry), status=201)


@route("POST", "/backends/{id}/drain", OPERATOR)
async def drain(request: web.Request) -> web.Response:
    plane, entry = _plane(request), _entry_or_404(request)
    body = await _json_object(request, {"timeout_s"})
    timeout = _field(DrainTimeout, body, "timeout_s") if "timeout_s" in body else plane.config.drain_timeout_s
    before = entry.to_json()
    after = await plane.drain(entry.id, timeout)
    await _audit(request, "backends.drain", entry.id, before, after.to_json())
    return web.json_response(_view(plane, after), status=202)


@route("POST", "/backends/{id}/resume", OPERATOR)
async def resume(request: web.Request) -> web.Response:
    plane, entry = _plane(request), _entry_or_404(request)
    await _json_object(request, set())
    before = entry.to_json()
    after = await plane.resume(entry.id)
    await _audit(request, "backends.resume", entry.id, before, after.to_json())
    return web.json_response(_view(plane, after))


@route("DELETE", "/backends/{id}", OPERATOR)
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
    before = entry.to_json()
    if force == "true":
        await plane.remove_now(entry.id)
        await _audit(request, "backends.remove", entry.id, before, None)
        return web.json_response(before | {"state": "removed"})
    after = await plane.drain(entry.id, plane.config.drain_timeout_s)  # removed once idle
    await _audit(request, "backends.remove", entry.id, before, after.to_json())
    return web.json_response(_view(plane, after), status=202)


# --- API keys (control_plane/tenants/keys.py): secrets are in the answers of create and rotate only


def _key_view(plane: PlaneView, key: ApiKey) -> dict:
    return key.to_json() | {"usage": plane.usage_of(key.id), "requests_in_flight": plane.requests_in_flight(key.id),
                            "budget": plane.budget_of(key.id)}


def _key_record(key: ApiKey) -> dict:
    """A key as the audit trail keeps it: its record without usage, and of its secrets only when
    each ends (not even a digest's prefix)."""
    return key.to_json() | {"secrets": [{"expires_at": s.expires_at} for s in key.secrets]}


def _key_fields(plane: PlaneView, body: dict) -> dict:
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


def _applied(behind: list[str], body: dict) -> dict:
    """A key change's answer, naming the Envoys that had not applied it when it was given (a stuck
    one is waited for ADMIN_ACK_TIMEOUT_S, then named here, in the log and on /status)."""
    return body | {"not_applied_by": behind} if behind else body


async def _table_change(change, mutate):
    """A change of the keys or the admin tokens (`change`: the plane's change_keys or change_tokens);
    a KeyProblem becomes its API error."""
    try:
        return await change(mutate)
    except KeyProblem as problem:
        error_type = {404: "not_found_error", 409: "conflict_error"}.get(problem.status, "invalid_request_error")
        raise ApiError(problem.status, str(problem), error_type, problem.param) from None


async def _key_change(plane: PlaneView, mutate):
    return await _table_change(plane.change_keys, mutate)


@route("GET", "/keys", VIEWER)
async def list_keys(request: web.Request) -> web.Response:
    plane = _plane(request)
    return web.json_response({"object": "list", "data": [_key_view(plane, k) for k in plane.api_keys()]})


@route("POST", "/keys", ADMIN)
async def create_key(request: web.Request) -> web.Response:
    plane = _plane(request)
    body = await _json_object(request, {"name", "models", "class", "plan"}, {"name"})
    given = _key_fields(plane, body)
    (key, secret), behind = await _key_change(plane, lambda keys: keys.create(
        given["name"], given.get("models", ()), given.get("key_class", "interactive"), time.time(),
        plane.config.auth.max_keys, given.get("plan")))
    log.info("API key %s (%s) created", key.id, key.name)
    await _audit(request, "keys.create", key.id, None, _key_record(key))
    return web.json_response(_applied(behind, _key_view(plane, key) | {"secret": secret}), status=201)


USAGE_DAYS_DEFAULT = 31  # GET /usage without `from`: this many days up to `to`
USAGE_DAYS_MOST = 3660


def _day(request: web.Request, name: str, default: date) -> date:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        if len(text) != 10:  # fromisoformat takes 20261207 too; a bill's days are written one way
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"{name}: expected a day as YYYY-MM-DD, got {text!r}", param=name) from None


@route("GET", "/usage", VIEWER)
async def read_usage(request: web.Request) -> web.Response:
    """Usage for billing: per UTC day, API key and model, over every control plane and restart
    (observe/usage.py). ?from=&to= (YYYY-MM-DD, inclusive; default: the last 31 days), ?key=
    (an id; "" is requests made without a key), ?format=csv."""
    if unknown := sorted(set(request.query) - {"from", "to", "key", "format"}):
        raise ApiError(400, "the query parameters are from, to, key and format", param=unknown[0])
    last = _day(request, "to", datetime.now(timezone.utc).date())
    first = _day(request, "from", last - timedelta(days=USAGE_DAYS_DEFAULT - 1))
    if not timedelta(0) <= last - first < timedelta(days=USAGE_DAYS_MOST):
        raise ApiError(400, f"from must be at most to, and at most {USAGE_DAYS_MOST} days before it", param="from")
    if (fmt := request.query.get("format", "json")) not in ("json", "csv"):
        raise ApiError(400, f"format: expected json or csv, got {fmt!r}", param="format")
    try:
        rows = await _plane(request).usage(first.isoformat(), last.isoformat(), request.query.get("key"))
    except StateUnavailable as error:
        raise ApiError(503, f"usage not readable now: {error}", "service_unavailable_error") from None
    if fmt == "csv":
        return web.Response(text=as_csv(rows), content_type="text/csv")
    return web.json_response({"object": "list", "from": first.isoformat(), "to": last.isoformat(), "data": rows})


def _key_or_404(request: web.Request) -> ApiKey:
    try:
        key = _plane(request).api_key(request.match_info["id"])
    except KeyProblem as problem:
        raise ApiError(404, str(problem), "not_found_error", "id") from None
    annotate({"whisper.admin.resource_id": key.id})
    return key


@route("GET", "/keys/{id}", VIEWER)
async def get_key(request: web.Request) -> web.Response:
    return web.json_response(_key_view(_plane(request), _key_or_404(request)))


@route("PATCH", "/keys/{id}", ADMIN)
async def set_key(request: web.Request) -> web.Response:
    plane, before = _plane(request), _key_or_404(request)
    key_id = before.id
    given = _key_fields(plane, await _json_object(request, {"name", "models", "class", "plan"}))
    key, behind = await _key_change(plane, lambda keys: keys.update(key_id, **given))
    log.info("API key %s (%s) changed: %s", key.id, key.name, ", ".join(sorted(given)) or "nothing")
    await _audit(request, "keys.set", key.id, _key_record(before), _key_record(key))
    return web.json_response(_applied(behind, _key_view(plane, key)))


@route("POST", "/keys/{id}/rotate", ADMIN)
async def rotate_key(request: web.Request) -> web.Response:
    plane, before = _plane(request), _key_or_404(request)
    key_id = before.id
    body = await _json_object(request, {"grace_s"})
    grace = _field(RotationGrace, body, "grace_s") if "grace_s" in body else plane.config.auth.rotation_grace_s
    (key, secret), behind = await _key_change(plane, lambda keys: keys.rotate(key_id, grace, time.time()))
    log.info("API key %s (%s) rotated; the previous secret works for %g s more", key.id, key.name, grace)
    # A rotation changes the key even where its record looks the same (grace 0: one secret for another).
    await _audit(request, "keys.rotate", key.id, _key_record(before), _key_record(key), changed=True)
    return web.json_response(_applied(behind, _key_view(plane, key) | {"secret": secret}))


@route("DELETE", "/keys/{id}", ADMIN)
async def revoke_key(request: web.Request) -> web.Response:
    plane, before = _plane(request), _key_or_404(request)
    key_id = before.id
    if request.query:
        raise ApiError(400, "DELETE /keys/{id} takes no query parameters")
    key, behind = await _key_change(plane, lambda keys: keys.revoke(key_id, time.time()))
    log.info("API key %s (%s) revoked", key.id, key.name)
    await _audit(request, "keys.revoke", key.id, _key_record(before), _key_record(key))
    return web.json_response(_applied(behind, _key_view(plane, key)))


# --- named admin tokens (control_plane/operator/tokens.py): the secret is in create's answer only


async def _token_change(plane: PlaneView, mutate):
    return await _table_change(plane.change_tokens, mutate)


@route("GET", "/tokens", ADMIN)
async def list_tokens(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [t.to_json() for t in _plane(request).admin_tokens().values()]})


@route("POST", "/tokens", ADMIN)
async def create_token(request: web.Request) -> web.Response:
    plane = _plane(request)
    body = await _json_object(request, {"name", "role"}, {"name", "role"})
    token, secret = await _token_change(plane, lambda tokens: tokens.create(body["name"], body["role"], time.time()))
    log.info("admin token %s (%s, %s) created", token.id, token.name, token.role)
    await _audit(request, "tokens.create", token.id, None, token.to_json())
    return web.json_response(token.to_json() | {"secret": secret}, status=201)


@route("DELETE", "/tokens/{id}", ADMIN)
async def revoke_token(request: web.Request) -> web.Response:
    plane, token_id = _plane(request), request.match_info["id"]
    if request.query:
        raise ApiError(400, "DELETE /tokens/{id} takes no query parameters")
    if (known := plane.admin_tokens().get(token_id)) is None:
        raise ApiError(404, f"no admin token with id {token_id!r}", "not_found_error", "id")
    before = known.to_json()
    token = await _token_change(plane, lambda tokens: tokens.revoke(token_id, time.time()))
    log.info("admin token %s (%s) revoked", token.id, token.name)
    await _audit(request, "tokens.revoke", token.id, before, token.to_json())
    return web.json_response(token.to_json())


# --- the audit trail (control_plane/operator/audit.py)


@route("GET", "/audit", ADMIN)
async def read_audit(request: web.Request) -> web.Response:
    """?since=<ISO 8601>: the first `limit` records from then on, oldest first; without since:
    the newest `limit`, oldest first. has_more: records were left out."""
    if set(request.query) - {"since", "limit"}:
        raise ApiError(400, "the query parameters are since (ISO 8601) and limit", param=sorted(
            set(request.query) - {"since", "limit"})[0])
    since = None
    if "since" in request.query:
        try:
            since = audit.since_key(audit.parse_since(request.query["since"]))
        except (ValueError, OverflowError):
            raise ApiError(400, f"since: {request.query['since']!r} is not an ISO 8601 time "
                                "(2025-01-31T12:00:00Z)", param="since") from None
    limit = request.query.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= audit.MAX_LIMIT:
        raise ApiError(400, f"limit: expected 1 to {audit.MAX_LIMIT}, got {limit!r}", param="limit")
    records, more = await _plane(request).audit.read(since, int(limit))
    return web.json_response({"object": "list", "data": records, "has_more": more})


def build_admin_app(plane: PlaneView, tracer: PlaneTracer | None = None) -> web.Application:
    """The admin API over `plane`, which handlers reach through the PLANE app key; its changes
    traced with `tracer` (none: not traced)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[guard, traced])
    app[PLANE] = plane
    app[TRACER] = tracer or PlaneTracer()
    app[FAILURES] = AuthFailures()
    app.add_routes(routes)
    return app
