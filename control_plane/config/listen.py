"""What the gateway serves and how: its listeners and their TLS, timeouts, limits, /metrics."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import StrictBool, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass

from control_plane.config.fields import SECTION, YAML_OFF, Address, Count, FilePath, Port, seconds
from control_plane.validation import within


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


# Of limits.max_heap_mb, what uploads in flight may hold (the rest: Envoy's own memory,
# connections, answers, the Lua filter's copies).
UPLOAD_SHARE = 0.75


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
    # With longform workers: an upload declaring more than max_upload_mb (Content-Length), up to
    # this, streams to a worker's disk instead of being buffered in Envoy (envoy/longform.lua).
    max_longform_mb: Annotated[StrictFloat, within(0.01, 65536)] = 1024.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_longform_bytes(self) -> int:
        return int(self.max_longform_mb * 1024 * 1024)

    @property
    def upload_budget_bytes(self) -> int:
        """What uploads in flight may hold of max_heap_mb, over all of an Envoy's workers
        (envoy/uploads.lua admits each against it); the rest is Envoy's own."""
        return int(self.max_heap_mb * 1024 * 1024 * UPLOAD_SHARE)


@dataclass(frozen=True, config=SECTION)
class MetricsConfig:
    """The control plane's /metrics (scraped without a token)."""

    # Per-key series (requests in flight, metering) carry the key's id as a label only when true.
    key_labels: StrictBool = False
