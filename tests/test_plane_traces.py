"""The control plane's own traces (control_plane/traces.py), without processes: each Envoy's answer
to a version joins the trace that served it (scripted Envoys, as tests/test_ads_stream.py), and
the plane's exporter writes OTLP that a real OTLP/gRPC receiver (harness/otlp.py) reads."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from control_plane.config.observability import TracingConfig
from control_plane.traces import SERVICE_NAME, OtlpExporter, PlaneTracer, published_versions
from control_plane.xds.cache import AllCallbacks, NoCallbacks, SnapshotCache
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from harness.otlp import Receiver
from harness.processes import free_port, wait_until
from tests.test_ads_stream import BAD_ADDRESS, ScriptedEnvoy, snapshot


def traced_cache() -> tuple[PlaneTracer, InMemorySpanExporter, SnapshotCache]:
    tracer, spans = PlaneTracer(), InMemorySpanExporter()
    tracer.install(SimpleSpanProcessor(spans))
    return tracer, spans, SnapshotCache(AllCallbacks(NoCallbacks(), tracer))


def named(spans: InMemorySpanExporter, prefix: str) -> list:
    return [s for s in spans.get_finished_spans() if s.name.startswith(prefix)]


def test_each_envoys_ack_of_a_version_served_in_a_trace_is_a_span_under_its_publish():
    tracer, spans, cache = traced_cache()
    first = snapshot({})
    with tracer.span("admin POST /keys", root=True):
        with tracer.span("publish", published_versions({}, first.versions)) as publish:
            cache.set_snapshot(first)
    envoys = [ScriptedEnvoy(cache, stream_id=i, node=f"envoy-{i}") for i in (1, 2)]
    for envoy in envoys:
        envoy.subscribe_all()
        envoy.pump(first)
        envoy.pump(first)  # nothing new: no second answer, no second span
    acks = named(spans, "xds ACK")
    context = publish.get_span_context()
    assert {(s.attributes["whisper.envoy.node"], s.name) for s in acks} == {
        (f"envoy-{i}", f"xds ACK {t}") for i in (1, 2) for t in ("CDS", "EDS", "LDS", "RDS")}
    assert all(s.parent.span_id == context.span_id and s.context.trace_id == context.trace_id for s in acks)
    assert all(s.attributes["whisper.xds.version"] == first.versions[{"CDS": CLUSTER, "EDS": ENDPOINT, "LDS": LISTENER,
                                                                      "RDS": ROUTE}[s.attributes["whisper.xds.type"]]]
               for s in acks)
    assert all(s.start_time <= s.end_time for s in acks)  # from the publish to the ACK
    (root,) = named(spans, "admin")
    assert publish.parent.span_id == root.context.span_id and root.parent is None


def test_a_nack_is_a_failed_span_with_envoys_reason_and_versions_served_outside_a_trace_are_not_traced():
    tracer, spans, cache = traced_cache()
    cache.set_snapshot(good := snapshot({}))  # no trace around it: nothing to join
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(good)
    assert spans.get_finished_spans() == ()
    bad = snapshot({"m1": BAD_ADDRESS})
    with tracer.span("load round", root=True):
        with tracer.span("publish") as publish:
            cache.set_snapshot(bad)
    envoy.pump(bad)
    (nack,) = named(spans, "xds NACK")
    assert nack.name == "xds NACK EDS" and nack.parent.span_id == publish.get_span_context().span_id
    assert nack.status.status_code is StatusCode.ERROR and BAD_ADDRESS in nack.status.description
    assert nack.attributes["whisper.envoy.node"] == "envoy-1"
    assert named(spans, "xds ACK") == []  # its first answer alone: the good endpoints it then takes one by one add none


def test_without_an_endpoint_nothing_is_traced():
    tracer = PlaneTracer()
    asyncio.run(tracer.configure(TracingConfig()))
    cache = SnapshotCache(tracer)
    with tracer.span("publish") as span:
        cache.set_snapshot(first := snapshot({}))
    assert not span.is_recording()
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(first)
    assert not tracer._published


def test_the_settings_turn_the_exporter_on_and_off():
    async def run():
        tracer = PlaneTracer()
        await tracer.configure(TracingConfig(otlp_endpoint=f"127.0.0.1:{free_port()}", sampling=1.0))
        with tracer.span("load round") as span:
            on = span.is_recording()
        await tracer.configure(TracingConfig())  # a reload that turns it off: flushed, closed, no-op from then on
        with tracer.span("load round") as span:
            off = not span.is_recording() and not span.get_span_context().is_valid
        await tracer.close()
        return on, off
    assert asyncio.run(run()) == (True, True)


def test_the_exporter_writes_otlp_a_collector_reads_with_every_span_and_its_parent():
    receiver = Receiver()
    try:
        tracer = PlaneTracer()
        tracer.install(SimpleSpanProcessor(OtlpExporter(f"127.0.0.1:{receiver.port}")))
        with tracer.span("admin DELETE /keys/{id}", {"whisper.admin.resource_id": "key-1", "n": 3, "ok": True,
                                                   "share": 0.5, "list": ["a", "b"]}, root=True) as root:
            with tracer.span("publish"):
                pass
        spans = wait_until(lambda: len(receiver.spans) == 2 and receiver.spans, 10, "both spans")
        by_name = {s["name"]: s for s in spans}
        admin, publish = by_name["admin DELETE /keys/{id}"], by_name["publish"]
        assert admin["trace_id"] == publish["trace_id"] == f"{root.get_span_context().trace_id:032x}"
        assert publish["parent_span_id"] == admin["span_id"] and admin["parent_span_id"] == ""
        assert admin["resource"]["service.name"] == SERVICE_NAME
        assert admin["kind"] == 1  # SPAN_KIND_INTERNAL
        attributes = admin["attributes"]
        assert (attributes["whisper.admin.resource_id"], attributes["n"], attributes["ok"], attributes["share"]) == \
            ("key-1", 3, True, 0.5)
    finally:
        receiver.stop()


def test_an_unreachable_collector_fails_the_batch_and_nothing_else():
    from opentelemetry.sdk.trace.export import SpanExportResult

    exporter = OtlpExporter(f"127.0.0.1:{free_port()}", timeout_s=0.5)
    tracer, kept = PlaneTracer(), InMemorySpanExporter()
    tracer.install(SimpleSpanProcessor(kept))
    with tracer.span("load round"):
        pass
    assert exporter.export(kept.get_finished_spans()) is SpanExportResult.FAILURE
    exporter.shutdown()
