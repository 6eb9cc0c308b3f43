"""Traces through real Envoy into an OTLP/gRPC receiver of the test's own (observability.tracing).

A span per request (SERVER) and one per try at an engine (CLIENT, under it), the attributes a
person debugging a slow transcription needs and no secret, the client's traceparent continued and
each try's passed on to its engine; with tracing off nothing is exported and no traceparent is made.
The control plane traces itself to the same receiver: an admin change with its publish and each
Envoy's ACK as one trace, and each load round.
"""

from __future__ import annotations

import json
import secrets

import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from harness.otlp import Receiver
from harness.processes import Envoy, GatewayStack, free_port, request, start_engine, transcribe, wait_until

pytestmark = pytest.mark.e2e

MODEL = "whisper-large-v3-turbo"
ALIAS = "whisper-1"
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
PLANE = "whisper-gateway-control-plane"  # the control plane's service.name (control_plane/traces.py)
# Engines that answer at once and stay in rotation through a test's 503s.
RESILIENCE = {"health_interval_s": 0.5, "health_timeout_s": 1.0, "unhealthy_threshold": 2, "healthy_threshold": 1,
              "ejection_s": 2, "consecutive_gateway_failures": 1000}


def traceparent() -> tuple[str, str, str]:
    """A client's own W3C traceparent (sampled): (header, trace id, its span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def whole_trace(receiver: Receiver, trace_id: str, tries: int = 1) -> tuple[dict, list[dict]]:
    """The request's SERVER span and its CLIENT spans, once at least `tries` of them have come."""
    def arrived():
        spans = receiver.trace(trace_id)
        server = [s for s in spans if s["kind"] == SERVER]
        clients = [s for s in spans if s["kind"] == CLIENT]
        return (server[0], clients) if len(server) == 1 and len(clients) >= tries else None
    return wait_until(arrived, 20, f"the spans of trace {trace_id} ({tries} tries)")


def form_headers(secret: str | None, parent: str | None = None) -> dict:
    return ({"Authorization": f"Bearer {secret}"} if secret else {}) | ({"traceparent": parent} if parent else {})


def fault(engine_url: str, **changes) -> None:
    answer = request("POST", engine_url + "/_sim/faults", json.dumps(changes).encode(), {"Content-Type": "application/json"})
    assert answer.status == 200, answer.text


def traceparents_seen(engine_url: str) -> list[str | None]:
    return request("GET", engine_url + "/_sim/traceparents").json()


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tracing")
    receiver = Receiver()
    engines = [start_engine(tmp_path, MODEL, name, time_scale=0.0001) for name in ("t1", "t2")]
    stack = GatewayStack(tmp_path, MODEL, [url for _, url in engines], aliases=(ALIAS,), resilience=RESILIENCE,
                         auth={"api_keys": "required", "batch_in_flight_per_engine": 8},
                         observability={"tracing": {"otlp_endpoint": f"127.0.0.1:{receiver.port}", "sampling": 1.0}})
    wait_until(lambda: len(stack.hosts()) == 2 and all(h.get("health_flags") == "healthy"
                                                       for h in stack.hosts().values()), 20, "both engines healthy")
    batch = stack.admin.call("POST", "/keys", {"name": "nightly", "class": "batch"}).json()
    interactive = stack.admin.call("POST", "/keys", {"name": "live"}).json()
    yield stack, receiver, [url for _, url in engines], {"batch": batch, "interactive": interactive}
    stack.stop()
    for process, _ in engines:
        process.stop()
    receiver.stop()


def secrets_in(spans: list[dict], keys: dict) -> list[str]:
    """Attribute values that carry a key's secret or an Authorization header's."""
    found = []
    for span in spans:
        for name, value in {**span["attributes"], **span["resource"]}.items():
            text = f"{name}={value}"
            if "bearer" in text.lower() or any(key["secret"] in text for key in keys.values()):
                found.append(text)
    return found


