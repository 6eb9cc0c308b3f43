"""The gateway's one YAML file, checked whole before anything starts.

A typo must stop the process with the key that is wrong, not become a default silently, so
unknown keys are errors too.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from control_plane.fleet.addresses import AddressError, own_port_problem, parse_backend_url
from control_plane.xds.snapshot import MAX_WEIGHT

DEFAULT_CONFIG_PATH = Path(__file__).parent / "defaults" / "gateway.yaml"
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")  # use fullmatch
# Options each engine kind takes in the config, with their types (they become --flags).
ENGINE_OPTIONS = {
    "simulated": {"max_num_seqs": int, "speed": float, "time_scale": float, "seconds_per_chunk": float,
                  "seconds_per_request": float, "batch_penalty": float},
    "whisper_cpu": {"max_num_seqs": int, "cpu_threads": int},
    # Real vLLM (python -m engines.vllm): model_path is a Hugging Face id or a folder; cpu adds the
    # settings of vLLM's CPU build for the tiny test checkpoint.
    "vllm": {"model_path": str, "max_num_seqs": int, "cpu": bool},
}
LB_POLICIES = ("least_request", "round_robin")


class ConfigError(ValueError):
    """A config problem, phrased as `key: problem`."""


@dataclass(frozen=True)
class ListenConfig:
    address: str = "0.0.0.0"
    port: int = 8080
    envoy_admin_port: int = 9901
    # Envoy's Prometheus metrics (only /stats/prometheus), on listen.address.
    envoy_metrics_port: int = 9902
    xds_address: str = "127.0.0.1"
    xds_port: int = 18000
    # The control plane's own HTTP API (status); loopback unless you mean otherwise.
    admin_address: str = "127.0.0.1"
    admin_port: int = 18001

    def own_endpoints(self) -> dict[str, tuple[str, int]]:
        """Every address and port the gateway itself listens on: never a backend (a loop)."""
        return {"listener (listen.port)": (self.address, self.port),
                "Envoy metrics listener": (self.address, self.envoy_metrics_port),
                "Envoy admin": ("127.0.0.1", self.envoy_admin_port),
                "xDS server": (self.xds_address, self.xds_port),
                "admin API": (self.admin_address, self.admin_port)}


@dataclass(frozen=True)
class TimeoutsConfig:
    # Long audio takes minutes; Envoy's 15 s default would cut it.
    route_s: float = 600.0
    connect_s: float = 2.0
    stream_idle_s: float = 300.0
    # Whole request (headers and body) received within this: a slow-drip upload ends with 408.
    request_s: float = 300.0
    request_headers_s: float = 10.0


@dataclass(frozen=True)
class LimitsConfig:
    # vLLM's own default upload limit.
    max_upload_mb: float = 25.0
    max_request_headers_kb: int = 60
    max_requests_per_model: int = 1024
    # Buffered uploads are real memory: Envoy stops taking new requests near this heap size.
    max_heap_mb: int = 2048
    max_connections: int = 4096

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass(frozen=True)
class RoutingConfig:
    """How engine load becomes endpoint weights (see control_plane/decide/policy.py)."""

    load_aware: bool = True
    # Envoy's balancer within a model's cluster. least_request (weight / (own in-flight + 1))
    # combines the weights with this Envoy's instant view; round_robin ignores in-flight counts
    # and is there for comparison (bench/routing), not for production.
    lb_policy: str = "least_request"
    scrape_interval_s: float = 0.25
    scrape_timeout_s: float = 0.2
    stale_after_s: float = 1.0
    hysteresis: float = 0.2
    # Envoy holds weight-only updates this long to merge them; its 1 s default delays reactions.
    update_merge_window_s: float = 0.0
    # Uploads at least this large (0: off) go to the engines that would finish them soonest
    # (control_plane/decide/policy.py). 2 MB is about a minute of 16 kHz WAV or two of MP3.
    long_upload_kb: float = 2048.0

    @property
    def long_upload_bytes(self) -> int:
        """The Lua filter's threshold; 0: long uploads are not routed apart (also when not load-aware)."""
        return int(self.long_upload_kb * 1024) if self.load_aware else 0


