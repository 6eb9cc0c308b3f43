"""The ADS protocol rules of one stream, against a scripted Envoy: no sockets, milliseconds each."""

from __future__ import annotations

import asyncio

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from control_plane.builders import build_resources
from control_plane.certificates import Authority, TlsMaterial
from control_plane.config import parse_config
from control_plane.fleet.resolved import Backend, Fleet
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.server import AdsStream
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

MODELS = ("m1", "m2", "m3")
ENGINE_CA = TlsMaterial(backend_ca=Authority(b"CA", "ca.pem", 1))  # the control plane always has one
BAD_ADDRESS = "fe80::1%lo"  # what Envoy refuses: "malformed IP address"


def snapshot(addresses: dict[str, str], weights: dict[str, int] | None = None, models=MODELS) -> Snapshot:
    """One backend per model at the given address; weights by model."""
    config = parse_config({"models": list(models)})
    backends = tuple(Backend(id=f"b-{m}", address=addresses.get(m, "127.0.0.1"), port=9000 + i, models=(m,),
                             url=f"http://x{i}:1") for i, m in enumerate(models))
    fleet = Fleet(models=config.models, backends=backends,
                  weights={(f"b-{m}", m): w for m, w in (weights or {}).items()})
    return Snapshot.from_resources(build_resources(config, fleet, "-- lua", certificates=ENGINE_CA))


class ScriptedEnvoy:
    """Subscribes like Envoy and answers every response: NACK when a resource is bad, else ACK."""

    def __init__(self, cache: SnapshotCache, stream_id: int = 1, node: str = "envoy-1"):
        from control_plane.xds.cache import EnvoyStatus

        self.cache = cache
        self.stream = AdsStream(stream_id, cache)
        cache.stream_opened(EnvoyStatus(stream_id, node, "whisper-gateway", "test"))
        self.sent: list[discovery_pb2.DiscoveryResponse] = []
        self.applied: dict[str, dict[str, endpoint_pb2.ClusterLoadAssignment]] = {ENDPOINT: {}}
        self.names: dict[str, list[str]] = {}
        self.hold_answers = False
        self.unanswered: list[discovery_pb2.DiscoveryResponse] = []

    def request(self, type_url: str, names=(), nonce: str = "", version: str = "", error: str | None = None):
        self.names[type_url] = list(names)
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names), response_nonce=nonce,
                                                 version_info=version)
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        asyncio.run(self.stream.on_request(request))

    def subscribe_all(self) -> None:
        self.request(CLUSTER)
        self.request(LISTENER)

    def pump(self, snap: Snapshot, rounds: int = 20) -> list[discovery_pb2.DiscoveryResponse]:
        """Runs the stream until it has nothing more to say; returns what it sent."""
        sent = []
        for _ in range(rounds):
            responses = self.stream.responses(snap)
            if not responses and not self.unanswered:
                break
            for response in responses:
                sent.append(response)
                if self.hold_answers:
                    self.unanswered.append(response)
                else:
                    self.answer(response, snap)
            if not responses and not self.hold_answers:
                break
        self.sent += sent
        return sent

    def answer(self, response, snap: Snapshot) -> None:
        bad = [r for r in response.resources if BAD_ADDRESS.encode() in r.value]
        if bad:
            self.request(response.type_url, self.names.get(response.type_url, []), response.nonce,
                         version="", error=f"malformed IP address: {BAD_ADDRESS}")
            return
        for resource in response.resources:
            if response.type_url == ENDPOINT:
                cla = endpoint_pb2.ClusterLoadAssignment()
                resource.Unpack(cla)
                self.applied[ENDPOINT][cla.cluster_name] = cla
        names = self.names.get(response.type_url, [])
        if response.type_url == CLUSTER:  # Envoy then asks for each EDS cluster's endpoints
            self.request(CLUSTER, (), response.nonce, response.version_info)
            self.request(ENDPOINT, sorted(snap.names(ENDPOINT)))
        elif response.type_url == LISTENER:
            self.request(LISTENER, (), response.nonce, response.version_info)
            self.request(ROUTE, sorted(snap.names(ROUTE)))
        else:
            self.request(response.type_url, names, response.nonce, response.version_info)

    def weight(self, model: str) -> int:
        cla = self.applied[ENDPOINT][f"model:{model}"]
        return cla.endpoints[0].lb_endpoints[0].load_balancing_weight.value


