"""A model's ClusterLoadAssignment: its engines with their weights and drain state."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import wrappers_pb2

from control_plane.builders.common import long_upload_metadata
from control_plane.names import METADATA_NAMESPACE, TLS_MATCH_KEY, cluster_name
from control_plane.xds.types import TLS_MATCH_NAMESPACE
from control_plane.fleet.resolved import Backend, Fleet


def _metadata(backend: Backend, long_uploads: bool) -> base_pb2.Metadata:
    """The backend's URL travels with its endpoint, so Envoy's config dump names it; the subset
    key marks the engines that take long uploads (routes.py matches it); the TLS mark selects
    the cluster's TLS transport socket for an https:// engine (clusters.py)."""
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[METADATA_NAMESPACE].update({"url": backend.url})
    if long_uploads:
        metadata.MergeFrom(long_upload_metadata())
    if backend.tls:
        metadata.filter_metadata[TLS_MATCH_NAMESPACE].update({TLS_MATCH_KEY: True})
    return metadata


def _lb_endpoint(backend: Backend, weight: int, long_uploads: bool, ejected: bool = False
                 ) -> endpoint_components_pb2.LbEndpoint:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=backend.address, port_value=backend.port)
    )
    status = health_check_pb2.DRAINING if backend.draining else \
        health_check_pb2.UNHEALTHY if ejected else health_check_pb2.UNKNOWN
    # An https:// engine's hostname is the name its certificate must carry: Envoy sends it as SNI.
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=address, hostname=backend.host if backend.tls else backend.id),
        metadata=_metadata(backend, long_uploads),
        health_status=status,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
    )


def build_load_assignment(model: str, fleet: Fleet) -> endpoint_pb2.ClusterLoadAssignment:
    ordered = sorted(fleet.backends_for(model), key=lambda b: (b.address, b.port))
    lb_endpoints = [_lb_endpoint(b, fleet.weight(b, model), (b.id, model) in fleet.long_uploads,
                                 (b.id, model) in fleet.ejected) for b in ordered]
    endpoints = [endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)]
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(model), endpoints=endpoints if ordered else [])