@dataclass(frozen=True)
class ResilienceConfig:
    """Health checks, outlier detection and retries, tuned for fleets of 1 to 10 engines."""

    health_path: str = "/health"
    # vLLM's /health can take many seconds on a busy engine: a short timeout would eject the busiest.
    health_interval_s: float = 3.0
    health_timeout_s: float = 10.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 1
    consecutive_gateway_failures: int = 3
    # Plain 500s eject an engine only when this is set (0: never): a client's odd upload can make
    # vLLM answer 500, and nobody may get healthy engines ejected by sending such uploads.
    consecutive_5xx: int = 0
    ejection_s: float = 5.0
    max_ejection_percent: int = 50
    retries: int = 2
    # Cuts an attempt that sends and receives nothing this long (0: off). Requests already on an
    # engine that hangs otherwise wait out timeouts.route_s; keep it above the longest silent
    # transcription (non-streamed answers come only at the end).
    per_try_idle_s: float = 0.0
    # A transcription has no side effects: a request cut by an engine that died is retried on
    # another (within the retry budget), so an engine crash loses nothing.
    retry_after_reset: bool = True
    # A try that has not answered within hedge_after_s + hedge_per_mb_s x the upload's MiB is
    # hedged: another engine is asked too and the first answer wins (0 and 0: never). This bounds
    # what an engine that hangs costs the requests it holds. Needs retries and retry_after_reset.
    hedge_after_s: float = 30.0
    hedge_per_mb_s: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendConfig:
    url: str
    models: tuple[str, ...]
    weight: int = 1


@dataclass(frozen=True)
class EngineConfig:
    """An engine process that `whisper-gateway up` starts and serves as a backend."""

    kind: str
    port: int
    model: str
    name: str
    options: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class DiscoveryConfig:
    """A DNS name whose A/AAAA records are engines (compose `--scale`, Kubernetes headless services)."""

    name: str
    port: int
    models: tuple[str, ...]
    weight: int = 1
    interval_s: float = 5.0
    nameserver: tuple[str, int] | None = None  # None: the system resolver


@dataclass(frozen=True)
class GatewayConfig:
    listen: ListenConfig = ListenConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    routing: RoutingConfig = RoutingConfig()
    resilience: ResilienceConfig = ResilienceConfig()
    models: tuple[ModelConfig, ...] = ()
    backends: tuple[BackendConfig, ...] = ()
    engines: tuple[EngineConfig, ...] = ()
    discovery: tuple[DiscoveryConfig, ...] = ()
    # How long a drain may take before the backend is removed anyway.
    drain_timeout_s: float = 300.0

    def all_backends(self) -> tuple[BackendConfig, ...]:
        """Configured backends plus the engines `up` runs."""
        started = tuple(BackendConfig(url=e.url, models=(e.model,)) for e in self.engines)
        return self.backends + started


# --- reading -------------------------------------------------------------------------------

def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, key: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def _reject_unknown(section: dict, allowed: set[str], key: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _number(section: dict, name: str, key: str, default: float, low: float, high: float, integer: bool = False):
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}.{name}: expected {kind}, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{key}.{name}: {value} is out of range {low}..{high}")
    return value


def _port(section: dict, name: str, key: str, default: int) -> int:
    return _number(section, name, key, default, 1, 65535, integer=True)


def _address(section: dict, name: str, key: str, default: str) -> str:
    value = section.get(name, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}.{name}: expected a host name or IP address, got {value!r}")
    return value


def _model_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not MODEL_NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{key}: {value!r} is not a valid model name (1-128 characters: letters, digits, . _ : / @ + -)"
        )
    return value


def _read_listen(raw: Any) -> ListenConfig:
    section = _mapping(raw, "listen")
    _reject_unknown(section, {"address", "port", "envoy_admin_port", "envoy_metrics_port", "xds_address", "xds_port",
                              "admin_address", "admin_port"}, "listen")
    d = ListenConfig()
    listen = ListenConfig(
        address=_address(section, "address", "listen", d.address),
        port=_port(section, "port", "listen", d.port),
        envoy_admin_port=_port(section, "envoy_admin_port", "listen", d.envoy_admin_port),
        envoy_metrics_port=_port(section, "envoy_metrics_port", "listen", d.envoy_metrics_port),
        xds_address=_address(section, "xds_address", "listen", d.xds_address),
        xds_port=_port(section, "xds_port", "listen", d.xds_port),
        admin_address=_address(section, "admin_address", "listen", d.admin_address),
        admin_port=_port(section, "admin_port", "listen", d.admin_port),
    )
    ports = {"port": listen.port, "envoy_admin_port": listen.envoy_admin_port,
             "envoy_metrics_port": listen.envoy_metrics_port, "xds_port": listen.xds_port, "admin_port": listen.admin_port}
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"listen: the ports must all differ, got {ports}")
    return listen


