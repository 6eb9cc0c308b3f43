"""The one RouteConfiguration: a route per (model name or alias, audio path), answered lists, 404s.

The Lua filter reads the `model` form field and sets MODEL_HEADER; routes match on it. Which
names exist reaches the filter as constants in its source (builders/lua_source.py), so adding a model is
a route update (RDS) and never a listener update, which would drain client connections.
"""

from __future__ import annotations

import json

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from control_plane.builders.common import JSON_HEADER, header, long_upload_metadata, pack, seconds
from control_plane.builders.lua_source import filter_source
from control_plane.builders.tracing import build_route_tracing
from control_plane.names import (
    AUDIO_PATHS,
    HOP_HEADER,
    LONG_UPLOAD_HEADER,
    LONGFORM_CLUSTER,
    LONGFORM_HEADER,
    LONGFORM_STREAMED,
    LUA_FILTER,
    MODEL_HEADER,
    ROUTE_CONFIG_NAME,
    STREAMED_BUFFER_BYTES,
    UNROUTED_CLUSTER,
    VIRTUAL_HOST_NAME,
    cluster_name,
)
from control_plane.config import GatewayConfig
from control_plane.fleet.resolved import Fleet
from control_plane.openai_errors import openai_error
from control_plane.tenants.keys import Access
from control_plane.xds.snapshot import MAX_WEIGHT

MAX_DIRECT_RESPONSE_BYTES = 1024 * 1024


def _lua_off() -> dict:
    return {LUA_FILTER: pack(lua_pb2.LuaPerRoute(disabled=True))}


def _answer(match: rc.RouteMatch, status: int, body: str, name: str) -> rc.Route:
    return rc.Route(
        name=name,
        match=match,
        direct_response=rc.DirectResponseAction(status=status, body=base_pb2.DataSource(inline_string=body)),
        response_headers_to_add=[JSON_HEADER],
        typed_per_filter_config=_lua_off(),
    )


def _model_object(name: str, root: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "whisper-gateway", "root": root}


def _model_routes(config: GatewayConfig, fleet: Fleet) -> list[rc.Route]:
    routes = []
    long_upload = rc.HeaderMatcher(name=LONG_UPLOAD_HEADER, present_match=True)
    for name, model in sorted(fleet.name_to_model().items()):
        for path in AUDIO_PATHS:
            tracing = build_route_tracing(config, path)  # None: tracing is off
            named = rc.HeaderMatcher(name=MODEL_HEADER, string_match=string_pb2.StringMatcher(exact=name))
            route_name = f"{model}:{name}:{path.rsplit('/', 1)[-1]}"
            action = rc.RouteAction(cluster=cluster_name(model), timeout=seconds(config.timeouts.route_s),
                                    retry_policy=_retry_policy(config))
            if config.routing.long_upload_bytes:
                # Same cluster, only the endpoints marked for long uploads (all when none is).
                long_action = rc.RouteAction()
                long_action.CopyFrom(action)
                long_action.metadata_match.CopyFrom(long_upload_metadata())
                routes.append(rc.Route(name=route_name + ":long", route=long_action, tracing=tracing,
                                       match=rc.RouteMatch(path=path, headers=[named, long_upload])))
            routes.append(rc.Route(name=route_name, match=rc.RouteMatch(path=path, headers=[named]), route=action,
                                   tracing=tracing))
    return routes


def _longform_routes(config: GatewayConfig) -> list[rc.Route]:
    """A recording the Lua filter sends to the longform workers (longform.split_above_s): another
    worker when one cannot be reached, never a second try once one has it (its pieces are retried)."""
    if not config.longform.enabled:
        return []
    retry = rc.RetryPolicy(retry_on="connect-failure,refused-stream,reset-before-request",
                           num_retries=wrappers_pb2.UInt32Value(value=2))
    # A recording answers nothing until its pieces are joined: the idle timeout is its whole time.
    action = rc.RouteAction(cluster=LONGFORM_CLUSTER, timeout=seconds(config.longform.timeout_s),
                            idle_timeout=seconds(config.longform.timeout_s), retry_policy=retry)
    # An upload too large to buffer streams through (envoy/longform.lua): Envoy holds at most this
    # much of it (and gives up replaying it to another worker once it has sent more).
    streamed = rc.HeaderMatcher(name=LONGFORM_HEADER,
                                string_match=string_pb2.StringMatcher(exact=LONGFORM_STREAMED))
    marked = rc.HeaderMatcher(name=LONGFORM_HEADER, present_match=True)
    return [route for path in AUDIO_PATHS for route in (
        rc.Route(name=f"longform-streamed:{path.rsplit('/', 1)[-1]}", match=rc.RouteMatch(path=path, headers=[streamed]),
                 route=action, request_body_buffer_limit=wrappers_pb2.UInt64Value(value=STREAMED_BUFFER_BYTES),
                 tracing=build_route_tracing(config, path)),
        rc.Route(name=f"longform:{path.rsplit('/', 1)[-1]}", match=rc.RouteMatch(path=path, headers=[marked]),
                 route=action, tracing=build_route_tracing(config, path)))]


