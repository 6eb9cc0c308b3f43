"""One EDS cluster per model, balanced by least request over weighted endpoints."""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from control_plane.builders.common import ads_source, header, pack, seconds
from control_plane.builders.secrets import upstream_transport_socket
from control_plane.names import HOP_HEADER, LONG_UPLOAD_KEY, LONGFORM_CLUSTER, TLS_MATCH_KEY, UNROUTED_CLUSTER, cluster_name
from control_plane.config import GatewayConfig

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _uint(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def _health_check(config: GatewayConfig) -> health_check_pb2.HealthCheck:
    r = config.resilience
    return health_check_pb2.HealthCheck(
        timeout=seconds(r.health_timeout_s),
        interval=seconds(r.health_interval_s),
        # Envoy checks idle clusters only every 60 s by default; engines are often idle.
        no_traffic_interval=seconds(r.health_interval_s),
        unhealthy_threshold=_uint(r.unhealthy_threshold),
        healthy_threshold=_uint(r.healthy_threshold),
        # The hop header: a backend that is a whisper-gateway answers 508 (builders/routes.py), so a loop
        # is taken out of rotation by its health checks; engines ignore it.
        http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(
            path=r.health_path, request_headers_to_add=[header(HOP_HEADER, "1")]),
    )


def _outlier_detection(config: GatewayConfig) -> outlier_detection_pb2.OutlierDetection:
    """Ejects an engine that keeps failing, at most half a small fleet (one of two, five of ten)."""
    r = config.resilience
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=_uint(r.consecutive_5xx or 5),
        # Plain 500s may be the client's doing (an odd upload): they eject only when configured.
        enforcing_consecutive_5xx=_uint(100 if r.consecutive_5xx else 0),
        consecutive_gateway_failure=_uint(r.consecutive_gateway_failures),
        enforcing_consecutive_gateway_failure=_uint(100),
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=_uint(r.consecutive_gateway_failures),
        enforcing_consecutive_local_origin_failure=_uint(100),
        enforcing_success_rate=_uint(0),
        interval=seconds(1),
        base_ejection_time=seconds(r.ejection_s),
        max_ejection_time=seconds(max(60.0, r.ejection_s)),
        max_ejection_percent=_uint(r.max_ejection_percent),
    )


def _circuit_breakers(config: GatewayConfig) -> circuit_breaker_pb2.CircuitBreakers:
    limit = config.limits.max_requests_per_model
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_connections=_uint(limit),
        max_pending_requests=_uint(limit),
        max_requests=_uint(limit),
        # Envoy's default allows 3 retries at once per cluster: far too few when an engine dies.
        retry_budget=circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
            budget_percent=percent_pb2.Percent(value=25.0), min_retry_concurrency=_uint(16)),
    )
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds])


def build_cluster(model: str, config: GatewayConfig, engine_tls: bool = False) -> cluster_pb2.Cluster:
    """`engine_tls`: there is a CA for https:// engines (the snapshot carries it as a secret)."""
    ads = ads_source()
    # vLLM's server speaks HTTP/1.1 only.
    protocol = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        ),
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(idle_timeout=seconds(60)),
    )
    # Long uploads select the endpoints marked for them; anything else, or no marked endpoint,
    # balances over all of them.
    subsets = cluster_pb2.Cluster.LbSubsetConfig(
        fallback_policy=cluster_pb2.Cluster.LbSubsetConfig.ANY_ENDPOINT,
        subset_selectors=[cluster_pb2.Cluster.LbSubsetConfig.LbSubsetSelector(keys=[LONG_UPLOAD_KEY])],
    ) if config.routing.long_upload_bytes else None
    return cluster_pb2.Cluster(
        name=cluster_name(model),
        lb_subset_config=subsets,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads),
        connect_timeout=seconds(config.timeouts.connect_s),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN if config.routing.lb_policy == "round_robin"
        else cluster_pb2.Cluster.LEAST_REQUEST,
        # Envoy's 50% panic default would spray traffic onto unhealthy engines of a small fleet.
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=0.0),
            update_merge_window=seconds(config.routing.update_merge_window_s),
        ),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: pack(protocol)},
        health_checks=[_health_check(config)],
        # Idle connections to an engine that failed its health checks are closed at once.
        close_connections_on_host_health_failure=True,
        # The control plane drains before it removes; a removed engine must not linger until it
        # fails a health check (Envoy's default when health checks are on).
        ignore_health_on_host_removal=True,
        outlier_detection=_outlier_detection(config),
        circuit_breakers=_circuit_breakers(config),
        transport_socket_matches=[_tls_match(config)] if engine_tls else [],
    )


def _tls_match(config: GatewayConfig) -> cluster_pb2.Cluster.TransportSocketMatch:
    """Endpoints marked TLS (https:// engines) get TLS, health checks included; the rest plain HTTP.
    An https:// engine is never dialled in plaintext: its mark travels with its endpoint."""
    marked = struct_pb2.Struct()
    marked.update({TLS_MATCH_KEY: True})
    return cluster_pb2.Cluster.TransportSocketMatch(name="tls", match=marked,
                                                    transport_socket=upstream_transport_socket(config))


def build_unrouted_cluster() -> cluster_pb2.Cluster:
    """Always empty: Envoy answers 503 for anything sent to it."""
    return cluster_pb2.Cluster(
        name=UNROUTED_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=seconds(1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=UNROUTED_CLUSTER),
    )


def build_longform_cluster(config: GatewayConfig) -> cluster_pb2.Cluster:
    """The longform workers (longform.workers), balanced by least request and health-checked, so a
    stopped worker gets no recording."""
    hosts = [endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(pipe=address_pb2.Pipe(path=path)))) for path in config.longform.worker_sockets]
    return cluster_pb2.Cluster(
        name=LONGFORM_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,  # their Unix sockets, in longform.socket_dir
        connect_timeout=seconds(config.timeouts.connect_s),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=LONGFORM_CLUSTER, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=hosts)]),
        health_checks=[health_check_pb2.HealthCheck(
            timeout=seconds(1), interval=seconds(1), no_traffic_interval=seconds(1),
            unhealthy_threshold=_uint(2), healthy_threshold=_uint(1),
            http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(path="/health"))],
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(healthy_panic_threshold=percent_pb2.Percent(value=0.0)),
    )