def test_a_transcription_is_a_server_span_over_its_try_with_what_a_slow_one_is_debugged_by(traced):
    stack, receiver, engine_urls, keys = traced
    key = keys["batch"]
    header, trace_id, client_span = traceparent()
    answer = transcribe(stack.envoy.url, ALIAS, seconds=2.0, headers=form_headers(key["secret"], header))
    assert answer.status == 200, answer.text

    server, clients = whole_trace(receiver, trace_id)
    assert len(clients) == 1
    (upstream,) = clients
    # The client's trace is continued; the try is the request's child.
    assert server["parent_span_id"] == client_span
    assert upstream["parent_span_id"] == server["span_id"]
    assert server["resource"]["service.name"] == "whisper-gateway"
    assert (server["name"], upstream["name"]) == ("ingress", f"router model:{MODEL} egress")
    attributes = server["attributes"]
    assert attributes["gen_ai.operation.name"] == "transcription"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["whisper.requested_model"] == ALIAS
    assert attributes["whisper.key_id"] == key["id"]
    assert attributes["whisper.lane"] == f"batch:{MODEL}"
    assert float(attributes["whisper.audio_seconds"]) == pytest.approx(2.0)
    assert "whisper.audio_estimated" not in attributes  # a WAV's length is read from its header
    assert attributes["http.status_code"] == "200"
    assert attributes["whisper.response_code_details"] == "via_upstream"
    assert "whisper.local_reply" not in attributes
    assert upstream["attributes"]["http.status_code"] == "200"
    assert upstream["attributes"]["gen_ai.request.model"] == MODEL
    # The engine was handed the try's span as its parent, in the same trace.
    sent = f"00-{trace_id}-{upstream['span_id']}-01"
    assert any(sent in traceparents_seen(url) for url in engine_urls)
    assert secrets_in([server, upstream], keys) == []


def test_a_translation_by_an_interactive_key_and_a_sampled_new_trace(traced):
    stack, receiver, engine_urls, keys = traced
    key = keys["interactive"]
    answer = transcribe(stack.envoy.url, MODEL, path="/v1/audio/translations", headers=form_headers(key["secret"]))
    assert answer.status == 200, answer.text
    # Without a client's traceparent, Envoy starts the trace: find it by what the engine was sent.
    seen = wait_until(lambda: [tp for url in engine_urls for tp in traceparents_seen(url) if tp], 10, "a traceparent")
    trace_ids = {tp.split("-")[1] for tp in seen}

    def translation():
        for trace_id in trace_ids:
            for span in receiver.trace(trace_id):
                if span["kind"] == SERVER and span["attributes"].get("gen_ai.operation.name") == "translation":
                    return span
    server = wait_until(translation, 20, "the translation's span")
    assert server["parent_span_id"] == "" and server["attributes"]["whisper.key_id"] == key["id"]
    assert "whisper.lane" not in server["attributes"] and "whisper.requested_model" not in server["attributes"]


def test_a_try_that_failed_and_its_retry_are_two_spans_under_the_request(traced):
    stack, receiver, engine_urls, keys = traced
    failing = engine_urls[1]
    fault(failing, requests="503")
    try:
        sent = []
        for _ in range(12):  # each goes first to either engine: one in two meets the failing one
            header, trace_id, _ = traceparent()
            answer = transcribe(stack.envoy.url, MODEL, headers=form_headers(keys["interactive"]["secret"], header))
            assert answer.status == 200, answer.text
            sent.append(trace_id)
        retried = [t for t in sent if f"-{t}-" in "".join(tp or "" for tp in traceparents_seen(failing))]
        assert retried, "no request tried the failing engine first"
        server, clients = whole_trace(receiver, retried[0], tries=2)
    finally:
        fault(failing, requests="ok")
    assert len(clients) == 2 and {c["parent_span_id"] for c in clients} == {server["span_id"]}
    assert sorted(c["attributes"]["http.status_code"] for c in clients) == ["200", "503"]
    assert server["attributes"]["http.status_code"] == "200"
    # Each try carried its own span to its engine.
    carried = {tp.split("-")[2] for url in engine_urls for tp in traceparents_seen(url) if tp and retried[0] in tp}
    assert carried == {c["span_id"] for c in clients}


