"""An OpenTelemetry collector's OTLP/gRPC trace receiver, in-process: what Envoy's tracer exports
to in tests/test_tracing.py and bench/datapath.py (opentelemetry-proto's TraceService)."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from harness.processes import free_port


def _value(any_value) -> object:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OpenTelemetry collector's OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self, keep: bool = True) -> None:
        """`keep`: False counts spans without keeping them (bench/datapath.py)."""
        self.keep = keep
        self.count = 0
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    @staticmethod
    def _scopes(resource_spans):
        """Its spans by scope. xds-protos ships an older copy of the OTLP protos into the same
        package path as opentelemetry-proto, and whichever installs last is imported: the older
        names the field `instrumentation_library_spans`, with the same number and wire format."""
        if "scope_spans" in resource_spans.DESCRIPTOR.fields_by_name:
            return resource_spans.scope_spans
        return resource_spans.instrumentation_library_spans

    def Export(self, request, context):  # noqa: N802 - the gRPC method's name
        if not self.keep:
            with self.lock:
                self.count += sum(len(s.spans) for r in request.resource_spans for s in self._scopes(r))
            return trace_service_pb2.ExportTraceServiceResponse()
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in self._scopes(resource_spans):
                for span in scope_spans.spans:
                    received.append({"trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                     "parent_span_id": span.parent_span_id.hex(), "name": span.name, "kind": span.kind,
                                     "attributes": {a.key: _value(a.value) for a in span.attributes},
                                     "resource": resource})
        with self.lock:
            self.spans += received
            self.count += len(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [span for span in self.spans if span["trace_id"] == trace_id]

    def stop(self) -> None:
        self.server.stop(grace=None)
