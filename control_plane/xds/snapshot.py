"""An immutable, versioned set of Envoy resources, checked for consistency before it is served.

Versions are content hashes per type: equal content gives an equal version, also across
control-plane restarts, so a stream sends a type only when that type really changed. Each
resource has its own hash too, so endpoints and routes (fetched by name) can be sent alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, SEND_ORDER, TLS_MATCH_NAMESPACE

Resources = dict[str, list[Message]]
MIN_WEIGHT, MAX_WEIGHT = 1, 128  # Envoy's endpoint weights (0 is refused): the one definition


def resource_name(message: Message) -> str:
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    return message.name


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _version(hashes: dict[str, str]) -> str:
    return _hash("\0".join(f"{name}={hashes[name]}" for name in sorted(hashes)).encode())


@dataclass(frozen=True)
class Snapshot:
    versions: dict[str, str]
    resources: dict[str, dict[str, Message]]
    packed: dict[str, dict[str, any_pb2.Any]]
    hashes: dict[str, dict[str, str]]

    @classmethod
    def from_resources(cls, resources: Resources) -> "Snapshot":
        snapshot = cls(versions={}, resources={}, packed={}, hashes={})
        for type_url in SEND_ORDER:
            snapshot._set_type(type_url, resources.get(type_url, []))
        return snapshot

    def with_type(self, type_url: str, messages: list[Message]) -> "Snapshot":
        """A copy with one type's resources replaced; the others are shared, not rebuilt."""
        copy = Snapshot(versions=dict(self.versions), resources=dict(self.resources), packed=dict(self.packed),
                        hashes=dict(self.hashes))
        copy._set_type(type_url, messages)
        return copy

    def _set_type(self, type_url: str, messages: list[Message]) -> None:
        by_name = {resource_name(m): m for m in messages}
        if len(by_name) != len(messages):
            raise ValueError(f"duplicate resource names in {type_url}")
        packed = {name: _pack(m) for name, m in by_name.items()}
        hashes = {name: _hash(wrapped.value) for name, wrapped in packed.items()}
        self.versions[type_url] = _version(hashes)
        self.resources[type_url], self.packed[type_url], self.hashes[type_url] = by_name, packed, hashes

    def names(self, type_url: str) -> frozenset[str]:
        return frozenset(self.resources[type_url])

    def select(self, type_url: str, names: Iterable[str] | None) -> list[any_pb2.Any]:
        """All resources of a type (names None: wildcard), or those of the asked names that exist."""
        packed = self.packed[type_url]
        if names is None:
            return [packed[name] for name in sorted(packed)]
        return [packed[name] for name in sorted(set(names)) if name in packed]

    def consistency_errors(self) -> list[str]:
        """What would make Envoy route to nothing or reject an update; empty when servable."""
        errors = []
        clusters = self.resources[CLUSTER]
        for name, cluster in clusters.items():
            if cluster.type == cluster_pb2.Cluster.EDS and name not in self.resources[ENDPOINT]:
                errors.append(f"cluster {name!r} has no ClusterLoadAssignment")
        for name, assignment in self.resources[ENDPOINT].items():
            if name not in clusters:
                errors.append(f"ClusterLoadAssignment {name!r} has no cluster")
            cluster = clusters.get(name)
            secure = cluster is not None and len(cluster.transport_socket_matches) > 0
            for locality in assignment.endpoints:
                for endpoint in locality.lb_endpoints:
                    if TLS_MATCH_NAMESPACE in endpoint.metadata.filter_metadata and not secure:
                        errors.append(f"endpoint {endpoint.endpoint.hostname!r} of {name!r} needs TLS, which its "
                                      "cluster lacks (it would be dialled in plaintext)")
                    weight = endpoint.load_balancing_weight.value
                    if endpoint.HasField("load_balancing_weight") and not MIN_WEIGHT <= weight <= MAX_WEIGHT:
                        errors.append(f"endpoint {endpoint.endpoint.hostname!r} of {name!r} has weight {weight}")
        for route_config in self.resources[ROUTE].values():
            for vhost in route_config.virtual_hosts:
                for route in vhost.routes:
                    if route.HasField("route") and route.route.cluster not in clusters:
                        errors.append(f"route {route.name!r} points at missing cluster {route.route.cluster!r}")
        for listener in self.resources[LISTENER].values():
            for route_name in _rds_names(listener):
                if route_name not in self.resources[ROUTE]:
                    errors.append(f"listener {listener.name!r} needs missing route configuration {route_name!r}")
        sockets = [(f"listener {listener.name!r}", chain.transport_socket)
                   for listener in self.resources[LISTENER].values() for chain in listener.filter_chains]
        sockets += [(f"cluster {cluster.name!r}", match.transport_socket)
                    for cluster in clusters.values() for match in cluster.transport_socket_matches]
        for owner, socket in sockets:
            for secret in _sds_names(socket):
                if secret not in self.resources[SECRET]:
                    errors.append(f"{owner} needs missing secret {secret!r}")  # Envoy would wait for it for ever
        return errors


def _pack(message: Message) -> any_pb2.Any:
    wrapped = any_pb2.Any()
    wrapped.Pack(message, deterministic=True)
    return wrapped


def _sds_names(socket) -> list[str]:
    """The SDS secrets a TLS transport socket names."""
    for kind in (tls_pb2.DownstreamTlsContext, tls_pb2.UpstreamTlsContext):
        context = kind()
        if socket.HasField("typed_config") and socket.typed_config.Unpack(context):
            common = context.common_tls_context
            named = list(common.tls_certificate_sds_secret_configs)
            if common.HasField("validation_context_sds_secret_config"):
                named.append(common.validation_context_sds_secret_config)
            return [config.name for config in named]
    return []


def _rds_names(listener: listener_pb2.Listener) -> list[str]:
    names = []
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            manager = http_connection_manager_pb2.HttpConnectionManager()
            if network_filter.typed_config.Unpack(manager) and manager.HasField("rds"):
                names.append(manager.rds.route_config_name)
    return names

