"""The pure builders: what Envoy is told, checked on the protobufs themselves."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from control_plane.builders import build_resources
from control_plane.certificates import Authority, TlsMaterial
from control_plane.names import (
    LB_METADATA,
    LONG_UPLOAD_HEADER,
    LONG_UPLOAD_KEY,
    LONGFORM_CLUSTER,
    PIECE_FILTER,
    PIECES_LISTENER_NAME,
    LUA_FILTER,
    MODEL_HEADER,
    ROUTE_CONFIG_NAME,
    UNROUTED_CLUSTER,
)
from control_plane.config import parse_config
from control_plane.fleet.resolved import Backend, Fleet
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

RAW = {
    "models": [{"name": "big", "aliases": ["whisper-1"]}, {"name": "small"}],
    "timeouts": {"route_s": 900},
    "limits": {"max_upload_mb": 10},
    "backends": [],
}


def fleet(*backends: Backend) -> Fleet:
    return Fleet(models=parse_config(RAW).models, backends=backends)


# What the control plane always has: a CA for https:// engines (the system's, when none is configured).
ENGINE_CA = TlsMaterial(backend_ca=Authority(b"CA", "ca.pem", 1))


def build(*backends: Backend):
    return build_resources(parse_config(RAW), fleet(*backends), "-- lua", certificates=ENGINE_CA)


def _lua_source(route_config) -> str:
    """The Lua filter's source as the routes carry it (CONTEXT and the keys ahead of the filter)."""
    per_route = lua_pb2.LuaPerRoute()
    route_config.virtual_hosts[0].typed_per_filter_config[LUA_FILTER].Unpack(per_route)
    return per_route.source_code.inline_string


def test_a_cluster_and_an_assignment_per_model():
    resources = build(Backend("http://a:1", "10.0.0.1", 1, ("big",), weight=7),
                      Backend("http://b:1", "10.0.0.2", 1, ("big", "small"), draining=True))
    clusters = {c.name: c for c in resources[CLUSTER]}
    assert set(clusters) == {"model:big", "model:small", UNROUTED_CLUSTER}
    assert clusters["model:big"].lb_policy == clusters["model:big"].LEAST_REQUEST
    assert clusters["model:big"].common_lb_config.healthy_panic_threshold.value == 0
    assignments = {a.cluster_name: a for a in resources[ENDPOINT]}
    assert set(assignments) == {"model:big", "model:small"}  # the EDS clusters', and nothing else
    big = assignments["model:big"].endpoints[0].lb_endpoints
    assert [(e.endpoint.address.socket_address.address, e.load_balancing_weight.value) for e in big] == [
        ("10.0.0.1", 7), ("10.0.0.2", 1)]
    assert big[1].health_status == health_check_pb2.DRAINING
    assert len(assignments["model:small"].endpoints[0].lb_endpoints) == 1


def test_round_robin_is_an_option_for_comparisons():
    raw = dict(RAW, routing={"lb_policy": "round_robin"})
    clusters = {c.name: c for c in build_resources(parse_config(raw), fleet(Backend("http://a:1", "10.0.0.1", 1, ("big",))),
                                                   "-- lua")[CLUSTER]}
    assert clusters["model:big"].lb_policy == clusters["model:big"].ROUND_ROBIN


def test_long_uploads_select_the_marked_endpoints_of_the_same_cluster():
    a, b = Backend("http://a:1", "10.0.0.1", 1, ("big",)), Backend("http://b:1", "10.0.0.2", 1, ("big",))
    config = parse_config(RAW)
    fleet_ = Fleet(models=config.models, backends=(a, b), long_uploads=frozenset({(a.id, "big")}))
    resources = build_resources(config, fleet_, "-- lua")
    cluster = {c.name: c for c in resources[CLUSTER]}["model:big"]
    assert list(cluster.lb_subset_config.subset_selectors[0].keys) == [LONG_UPLOAD_KEY]
    assert cluster.lb_subset_config.fallback_policy == cluster.lb_subset_config.ANY_ENDPOINT
    endpoints = {a_.cluster_name: a_ for a_ in resources[ENDPOINT]}["model:big"].endpoints[0].lb_endpoints
    marked = [e.endpoint.hostname for e in endpoints if LONG_UPLOAD_KEY in e.metadata.filter_metadata[LB_METADATA]]
    assert marked == [a.id]
    routes = resources[ROUTE][0].virtual_hosts[0].routes
    by_name = {r.name: r for r in routes}
    long_route, plain = by_name["big:big:transcriptions:long"], by_name["big:big:transcriptions"]
    # The long route comes first and differs only in its header and subset.
    assert [r.name for r in routes].index(long_route.name) < [r.name for r in routes].index(plain.name)
    assert [h.name for h in long_route.match.headers] == [MODEL_HEADER, LONG_UPLOAD_HEADER]
    assert long_route.route.metadata_match.filter_metadata[LB_METADATA][LONG_UPLOAD_KEY] is True
    assert long_route.route.cluster == plain.route.cluster and long_route.route.timeout == plain.route.timeout
    assert not plain.route.HasField("metadata_match")
    assert f'["long_upload_bytes"] = {2048 * 1024}' in _lua_source(resources[ROUTE][0])