def _retry_policy(config: GatewayConfig) -> rc.RetryPolicy | None:
    """Another engine on connect failure, reset before the request went out, or 503 (queue full).

    Each retry replays the buffered body (the virtual host's buffer limit holds the largest
    upload), and never goes to an engine this request already tried. Envoy's router keeps its
    own copy of every body it might replay (bench/datapath: about 0.2 ms of CPU per 1 MB), so
    `retries: 0` without a per-try idle timeout sets no policy at all.
    """
    idle = config.resilience.per_try_idle_s
    if config.resilience.retries == 0 and not idle:
        return None
    retry_on = "connect-failure,refused-stream,reset-before-request,retriable-status-codes"
    if config.resilience.retry_after_reset:
        retry_on += ",reset"
    return rc.RetryPolicy(
        per_try_idle_timeout=seconds(idle) if idle else None,
        retry_on=retry_on,
        retriable_status_codes=[503],
        num_retries=wrappers_pb2.UInt32Value(value=config.resilience.retries),
        retry_host_predicate=[rc.RetryPolicy.RetryHostPredicate(
            name="envoy.retry_host_predicates.previous_hosts",
            typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()))],
        # Weighted picks follow a schedule: with weights 128 and 1, the light engine comes up once in
        # 129 picks, and a retry must be able to reach it when the heavy one just failed.
        host_selection_retry_max_attempts=MAX_WEIGHT + 1,
    )


def _listing_routes(fleet: Fleet) -> list[rc.Route]:
    objects = [_model_object(name, model) for name, model in sorted(fleet.name_to_model().items())]
    routes = [_answer(rc.RouteMatch(path="/v1/models"), 200, json.dumps({"object": "list", "data": objects}), "models")]
    for obj in objects:
        routes.append(_answer(rc.RouteMatch(path=f"/v1/models/{obj['id']}"), 200, json.dumps(obj), f"model:{obj['id']}"))
    # Envoy's health checks of engines carry the hop header (builders/clusters.py): a backend that
    # is a whisper-gateway (a loop, or two gateways pointing at each other) answers them 508 here,
    # so it is marked unhealthy and gets no traffic, rather than answering half its model's requests 508.
    loop = openai_error("Loop detected: this health check already passed through a whisper-gateway.", "LoopDetected",
                        None, 508)
    routes.append(_answer(rc.RouteMatch(path="/health", headers=[rc.HeaderMatcher(name=HOP_HEADER, present_match=True)]),
                          508, json.dumps(loop), "health:loop"))
    # Otherwise 200; the drain-aware check for load balancers is on the metrics port (bootstrap).
    routes.append(_answer(rc.RouteMatch(path="/health"), 200, json.dumps({"status": "ok"}), "health"))
    return routes


def _fallback_routes(config: GatewayConfig) -> list[rc.Route]:
    # Requests match these before the Lua filter sets the model header. They must be real
    # route actions: Envoy applies the virtual host's body limit only to those, and answers
    # "payload too large" at 1 MiB otherwise. The filter answers every request itself or sets
    # the header, so the empty cluster is only a safe end for what might slip past it.
    routes = [
        rc.Route(name=f"unrouted:{path}", match=rc.RouteMatch(path=path),
                 route=rc.RouteAction(cluster=UNROUTED_CLUSTER), tracing=build_route_tracing(config, path))
        for path in AUDIO_PATHS
    ]
    # A plain message: Envoy's local reply mapper gives every error it answers OpenAI's shape.
    unknown_path = ("Unknown path. This gateway serves POST /v1/audio/transcriptions, POST /v1/audio/translations "
                    "and GET /v1/models.")
    routes.append(_answer(rc.RouteMatch(prefix="/"), 404, unknown_path, "unknown-path"))
    return routes


