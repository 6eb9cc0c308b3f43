"""The pure builders: what Envoy is told, checked on the protobufs themselves."""

from __future__ import annotations

from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2

from control_plane.builders import build_resources
from control_plane.builders.names import LUA_FILTER, MODEL_HEADER, UNROUTED_CLUSTER
from control_plane.config import parse_config
from control_plane.fleet import Backend, Fleet
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


def build(*backends: Backend):
    return build_resources(parse_config(RAW), fleet(*backends), "-- lua")


def test_a_cluster_and_an_assignment_per_model():
    resources = build(Backend("http://a:1", "10.0.0.1", 1, ("big",), weight=7),
                      Backend("http://b:1", "10.0.0.2", 1, ("big", "small"), draining=True))
    clusters = {c.name: c for c in resources[CLUSTER]}
    assert set(clusters) == {"model:big", "model:small", UNROUTED_CLUSTER}
    assert clusters["model:big"].lb_policy == clusters["model:big"].LEAST_REQUEST
    assert clusters["model:big"].common_lb_config.healthy_panic_threshold.value == 0
    assignments = {a.cluster_name: a for a in resources[ENDPOINT]}
    big = assignments["model:big"].endpoints[0].lb_endpoints
    assert [(e.endpoint.address.socket_address.address, e.load_balancing_weight.value) for e in big] == [
        ("10.0.0.1", 7), ("10.0.0.2", 1)]
    assert big[1].health_status == health_check_pb2.DRAINING
    assert len(assignments["model:small"].endpoints[0].lb_endpoints) == 1


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
    per_route = lua_pb2.LuaPerRoute()
    vhost.typed_per_filter_config[LUA_FILTER].Unpack(per_route)
    assert dict(per_route.filter_context["models"]) == {"big": "big", "whisper-1": "big", "small": "small"}


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
    three = Snapshot.from_resources(build_resources(config, Fleet(config.models, ()), "-- lua"))
    assert three.versions[LISTENER] == one.versions[LISTENER]
    assert three.versions[ROUTE] != one.versions[ROUTE]


def test_versions_are_content_hashes():
    first = Snapshot.from_resources(build())
    again = Snapshot.from_resources(build())
    assert first.versions == again.versions
    assert first.consistency_errors() == []


def test_consistency_catches_bad_weights():
    resources = build(Backend("http://a:1", "10.0.0.1", 1, ("big",)))
    resources[ENDPOINT][0].endpoints[0].lb_endpoints[0].load_balancing_weight.value = 0
    assert "has weight 0" in " ".join(Snapshot.from_resources(resources).consistency_errors())