def test_long_upload_routing_can_be_switched_off():
    for routing in ({"long_upload_kb": 0}, {"load_aware": False}):
        resources = build_resources(parse_config(dict(RAW, routing=routing)), fleet(), "-- lua")
        assert not any(c.HasField("lb_subset_config") for c in resources[CLUSTER])
        assert not any(r.name.endswith(":long") for r in resources[ROUTE][0].virtual_hosts[0].routes)


def test_retries_off_means_no_retry_policy_and_no_body_copy():
    def policies(resilience):
        resources = build_resources(parse_config(dict(RAW, resilience=resilience)), fleet(), "-- lua")
        return [r.route.HasField("retry_policy") for r in resources[ROUTE][0].virtual_hosts[0].routes
                if r.route.cluster.startswith("model:")]
    assert all(policies({}))  # two retries by default
    assert not any(policies({"retries": 0}))
    assert all(policies({"retries": 0, "per_try_idle_s": 30}))  # the idle timeout lives in the policy


def test_a_model_without_backends_gets_an_empty_assignment():
    assignments = {a.cluster_name: a for a in build()[ENDPOINT]}
    assert list(assignments["model:small"].endpoints) == []


def test_routes_per_name_and_path_with_a_long_timeout():
    route_config = build()[ROUTE][0]
    vhost = route_config.virtual_hosts[0]
    routed = {}
    for route in vhost.routes:
        if route.HasField("route") and route.match.headers:
            header = route.match.headers[0]
            assert header.name == MODEL_HEADER
            routed[(header.string_match.exact, route.match.path)] = route.route
    assert routed[("whisper-1", "/v1/audio/transcriptions")].cluster == "model:big"
    assert routed[("small", "/v1/audio/translations")].cluster == "model:small"
    assert len(routed) == 6
    assert all(r.timeout.seconds == 900 for r in routed.values())
    assert vhost.request_body_buffer_limit.value == 10 * 1024 * 1024
    # The names the Lua filter accepts travel with the routes, not the listener.
    assert '["models"] = {["big"] = "big", ["small"] = "small", ["whisper-1"] = "big"}' in _lua_source(route_config)


def test_audio_paths_match_a_real_route_before_the_model_is_known():
    """Envoy applies the body limit only when the first matched route is a route action."""
    vhost = build()[ROUTE][0].virtual_hosts[0]
    fallbacks = [r for r in vhost.routes if r.match.path.startswith("/v1/audio/") and not r.match.headers]
    assert len(fallbacks) == 2
    assert all(r.HasField("route") and r.route.cluster == UNROUTED_CLUSTER for r in fallbacks)


def test_fleet_changes_touch_endpoints_only_and_model_changes_never_the_listener():
    one = Snapshot.from_resources(build(Backend("http://a:1", "10.0.0.1", 1, ("big",))))
    two = Snapshot.from_resources(build(Backend("http://a:1", "10.0.0.1", 1, ("big",), weight=3)))
    changed = {t for t in one.versions if one.versions[t] != two.versions[t]}
    assert changed == {ENDPOINT}
    more_models = dict(RAW, models=RAW["models"] + [{"name": "third"}])
    config = parse_config(more_models)
    three = Snapshot.from_resources(build_resources(config, Fleet(config.models, ()), "-- lua", certificates=ENGINE_CA))
    assert three.versions[LISTENER] == one.versions[LISTENER]
    assert three.versions[ROUTE] != one.versions[ROUTE]


def test_versions_are_content_hashes():
    first = Snapshot.from_resources(build())
    again = Snapshot.from_resources(build())
    assert first.versions == again.versions
    assert first.consistency_errors() == []