def _read_timeouts(raw: Any) -> TimeoutsConfig:
    section = _mapping(raw, "timeouts")
    d = TimeoutsConfig()
    _reject_unknown(section, set(d.__dataclass_fields__), "timeouts")
    return TimeoutsConfig(
        route_s=_number(section, "route_s", "timeouts", d.route_s, 1, 86400),
        connect_s=_number(section, "connect_s", "timeouts", d.connect_s, 0.01, 60),
        stream_idle_s=_number(section, "stream_idle_s", "timeouts", d.stream_idle_s, 1, 86400),
        request_s=_number(section, "request_s", "timeouts", d.request_s, 1, 86400),
        request_headers_s=_number(section, "request_headers_s", "timeouts", d.request_headers_s, 1, 600),
    )


def _read_limits(raw: Any) -> LimitsConfig:
    section = _mapping(raw, "limits")
    d = LimitsConfig()
    _reject_unknown(section, set(d.__dataclass_fields__), "limits")
    return LimitsConfig(
        max_upload_mb=_number(section, "max_upload_mb", "limits", d.max_upload_mb, 0.01, 1024),
        max_request_headers_kb=_number(section, "max_request_headers_kb", "limits", d.max_request_headers_kb, 1, 8192,
                                       integer=True),
        max_requests_per_model=_number(section, "max_requests_per_model", "limits", d.max_requests_per_model, 1,
                                       1_000_000, integer=True),
        max_heap_mb=_number(section, "max_heap_mb", "limits", d.max_heap_mb, 64, 1_048_576, integer=True),
        max_connections=_number(section, "max_connections", "limits", d.max_connections, 1, 1_000_000, integer=True),
    )


def _read_resilience(raw: Any) -> ResilienceConfig:
    section = _mapping(raw, "resilience")
    d = ResilienceConfig()
    _reject_unknown(section, set(d.__dataclass_fields__), "resilience")
    path = section.get("health_path", d.health_path)
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"resilience.health_path: expected a path starting with /, got {path!r}")
    retry_after_reset = section.get("retry_after_reset", d.retry_after_reset)
    if not isinstance(retry_after_reset, bool):
        raise ConfigError(f"resilience.retry_after_reset: expected true or false, got {retry_after_reset!r}")
    key = "resilience"
    return ResilienceConfig(
        health_path=path,
        health_interval_s=_number(section, "health_interval_s", key, d.health_interval_s, 0.1, 3600),
        health_timeout_s=_number(section, "health_timeout_s", key, d.health_timeout_s, 0.1, 600),
        unhealthy_threshold=_number(section, "unhealthy_threshold", key, d.unhealthy_threshold, 1, 100, integer=True),
        healthy_threshold=_number(section, "healthy_threshold", key, d.healthy_threshold, 1, 100, integer=True),
        consecutive_gateway_failures=_number(section, "consecutive_gateway_failures", key,
                                             d.consecutive_gateway_failures, 1, 1000, integer=True),
        consecutive_5xx=_number(section, "consecutive_5xx", key, d.consecutive_5xx, 0, 1000, integer=True),
        ejection_s=_number(section, "ejection_s", key, d.ejection_s, 0.1, 3600),
        max_ejection_percent=_number(section, "max_ejection_percent", key, d.max_ejection_percent, 0, 100,
                                     integer=True),
        retries=_number(section, "retries", key, d.retries, 0, 10, integer=True),
        per_try_idle_s=_number(section, "per_try_idle_s", key, d.per_try_idle_s, 0, 86400),
        retry_after_reset=retry_after_reset,
        hedge_after_s=_number(section, "hedge_after_s", key, d.hedge_after_s, 0, 86400),
        hedge_per_mb_s=_number(section, "hedge_per_mb_s", key, d.hedge_per_mb_s, 0, 86400),
    )


