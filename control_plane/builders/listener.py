"""The public listener: HTTP connection manager, the model-routing Lua filter, the router.

It changes only with the config file (address, timeouts, the Lua source), never with the
fleet, so fleet changes do not drain client connections.
"""

from __future__ import annotations

import json

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.listener.proxy_protocol.v3 import proxy_protocol_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as grpc_als_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import wrappers_pb2

from control_plane.builders.common import JSON_HEADER, ads_source, lua_marked, pack, seconds, status_is
from control_plane.builders.local_replies import build_local_reply_config
from control_plane.builders.lua_source import filter_source
from control_plane.builders.quotas import build_quota_filters, limits_in_flight
from control_plane.builders.secrets import downstream_transport_socket
from control_plane.builders.tracing import build_http_tracing
from control_plane.names import (AUDIO_ESTIMATED_HEADER, AUDIO_SECONDS_HEADER, BATCH_LANE_HEADER, CLAIMED_KEY, CUT_SHORT_FLAGS, ENGINE_SECONDS_KEY,
                                 KEY_ID_HEADER, LIMITED_HEADER,
                                 LISTENER_NAME, LONGFORM_HEADER, LUA_FILTER, MODEL_HEADER, UPLOAD_FILTER, MODEL_KEY, PIECE_FILTER,
                                 PIECE_HEADER, PIECES_LISTENER_NAME, REQUEST_LOG_NAME, STREAMED_BUFFER_BYTES, STREAMED_KEY, ROUTE_CONFIG_NAME, UPSTREAM_LOG_NAME,
                                 XDS_CLUSTER)
from control_plane.config import GatewayConfig
from control_plane.openai_errors import openai_error
from control_plane.tenants.keys import Access


# What the control plane reads from each logged try: the model, the upload's audio-seconds and
# the key it was admitted with, as the Lua filter set them (envoy/audio_duration.lua; a client's own are removed first).
# Requests' logs carry them as dynamic metadata.
# A recording sent to a longform worker, and each of its pieces, say so (neither is metered twice).
LOGGED_HEADERS = [MODEL_HEADER, AUDIO_SECONDS_HEADER, AUDIO_ESTIMATED_HEADER, KEY_ID_HEADER, BATCH_LANE_HEADER, LONGFORM_HEADER,
                  PIECE_HEADER]


# How often each Envoy worker sends its log entries: Envoy's 1 s default would delay the evidence.
# With in-flight limits, a slot is free again only once the end of the request that held it is
# at the control plane, so the logs go 10 times as often; routing does not want that (the
# routing bench's p99 against least request went from 0.83-1.01x to 1.13-1.30x with it, the
# control plane's extra work sharing the cores), so only limits get it.
LOG_FLUSH_S, IN_FLIGHT_LOG_FLUSH_S = 0.1, 0.01
# While no control plane takes the logs (one restarting: the bootstrap's xds_cluster marks it
# unhealthy), a worker keeps its entries and sends them once one does, up to LOG_BUFFER_BYTES
# (Envoy's default of 16 KiB held about 15 tries' entries; past it, new entries are dropped).
# Below the control plane's gRPC message limit (4 MiB), as the batch goes as one message.
LOG_BUFFER_BYTES = 1 << 20


def _grpc_log(log_name: str, headers: list[str], flush_s: float, only: accesslog_pb2.AccessLogFilter | None = None,
              response_headers: list[str] = ()) -> accesslog_pb2.AccessLog:
    """An access log streamed to the control plane (control_plane/observe/access_logs.py)."""
    common = grpc_als_pb2.CommonGrpcAccessLogConfig(
        log_name=log_name,
        transport_api_version=config_source_pb2.V3,
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)),
        buffer_flush_interval=seconds(flush_s),  # each message carries every entry since the last
        buffer_size_bytes=wrappers_pb2.UInt32Value(value=LOG_BUFFER_BYTES),
    )
    logged = grpc_als_pb2.HttpGrpcAccessLogConfig(common_config=common, additional_request_headers_to_log=headers,
                                                  additional_response_headers_to_log=response_headers)
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc", filter=only, typed_config=pack(logged))


def _router(flush_s: float) -> router_pb2.Router:
    """The router logs every try at an engine twice: when its stream to the engine starts (the
    ledger of work in flight) and when it ends (its outcome, the work done, and a 2xx's metering:
    a 2xx is what the client gets, so no other try of its request is metered as served)."""
    return router_pb2.Router(
        upstream_log=[_grpc_log(UPSTREAM_LOG_NAME, LOGGED_HEADERS, flush_s)],
        upstream_log_options=router_pb2.Router.UpstreamAccessLogOptions(flush_upstream_log_on_upstream_stream=True))


