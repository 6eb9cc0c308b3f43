"""Pure functions from configuration and fleet state to Envoy resources (no I/O here)."""

from __future__ import annotations

from control_plane.builders.clusters import build_cluster, build_longform_cluster, build_unrouted_cluster
from control_plane.builders.endpoints import build_load_assignment
from control_plane.builders.listener import build_listener, build_pieces_listener
from control_plane.builders.routes import build_route_configuration
from control_plane.builders.secrets import build_secrets
from control_plane.builders.tracing import build_collector_cluster
from control_plane.certificates import TlsMaterial
from control_plane.config import GatewayConfig
from control_plane.fleet.resolved import Fleet
from control_plane.tenants.keys import Access
from control_plane.xds.snapshot import Resources
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET


def build_load_assignments(fleet: Fleet) -> list:
    """Endpoints alone: what a weight change rebuilds."""
    return [build_load_assignment(model, fleet) for model in fleet.model_names()]


def build_resources(config: GatewayConfig, fleet: Fleet, lua_source: str, access: Access = Access(),
                    envoys: int = 1, certificates: TlsMaterial | None = None) -> Resources:
    """Everything Envoy needs for this fleet, these keys and these certificates, by type URL.
    Without a CA for https:// engines the clusters have no TLS, and such engines are refused
    before they get here (the snapshot's check would stop them)."""
    models = fleet.model_names()
    engine_tls = certificates is not None and certificates.checks_engines
    collector = build_collector_cluster(config)  # observability.tracing's, while it is set
    longform = config.longform.enabled  # the workers' cluster, and the listener they send pieces to
    return {
        LISTENER: [build_listener(config, lua_source)] + ([build_pieces_listener(config, lua_source)] if longform else []),
        ROUTE: [build_route_configuration(config, fleet, lua_source, access, envoys)],
        CLUSTER: [build_cluster(model, config, engine_tls) for model in models] + [build_unrouted_cluster()] + ([collector] if collector else [])
                   + ([build_longform_cluster(config)] if longform else []),
        ENDPOINT: build_load_assignments(fleet),
        SECRET: build_secrets(certificates),
    }
