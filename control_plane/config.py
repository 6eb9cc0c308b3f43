"""The gateway's one YAML file, checked whole before anything starts.

Each section is a dataclass whose fields carry their bounds (control_plane/validation.py checks
them and names the failing key). A typo must stop the process with the key that is wrong, not
become a default silently, so unknown keys are errors too. The admin API checks its fields
with the same types.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass

from control_plane.fleet.addresses import AddressError, is_ip_address, is_loopback, own_port_problem, parse_backend_url
from control_plane.fleet.registry import Entry, Source
from control_plane.validation import ConfigError, check, fail, matching, within
from control_plane.xds.snapshot import MAX_WEIGHT, MIN_WEIGHT

DEFAULT_CONFIG_PATH = Path(__file__).parent / "defaults" / "gateway.yaml"
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")  # use fullmatch
_DNS_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")
SECTION = ConfigDict(extra="forbid")
YAML_OFF = BeforeValidator(lambda v: "off" if v is False else v)  # YAML reads an unquoted `off` as false


def _backend_url(value: Any) -> str:
    try:
        return parse_backend_url(value)[0]
    except AddressError as error:
        fail(str(error))


def _ip_port(value: Any) -> tuple[str, int]:
    host, _, port = str(value).rpartition(":")
    if not is_ip_address(host) or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"expected IP:port, got {value!r}")
    return host, int(port)


Port = Annotated[StrictInt, within(1, 65535)]
Weight = Annotated[StrictInt, within(MIN_WEIGHT, MAX_WEIGHT)]
Count = Annotated[StrictInt, within(1, 1_000_000)]
_positive = AfterValidator(lambda v: v if v > 0 else fail(f"expected a positive number, got {v!r}"))
Positive = Annotated[StrictFloat, _positive]
PositiveInt = Annotated[StrictInt, _positive]
ModelName = Annotated[StrictStr, matching(MODEL_NAME_PATTERN, "{!r} is not a valid model name (1-128 characters: "
                                                               "letters, digits, . _ : / @ + -)")]
BackendUrl = Annotated[Any, AfterValidator(_backend_url)]
Address = Annotated[StrictStr, Field(min_length=1)]
DrainTimeout = Annotated[StrictFloat, within(1, 86400)]
RotationGrace = Annotated[StrictFloat, within(0, 30 * 86400)]


def seconds(low: float, high: float):
    return Annotated[StrictFloat, within(low, high)]


FilePath = Annotated[StrictStr, Field(min_length=1)]


@dataclass(frozen=True, config=SECTION)
class ListenTlsConfig:
    """TLS on the audio listener (and the admin API beyond loopback): PEM files, read by the control
    plane and sent to every Envoy over SDS, so replacing them rotates the certificate live
    (control_plane/certificates.py)."""

    cert_file: FilePath  # the certificate chain, leaf first
    key_file: FilePath  # its private key, unencrypted
    # Client certificates (mTLS), checked against client_ca_file: off, optional (verified when
    # sent) or required.
    client_certificates: Annotated[Literal["off", "optional", "required"], YAML_OFF] = "off"
    client_ca_file: FilePath | None = None


@dataclass(frozen=True, config=SECTION)
class BackendTlsConfig:
    """How the gateway checks `https://` engines: their certificates against ca_file (the system's
    roots when unset), their names by SNI; a client certificate when the engines ask for one."""

    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None


@dataclass(frozen=True, config=SECTION)
class InternalTlsConfig:
    """Mutual TLS between the gateway's own parts (control_plane/internal_pki.py): the xDS port
    (ADS, access logs, RLQS) requires a certificate from this folder's CA, and each stream is bound
    to the identity it names. `whisper-gateway certs` makes the folder: ca.pem (the internal CA),
    control-plane.pem/.key, envoy-<name>.pem/.key; replacing a file rotates it live."""

    dir: FilePath


@dataclass(frozen=True, config=SECTION)
class ListenConfig:
    # Where clients send audio. Loopback unless you mean otherwise: beyond it, auth.api_keys
    # must be required (or auth.open_listener set).
    address: Address = "127.0.0.1"
    port: Port = 8080
    envoy_admin_port: Port = 9901
    # Envoy's Prometheus metrics (only /stats/prometheus), on listen.address.
    envoy_metrics_port: Port = 9902
    xds_address: Address = "127.0.0.1"
    xds_port: Port = 18000
    # The control plane's own HTTP API (status); loopback unless you mean otherwise.
    admin_address: Address = "127.0.0.1"
    admin_port: Port = 18001
    # HTTPS on listen.port (TLS 1.2 and 1.3, HTTP/1.1 and HTTP/2 by ALPN); the admin API uses the
    # same certificate when admin_address is beyond loopback (and admin_plaintext is false),
    # unless internal_tls is set: then it serves the control plane's internal certificate.
    tls: ListenTlsConfig | None = None
    # An admin_address beyond loopback is served over TLS (internal_tls, else listen.tls), so the
    # token never travels in the clear; true keeps it plain HTTP there (a port published only on
    # a private network).
    admin_plaintext: StrictBool = False
    # Every connection to listen.port starts with a PROXY protocol header (v1 or v2) from a load
    # balancer in front (compose's `lb`), which names the client's address; one without is closed.
    proxy_protocol: StrictBool = False

    def own_endpoints(self) -> dict[str, tuple[str, int]]:
        """Every address and port the gateway itself listens on: never a backend (a loop)."""
        return {"listener (listen.port)": (self.address, self.port),
                "Envoy metrics listener": (self.address, self.envoy_metrics_port),
                "Envoy admin": ("127.0.0.1", self.envoy_admin_port),
                "xDS server": (self.xds_address, self.xds_port),
                "admin API": (self.admin_address, self.admin_port)}


@dataclass(frozen=True, config=SECTION)
class TimeoutsConfig:
    # Long audio takes minutes; Envoy's 15 s default would cut it.
    route_s: seconds(1, 86400) = 600.0
    connect_s: seconds(0.01, 60) = 2.0
    stream_idle_s: seconds(1, 86400) = 300.0
    # Whole request (headers and body) received within this: a slow-drip upload ends with 408.
    request_s: seconds(1, 86400) = 300.0
    request_headers_s: seconds(1, 600) = 10.0


@dataclass(frozen=True, config=SECTION)
class LimitsConfig:
    # vLLM's own default upload limit.
    max_upload_mb: Annotated[StrictFloat, within(0.01, 1024)] = 25.0
    max_request_headers_kb: Annotated[StrictInt, within(1, 8192)] = 60
    max_requests_per_model: Count = 1024
    # Buffered uploads are real memory: Envoy stops taking new requests near this heap size.
    max_heap_mb: Annotated[StrictInt, within(64, 1_048_576)] = 2048
    max_connections: Count = 4096
    # The most audio-seconds one upload is counted as: a header claiming more is not trusted
    # (envoy/audio_duration.lua estimates from the size instead, capped here too).
    max_audio_s: Annotated[StrictFloat, within(1, 86400)] = 14400.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass(frozen=True, config=SECTION)
class RoutingConfig:
    """How engine load becomes endpoint weights (see control_plane/decide/policy.py)."""

    load_aware: StrictBool = True
    # Envoy's balancer within a model's cluster. least_request (weight / (own in-flight + 1))
    # combines the weights with this Envoy's instant view; round_robin ignores in-flight counts
    # and is there for comparison (bench/routing), not for production.
    lb_policy: Literal["least_request", "round_robin"] = "least_request"
    scrape_interval_s: seconds(0.05, 60) = 0.25
    scrape_timeout_s: seconds(0.01, 60) = 0.2
    stale_after_s: seconds(0.05, 3600) = 1.0
    hysteresis: seconds(0, 0.9) = 0.2
    # Envoy holds weight-only updates this long to merge them; its 1 s default delays reactions.
    update_merge_window_s: seconds(0, 10) = 0.0
    # Uploads at least this large (0: off) go to the engines that would finish them soonest
    # (control_plane/decide/policy.py). 2 MB is about a minute of 16 kHz WAV or two of MP3.
    long_upload_kb: seconds(0, 10**7) = 2048.0

    @property
    def long_upload_bytes(self) -> int:
        """The Lua filter's threshold; 0: long uploads are not routed apart (also when not load-aware)."""
        return int(self.long_upload_kb * 1024) if self.load_aware else 0