def sent_names(responses, type_url: str) -> list[list[str]]:
    out = []
    for response in responses:
        if response.type_url == type_url:
            names = []
            for resource in response.resources:
                cla = endpoint_pb2.ClusterLoadAssignment()
                resource.Unpack(cla)
                names.append(cla.cluster_name)
            out.append(names)
    return out


def test_first_connection_sends_types_in_order_and_holds_routes_until_clusters_are_acked():
    cache, snap = SnapshotCache(), snapshot({})
    cache.set_snapshot(snap)
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    first = envoy.stream.responses(snap)
    assert [r.type_url for r in first] == [CLUSTER]  # listeners and routes wait for applied clusters
    envoy.answer(first[0], snap)
    second = envoy.stream.responses(snap)
    assert [r.type_url for r in second] == [ENDPOINT, LISTENER]  # endpoints go out before listeners
    for response in second:
        envoy.answer(response, snap)
    assert [r.type_url for r in envoy.pump(snap)] == [ROUTE]
    assert set(envoy.applied[ENDPOINT]) == {f"model:{m}" for m in MODELS}


def test_a_nacked_batch_is_split_and_only_the_refused_resource_is_held_back():
    cache = SnapshotCache()
    good = snapshot({})
    cache.set_snapshot(good)
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(good)
    # One change makes m1's endpoints bad while m2's and m3's weights change with it.
    poisoned = snapshot({"m1": BAD_ADDRESS}, weights={"m2": 128, "m3": 64})
    cache.set_snapshot(poisoned)
    sent = envoy.pump(poisoned)
    batches = sent_names(sent, ENDPOINT)
    assert batches[0] == ["model:m1", "model:m2", "model:m3"]  # NACKed whole
    assert sorted(batches[1:]) == [["model:m1"], ["model:m2"], ["model:m3"]]  # then one at a time
    assert envoy.weight("m2") == 128 and envoy.weight("m3") == 64
    status = cache.envoys[1]
    assert list(status.rejected) == [(ENDPOINT, "model:m1")]
    assert "malformed IP address" in status.rejected[(ENDPOINT, "model:m1")].message
    assert cache.applied_everywhere(ENDPOINT, {"model:m2", "model:m3"})
    assert not cache.applied_everywhere(ENDPOINT, {"model:m1"})
    # The refused resource is not sent again, while later good changes flow alone.
    later = snapshot({"m1": BAD_ADDRESS}, weights={"m2": 7, "m3": 64})
    cache.set_snapshot(later)
    assert sent_names(envoy.pump(later), ENDPOINT) == [["model:m2"]]
    assert envoy.weight("m2") == 7
    # Fixed content is sent, applied, and the rejection clears.
    fixed = snapshot({}, weights={"m1": 5, "m2": 7, "m3": 64})
    cache.set_snapshot(fixed)
    assert sent_names(envoy.pump(fixed), ENDPOINT) == [["model:m1"]]
    assert envoy.weight("m1") == 5
    assert status.rejected == {} and cache.applied_everywhere(ENDPOINT, {f"model:{m}" for m in MODELS})


def test_a_refusal_ends_when_the_content_returns_to_what_envoy_holds():
    cache, good = SnapshotCache(), snapshot({})
    cache.set_snapshot(good)
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(good)
    cache.set_snapshot(bad := snapshot({"m1": BAD_ADDRESS}))
    envoy.pump(bad)
    assert list(cache.envoys[1].rejected) == [(ENDPOINT, "model:m1")]
    cache.set_snapshot(good)  # rolled back: Envoy already holds exactly this
    assert envoy.pump(good) == []
    assert cache.envoys[1].rejected == {} and cache.applied_everywhere(ENDPOINT, {"model:m1"})


