"""What the gateway tells an operator beyond its metrics: traces (OpenTelemetry, over OTLP/gRPC)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StrictFloat
from pydantic.dataclasses import dataclass

from control_plane.config.fields import SECTION, HostPort
from control_plane.validation import within


@dataclass(frozen=True, config=SECTION)
class TracingConfig:
    """Traces of the audio listener's requests (builders/tracing.py): Envoy's OpenTelemetry tracer
    sends a span per request and one per try at an engine to an OTLP/gRPC collector, and passes
    W3C `traceparent` on to the engines (vLLM's own spans join when it has --otlp-traces-endpoint).
    The control plane traces its own work to the same collector (control_plane/traces.py): admin
    changes with their publishes and the Envoys' ACKs, and load rounds."""

    # host:port of an OpenTelemetry collector's OTLP/gRPC receiver (usually :4317); unset: no traces.
    otlp_endpoint: HostPort | None = None
    # The share of requests traced (0..1) unless the client's traceparent already decided. Every
    # request by default: turned on to debug, a trace is wanted for the slow request at hand;
    # lower it (0.01) on a busy gateway, where each traced request costs its spans' export.
    sampling: Annotated[StrictFloat, within(0, 1)] = 1.0


@dataclass(frozen=True, config=SECTION)
class ObservabilityConfig:
    tracing: TracingConfig = TracingConfig()
