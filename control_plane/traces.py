"""The control plane's own traces (observability.tracing): what it does, as OpenTelemetry spans.

An admin change is one trace: its root span `admin <method> <route>` (operator/admin.py), under
it the publish of the snapshot it made (plane/publisher.py), and under the publish a span per
Envoy's ACK, or NACK with Envoy's error, of each type the publish changed (`xds ACK RDS`,
`xds NACK EDS`). The xDS layer knows nothing of traces: it tells its callbacks (xds/cache.py)
which versions it serves, from the publishing task, whose context holds the publish span, and
which version each Envoy ACKed; the versions tie the two. Each load round is a trace of its own,
`load round` (plane/load_loop.py), with its scrapes and what it published.

Spans go by OTLP/gRPC to `observability.tracing.otlp_endpoint`, plain HTTP/2 as Envoy's tracer
sends (builders/tracing.py), as service `whisper-gateway-control-plane`; `sampling` is the
share of these traces kept. Unset: a no-op tracer, nothing is made or sent.

The exporter is the plane's own, on the OpenTelemetry SDK's batching: the maintained one
(opentelemetry-exporter-otlp-proto-grpc) needs opentelemetry-proto's current messages, and
xds-protos installs an older copy of them into the same package path, which wins in a fresh
install whenever it is unpacked last. This one writes the spans by field number, which both
copies share (harness/otlp.py reads either).

Attributes name what changed (its kind and id, the admin token's name and role) and never a
secret: no header, no body, no key's or token's secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from control_plane.config.observability import TracingConfig
from control_plane.xds.cache import NoCallbacks
from control_plane.xds.types import SHORT_NAMES

log = logging.getLogger(__name__)

SERVICE_NAME = "whisper-gateway-control-plane"
SCOPE = "control_plane"
EXPORT_TIMEOUT_S = 5.0  # as Envoy's tracer's gRPC timeout (builders/tracing.py)
EXPORT_EVERY_S = 1.0  # a batch at least this often: an admin change's trace is seen within seconds
PUBLISHES_KEPT = 256  # (type, version) published in a trace, remembered for their ACKs
NACK_MESSAGE_CHARS = 512
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


# -- OTLP/gRPC, written by field number --------------------------------------------------------------


def _field(message, number: int):
    """A message's field by its number (the two copies of the OTLP protos name some differently)."""
    return getattr(message, message.DESCRIPTOR.fields_by_number[number].name)


def _value(target, value) -> None:
    """An attribute's value into an OTLP AnyValue."""
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, Sequence):
        for item in value:
            _value(target.array_value.values.add(), item)
    else:
        target.string_value = str(value)


def _attributes(target, attributes: Mapping | None) -> None:
    for key, value in (attributes or {}).items():
        pair = target.add()
        pair.key = key
        _value(pair.value, value)