@dataclass(frozen=True, config=SECTION)
class ResilienceConfig:
    """Health checks, outlier detection and retries, tuned for fleets of 1 to 10 engines."""

    health_path: Annotated[StrictStr, matching(re.compile(r"/.*"), "expected a path starting with /, got {!r}")] = "/health"
    # vLLM's /health can take many seconds on a busy engine: a short timeout would eject the busiest.
    health_interval_s: seconds(0.1, 3600) = 3.0
    health_timeout_s: seconds(0.1, 600) = 10.0
    unhealthy_threshold: Annotated[StrictInt, within(1, 100)] = 3
    healthy_threshold: Annotated[StrictInt, within(1, 100)] = 1
    consecutive_gateway_failures: Annotated[StrictInt, within(1, 1000)] = 3
    # Plain 500s eject an engine only when this is set (0: never): a client's odd upload can make
    # vLLM answer 500, and nobody may get healthy engines ejected by sending such uploads.
    consecutive_5xx: Annotated[StrictInt, within(0, 1000)] = 0
    ejection_s: seconds(0.1, 3600) = 5.0
    max_ejection_percent: Annotated[StrictInt, within(0, 100)] = 50
    retries: Annotated[StrictInt, within(0, 10)] = 2
    # Cuts an attempt that sends and receives nothing this long (0: off). Requests already on an
    # engine that hangs otherwise wait out timeouts.route_s; keep it above the longest silent
    # transcription (non-streamed answers come only at the end).
    per_try_idle_s: seconds(0, 86400) = 0.0
    # A transcription has no side effects: a request cut by an engine that died is retried on
    # another (within the retry budget), so an engine crash loses nothing.
    retry_after_reset: StrictBool = True
    # A try that has not answered within its deadline is hedged: another engine is asked too and
    # the first answer wins. This bounds what an engine that hangs costs the requests it holds.
    # Once a model's speed is measured (decide/hedging.py) the deadline is hedge_factor x what its
    # recent tries took per audio-second (90th percentile) x the upload's audio-seconds, at least
    # hedge_floor_s; until then hedge_after_s + hedge_per_mb_s x the upload's MiB (0 and 0: never
    # hedge). Needs retries and retry_after_reset.
    hedge_after_s: seconds(0, 86400) = 30.0
    hedge_per_mb_s: seconds(0, 86400) = 30.0
    hedge_factor: Annotated[StrictFloat, within(1, 100)] = 1.25
    hedge_floor_s: seconds(0.1, 86400) = 2.0