def test_the_envoys_count_reaches_the_lua_filter_through_the_routes_alone():
    config, fleet_ = parse_config(RAW), fleet(Backend("http://a:1", "10.0.0.1", 1, ("big",)))
    one, three = (Snapshot.from_resources(build_resources(config, fleet_, "-- lua", envoys=n, certificates=ENGINE_CA))
                  for n in (1, 3))
    assert {t for t in one.versions if one.versions[t] != three.versions[t]} == {ROUTE}
    assert '["envoys"] = 3' in _lua_source(three.resources[ROUTE][ROUTE_CONFIG_NAME])


def test_consistency_refuses_endpoints_of_a_cluster_envoy_was_not_sent():
    resources = build(Backend("http://a:1", "10.0.0.1", 1, ("big",)))
    resources[CLUSTER] = [c for c in resources[CLUSTER] if c.name != "model:small"]
    resources[ROUTE][0].virtual_hosts[0].ClearField("routes")
    assert Snapshot.from_resources(resources).consistency_errors() == [
        "ClusterLoadAssignment 'model:small' has no cluster"]


def test_consistency_catches_bad_weights():
    resources = build(Backend("http://a:1", "10.0.0.1", 1, ("big",)))
    resources[ENDPOINT][0].endpoints[0].lb_endpoints[0].load_balancing_weight.value = 0
    assert "has weight 0" in " ".join(Snapshot.from_resources(resources).consistency_errors())


@pytest.mark.e2e
def test_versions_are_the_same_in_every_process():
    """Hash versions survive restarts: map fields (metadata) pack in a fixed order."""
    import subprocess
    import sys

    script = (
        "import asyncio;"
        "from control_plane.config import load_config;"
        "from control_plane.fleet.registry import Registry, config_entries;"
        "from control_plane.fleet.resolve import resolve_fleet;"
        "from control_plane.builders import build_resources;"
        "from control_plane.bootstrap import read_lua_filter;"
        "from control_plane.xds.snapshot import Snapshot;"
        "c = load_config('examples/simulated.yaml'); r = Registry.empty(); r.set_config(config_entries(c));"
        "f = asyncio.run(resolve_fleet(c, r));"
        "from control_plane.certificates import read_material, utc_now;"
        "m = read_material(c.listen.tls, c.backend_tls, utc_now());"
        "print(sorted(Snapshot.from_resources(build_resources(c, f, read_lua_filter(), certificates=m)).versions.items()))"
    )
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2", "3")}
    assert len(outputs) == 1, outputs


# --- TLS -------------------------------------------------------------------------------------

def _material():
    from datetime import datetime, timezone

    from control_plane.certificates import Authority, KeyPair, TlsMaterial

    pair = KeyPair(b"CHAIN", b"KEY", "CN=x", datetime(2030, 1, 1, tzinfo=timezone.utc), "ab")
    return TlsMaterial(listener=pair, client_ca=Authority(b"CA", "ca.pem", 1), backend_ca=Authority(b"CA2", "b.pem", 1))


def _tls_config(client_certificates="off"):
    tls = {"cert_file": "c.pem", "key_file": "k.pem", "client_certificates": client_certificates}
    if client_certificates != "off":
        tls["client_ca_file"] = "ca.pem"
    return parse_config(dict(RAW, listen={"tls": tls}))


def test_an_https_engine_is_dialled_with_tls_and_its_name_a_plain_one_without():
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    from control_plane.names import BACKEND_CA_SECRET, TLS_MATCH_KEY
    from control_plane.xds.types import TLS_MATCH_NAMESPACE

    resources = build(Backend("b1", "10.0.0.1", 8443, ("big",), url="https://engine-1.internal:8443",
                              host="engine-1.internal"),
                      Backend("b2", "10.0.0.2", 8000, ("big",), url="http://10.0.0.2:8000", host="10.0.0.2"))
    endpoints = {e.endpoint.address.socket_address.address: e
                 for e in next(a for a in resources[ENDPOINT] if a.cluster_name == "model:big").endpoints[0].lb_endpoints}
    secure, plain = endpoints["10.0.0.1"], endpoints["10.0.0.2"]
    assert secure.endpoint.hostname == "engine-1.internal"  # sent as SNI, and checked against the certificate
    assert secure.metadata.filter_metadata[TLS_MATCH_NAMESPACE][TLS_MATCH_KEY] is True
    assert TLS_MATCH_NAMESPACE not in plain.metadata.filter_metadata
    cluster = next(c for c in resources[CLUSTER] if c.name == "model:big")
    assert not cluster.HasField("transport_socket")  # plain HTTP unless an endpoint is marked
    (match,) = cluster.transport_socket_matches
    assert dict(match.match) == {TLS_MATCH_KEY: True}
    context = tls_pb2.UpstreamTlsContext()
    match.transport_socket.typed_config.Unpack(context)
    assert context.auto_host_sni and context.auto_sni_san_validation
    assert context.common_tls_context.validation_context_sds_secret_config.name == BACKEND_CA_SECRET
    assert not context.common_tls_context.tls_certificate_sds_secret_configs  # no client certificate configured
    # With no CA for https:// engines the clusters have no TLS: such an endpoint would go out in
    # plaintext, and the snapshot's check refuses it.
    bare = build_resources(parse_config(RAW), fleet(Backend("b1", "10.0.0.1", 8443, ("big",),
                                                            url="https://engine-1.internal:8443", host="engine-1.internal")),
                           "-- lua")
    assert not any(c.transport_socket_matches for c in bare[CLUSTER])
    assert "needs TLS, which its cluster lacks" in " ".join(Snapshot.from_resources(bare).consistency_errors())