def test_refusals_carry_their_code_and_no_span_carries_a_secret(traced):
    stack, receiver, _, keys = traced
    header, trace_id, _ = traceparent()
    wrong = "sk-wg-" + "0" * 40
    answer = transcribe(stack.envoy.url, MODEL, headers=form_headers(wrong, header))
    assert answer.status == 401
    server, clients = whole_trace(receiver, trace_id, tries=0)
    assert clients == []
    assert server["attributes"]["whisper.local_reply"] == "invalid_api_key"
    assert server["attributes"]["http.status_code"] == "401"

    header, trace_id, _ = traceparent()
    answer = transcribe(stack.envoy.url, "no-such-model", headers=form_headers(keys["interactive"]["secret"], header))
    assert answer.status == 404
    server, _ = whole_trace(receiver, trace_id, tries=0)
    assert server["attributes"]["whisper.local_reply"] == "404"
    assert server["attributes"]["gen_ai.operation.name"] == "transcription"

    with receiver.lock:
        spans = list(receiver.spans)
    assert spans and secrets_in(spans, keys | {"wrong": {"secret": wrong}}) == []
    assert not any(name.startswith(("http.request.header", "request_header")) or "authorization" in name.lower()
                   for span in spans for name in span["attributes"])


def plane_spans(receiver: Receiver) -> list[dict]:
    with receiver.lock:
        return [s for s in receiver.spans if s["resource"].get("service.name") == PLANE]


def test_an_admin_change_is_one_trace_of_its_publish_and_each_envoys_ack(traced, tmp_path):
    stack, receiver, _, keys = traced
    second = Envoy(tmp_path, stack.raw, name="envoy-2")
    try:
        second.wait_serving()
        wait_until(lambda: len(stack.admin.status()["envoys"]) == 2, 10, "both Envoys connected")
        # The plane publishes its Envoys' new count in a round; the change comes after both applied that.
        wait_until(lambda: any(s["attributes"].get("whisper.publish") == "envoys" for s in plane_spans(receiver)),
                   20, "the Envoys' count published")
        wait_until(lambda: stack.envoy.config_versions() == second.config_versions(), 10, "both Envoys up to date")
        answer = stack.admin.call("POST", "/keys", {"name": "traced"})
        assert answer.status == 201, answer.text
        key = answer.json()

        def whole_trace_of_the_change():
            roots = [s for s in plane_spans(receiver) if s["name"] == "admin POST /keys"
                     and s["attributes"].get("whisper.admin.resource_id") == key["id"]]
            if len(roots) != 1:
                return None
            spans = receiver.trace(roots[0]["trace_id"])
            acks = [s for s in spans if s["name"] == "xds ACK RDS"]
            if {s["attributes"]["whisper.envoy.node"] for s in acks} != {"envoy", "envoy-2"}:
                return None
            return roots[0], [s for s in spans if s["name"] == "publish"], acks, spans
        root, publishes, acks, spans = wait_until(whole_trace_of_the_change, 20, "the change's trace with both ACKs")
    finally:
        second.stop()
    assert root["parent_span_id"] == "" and root["resource"]["service.name"] == PLANE
    assert {k: root["attributes"][k] for k in ("http.request.method", "http.route", "http.response.status_code",
                                               "whisper.admin.resource", "whisper.admin.action",
                                               "whisper.admin.caller", "whisper.admin.role")} == {
        "http.request.method": "POST", "http.route": "/keys", "http.response.status_code": 201,
        "whisper.admin.resource": "keys", "whisper.admin.action": "keys.create", "whisper.admin.caller": "bootstrap",
        "whisper.admin.role": "admin"}
    (publish,) = publishes
    assert publish["parent_span_id"] == root["span_id"]
    assert publish["attributes"]["whisper.publish"] == "config" and "RDS" in publish["attributes"]["whisper.xds.changed"]
    # One ACK per Envoy, under the publish, of the routes' version it served.
    assert len(acks) == 2 and {a["parent_span_id"] for a in acks} == {publish["span_id"]}
    assert {a["attributes"]["whisper.xds.version"] for a in acks} == {publish["attributes"]["whisper.xds.version.RDS"]}
    assert {s["name"] for s in spans} <= {"admin POST /keys", "publish", *(f"xds ACK {t}" for t in ("CDS", "EDS", "LDS",
                                                                                                  "RDS", "SDS"))}
    # Nothing secret in any of the plane's spans: not the admin token, not a key's secret, not even
    # one pasted into the path for an id.
    assert stack.admin.call("DELETE", f"/keys/{key['secret']}").status == 404
    (refused,) = wait_until(lambda: [s for s in plane_spans(receiver) if s["name"] == "admin DELETE /keys/{id}"], 20,
                            "the refused change's span")
    assert refused["attributes"]["http.response.status_code"] == 404
    assert "whisper.admin.resource_id" not in refused["attributes"]
    every = plane_spans(receiver)
    assert secrets_in(every, keys | {"traced": key, "admin": {"secret": stack.admin.token}}) == []