EnvName = Annotated[StrictStr, matching(re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}"),
                                        "expected an environment variable's name, got {!r}")]


PlanName = Annotated[StrictStr, matching(re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
                                         "{!r} is not a valid plan name (1-64 characters: letters, digits, . _ -)")]


@dataclass(frozen=True, config=SECTION)
class PlanConfig:
    """A key's limits, enforced in every Envoy by its quota filters (builders/quotas.py)."""

    requests_per_minute: Annotated[StrictInt, within(1, 10_000_000)]
    # Each upload costs its duration, rounded up to a whole second (envoy/audio_duration.lua).
    audio_seconds_per_minute: Annotated[StrictInt, within(1, 1_000_000_000)]
    audio_seconds_per_day: Annotated[StrictInt, within(1, 4_000_000_000)] | None = None  # Envoy's buckets are 32-bit
    # At most this many of the key's requests at once (counted by the control plane, enforced in
    # every Envoy: builders/quotas.py); null: no limit.
    requests_in_flight: Annotated[StrictInt, within(1, 100_000)] | None = None


@dataclass(frozen=True, config=SECTION)
class AuthConfig:
    """API keys on the audio listener (control_plane/tenants/keys.py, envoy/api_keys.lua)."""

    # required: every audio request needs `Authorization: Bearer <key>` (keys made with
    # `whisper-gateway keys create`); off: anyone who can reach listen.address may send audio.
    api_keys: Annotated[Literal["off", "required"], YAML_OFF] = "off"
    # Lets api_keys: off serve a listen.address beyond loopback; without it that is refused, so
    # nothing is open by accident.
    open_listener: StrictBool = False
    max_keys: Annotated[StrictInt, within(1, 100_000)] = 1000
    # How long a rotated key's previous secret keeps working, unless a rotation says otherwise.
    rotation_grace_s: RotationGrace = 86400.0
    # The environment variable holding the engines' own --api-key (vLLM's): Envoy sends it to
    # them in place of whatever the client sent. Unset: with keys required, the client's key is
    # removed before any engine sees it; with keys off, it reaches the engines as sent.
    engine_api_key_env: EnvName | None = None
    # Named limits a key can have (`whisper-gateway keys create NAME --plan P`); default_plan is
    # the plan of keys made without one (null: those keys have no limits).
    plans: dict[PlanName, PlanConfig] = Field(default_factory=dict)
    default_plan: PlanName | None = None
    # Batch keys get 429 while a model's expected wait for a new 30 s clip is above this (the
    # autoscaling number, docs/operations.md), so interactive ones keep flowing; null: never.
    batch_above_wait_s: seconds(0.05, 3600) | None = None
    # At most this many batch requests per serving engine in flight on each model, all batch keys
    # together; over it, batch requests get 429 (builders/quotas.py); null: no such cap.
    batch_in_flight_per_engine: Annotated[StrictInt, within(1, 1000)] | None = None
    # A client address that sent this many wrong API keys within bad_key_window_s gets 429 for
    # every request without a valid key until the window ends; a valid key still passes (counted
    # by each Envoy worker thread; 0: never).
    bad_keys_per_address: Annotated[StrictInt, within(0, 1_000_000)] = 20
    bad_key_window_s: seconds(1, 3600) = 10.0