def hedging(config: GatewayConfig, fleet: Fleet | None) -> dict:
    """The per-try deadline the Lua filter sets: by the model's measured speed (ms per
    audio-second, decide/hedging.py) with a floor, else base ms + ms per MiB; all 0: none.

    A per-try timeout without a retry (or with retries that never follow a reset) would fail
    the request instead of asking another engine, so it is set only where it can hedge.
    """
    r = config.resilience
    if not (r.retries and r.retry_after_reset) or not (r.hedge_after_s or r.hedge_per_mb_s):
        return {"per_try_base_ms": 0, "per_try_ms_per_mb": 0, "per_try_ms_per_audio_s": {}, "per_try_floor_ms": 0}
    return {"per_try_base_ms": int(r.hedge_after_s * 1000), "per_try_ms_per_mb": int(r.hedge_per_mb_s * 1000),
            "per_try_ms_per_audio_s": dict(fleet.hedge_ms) if fleet is not None else {},
            "per_try_floor_ms": int(r.hedge_floor_s * 1000)}


def longform_parallel(config: GatewayConfig, fleet: Fleet) -> dict[str, int]:
    """Each model's pieces of one recording that may be at its engines at once: as decided
    (decide/longform.py), else all of its engines' slots."""
    return {model: fleet.longform_parallel.get(model) or config.longform.parallel(len(fleet.backends_for(model)), False, 1)
            for model in fleet.model_names()}


def lua_context(config: GatewayConfig, fleet: Fleet | None, access: Access, envoys: int = 1) -> dict:
    """What the Lua filter reads of the config and fleet (CONTEXT in its source); `envoys`: the
    gateways sharing each key's budget (builders/quotas.py)."""
    return hedging(config, fleet) | {
            "models": fleet.name_to_model() if fleet is not None else {},
            "long_upload_bytes": config.routing.long_upload_bytes,
            "max_audio_seconds": config.limits.max_audio_s,
            "keys_required": access.required,
            # A client address over this many wrong keys per window gets 429 (envoy/api_keys.lua; 0: never).
            "bad_keys_per_address": config.auth.bad_keys_per_address,
            "bad_key_window_s": config.auth.bad_key_window_s,
            "batch_closed": dict(fleet.batch_closed) if fleet is not None else {},
            # With auth.batch_in_flight_per_engine: a batch key's request counts in its model's batch lane.
            "batch_lanes": config.auth.batch_in_flight_per_engine is not None,
            "envoys": envoys,
            # Long recordings (0: never split), and how many of a recording's pieces may be at a
            # model's engines at once (a worker reads it again on each piece's answer).
            "longform_above_s": config.longform.split_above_s if config.longform.enabled else 0,
            # Uploads declaring more than max_upload_bytes stream to a worker, up to max_longform_bytes.
            "max_upload_bytes": config.limits.max_upload_bytes,
            "max_longform_bytes": config.limits.max_longform_bytes,
            "longform_parallel": longform_parallel(config, fleet) if fleet is not None and config.longform.enabled else {},
            # Each plan's limits, for what the filter says on a 429 (builders/quotas.py enforces them).
            "plans": {name: {k: v for k, v in vars(plan).items() if v is not None}
                      for name, plan in config.auth.plans.items()}}


def _engine_authorization(access: Access) -> tuple[list[base_pb2.HeaderValueOption], list[str]]:
    """(headers to add, to remove) so that engines see their own key, or none of the clients'."""
    if access.engine_key is not None:
        return [header("authorization", f"Bearer {access.engine_key}")], []
    return [], ["authorization"] if access.required else []


def build_route_configuration(config: GatewayConfig, fleet: Fleet, lua_source: str, access: Access = Access(),
                              envoys: int = 1) -> route_pb2.RouteConfiguration:
    engine_headers, removed_headers = _engine_authorization(access)
    virtual_host = rc.VirtualHost(
        name=VIRTUAL_HOST_NAME,
        domains=["*"],
        routes=_listing_routes(fleet) + _longform_routes(config) + _model_routes(config, fleet) + _fallback_routes(config),
        # The Lua filter buffers whole bodies; Envoy takes this limit from the route matched
        # before the filter sets the model header, so it must sit on the virtual host.
        request_body_buffer_limit=wrappers_pb2.UInt64Value(value=config.limits.max_upload_bytes),
        typed_per_filter_config={LUA_FILTER: pack(lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(
            inline_string=filter_source(lua_source, lua_context(config, fleet, access, envoys), access))))},
        # Every proxied request carries it; the Lua filter refuses one that arrives with it (a loop).
        request_headers_to_add=[header(HOP_HEADER, "1")] + engine_headers,
        request_headers_to_remove=removed_headers,
        # The per-try deadline (hedging()) starts another try without cutting the first.
        hedge_policy=rc.HedgePolicy(hedge_on_per_try_timeout=True),
    )
    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[virtual_host],
        max_direct_response_body_size_bytes=wrappers_pb2.UInt32Value(value=MAX_DIRECT_RESPONSE_BYTES),
    )
