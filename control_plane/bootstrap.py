"""Envoy's bootstrap: the only file Envoy reads; it points Envoy at the control plane."""

from __future__ import annotations

import socket
from pathlib import Path
from string import Template

from control_plane.config import GatewayConfig
from control_plane.internal_pki import CONTROL_PLANE, IDENTITY_PREFIX, ca_path, pair_paths

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
BOOTSTRAP_TEMPLATE = ENVOY_DIR / "bootstrap.yaml"
# The Lua filter's modules, envoy/<name>.lua, in the order read_lua_filter joins them: each reads
# only modules before it, and `main` defines the entry points Envoy calls.
LUA_MODULES = ("openai_errors", "api_keys", "audio_duration", "uploads", "multipart", "models", "metering", "lanes",
               "plans", "routing", "longform", "main")
LUA_FILTER_PATHS = tuple(ENVOY_DIR / f"{name}.lua" for name in LUA_MODULES)


def xds_endpoints(xds_host: str | None, config: GatewayConfig) -> list[tuple[str, int]]:
    """`host[:port],...` (several control planes) -> (host, port) pairs; the port defaults to
    listen.xds_port, the host to where the control plane listens."""
    endpoints = []
    for item in (xds_host or config.listen.xds_address).split(","):
        host, port = item.strip(), ""
        if host.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
            host, port = host.split(":")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        endpoints.append((host, int(port) if port else config.listen.xds_port))
    return endpoints


INTERNAL_SECRET = "internal"  # the Envoy's own certificate, as its SDS file names it


def identity_of(node_id: str) -> str:
    """The certificate an Envoy uses by default: the one named as its node id, up to a first dot
    (replicas `envoy.<hostname>` share `envoy`)."""
    return node_id.split(".", 1)[0]


def sds_file_text(config: GatewayConfig, identity: str) -> str:
    """The file Envoy reads its internal certificate from (SDS from a file): the certificate and
    key of envoy-<identity> in internal_tls.dir, re-read when that folder changes (rotation with
    no restart)."""
    folder = Path(config.internal_tls.dir).resolve()
    cert, key = pair_paths(folder, "envoy", identity)
    return (f"resources:\n"
            f"- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n"
            f"  name: {INTERNAL_SECRET}\n"
            f"  tls_certificate:\n"
            f"    certificate_chain: {{filename: {cert}}}\n"
            f"    private_key: {{filename: {key}}}\n"
            f"    watched_directory: {{path: {folder}}}\n")


def _transport_socket(config: GatewayConfig, sds_path: Path) -> str:
    """mTLS to the control plane: the internal CA checks its certificate's identity; the Envoy's own
    comes from `sds_path` (sds_file_text)."""
    ca = ca_path(Path(config.internal_tls.dir).resolve())
    return f"""    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {CONTROL_PLANE}
        common_tls_context:
          alpn_protocols: [h2]  # the health checks' connections too (envoy/bootstrap.yaml)
          tls_certificate_sds_secret_configs:
          - name: {INTERNAL_SECRET}
            sds_config:
              path_config_source:
                path: {sds_path.resolve()}
                watched_directory: {{path: {sds_path.resolve().parent}}}
              resource_api_version: V3
          validation_context:
            trusted_ca: {{filename: {ca}}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{prefix: "{IDENTITY_PREFIX}{CONTROL_PLANE}/"}}
"""


def write_bootstrap(path: Path, config: GatewayConfig, node_id: str, xds_host: str | None = None,
                    admin_port: int | None = None, identity: str | None = None) -> Path:
    """Envoy's bootstrap at `path`, and with internal_tls the SDS file of its certificate beside it
    (envoy-<identity>, by default the node id's: identity_of)."""
    sds_path = None
    if config.internal_tls is not None:
        sds_path = path.with_name(path.stem + "-internal-sds.yaml")
        sds_path.write_text(sds_file_text(config, identity or identity_of(node_id)))
    path.write_text(render_bootstrap(BOOTSTRAP_TEMPLATE.read_text(), config, node_id, xds_host, admin_port, sds_path))
    return path


def render_bootstrap(template: str, config: GatewayConfig, node_id: str, xds_host: str | None = None,
                     admin_port: int | None = None, sds_path: Path | None = None) -> str:
    """Fills the template; `xds_host` (comma-separated for several control planes) defaults to
    where the control plane listens; `sds_path`: the Envoy's internal certificate (write_bootstrap),
    needed with internal_tls."""
    if config.internal_tls is not None and sds_path is None:
        raise ValueError("internal_tls: the bootstrap needs the Envoy's certificate (write_bootstrap)")
    endpoints = "\n".join(f"        - endpoint:\n            address:\n              socket_address: "
                          f"{{address: {host}, port_value: {port}}}" for host, port in xds_endpoints(xds_host, config))
    return Template(template).substitute(
        node_id=node_id,
        admin_port=admin_port if admin_port is not None else config.listen.envoy_admin_port,
        xds_endpoints=endpoints,
        metrics_address=config.listen.address,
        metrics_port=config.listen.envoy_metrics_port,
        max_heap_bytes=config.limits.max_heap_mb * 1024 * 1024,
        max_connections=config.limits.max_connections,
        xds_transport_socket=_transport_socket(config, sds_path) if sds_path is not None else "",
    )


def default_node_id() -> str:
    return f"envoy-{socket.gethostname()}"


def read_lua_filter(modules: tuple[str, ...] = LUA_MODULES) -> str:
    """The Lua filter as one chunk (Envoy takes one source): each module's file is the body of its
    own function, run once, whose returned table (the module's exports) is a local named after it:
    `local multipart = (function() ... end)()`. A module's locals stay its own (LuaJIT's limits of
    200 locals and 60 upvalues count per function), and a later module reads it only through its
    table. builders/lua_source.py writes NAMES, CONTEXT and KEY_GRANTS ahead of the chunk."""
    return "\n".join(f"local {name} = (function()\n{(ENVOY_DIR / f'{name}.lua').read_text().rstrip()}\nend)()"
                     for name in modules)