def _unanswered() -> accesslog_pb2.AccessLogFilter:
    """Requests the Lua filter routed that did not end in a whole 2xx: each is metered as failed
    (or refused) from its request log, whether an engine or Envoy failed it. A 2xx was metered
    from its try's end, so most requests cost one log entry fewer (bench/datapath.py measured
    each entry); only one whose engine measured its audio otherwise is logged, to correct it."""
    comparisons = [status_is(accesslog_pb2.ComparisonFilter.LE, 199, "unanswered"),
                   status_is(accesslog_pb2.ComparisonFilter.GE, 300, "unanswered"),
                   accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter(
                       flags=sorted(CUT_SHORT_FLAGS.values())))]
    not_2xx = accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(filters=comparisons))
    failed = accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(filters=[lua_marked(MODEL_KEY), not_2xx]))
    # And a 2xx whose container lied, or whose engine's own duration differed from the edge's
    # (the Lua filter marks both): a mismatch, and the engine's figure corrects the metering; and a
    # recording streamed to its worker unread, metered by what its answer said.
    return accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(
        filters=[failed, lua_marked(ENGINE_SECONDS_KEY), lua_marked(CLAIMED_KEY), lua_marked(STREAMED_KEY)]))


def upload_admission_context(config: GatewayConfig) -> dict:
    """CONTEXT of the listener's upload-admission filter (envoy/uploads.lua): uploads in flight
    are admitted against upload_budget_bytes (each worker its share), by what they declare x
    the copies Envoy keeps (the body, and the router's own to replay it)."""
    return {"upload_admission": True, "keys_required": config.auth.api_keys == "required",
            "upload_budget_bytes": config.limits.upload_budget_bytes,
            "max_upload_bytes": config.limits.max_upload_bytes,
            "upload_copies": 2 if config.resilience.retries else 1,
            # With longform workers, an upload declaring more than max_upload_bytes streams to one
            # unbuffered (envoy/longform.lua): it holds its route's buffer, and the connection's.
            "streamed_upload_bytes": 2 * STREAMED_BUFFER_BYTES if config.longform.enabled else 0}


def _http_filters(config: GatewayConfig, lua_source: str, access: Access, flush_s: float) -> list[hcm.HttpFilter]:
    """Upload admission, the Lua filter, the quota filters, the router. Upload admission runs in a
    Lua filter of its own, which no route overrides: its count of what uploads hold survives route
    updates (each starts the routes' Lua states afresh). The routes carry the Lua filter's source
    with their models and keys; its default here, with none, answers what no route configures."""
    def lua(context: dict, keys: Access) -> lua_pb2.Lua:
        return lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=filter_source(lua_source, context, keys)))

    default = {"models": {}, "keys_required": access.required, "batch_closed": {}, "plans": {}}
    return [hcm.HttpFilter(name=UPLOAD_FILTER, typed_config=pack(lua(upload_admission_context(config), Access()))),
            hcm.HttpFilter(name=LUA_FILTER, typed_config=pack(lua(default, access)))] + build_quota_filters(config) + [
        hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(_router(flush_s)))]


def build_listener(config: GatewayConfig, lua_source: str) -> listener_pb2.Listener:
    # The routes carry the source with their models and keys (builders/lua_source.py); this one,
    # with none, answers only what no route configures, and refuses it when keys are required.
    # Only what the listener must know: other values here would make reloads that change them
    # rebuild the listener, and with it the quota filters' buckets (builders/quotas.py) and upload
    # admission's count (while old connections drain, both counts hold uploads: up to twice the
    # budget). Upload admission needs limits.max_heap_mb, max_upload_mb and resilience.retries:
    # rarely changed.
    access = Access(required=config.auth.api_keys == "required")
    flush_s = IN_FLIGHT_LOG_FLUSH_S if limits_in_flight(config) else LOG_FLUSH_S
    manager = hcm.HttpConnectionManager(
        stat_prefix="whisper",
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(
            config_source=ads_source(),
            route_config_name=ROUTE_CONFIG_NAME,
        ),
        stream_idle_timeout=seconds(config.timeouts.stream_idle_s),
        request_timeout=seconds(config.timeouts.request_s),
        request_headers_timeout=seconds(config.timeouts.request_headers_s),
        max_request_headers_kb=wrappers_pb2.UInt32Value(value=config.limits.max_request_headers_kb),
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            max_headers_count=wrappers_pb2.UInt32Value(value=100), idle_timeout=seconds(300)),
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        server_name="whisper-gateway",
        local_reply_config=build_local_reply_config(config),
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        # Each request the filter routed and that failed, once, at its end: metering (`/health`,
        # the filter's refusals and 2xx answers are not sent).
        # A 429's x-whisper-limited says which in-flight filter refused it (observe/access_logs.py).
        access_log=[_grpc_log(REQUEST_LOG_NAME, [], flush_s, only=_unanswered(), response_headers=[LIMITED_HEADER])],
        http_filters=_http_filters(config, lua_source, access, flush_s),
        # With observability.tracing.otlp_endpoint: spans to the collector, traceparent to the engines.
        tracing=build_http_tracing(config),
    )
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=config.listen.address, port_value=config.listen.port)
    )
    chain = listener_components_pb2.FilterChain(filters=[_manager_filter(manager)])
    # INBOUND: `whisper-gateway envoy-drain` drains inbound listeners only (the metrics listener,
    # which has none, keeps answering /health with 503 for the load balancer).
    inbound = base_pb2.TrafficDirection.INBOUND
    # Behind a load balancer that speaks PROXY protocol: the client's address, for the per-address
    # limit on wrong keys and the logs, is the one its header names.
    proxy = [listener_components_pb2.ListenerFilter(name="envoy.filters.listener.proxy_protocol",
                                                    typed_config=pack(proxy_protocol_pb2.ProxyProtocol()))
             ] if config.listen.proxy_protocol else []
    if config.listen.tls is None:
        return listener_pb2.Listener(name=LISTENER_NAME, address=address, filter_chains=[chain], traffic_direction=inbound,
                                     listener_filters=proxy)
    # HTTPS: the TLS inspector tells a TLS handshake from plain HTTP, which gets a 400 that says
    # so instead of a dropped connection.
    chain.filter_chain_match.transport_protocol = "tls"
    chain.transport_socket.CopyFrom(downstream_transport_socket(config))
    inspector = listener_components_pb2.ListenerFilter(name="envoy.filters.listener.tls_inspector",
                                                       typed_config=pack(tls_inspector_pb2.TlsInspector()))
    return listener_pb2.Listener(name=LISTENER_NAME, address=address, filter_chains=[chain], traffic_direction=inbound,
                                 listener_filters=proxy + [inspector], default_filter_chain=_plaintext_refusal(config))