def test_the_tls_listener_refuses_plain_http_and_asks_for_client_certificates_as_configured():
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

    from control_plane.builders.listener import build_listener
    from control_plane.names import CLIENT_CA_SECRET, LISTENER_CERT_SECRET

    plain = build_listener(parse_config(RAW), "-- lua")
    assert not plain.listener_filters and not plain.filter_chains[0].HasField("transport_socket")
    for mode, required in (("off", False), ("optional", False), ("required", True)):
        listener = build_listener(_tls_config(mode), "-- lua")
        assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.tls_inspector"]
        (chain,) = listener.filter_chains
        assert chain.filter_chain_match.transport_protocol == "tls"
        context = tls_pb2.DownstreamTlsContext()
        chain.transport_socket.typed_config.Unpack(context)
        common = context.common_tls_context
        assert list(common.alpn_protocols) == ["h2", "http/1.1"]
        assert (common.tls_params.tls_minimum_protocol_version, common.tls_params.tls_maximum_protocol_version) == (
            common_pb2.TlsParameters.TLSv1_2, common_pb2.TlsParameters.TLSv1_3)
        assert [s.name for s in common.tls_certificate_sds_secret_configs] == [LISTENER_CERT_SECRET]
        assert common.validation_context_sds_secret_config.name == ("" if mode == "off" else CLIENT_CA_SECRET)
        assert context.require_client_certificate.value is required
        assert listener.default_filter_chain.filters[0].name == "envoy.filters.network.http_connection_manager"


def test_secrets_carry_the_files_and_a_missing_one_is_inconsistent():
    from control_plane.xds.types import SECRET

    resources = build_resources(_tls_config("required"), fleet(), "-- lua", certificates=_material())
    secrets = {s.name: s for s in resources[SECRET]}
    assert set(secrets) == {"listener_certificate", "client_ca", "backend_ca"}
    assert secrets["listener_certificate"].tls_certificate.private_key.inline_bytes == b"KEY"
    assert secrets["client_ca"].validation_context.trusted_ca.inline_bytes == b"CA"
    assert Snapshot.from_resources(resources).consistency_errors() == []
    resources[SECRET] = [s for s in resources[SECRET] if s.name != "client_ca"]
    assert Snapshot.from_resources(resources).consistency_errors() == [
        "listener 'whisper_http' needs missing secret 'client_ca'"]


def _manager(resources):
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    manager = hcm.HttpConnectionManager()
    resources[LISTENER][0].filter_chains[0].filters[0].typed_config.Unpack(manager)
    return manager


def test_tracing_is_off_by_default_and_publishes_nothing_for_it():
    resources = build(Backend("http://a:1", "10.0.0.1", 1, ("big",)))
    assert not _manager(resources).HasField("tracing")
    assert {c.name for c in resources[CLUSTER]} == {"model:big", "model:small", UNROUTED_CLUSTER}
    assert not any(route.HasField("tracing") for route in resources[ROUTE][0].virtual_hosts[0].routes)


