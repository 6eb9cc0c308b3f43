"""Traces of the audio listener's requests (observability.tracing): Envoy's OpenTelemetry tracer.

Each traced request is one SERVER span (the listener's HTTP connection manager) and, under it, a
CLIENT span per try at an engine (`spawn_upstream_span`: a retry or a hedge is a span of its own).
Envoy sends W3C `traceparent` with each try, naming that try's span, so an engine that traces
(vLLM with --otlp-traces-endpoint) continues the trace; a client's own traceparent is continued.

The attributes come from what the Lua filter already leaves on every request it routes: its
dynamic metadata (a client cannot forge it; names.py), read by Envoy when the span ends, so tracing
adds no Lua work. Never a header a client sent: no Authorization, no API key's secret.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from control_plane.builders.common import pack, seconds
from control_plane.config import GatewayConfig
from control_plane.names import (BATCH_LANE_KEY, ESTIMATED_KEY, KEY_ID_KEY, LUA_REPLY_KEY, METADATA_NAMESPACE, MODEL_KEY,
                                 OTLP_CLUSTER, REQUESTED_MODEL_KEY, SECONDS_KEY, TRACING_SERVICE_NAME)

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Span attribute -> the Lua filter's dynamic metadata key (names.py) it shows. OpenTelemetry's
# GenAI conventions where they have a name; the gateway's own under `whisper.`.
METADATA_TAGS = {
    "gen_ai.request.model": MODEL_KEY,  # the model as resolved (what the engines serve)
    "whisper.requested_model": REQUESTED_MODEL_KEY,  # the alias the client named, when it named one
    "whisper.key_id": KEY_ID_KEY,  # the API key's id, never its secret
    "whisper.lane": BATCH_LANE_KEY,  # a batch key's lane (batch:<model>); absent: interactive
    "whisper.audio_seconds": SECONDS_KEY,
    "whisper.audio_estimated": ESTIMATED_KEY,  # "1" when the seconds are an estimate from the size
    "whisper.local_reply": LUA_REPLY_KEY,  # the Lua filter's own answer: its OpenAI code (or status)
}
# Why Envoy answered as it did (`via_upstream` when an engine did; else the local reply's reason,
# e.g. `no_healthy_upstream`, `request_payload_too_large`). Envoy tags http.status_code,
# response_flags and error itself.
DETAILS_TAG = "whisper.response_code_details"
OPERATION_TAG = "gen_ai.operation.name"
OPERATIONS = {"/v1/audio/transcriptions": "transcription", "/v1/audio/translations": "translation"}


def tracing_on(config: GatewayConfig) -> bool:
    return config.observability.tracing.otlp_endpoint is not None


def _percent(share: float) -> percent_pb2.Percent:
    return percent_pb2.Percent(value=share * 100)


def _metadata_tag(tag: str, key: str) -> custom_tag_pb2.CustomTag:
    return custom_tag_pb2.CustomTag(tag=tag, metadata=custom_tag_pb2.CustomTag.Metadata(
        kind=metadata_pb2.MetadataKind(request=metadata_pb2.MetadataKind.Request()),
        metadata_key=metadata_pb2.MetadataKey(key=METADATA_NAMESPACE,
                                              path=[metadata_pb2.MetadataKey.PathSegment(key=key)])))


def build_http_tracing(config: GatewayConfig) -> hcm.HttpConnectionManager.Tracing | None:
    """The listener's tracing, or None when observability.tracing.otlp_endpoint is unset."""
    if not tracing_on(config):
        return None
    tracer = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=OTLP_CLUSTER), timeout=seconds(5)),
        service_name=TRACING_SERVICE_NAME)
    tags = [_metadata_tag(tag, key) for tag, key in METADATA_TAGS.items()]
    tags.append(custom_tag_pb2.CustomTag(tag=DETAILS_TAG, value="%RESPONSE_CODE_DETAILS%"))
    return hcm.HttpConnectionManager.Tracing(
        provider=http_tracer_pb2.Tracing.Http(name="envoy.tracers.opentelemetry", typed_config=pack(tracer)),
        random_sampling=_percent(config.observability.tracing.sampling),
        spawn_upstream_span=wrappers_pb2.BoolValue(value=True),  # one CLIENT span per try at an engine, retries and hedges included
        custom_tags=tags)


def build_route_tracing(config: GatewayConfig, path: str) -> rc.Tracing | None:
    """An audio path's routes name their operation. A route's tracing replaces the listener's
    sampling (its random_sampling defaults to 100%), so it carries the same shares."""
    if not tracing_on(config):
        return None
    return rc.Tracing(
        random_sampling=percent_pb2.FractionalPercent(
            numerator=round(config.observability.tracing.sampling * 1_000_000),
            denominator=percent_pb2.FractionalPercent.MILLION),
        custom_tags=[custom_tag_pb2.CustomTag(tag=OPERATION_TAG,
                                              literal=custom_tag_pb2.CustomTag.Literal(value=OPERATIONS[path]))])


def build_collector_cluster(config: GatewayConfig) -> cluster_pb2.Cluster | None:
    """The OTLP/gRPC collector (HTTP/2, plain), by DNS when it is a name; None when tracing is off."""
    endpoint = config.observability.tracing.otlp_endpoint
    if endpoint is None:
        return None
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    protocol = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
    address = address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=int(port)))
    return cluster_pb2.Cluster(
        name=OTLP_CLUSTER,
        type=cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=seconds(config.timeouts.connect_s),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: pack(protocol)},
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=OTLP_CLUSTER, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=address))])]))