def _read_routing(raw: Any) -> RoutingConfig:
    section = _mapping(raw, "routing")
    d = RoutingConfig()
    _reject_unknown(section, set(d.__dataclass_fields__), "routing")
    load_aware = section.get("load_aware", d.load_aware)
    if not isinstance(load_aware, bool):
        raise ConfigError(f"routing.load_aware: expected true or false, got {load_aware!r}")
    lb_policy = section.get("lb_policy", d.lb_policy)
    if lb_policy not in LB_POLICIES:
        raise ConfigError(f"routing.lb_policy: expected one of {', '.join(LB_POLICIES)}, got {lb_policy!r}")
    routing = RoutingConfig(
        load_aware=load_aware,
        lb_policy=lb_policy,
        scrape_interval_s=_number(section, "scrape_interval_s", "routing", d.scrape_interval_s, 0.05, 60),
        scrape_timeout_s=_number(section, "scrape_timeout_s", "routing", d.scrape_timeout_s, 0.01, 60),
        stale_after_s=_number(section, "stale_after_s", "routing", d.stale_after_s, 0.05, 3600),
        hysteresis=_number(section, "hysteresis", "routing", d.hysteresis, 0, 0.9),
        update_merge_window_s=_number(section, "update_merge_window_s", "routing", d.update_merge_window_s, 0, 10),
        long_upload_kb=_number(section, "long_upload_kb", "routing", d.long_upload_kb, 0, 10**7),
    )
    if 0 < routing.long_upload_kb < 1:
        raise ConfigError(f"routing.long_upload_kb: {routing.long_upload_kb} is under 1 KB; 0 turns it off")
    if routing.scrape_timeout_s >= routing.scrape_interval_s:
        raise ConfigError(f"routing.scrape_timeout_s: {routing.scrape_timeout_s} must be shorter than "
                          f"scrape_interval_s ({routing.scrape_interval_s})")
    if routing.stale_after_s < routing.scrape_interval_s:
        raise ConfigError(f"routing.stale_after_s: {routing.stale_after_s} must be at least "
                          f"scrape_interval_s ({routing.scrape_interval_s})")
    return routing


def _read_models(raw: Any) -> tuple[ModelConfig, ...]:
    models: list[ModelConfig] = []
    owner: dict[str, str] = {}
    for i, item in enumerate(_list(raw, "models")):
        key = f"models[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        section = _mapping(item, key)
        _reject_unknown(section, {"name", "aliases"}, key)
        if "name" not in section:
            raise ConfigError(f"{key}.name: required")
        name = _model_name(section["name"], f"{key}.name")
        aliases = tuple(
            _model_name(alias, f"{key}.aliases[{j}]") for j, alias in enumerate(_list(section.get("aliases"), f"{key}.aliases"))
        )
        for label, value in [(f"{key}.name", name)] + [(f"{key}.aliases[{j}]", a) for j, a in enumerate(aliases)]:
            if value in owner:
                raise ConfigError(f"{label}: {value!r} is already used by model {owner[value]!r}")
            owner[value] = name
        models.append(ModelConfig(name=name, aliases=aliases))
    return tuple(models)


def validate_backend_url(url: Any, key: str) -> str:
    """http with a host Envoy can dial and an explicit port, nothing else (control_plane/fleet/addresses.py)."""
    try:
        return parse_backend_url(url)[0]
    except AddressError as error:
        raise ConfigError(f"{key}: {error}") from None


def _read_backends(raw: Any, served: set[str]) -> tuple[BackendConfig, ...]:
    backends: list[BackendConfig] = []
    for i, item in enumerate(_list(raw, "backends")):
        key = f"backends[{i}]"
        section = _mapping(item, key)
        _reject_unknown(section, {"url", "models", "weight"}, key)
        if "url" not in section:
            raise ConfigError(f"{key}.url: required")
        url = validate_backend_url(section["url"], f"{key}.url")
        models = _backend_models(section.get("models"), f"{key}.models", served)
        weight = _number(section, "weight", key, 1, 1, MAX_WEIGHT, integer=True)
        backends.append(BackendConfig(url=url, models=models, weight=weight))
    return tuple(backends)


def _backend_models(raw: Any, key: str, served: set[str]) -> tuple[str, ...]:
    names = _list(raw, key)
    if not names:
        raise ConfigError(f"{key}: list the models this backend serves")
    for j, name in enumerate(names):
        if name not in served:
            raise ConfigError(f"{key}[{j}]: {name!r} is not a model name under models (known: {sorted(served)})")
    return tuple(names)