def test_tracing_exports_to_the_collector_cluster_with_the_lua_filters_metadata_as_tags():
    from envoy.config.trace.v3 import opentelemetry_pb2

    from control_plane.builders.tracing import METADATA_TAGS
    from control_plane.names import METADATA_NAMESPACE, OTLP_CLUSTER

    raw = dict(RAW, observability={"tracing": {"otlp_endpoint": "collector.example:4317", "sampling": 0.01}},
               routing={"long_upload_kb": 1024})
    resources = build_resources(parse_config(raw), fleet(Backend("http://a:1", "10.0.0.1", 1, ("big",))), "-- lua")
    tracing = _manager(resources).tracing
    assert tracing.provider.name == "envoy.tracers.opentelemetry"
    tracer = opentelemetry_pb2.OpenTelemetryConfig()
    tracing.provider.typed_config.Unpack(tracer)
    assert tracer.service_name == "whisper-gateway" and tracer.grpc_service.envoy_grpc.cluster_name == OTLP_CLUSTER
    assert tracing.random_sampling.value == pytest.approx(1.0) and tracing.spawn_upstream_span.value
    tags = {tag.tag: tag for tag in tracing.custom_tags}
    for name, key in METADATA_TAGS.items():
        assert tags[name].metadata.metadata_key.key == METADATA_NAMESPACE
        assert [p.key for p in tags[name].metadata.metadata_key.path] == [key]
    # Never a request header: a client's Authorization would be one.
    assert not any(tag.HasField("request_header") for tag in tracing.custom_tags)
    collector = {c.name: c for c in resources[CLUSTER]}[OTLP_CLUSTER]
    address = collector.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("collector.example", 4317)
    assert collector.type == collector.STRICT_DNS
    # Each audio route names its operation and keeps the listener's sampling (a route's own
    # random_sampling would default to 100%).
    routes = [r for r in resources[ROUTE][0].virtual_hosts[0].routes if r.HasField("route")]
    assert routes and all(r.HasField("tracing") for r in routes)
    for route in routes:
        assert route.tracing.random_sampling.numerator == 10_000  # of a million: 1%
        expected = "translation" if route.match.path.endswith("translations") else "transcription"
        assert [(t.tag, t.literal.value) for t in route.tracing.custom_tags] == [("gen_ai.operation.name", expected)]
    assert Snapshot.from_resources(resources).consistency_errors() == []


def test_long_recordings_get_the_workers_cluster_their_routes_and_the_pieces_listener():
    raw = RAW | {"longform": {"workers": 2, "socket_dir": "/run/wg", "timeout_s": 1800}}
    resources = build_resources(parse_config(raw), fleet(Backend("http://a:1", "10.0.0.1", 1, ("big",))), "-- lua",
                                certificates=ENGINE_CA)
    assert Snapshot.from_resources(resources).consistency_errors() == []
    workers = {c.name: c for c in resources[CLUSTER]}[LONGFORM_CLUSTER]
    hosts = workers.load_assignment.endpoints[0].lb_endpoints
    assert [h.endpoint.address.pipe.path for h in hosts] == ["/run/wg/worker-0.sock", "/run/wg/worker-1.sock"]
    assert workers.health_checks[0].http_health_check.path == "/health"
    routes = resources[ROUTE][0].virtual_hosts[0].routes
    names = [r.name for r in routes]
    # Before every model's route: the Lua filter's mark sends a recording there, whatever its model.
    assert names.index("longform:transcriptions") < names.index("big:big:transcriptions")
    longform = routes[names.index("longform:translations")]
    assert longform.match.headers[0].name == "x-whisper-longform" and longform.route.cluster == LONGFORM_CLUSTER
    assert longform.route.timeout.seconds == longform.route.idle_timeout.seconds == 1800  # silent until joined
    assert not longform.route.retry_policy.retriable_status_codes  # a worker that has it is not asked again
    listeners = {listener.name: listener for listener in resources[LISTENER]}
    pieces = listeners[PIECES_LISTENER_NAME]
    assert (pieces.address.pipe.path, pieces.address.pipe.mode) == ("/run/wg/pieces.sock", 0o600)  # no port: no one else
    assert pieces.traffic_direction == base_pb2.TrafficDirection.OUTBOUND  # a drain (inbound listeners) lets running recordings finish
    manager = hcm.HttpConnectionManager()
    pieces.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [f.name for f in manager.http_filters] == [PIECE_FILTER, LUA_FILTER, "envoy.filters.http.router"]
    assert manager.rds.route_config_name == resources[ROUTE][0].name  # the same routes as the audio listener
    assert not manager.access_log  # a failed piece fails its recording, which is logged


def test_without_workers_no_recording_is_split():
    resources = build()
    assert LONGFORM_CLUSTER not in {c.name for c in resources[CLUSTER]}
    assert [listener.name for listener in resources[LISTENER]] == ["whisper_http"]
    assert not [r for r in resources[ROUTE][0].virtual_hosts[0].routes if r.name.startswith("longform:")]
