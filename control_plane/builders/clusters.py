"""One EDS cluster per model, balanced by least request over weighted endpoints."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2

from control_plane.builders.common import pack, seconds
from control_plane.builders.names import UNROUTED_CLUSTER, cluster_name
from control_plane.config import GatewayConfig

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def build_cluster(model: str, config: GatewayConfig) -> cluster_pb2.Cluster:
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )
    # vLLM's server speaks HTTP/1.1 only.
    protocol = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        ),
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(idle_timeout=seconds(60)),
    )
    return cluster_pb2.Cluster(
        name=cluster_name(model),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads),
        connect_timeout=seconds(config.timeouts.connect_s),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        # Envoy's 50% panic default would spray traffic onto unhealthy engines of a small fleet.
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=0.0),
            update_merge_window=seconds(config.routing.update_merge_window_s),
        ),
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: pack(protocol)},
    )


def build_unrouted_cluster() -> cluster_pb2.Cluster:
    """Always empty: Envoy answers 503 for anything sent to it."""
    return cluster_pb2.Cluster(
        name=UNROUTED_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=seconds(1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=UNROUTED_CLUSTER),
    )