def _read_engines(raw: Any, served: set[str]) -> tuple[EngineConfig, ...]:
    engines: list[EngineConfig] = []
    for i, item in enumerate(_list(raw, "engines")):
        key = f"engines[{i}]"
        section = dict(_mapping(item, key))
        kind = section.pop("kind", None)
        if kind not in ENGINE_OPTIONS:
            raise ConfigError(f"{key}.kind: expected one of {list(ENGINE_OPTIONS)}, got {kind!r}")
        port = _port(section, "port", key, 0) if "port" in section else None
        if port is None:
            raise ConfigError(f"{key}.port: required")
        section.pop("port")
        model = section.pop("model", None)
        if model not in served:
            raise ConfigError(f"{key}.model: {model!r} is not a model name under models (known: {sorted(served)})")
        name = section.pop("name", f"{kind}-{port}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}.name: expected a non-empty string")
        options = _engine_options(kind, section, key)
        engines.append(EngineConfig(kind=kind, port=port, model=model, name=name, options=options))
    ports = [e.port for e in engines]
    for i, port in enumerate(ports):
        if port in ports[:i]:
            raise ConfigError(f"engines[{i}].port: {port} is used by another engine")
    return tuple(engines)


def _engine_options(kind: str, section: dict, key: str) -> dict:
    allowed = ENGINE_OPTIONS[kind]
    _reject_unknown(section, set(allowed) | {"kind", "port", "model", "name"}, key)
    options = {}
    for name, value in section.items():
        wanted = allowed[name]
        if wanted is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{key}.{name}: expected true or false, got {value!r}")
        elif wanted is str:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{key}.{name}: expected a non-empty string, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{key}.{name}: expected a positive number, got {value!r}")
        elif wanted is int and not isinstance(value, int):
            raise ConfigError(f"{key}.{name}: expected an integer, got {value!r}")
        options[name] = value
    if kind == "vllm" and "model_path" not in options:
        raise ConfigError(f"{key}.model_path: required (a Hugging Face id or a folder)")
    return options


def _read_discovery(raw: Any, served: set[str]) -> tuple[DiscoveryConfig, ...]:
    found = []
    for i, item in enumerate(_list(raw, "discovery")):
        key = f"discovery[{i}]"
        section = _mapping(item, key)
        _reject_unknown(section, {"name", "port", "models", "weight", "interval_s", "nameserver"}, key)
        name = section.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", name):
            raise ConfigError(f"{key}.name: expected a DNS name, got {name!r}")
        if "port" not in section:
            raise ConfigError(f"{key}.port: required")
        nameserver = section.get("nameserver")
        if nameserver is not None:
            host, _, port = str(nameserver).rpartition(":")
            if not is_ip_address(host) or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{key}.nameserver: expected IP:port, got {nameserver!r}")
            nameserver = (host, int(port))
        found.append(DiscoveryConfig(
            name=name,
            port=_port(section, "port", key, 0),
            models=_backend_models(section.get("models"), f"{key}.models", served),
            weight=_number(section, "weight", key, 1, 1, MAX_WEIGHT, integer=True),
            interval_s=_number(section, "interval_s", key, 5.0, 0.1, 3600),
            nameserver=nameserver,
        ))
    return tuple(found)


def parse_config(raw: Any) -> GatewayConfig:
    """Builds a config from parsed YAML; raises ConfigError naming the first bad key."""
    top = _mapping(raw, "config")
    _reject_unknown(top, {"listen", "timeouts", "limits", "routing", "resilience", "models", "backends", "engines",
                          "discovery", "drain_timeout_s"}, "")
    models = _read_models(top.get("models"))
    if not models:
        raise ConfigError("models: at least one model is required")
    served = {m.name for m in models}
    config = GatewayConfig(
        listen=_read_listen(top.get("listen")),
        timeouts=_read_timeouts(top.get("timeouts")),
        limits=_read_limits(top.get("limits")),
        routing=_read_routing(top.get("routing")),
        resilience=_read_resilience(top.get("resilience")),
        models=models,
        backends=_read_backends(top.get("backends"), served),
        engines=_read_engines(top.get("engines"), served),
        discovery=_read_discovery(top.get("discovery"), served),
        drain_timeout_s=_number(top, "drain_timeout_s", "config", 300.0, 1, 86400),
    )
    urls = [b.url for b in config.all_backends()]
    for i, url in enumerate(urls):
        if url in urls[:i]:
            raise ConfigError(f"backends: {url} is listed twice (engines count as backends)")
        host = urlsplit(url).hostname
        if is_ip_address(host) and ipaddress.ip_address(host).is_loopback:  # others: checked when resolved
            problem = own_port_problem(host, urlsplit(url).port, config.listen.own_endpoints())
            if problem:
                raise ConfigError(f"backends: {url}: {problem}")
    return config


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


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
