"""An immutable, versioned set of Envoy resources, checked for consistency before it is served.

Versions are content hashes per type: equal content gives an equal version, also across
control-plane restarts, so a stream sends a type only when that type really changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SEND_ORDER

Resources = dict[str, list[Message]]
MIN_WEIGHT, MAX_WEIGHT = 1, 128


def resource_name(message: Message) -> str:
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    return message.name


def _version(named: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(named[name])
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    versions: dict[str, str]
    resources: dict[str, dict[str, Message]]
    packed: dict[str, dict[str, any_pb2.Any]]

    @classmethod
    def from_resources(cls, resources: Resources) -> "Snapshot":
        versions, by_name, packed = {}, {}, {}
        for type_url in SEND_ORDER:
            messages = {resource_name(m): m for m in resources.get(type_url, [])}
            if len(messages) != len(resources.get(type_url, [])):
                raise ValueError(f"duplicate resource names in {type_url}")
            serialized = {name: m.SerializeToString(deterministic=True) for name, m in messages.items()}
            versions[type_url] = _version(serialized)
            by_name[type_url] = messages
            packed[type_url] = {name: _pack(m) for name, m in messages.items()}
        return cls(versions=versions, resources=by_name, packed=packed)

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
            for locality in assignment.endpoints:
                for endpoint in locality.lb_endpoints:
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
        return errors


def _pack(message: Message) -> any_pb2.Any:
    wrapped = any_pb2.Any()
    wrapped.Pack(message, deterministic=True)
    return wrapped


def _rds_names(listener: listener_pb2.Listener) -> list[str]:
    names = []
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            manager = http_connection_manager_pb2.HttpConnectionManager()
            if network_filter.typed_config.Unpack(manager) and manager.HasField("rds"):
                names.append(manager.rds.route_config_name)
    return names