def encode(spans: Sequence[ReadableSpan]) -> trace_service_pb2.ExportTraceServiceRequest:
    """The spans as one OTLP export request, by resource and instrumentation scope."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    groups: dict[tuple[int, str], object] = {}
    resources: dict[int, object] = {}
    for span in spans:
        resource_id = id(span.resource)
        if resource_id not in resources:
            resources[resource_id] = request.resource_spans.add()
            _attributes(resources[resource_id].resource.attributes, span.resource.attributes)
        scope = span.instrumentation_scope.name if span.instrumentation_scope else ""
        if (resource_id, scope) not in groups:
            scoped = _field(resources[resource_id], 2).add()  # scope_spans (instrumentation_library_spans)
            _field(scoped, 1).name = scope  # scope (instrumentation_library)
            groups[(resource_id, scope)] = scoped
        out = groups[(resource_id, scope)].spans.add()
        out.trace_id = span.context.trace_id.to_bytes(16, "big")
        out.span_id = span.context.span_id.to_bytes(8, "big")
        if span.parent is not None:
            out.parent_span_id = span.parent.span_id.to_bytes(8, "big")
        out.name = span.name
        out.kind = span.kind.value + 1  # OTLP counts from SPAN_KIND_UNSPECIFIED
        out.start_time_unix_nano, out.end_time_unix_nano = span.start_time or 0, span.end_time or 0
        _attributes(out.attributes, span.attributes)
        for event in span.events:
            added = out.events.add()
            added.time_unix_nano, added.name = event.timestamp, event.name
            _attributes(added.attributes, event.attributes)
        for link in span.links:
            added = out.links.add()
            added.trace_id = link.context.trace_id.to_bytes(16, "big")
            added.span_id = link.context.span_id.to_bytes(8, "big")
            _attributes(added.attributes, link.attributes)
        out.status.code = span.status.status_code.value  # UNSET, OK, ERROR: the same numbers
        if span.status.description:
            out.status.message = span.status.description
    return request


class OtlpExporter(SpanExporter):
    """Sends span batches to an OTLP/gRPC collector (plain HTTP/2); called from the SDK's batching thread."""

    def __init__(self, endpoint: str, timeout_s: float = EXPORT_TIMEOUT_S):
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self._channel = grpc.insecure_channel(endpoint)
        self._export = self._channel.unary_unary(  # TraceService/Export (xds-protos' copy has no _grpc module)
            EXPORT_METHOD, request_serializer=trace_service_pb2.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self._export(encode(spans), timeout=self.timeout_s)
        except grpc.RpcError as error:
            if not self._failing:  # once per outage, not once per batch
                log.warning("traces not exported to %s: %s", self.endpoint, getattr(error, "code", lambda: error)())
            self._failing = True
            return SpanExportResult.FAILURE
        if self._failing:
            log.info("traces exported to %s again", self.endpoint)
        self._failing = False
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._channel.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# -- the plane's tracer -----------------------------------------------------------------------------


def annotate(attributes: Mapping) -> None:
    """Adds attributes to the span in progress (none: nothing)."""
    trace.get_current_span().set_attributes(attributes)


def failed(error: BaseException) -> None:
    """Marks the span in progress failed by `error`, which was handled."""
    span = trace.get_current_span()
    span.record_exception(error)
    span.set_status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")


@dataclass
class _Published:
    """A version served within a sampled trace: the span that served it, when, and the Envoys whose answer is traced."""

    parent: trace.SpanContext
    at_ns: int
    answered: set[str] = field(default_factory=set)


class PlaneTracer(NoCallbacks):
    """The plane's tracer, set from observability.tracing (a no-op until then, and while unset),
    and the xDS callbacks (xds/cache.py) that trace each Envoy's answer to a version served in a trace."""

    def __init__(self) -> None:
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.settings: TracingConfig | None = None
        self._provider: TracerProvider | None = None
        self._published: OrderedDict[tuple[str, str], _Published] = OrderedDict()

    # -- set up and shut down

    def install(self, processor: SpanProcessor, sampling: float = 1.0) -> TracerProvider | None:
        """Spans from now on go to `processor`, `sampling` of the traces; the provider replaced (to shut down)."""
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(sampling)), shutdown_on_exit=False,
                                  resource=Resource.create({"service.name": SERVICE_NAME}))
        provider.add_span_processor(processor)
        old, self._provider, self.tracer = self._provider, provider, provider.get_tracer(SCOPE)
        return old

    async def configure(self, settings: TracingConfig) -> None:
        """Traces per `settings` (otlp_endpoint unset: none); the previous exporter flushed and closed."""
        if settings == self.settings:
            return
        self.settings = settings
        if settings.otlp_endpoint is None:
            old, self._provider, self.tracer = self._provider, None, trace.NoOpTracer()
        else:
            old = self.install(BatchSpanProcessor(OtlpExporter(settings.otlp_endpoint),
                                                  schedule_delay_millis=EXPORT_EVERY_S * 1000,
                                                  export_timeout_millis=EXPORT_TIMEOUT_S * 1000), settings.sampling)
            log.info("the control plane's traces go to %s (sampling %g)", settings.otlp_endpoint, settings.sampling)
        self._published.clear()
        if old is not None:
            await asyncio.to_thread(old.shutdown)

    async def close(self) -> None:
        """Exports what is left (at most EXPORT_TIMEOUT_S), then traces nothing more."""
        provider, self._provider, self.tracer, self.settings = self._provider, None, trace.NoOpTracer(), None
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)

    # -- spans

    @contextmanager
    def span(self, name: str, attributes: Mapping | None = None, root: bool = False) -> Iterator[trace.Span]:
        """A span around the block, the current one's child (`root`: a trace of its own); an
        exception is recorded on it and goes on."""
        context = trace.set_span_in_context(trace.INVALID_SPAN) if root else None
        with self.tracer.start_as_current_span(name, context=context, attributes=attributes) as span:
            yield span

    # -- the xDS layer's callbacks (xds/cache.py): each Envoy's answer to a version served in a trace

    def on_serve(self, versions: Mapping[str, str]) -> None:
        """The types whose version changed; called by the task that served them, in its trace."""
        parent = trace.get_current_span().get_span_context()
        if not parent.is_valid or not parent.trace_flags.sampled:
            return
        now = time.time_ns()
        for type_url, version in versions.items():
            self._published.pop((type_url, version), None)
            self._published[(type_url, version)] = _Published(parent, now)
        while len(self._published) > PUBLISHES_KEPT:
            self._published.popitem(last=False)

    def on_ack(self, type_url: str, version: str, node: str, push_to_ack_s: float | None) -> None:
        self._answered(type_url, version, node, None)

    def on_nack(self, type_url: str, version: str, node: str, message: str) -> None:
        self._answered(type_url, version, node, message)

    def _answered(self, type_url: str, version: str, node: str, error: str | None) -> None:
        """A span from the publish to an Envoy's first answer to that version, under the publish."""
        published = self._published.get((type_url, version))
        if published is None or node in published.answered:
            return
        published.answered.add(node)
        short = SHORT_NAMES.get(type_url, type_url)
        span = self.tracer.start_span(
            f"xds {'NACK' if error is not None else 'ACK'} {short}",
            context=trace.set_span_in_context(trace.NonRecordingSpan(published.parent)), start_time=published.at_ns,
            attributes={"whisper.envoy.node": node, "whisper.xds.type": short, "whisper.xds.version": version})
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error[:NACK_MESSAGE_CHARS]))
        span.end()


def published_versions(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, str]:
    """A publish span's attributes: the types whose version changed, and each one's new version."""
    changed = {SHORT_NAMES.get(t, t): v for t, v in after.items() if before.get(t) != v}
    return {"whisper.xds.changed": sorted(changed)} | {f"whisper.xds.version.{t}": v for t, v in changed.items()}
