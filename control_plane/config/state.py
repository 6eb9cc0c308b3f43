"""Where runtime changes live: the `state:` section."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, StrictInt, StrictStr
from pydantic.dataclasses import dataclass

from control_plane.addresses import is_ip_address
from control_plane.config.fields import DNS_NAME, SECTION, EnvName, seconds
from control_plane.config.listen import BackendTlsConfig
from control_plane.validation import fail, matching, within


def _host_port(value: Any) -> str:
    host, _, port = str(value).rpartition(":")
    if ":" in host or not (is_ip_address(host) or DNS_NAME.fullmatch(host)) or not port.isdigit() \
            or not 0 < int(port) < 65536:
        fail(f"expected host:port (an IPv4 address or a name), got {value!r}")
    return f"{host}:{port}"


@dataclass(frozen=True, config=SECTION)
class StateConfig:
    """Where runtime changes (backends, drains, keys) live: the state dir's file for one control
    plane, or etcd for several that share them (control_plane/fleet/etcd_state.py)."""

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
    # Days of per-key usage kept for billing (GET /usage, `whisper-gateway keys usage`), in the
    # state dir or in etcd beside the shared state.
    usage_days: Annotated[StrictInt, within(1, 3660)] = 400