def test_an_envoy_joining_while_a_bad_resource_is_pending_gets_everything_else():
    cache = SnapshotCache()
    poisoned = snapshot({"m2": BAD_ADDRESS})
    cache.set_snapshot(poisoned)
    envoy = ScriptedEnvoy(cache, stream_id=2, node="late")
    envoy.subscribe_all()
    envoy.pump(poisoned)
    assert set(envoy.applied[ENDPOINT]) == {"model:m1", "model:m3"}
    assert list(cache.envoys[2].rejected) == [(ENDPOINT, "model:m2")]
    # Routes are not held back by the refused endpoints: Envoy keeps what it has for that model.
    assert any(r.type_url == ROUTE for r in envoy.sent)


def test_a_stale_nonce_is_ignored_and_a_nacked_cluster_version_is_not_resent():
    cache, snap = SnapshotCache(), snapshot({})
    cache.set_snapshot(snap)
    envoy = ScriptedEnvoy(cache)
    envoy.request(CLUSTER)
    (first,) = envoy.stream.responses(snap)
    envoy.request(CLUSTER, (), nonce="999", version="x")  # answers nothing we sent: ignored
    assert envoy.stream.types[CLUSTER].acked_version is None
    envoy.request(CLUSTER, (), nonce=first.nonce, error="bad cluster")
    assert cache.nacks_total == 1 and cache.envoys[1].last_nack.message == "bad cluster"
    assert envoy.stream.responses(snap) == []  # the same version is not resent
    changed = snapshot({}, models=("m1", "m2"))
    cache.set_snapshot(changed)
    assert [r.type_url for r in envoy.stream.responses(changed)] == [CLUSTER]


def test_endpoints_are_resent_after_a_cluster_change():
    cache, snap = SnapshotCache(), snapshot({})
    cache.set_snapshot(snap)
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(snap)
    grown = snapshot({}, models=MODELS + ("m4",))
    cache.set_snapshot(grown)
    sent = envoy.pump(grown)
    assert [r.type_url for r in sent][:2] == [CLUSTER, ENDPOINT]
    assert set(sum(sent_names(sent, ENDPOINT), [])) == {f"model:{m}" for m in MODELS + ("m4",)}
    assert set(envoy.applied[ENDPOINT]) == {f"model:{m}" for m in MODELS + ("m4",)}


def test_responses_never_answered_on_their_own_are_sent_again():
    cache, snap = SnapshotCache(), snapshot({})
    cache.set_snapshot(snap)
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(snap)
    one = snapshot({}, weights={"m1": 10})
    cache.set_snapshot(one)
    (first,) = envoy.stream.responses(one)
    two = snapshot({}, weights={"m1": 10, "m2": 20})
    cache.set_snapshot(two)
    (second,) = envoy.stream.responses(two)
    # Envoy answers only the newer response: the older one's fate is unknown, so it goes again.
    envoy.request(ENDPOINT, envoy.names[ENDPOINT], second.nonce, second.version_info)
    assert sent_names(envoy.stream.responses(two), ENDPOINT) == [["model:m1"]]
    assert first.nonce != second.nonce


def test_a_new_subscription_echoing_an_answered_nonce_is_served():
    """Envoy asks for a new cluster's endpoints with the last EDS nonce it already ACKed."""
    cache, snap = SnapshotCache(), snapshot({})
    cache.set_snapshot(snap)
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(snap)
    last = envoy.stream.types[ENDPOINT].nonce
    grown = snapshot({}, models=MODELS + ("m4",))
    cache.set_snapshot(grown)
    envoy.request(ENDPOINT, sorted(grown.names(ENDPOINT)), nonce=last, version="whatever")
    assert "model:m4" in sum(sent_names(envoy.stream.responses(grown), ENDPOINT), [])