def build_pieces_listener(config: GatewayConfig, lua_source: str) -> listener_pb2.Listener:
    """Where the longform workers send a recording's pieces (a Unix socket in longform.socket_dir,
    which only the gateway's user may enter, mode 0600 itself: no one else can send a piece):
    the same routes as the audio listener, so each piece is routed, retried and hedged like any
    request; its first filter marks it a piece (envoy/routing.lua), which the Lua filter neither
    admits nor charges, and the logs count in its engine's load without metering it (its
    recording was metered once). No upload admission or in-flight quotas (the recording passed
    them), and no request log (a failed piece fails its recording, which is logged)."""
    flush_s = IN_FLIGHT_LOG_FLUSH_S if limits_in_flight(config) else LOG_FLUSH_S

    def lua(context: dict) -> lua_pb2.Lua:
        return lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=filter_source(lua_source, context, Access())))

    manager = hcm.HttpConnectionManager(
        stat_prefix="whisper_pieces",
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(config_source=ads_source(), route_config_name=ROUTE_CONFIG_NAME),
        stream_idle_timeout=seconds(config.timeouts.stream_idle_s),
        request_timeout=seconds(config.timeouts.request_s),
        server_name="whisper-gateway",
        local_reply_config=build_local_reply_config(config),
        http_filters=[hcm.HttpFilter(name=PIECE_FILTER, typed_config=pack(lua({"piece_marker": True}))),
                      hcm.HttpFilter(name=LUA_FILTER, typed_config=pack(lua({"models": {}, "batch_closed": {}, "plans": {}}))),
                      hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(_router(flush_s)))],
        tracing=build_http_tracing(config),
    )
    address = address_pb2.Address(pipe=address_pb2.Pipe(path=config.longform.pieces_socket, mode=0o600))
    # OUTBOUND: `whisper-gateway envoy-drain` closes inbound listeners only; a recording still at
    # its worker when a drain starts sends its next pieces here until it is done.
    return listener_pb2.Listener(name=PIECES_LISTENER_NAME, address=address, traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
                                 filter_chains=[listener_components_pb2.FilterChain(filters=[_manager_filter(manager)])])


def _manager_filter(manager: hcm.HttpConnectionManager) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                          typed_config=pack(manager))


PLAINTEXT_REFUSAL = json.dumps(openai_error("This port speaks HTTPS: send the request to https:// instead of http://.",
                                            "invalid_request_error", None, "https_required"), separators=(",", ":"))


def _plaintext_refusal(config: GatewayConfig) -> listener_components_pb2.FilterChain:
    """Plain HTTP on the TLS port: every request gets 400 in OpenAI's shape, and nothing is routed."""
    refuse = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        direct_response=route_components_pb2.DirectResponseAction(
            status=400, body=base_pb2.DataSource(inline_string=PLAINTEXT_REFUSAL)),
        response_headers_to_add=[JSON_HEADER])
    manager = hcm.HttpConnectionManager(
        stat_prefix="whisper_plaintext", codec_type=hcm.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(name="whisper_plaintext", virtual_hosts=[
            route_components_pb2.VirtualHost(name="plaintext", domains=["*"], routes=[refuse])]),
        request_headers_timeout=seconds(config.timeouts.request_headers_s), server_name="whisper-gateway",
        http_filters=[hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))])
    return listener_components_pb2.FilterChain(filters=[_manager_filter(manager)])