@dataclass(frozen=True, config=SECTION)
class MetricsConfig:
    """The control plane's /metrics (scraped without a token)."""

    # Per-key series (requests in flight, metering) carry the key's id as a label only when true.
    key_labels: StrictBool = False


@dataclass(frozen=True, config=SECTION)
class ModelConfig:
    name: ModelName
    aliases: tuple[ModelName, ...] = ()


@dataclass(frozen=True, config=SECTION)
class BackendConfig:
    """A backend as the config file gives it; the registry keeps it as an `Entry`."""

    url: BackendUrl
    models: tuple[StrictStr, ...] = ()
    weight: Weight = 1


@dataclass(frozen=True, config=SECTION, kw_only=True)
class EngineConfig:
    """An engine process that `whisper-gateway up` starts and serves as a backend."""

    kind: str
    port: Port
    model: StrictStr
    name: Address = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", f"{self.kind}-{self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict:
        """The kind's own settings that were given; each becomes a --flag."""
        own = [f.name for f in fields(self) if f.name not in {"kind", "port", "model", "name"}]
        return {name: getattr(self, name) for name in own if getattr(self, name) is not None}


@dataclass(frozen=True, config=SECTION, kw_only=True)
class SimulatedEngine(EngineConfig):
    kind: Literal["simulated"]
    max_num_seqs: PositiveInt | None = None
    speed: Positive | None = None
    time_scale: Positive | None = None
    seconds_per_chunk: Positive | None = None
    seconds_per_request: Positive | None = None
    batch_penalty: Positive | None = None


@dataclass(frozen=True, config=SECTION, kw_only=True)
class WhisperCpuEngine(EngineConfig):
    kind: Literal["whisper_cpu"]
    max_num_seqs: PositiveInt | None = None
    cpu_threads: PositiveInt | None = None


@dataclass(frozen=True, config=SECTION, kw_only=True)
class VllmEngine(EngineConfig):
    """Real vLLM (python -m engines.vllm); cpu adds the settings of vLLM's CPU build for the tiny checkpoint."""

    kind: Literal["vllm"]
    model_path: Address  # a Hugging Face id or a folder
    max_num_seqs: PositiveInt | None = None
    cpu: StrictBool | None = None


AnyEngine = Annotated[Union[SimulatedEngine, WhisperCpuEngine, VllmEngine], Field(discriminator="kind")]


@dataclass(frozen=True, config=SECTION)
class DiscoveryConfig:
    """A DNS name whose A/AAAA records are engines (compose `--scale`, Kubernetes headless services)."""

    name: Annotated[StrictStr, matching(_DNS_NAME, "expected a DNS name, got {!r}")]
    port: Port
    # https: the engines' certificates must carry `name` (it is sent as SNI); see backend_tls.
    scheme: Literal["http", "https"] = "http"
    models: tuple[StrictStr, ...] = ()
    weight: Weight = 1
    interval_s: seconds(0.1, 3600) = 5.0
    nameserver: Annotated[tuple[str, int] | None, BeforeValidator(lambda v: v if v is None else _ip_port(v))] = None


def _host_port(value: Any) -> str:
    host, _, port = str(value).rpartition(":")
    if ":" in host or not (is_ip_address(host) or _DNS_NAME.fullmatch(host)) or not port.isdigit() \
            or not 0 < int(port) < 65536:
        fail(f"expected host:port (an IPv4 address or a name), got {value!r}")
    return f"{host}:{port}"


@dataclass(frozen=True, config=SECTION)
class StateConfig:
    """Where runtime changes (backends, drains, keys) live: the state dir's file for one control
    plane, or etcd for several that share them (control_plane/fleet/shared_state.py)."""

    # etcd members as host:port (names are resolved once, at start); one is enough, all of them
    # ride out a member's loss.
    etcd: tuple[Annotated[Any, AfterValidator(_host_port)], ...] = ()
    # TLS to etcd, with a client certificate (etcd's --client-cert-auth): {ca_file, cert_file, key_file}.
    etcd_tls: BackendTlsConfig | None = None
    # etcd's own user (etcd's auth enabled); its password is read from the environment variable named.
    etcd_user: StrictStr | None = None
    etcd_password_env: EnvName | None = None
    prefix: Annotated[StrictStr, matching(re.compile(r"/[A-Za-z0-9._/-]{0,200}/"),
                                          "expected a key prefix such as /whisper-gateway/, got {!r}")] = "/whisper-gateway/"
    timeout_s: seconds(0.1, 60) = 2.0


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
    # How long a drain may take before the backend is removed anyway.
    drain_timeout_s: DrainTimeout = 300.0

    def all_backends(self) -> list[Entry]:
        """Configured backends plus the engines `up` runs, as the registry keeps them."""
        given = [Entry.create(b.url, b.models, b.weight, Source.CONFIG) for b in self.backends]
        return given + [Entry.create(e.url, (e.model,), 1, Source.CONFIG) for e in self.engines]

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


# --- reading -------------------------------------------------------------------------------

def _cross_checks(config: GatewayConfig) -> None:
    """What one section cannot see: names used twice, models nobody declared, ports and URLs that clash."""
    owner: dict[str, str] = {}
    for i, model in enumerate(config.models):
        names = [(f"models[{i}].name", model.name)] + [(f"models[{i}].aliases[{j}]", a) for j, a in enumerate(model.aliases)]
        for label, value in names:
            if value in owner:
                raise ConfigError(f"{label}: {value!r} is already used by model {owner[value]!r}")
            owner[value] = model.name
    if not config.models:
        raise ConfigError("models: at least one model is required")
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
    routing = config.routing
    if 0 < routing.long_upload_kb < 1:
        raise ConfigError(f"routing.long_upload_kb: {routing.long_upload_kb} is under 1 KB; 0 turns it off")
    if routing.scrape_timeout_s >= routing.scrape_interval_s:
        raise ConfigError(f"routing.scrape_timeout_s: {routing.scrape_timeout_s} must be shorter than "
                          f"scrape_interval_s ({routing.scrape_interval_s})")
    if routing.stale_after_s < routing.scrape_interval_s:
        raise ConfigError(f"routing.stale_after_s: {routing.stale_after_s} must be at least "
                          f"scrape_interval_s ({routing.scrape_interval_s})")
    if config.auth.api_keys == "off" and not config.auth.open_listener and not is_loopback(config.listen.address):
        raise ConfigError(f"auth.api_keys: off while listen.address {config.listen.address} is reachable beyond this "
                          "host: set auth.api_keys: required and make keys (whisper-gateway keys create), bind "
                          "listen.address: 127.0.0.1, or set auth.open_listener: true to serve anyone who reaches it")
    if config.auth.default_plan is not None and config.auth.default_plan not in config.auth.plans:
        raise ConfigError(f"auth.default_plan: {config.auth.default_plan!r} is not a plan under auth.plans "
                          f"(known: {sorted(config.auth.plans)})")
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
    state = config.state
    if state.etcd_tls is not None and (state.etcd_tls.cert_file is None) != (state.etcd_tls.key_file is None):
        raise ConfigError("state.etcd_tls: cert_file and key_file go together")
    if (state.etcd_user is None) != (state.etcd_password_env is None):
        raise ConfigError("state.etcd_user and state.etcd_password_env go together")
    ports = {name: port for name, (_, port) in config.listen.own_endpoints().items()}
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"listen: the ports must all differ, got {ports}")
    urls = [b.url for b in config.all_backends()]
    for i, url in enumerate(urls):
        if url in urls[:i]:
            raise ConfigError(f"backends: {url} is listed twice (engines count as backends)")
        _, host, port = parse_backend_url(url)
        if is_ip_address(host):  # names: checked when resolved
            if problem := own_port_problem(host, port, config.listen.own_endpoints()):
                raise ConfigError(f"backends: {url}: {problem}")


def parse_config(raw: Any) -> GatewayConfig:
    """Builds a config from parsed YAML; raises ConfigError naming the first bad key."""
    if isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if value is not None}  # `listen:` with nothing under it
    config = check(GatewayConfig, raw)
    _cross_checks(config)
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