def test_pushes_acks_and_nacks_reach_the_callbacks():
    """Telemetry listens through callbacks; the xDS layer imports nothing above it."""
    import re
    from pathlib import Path

    seen = []

    class Recorder:
        def on_serve(self, versions):
            seen.append(("serve", frozenset(versions)))

        def on_push(self, type_url):
            seen.append(("push", type_url))

        def on_ack(self, type_url, version, node, push_to_ack_s):
            seen.append(("ack", type_url))

        def on_nack(self, type_url, version, node, message):
            seen.append(("nack", type_url))

    cache = SnapshotCache(Recorder())
    cache.set_snapshot(good := snapshot({}))
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(good)
    cache.set_snapshot(bad := snapshot({"m1": BAD_ADDRESS}))
    envoy.pump(bad)
    assert ("ack", CLUSTER) in seen and ("nack", ENDPOINT) in seen
    assert ("serve", frozenset({ENDPOINT})) in seen  # only what the bad snapshot changed
    xds = Path(__file__).resolve().parent.parent / "control_plane" / "xds"
    for module in xds.glob("*.py"):
        imports = re.findall(r"^(?:from|import) (control_plane\.\w+)", module.read_text(), re.M)
        assert all(name == "control_plane.xds" for name in imports), (module.name, imports)


def test_secrets_are_sent_by_name_and_a_rotation_sends_only_the_changed_one():
    from datetime import datetime, timezone

    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    from control_plane.builders.secrets import build_secrets
    from control_plane.certificates import KeyPair
    from control_plane.xds.types import SECRET

    def with_secrets(chain: bytes) -> Snapshot:
        pair = KeyPair(chain, b"KEY", "CN=x", datetime(2030, 1, 1, tzinfo=timezone.utc), "ab")
        return snapshot({}).with_type(SECRET, build_secrets(TlsMaterial(listener=pair, backend_ca=ENGINE_CA.backend_ca)))

    cache, snap = SnapshotCache(), with_secrets(b"ONE")
    cache.set_snapshot(snap)
    envoy = ScriptedEnvoy(cache)
    envoy.subscribe_all()
    envoy.pump(snap)
    envoy.request(SECRET, ["backend_ca", "listener_certificate"])
    first = [r for r in envoy.pump(snap) if r.type_url == SECRET]
    assert [len(r.resources) for r in first] == [2]
    rotated = with_secrets(b"TWO")
    cache.set_snapshot(rotated)
    (second,) = envoy.pump(rotated)
    assert second.type_url == SECRET  # nothing but the secret that changed
    (resource,) = second.resources
    secret = secret_pb2.Secret()
    resource.Unpack(secret)
    assert secret.name == "listener_certificate" and secret.tls_certificate.certificate_chain.inline_bytes == b"TWO"


def test_an_envoy_lags_only_on_responses_it_left_unanswered():
    """Lagging (xds/cache.py LAGGING_AFTER_S) is a response sent and never answered for that long:
    an Envoy that answers everything is never lagging, whatever it did not subscribe to (SDS
    without TLS) and however often versions move; one that stops answering is, until it answers."""
    import time

    from control_plane.xds.cache import LAGGING_AFTER_S

    cache, snap = SnapshotCache(), snapshot({})
    cache.set_snapshot(snap)
    later = lambda: time.monotonic() + LAGGING_AFTER_S + 1  # noqa: E731
    good, stuck = ScriptedEnvoy(cache, 1, "good"), ScriptedEnvoy(cache, 2, "stuck")
    for envoy in (good, stuck):
        envoy.subscribe_all()
    good.pump(snap)
    cache.set_snapshot(snapshot({}, weights={MODELS[0]: 7}))  # a new version of a type
    assert not cache.envoys[1].lagging(later(), LAGGING_AFTER_S)  # nothing was sent it has not answered
    unanswered = stuck.stream.responses(snap)
    assert unanswered and not cache.envoys[2].lagging(time.monotonic(), LAGGING_AFTER_S)
    assert cache.envoys[2].lagging(later(), LAGGING_AFTER_S)
    assert cache.not_applied(CLUSTER, snap.versions[CLUSTER]) == ["stuck"]
    stuck.answer(unanswered[0], snap)
    assert not cache.envoys[2].lagging(later(), LAGGING_AFTER_S)