def test_a_load_round_is_a_span_with_its_scrapes_and_seconds(traced):
    _, receiver, engine_urls, _ = traced
    rounds = wait_until(lambda: [s for s in plane_spans(receiver) if s["name"] == "load round"
                                 and s["attributes"]["whisper.load_round.scrapes"] == len(engine_urls)],
                        20, "a load round's span")
    latest = rounds[-1]
    assert latest["parent_span_id"] == "" and latest["attributes"]["whisper.load_round.scrape_failures"] == 0
    assert 0 < latest["attributes"]["whisper.load_round.duration_s"] < 5


def test_with_tracing_off_nothing_is_exported_and_a_clients_traceparent_passes_unchanged(traced, tmp_path):
    _, receiver, engine_urls, _ = traced
    plain = GatewayStack(tmp_path, MODEL, engine_urls[:1], resilience=RESILIENCE)
    try:
        wait_until(lambda: plain.hosts() and all(h.get("health_flags") == "healthy" for h in plain.hosts().values()),
                   20, "the engine healthy")
        header, trace_id, _ = traceparent()
        answer = transcribe(plain.envoy.url, MODEL, headers=form_headers(None, header))
        assert answer.status == 200, answer.text
        # No span was made: the engine got the client's own traceparent, not a span of Envoy's.
        assert header in traceparents_seen(engine_urls[0])
        # No tracer and no collector cluster exist to export with.
        listeners = request("GET", plain.envoy.admin + "/config_dump?resource=dynamic_listeners").text
        assert "whisper_http" in listeners and '"tracing"' not in listeners
        assert "whisper_otlp" not in request("GET", plain.envoy.admin + "/clusters").text
        assert "tracing.opentelemetry" not in request("GET", plain.envoy.admin + "/stats").text
        assert receiver.trace(trace_id) == []
    finally:
        plain.stop()



def test_with_sampling_0_a_clients_trace_goes_on_to_the_engine_unsampled(traced, tmp_path):
    """The sampling decision is the gateway's: a client's sampled traceparent does not override it."""
    _, receiver, engine_urls, _ = traced
    rare = GatewayStack(tmp_path, MODEL, engine_urls[:1], resilience=RESILIENCE,
                        observability={"tracing": {"otlp_endpoint": f"127.0.0.1:{receiver.port}", "sampling": 0.0}})
    try:
        wait_until(lambda: rare.hosts() and all(h.get("health_flags") == "healthy" for h in rare.hosts().values()),
                   20, "the engine healthy")
        header, trace_id, client_span = traceparent()
        assert transcribe(rare.envoy.url, MODEL, headers=form_headers(None, header)).status == 200
        (sent,) = [tp for tp in traceparents_seen(engine_urls[0]) if tp and trace_id in tp]
        version, trace, span, flags = sent.split("-")
        # The same trace, a span of Envoy's (not recorded), and the engine told not to record its own.
        assert (version, trace, flags) == ("00", trace_id, "00") and span != client_span
    finally:
        rare.stop()
