"""The models the gateway serves and the engines behind them: given as URLs, started by `up`, or
discovered in DNS."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, StrictBool, StrictStr
from pydantic.dataclasses import dataclass

from control_plane.addresses import is_ip_address
from control_plane.config.fields import (DNS_NAME, SECTION, Address, BackendUrl, ModelName, Port, Positive, PositiveInt,
                                         Weight, seconds)
from control_plane.validation import fail, matching


def _ip_port(value: Any) -> tuple[str, int]:
    host, _, port = str(value).rpartition(":")
    if not is_ip_address(host) or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"expected IP:port, got {value!r}")
    return host, int(port)


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

    name: Annotated[StrictStr, matching(DNS_NAME, "expected a DNS name, got {!r}")]
    port: Port
    # https: the engines' certificates must carry `name` (it is sent as SNI); see backend_tls.
    scheme: Literal["http", "https"] = "http"
    models: tuple[StrictStr, ...] = ()
    weight: Weight = 1
    interval_s: seconds(0.1, 3600) = 5.0
    nameserver: Annotated[tuple[str, int] | None, BeforeValidator(lambda v: v if v is None else _ip_port(v))] = None
