"""Reading the file: YAML parsed, every section checked, then what one section cannot see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from control_plane.addresses import is_ip_address, is_loopback, own_port_problem, parse_backend_url
from control_plane.config.gateway import GatewayConfig
from control_plane.validation import ConfigError, check, problems

DEFAULT_CONFIG_PATH = Path(__file__).parent.parent / "defaults" / "gateway.yaml"


def _check_models(config: GatewayConfig) -> None:
    """Every model name and alias is used once, and there is at least one model."""
    owner: dict[str, str] = {}
    for i, model in enumerate(config.models):
        names = [(f"models[{i}].name", model.name)] + [(f"models[{i}].aliases[{j}]", a) for j, a in enumerate(model.aliases)]
        for label, value in names:
            if value in owner:
                raise ConfigError(f"{label}: {value!r} is already used by model {owner[value]!r}")
            owner[value] = model.name
    if not config.models:
        raise ConfigError("models: at least one model is required")


def _check_served_models(config: GatewayConfig) -> None:
    """Backends, discovered names and engines serve declared models; engines' ports differ."""
    served = {m.name for m in config.models}
    for section in ("backends", "discovery"):
        for i, item in enumerate(getattr(config, section)):
            if not item.models:
                raise ConfigError(f"{section}[{i}].models: list the models this backend serves")
            for j, name in enumerate(item.models):
                if name not in served:
                    raise ConfigError(f"{section}[{i}].models[{j}]: {name!r} is not a model name under models "
                                      f"(known: {sorted(served)})")
    for i, engine in enumerate(config.engines):
        if engine.model not in served:
            raise ConfigError(f"engines[{i}].model: {engine.model!r} is not a model name under models "
                              f"(known: {sorted(served)})")
        if engine.port in [e.port for e in config.engines[:i]]:
            raise ConfigError(f"engines[{i}].port: {engine.port} is used by another engine")


def _check_routing(config: GatewayConfig) -> None:
    routing = config.routing
    if 0 < routing.long_upload_kb < 1:
        raise ConfigError(f"routing.long_upload_kb: {routing.long_upload_kb} is under 1 KB; 0 turns it off")
    if routing.scrape_timeout_s >= routing.scrape_interval_s:
        raise ConfigError(f"routing.scrape_timeout_s: {routing.scrape_timeout_s} must be shorter than "
                          f"scrape_interval_s ({routing.scrape_interval_s})")
    if routing.stale_after_s < routing.scrape_interval_s:
        raise ConfigError(f"routing.stale_after_s: {routing.stale_after_s} must be at least "
                          f"scrape_interval_s ({routing.scrape_interval_s})")


def _check_auth(config: GatewayConfig) -> None:
    if config.auth.api_keys == "off" and not config.auth.open_listener and not is_loopback(config.listen.address):
        raise ConfigError(f"auth.api_keys: off while listen.address {config.listen.address} is reachable beyond this "
                          "host: set auth.api_keys: required and make keys (whisper-gateway keys create), bind "
                          "listen.address: 127.0.0.1, or set auth.open_listener: true to serve anyone who reaches it")
    if config.auth.default_plan is not None and config.auth.default_plan not in config.auth.plans:
        raise ConfigError(f"auth.default_plan: {config.auth.default_plan!r} is not a plan under auth.plans "
                          f"(known: {sorted(config.auth.plans)})")


def _check_tls(config: GatewayConfig) -> None:
    """TLS settings that go together, and ports beyond loopback that need TLS."""
    tls = config.listen.tls
    if tls is not None and (tls.client_certificates == "off") != (tls.client_ca_file is None):
        raise ConfigError("listen.tls.client_ca_file: give it exactly when client_certificates is optional or required")
    if (config.backend_tls.cert_file is None) != (config.backend_tls.key_file is None):
        raise ConfigError("backend_tls: cert_file and key_file go together (the client certificate engines may ask for)")
    if not is_loopback(config.listen.admin_address) and config.admin_tls is None and not config.listen.admin_plaintext:
        raise ConfigError(f"listen.admin_address {config.listen.admin_address} is reachable beyond this host: set "
                          "internal_tls (the admin API then serves the internal CA's certificate) or listen.tls so "
                          "the admin API is served over HTTPS, bind it to 127.0.0.1, or set "
                          "listen.admin_plaintext: true if only a private network reaches it")
    if not is_loopback(config.listen.xds_address) and config.internal_tls is None:
        raise ConfigError(f"listen.xds_address {config.listen.xds_address} is reachable beyond this host: set "
                          "internal_tls (make its files with `whisper-gateway certs init`) so only Envoys with "
                          "the internal CA's certificates reach xDS, or bind it to 127.0.0.1")


def _check_state(config: GatewayConfig) -> None:
    state = config.state
    if state.etcd_tls is not None and (state.etcd_tls.cert_file is None) != (state.etcd_tls.key_file is None):
        raise ConfigError("state.etcd_tls: cert_file and key_file go together")
    if (state.etcd_user is None) != (state.etcd_password_env is None):
        raise ConfigError("state.etcd_user and state.etcd_password_env go together")


def _check_endpoints(config: GatewayConfig) -> None:
    """The gateway's own ports differ; no backend (engines count) is listed twice or is one of them."""
    ports = {name: port for name, (_, port) in config.listen.own_endpoints().items()}
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"listen: the ports must all differ, got {ports}")
    urls = [b.url for b in config.backends] + [e.url for e in config.engines]
    for i, url in enumerate(urls):
        if url in urls[:i]:
            raise ConfigError(f"backends: {url} is listed twice (engines count as backends)")
        _, host, port = parse_backend_url(url)
        if is_ip_address(host):  # names: checked when resolved
            if problem := own_port_problem(host, port, config.listen.own_endpoints()):
                raise ConfigError(f"backends: {url}: {problem}")


def _check_longform(config: GatewayConfig) -> None:
    """Uploads past max_upload_mb stream to the workers up to max_longform_mb."""
    longform = config.longform
    if not longform.enabled:
        return
    if config.limits.max_longform_mb < config.limits.max_upload_mb:
        raise ConfigError(f"limits.max_longform_mb: {config.limits.max_longform_mb:g} is less than "
                          f"limits.max_upload_mb ({config.limits.max_upload_mb:g}): uploads past max_upload_mb "
                          "stream to the longform workers up to max_longform_mb")


# What one section cannot see: names used twice, models nobody declared, ports and URLs that clash.
CROSS_CHECKS = (_check_models, _check_served_models, _check_routing, _check_auth, _check_tls, _check_state,
                _check_endpoints, _check_longform)


def parse_config(raw: Any) -> GatewayConfig:
    """Builds a config from parsed YAML; raises ConfigError naming the first bad key."""
    if isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if value is not None}  # `listen:` with nothing under it
    config = check(GatewayConfig, raw)
    for check_part in CROSS_CHECKS:
        check_part(config)
    return config


def config_problems(raw: Any) -> list[str]:
    """Everything wrong with a parsed file, for `whisper-gateway check`: every bad key; once the
    sections pass, each failing check across them."""
    if isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if value is not None}
    found = problems(GatewayConfig, raw)
    if found:
        return found
    config = check(GatewayConfig, raw)
    for check_part in CROSS_CHECKS:
        try:
            check_part(config)
        except ConfigError as error:
            found.append(str(error))
    return found


def load_config(path: Path | str | None = None) -> GatewayConfig:
    """Reads and checks the YAML file (the embedded default when no path is given)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    try:
        return parse_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
