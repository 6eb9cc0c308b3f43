"""The whole file: every section, and what the admin API's address follows from them."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator
from pydantic.dataclasses import dataclass

from control_plane.addresses import is_loopback
from control_plane.config.auth import AuthConfig
from control_plane.config.backends import AnyEngine, BackendConfig, DiscoveryConfig, ModelConfig
from control_plane.config.fields import SECTION, DrainTimeout
from control_plane.config.listen import (BackendTlsConfig, InternalTlsConfig, LimitsConfig, ListenConfig, MetricsConfig,
                                         TimeoutsConfig)
from control_plane.config.longform import LongformConfig
from control_plane.config.observability import ObservabilityConfig
from control_plane.config.routing import ResilienceConfig, RoutingConfig
from control_plane.config.state import StateConfig


@dataclass(frozen=True, config=SECTION)
class GatewayConfig:
    listen: ListenConfig = ListenConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    routing: RoutingConfig = RoutingConfig()
    resilience: ResilienceConfig = ResilienceConfig()
    auth: AuthConfig = AuthConfig()
    backend_tls: BackendTlsConfig = BackendTlsConfig()
    models: tuple[Annotated[ModelConfig, BeforeValidator(lambda v: {"name": v} if isinstance(v, str) else v)], ...] = ()
    backends: tuple[BackendConfig, ...] = ()
    engines: tuple[AnyEngine, ...] = ()
    discovery: tuple[DiscoveryConfig, ...] = ()
    state: StateConfig = StateConfig()
    internal_tls: InternalTlsConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    longform: LongformConfig = LongformConfig()
    # How long a drain may take before the backend is removed anyway.
    drain_timeout_s: DrainTimeout = 300.0

    @property
    def admin_tls(self) -> tuple[str, str] | None:
        """The certificate and key files the admin API serves HTTPS with; None: plain HTTP. HTTPS
        beyond loopback (unless listen.admin_plaintext): the control plane's internal certificate
        when internal_tls is set (the CLI trusts the internal CA for it), else listen.tls's."""
        listen = self.listen
        if is_loopback(listen.admin_address) or listen.admin_plaintext:
            return None
        if self.internal_tls is not None:
            from control_plane.internal_pki import CONTROL_PLANE, pair_paths

            cert, key = pair_paths(self.internal_tls.dir, CONTROL_PLANE)
            return str(cert), str(key)
        return (listen.tls.cert_file, listen.tls.key_file) if listen.tls is not None else None

    @property
    def admin_url(self) -> str:
        """Where the admin API answers, as the CLI and the log name it."""
        listen = self.listen
        return f"{'https' if self.admin_tls else 'http'}://{listen.admin_address}:{listen.admin_port}"
