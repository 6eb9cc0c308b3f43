"""The control plane and real Envoys over real gRPC: reloads, NACKs, several Envoys, restarts."""

from __future__ import annotations

import asyncio
import copy
import signal
import threading
import time

import pytest

from control_plane.app import ControlPlane
from control_plane.builders import build_resources
from control_plane.config import parse_config
from control_plane.fleet.resolve import resolve_fleet
from control_plane.fleet.registry import Registry, config_entries
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import CLUSTER, ENDPOINT
from harness.processes import (
    Envoy,
    GatewayConfigFile,
    base_config,
    served_by,
    free_port,
    start_control_plane,
    start_engine,
    transcribe,
    wait_until,
)

MODEL = "whisper-large-v3-turbo"
OTHER = "whisper-small"


def _host(url: str) -> str:
    return url.removeprefix("http://")


@pytest.fixture
def engines(tmp_path):
    started = [start_engine(tmp_path, MODEL, f"e{i}") for i in range(1, 3)]
    yield [url for _, url in started]
    for process, _ in started:
        process.stop()


def _serve_one_model(tmp_path, engine_url: str) -> tuple[dict, GatewayConfigFile, object]:
    """A config file with MODEL on one engine, and a control plane serving it."""
    raw = base_config(free_port(), free_port(), [{"name": MODEL}], [{"url": engine_url, "models": [MODEL]}])
    config = GatewayConfigFile(tmp_path / "gateway.yaml")
    config.write(raw)
    return raw, config, start_control_plane(tmp_path, config.path)


# Processes a test starts are stopped by the reap_processes fixture, pass or fail.


@pytest.mark.e2e
def test_config_reload_changes_endpoints_and_traffic_follows(tmp_path, engines):
    e1, e2 = engines
    raw, config, plane = _serve_one_model(tmp_path, e1)
    envoy = Envoy(tmp_path, raw)
    envoy.wait_serving()
    assert set(envoy.endpoints()[f"model:{MODEL}"]) == {_host(e1)}
    assert served_by(envoy.url, MODEL, ["e1", "e2"], 8) == {"e1": 8, "e2": 0}

    # Swap e1 for e2: Envoy's endpoints change, and so does where requests go.
    swapped = copy.deepcopy(raw)
    swapped["backends"] = [{"url": e2, "models": [MODEL]}]
    config.write(swapped)
    plane.signal(signal.SIGHUP)
    wait_until(lambda: set(envoy.endpoints()[f"model:{MODEL}"]) == {_host(e2)}, 10, "e2 to replace e1")
    assert served_by(envoy.url, MODEL, ["e1", "e2"], 8) == {"e1": 0, "e2": 8}

    # A new model becomes routable; removing it again makes it unknown.
    assert transcribe(envoy.url, OTHER).status == 404
    _, other_url = start_engine(tmp_path, OTHER, "o1")
    with_model = copy.deepcopy(swapped)
    with_model["models"].append({"name": OTHER})
    with_model["backends"].append({"url": other_url, "models": [OTHER]})
    config.write(with_model)
    plane.signal(signal.SIGHUP)
    wait_until(lambda: transcribe(envoy.url, OTHER).status == 200, 10, "the new model to be routable")
    assert " o1 " in transcribe(envoy.url, OTHER).json()["text"]
    config.write(swapped)
    plane.signal(signal.SIGHUP)
    wait_until(lambda: transcribe(envoy.url, OTHER).status == 404, 10, "the removed model to be unknown")
    wait_until(lambda: f"model:{OTHER}" not in envoy.endpoints(), 10, "its cluster to go")


@pytest.mark.e2e
def test_bad_config_on_reload_changes_nothing(tmp_path, engines):
    e1, _ = engines
    raw, config, plane = _serve_one_model(tmp_path, e1)
    envoy = Envoy(tmp_path, raw)
    envoy.wait_serving()
    before = envoy.config_versions()
    config.write_text(config.path.read_text() + "\nbakends: []\n")
    plane.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in plane.log_text(), 10, "the refusal to be logged")
    assert "bakends: unknown key" in plane.log_text()
    assert plane.alive()
    assert envoy.config_versions() == before
    assert transcribe(envoy.url, MODEL).status == 200


class InProcessControlPlane:
    """The real ControlPlane on its own event loop thread, so a test can hand it any snapshot."""

    def __init__(self, raw: dict):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.plane = self.run(self._create(raw))
        self.run(self.plane.start())

    async def _create(self, raw: dict) -> ControlPlane:
        return ControlPlane(parse_config(raw))

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def set_snapshot(self, snapshot: Snapshot) -> bool:
        async def set_it():
            return self.plane.cache.set_snapshot(snapshot)

        return self.run(set_it())

    def stop(self) -> None:
        self.run(self.plane.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.e2e
def test_rejected_resource_is_nacked_recorded_and_recovered_from(tmp_path, engines):
    e1, e2 = engines
    raw = base_config(free_port(), free_port(), [{"name": MODEL}], [{"url": e1, "models": [MODEL]}])
    inproc = InProcessControlPlane(raw)
    envoy = Envoy(tmp_path, raw)
    try:
        envoy.wait_serving()
        good_versions = envoy.config_versions()
        # Envoy validates what our builders do not: least-request needs at least two choices.
        plane = inproc.plane
        resources = build_resources(plane.config, plane.fleet, plane.lua_source, certificates=plane.certificates.current)
        resources[CLUSTER][0].least_request_lb_config.choice_count.value = 1
        assert inproc.set_snapshot(Snapshot.from_resources(resources))

        wait_until(lambda: plane.cache.nacks_total >= 1, 10, "a NACK")
        nack = plane.cache.last_nack
        assert nack.type_url == CLUSTER and "choice_count" in nack.message
        assert envoy.stat("cluster_manager.cds.update_rejected") >= 1
        # The last good configuration keeps serving, and the bad one is not resent in a loop.
        assert envoy.config_versions()["CDS"] == good_versions["CDS"]
        assert transcribe(envoy.url, MODEL).status == 200
        time.sleep(1.5)
        assert plane.cache.nacks_total == 1

        fixed = copy.deepcopy(raw)
        fixed["backends"].append({"url": e2, "models": [MODEL]})
        inproc.run(plane.apply(parse_config(fixed)))
        wait_until(lambda: set(envoy.endpoints()[f"model:{MODEL}"]) == {_host(e1), _host(e2)}, 10,
                   "the fixed state to be applied")
        current = plane.cache.snapshot.versions[CLUSTER]
        wait_until(lambda: all(s.acked.get(CLUSTER) == current for s in plane.cache.envoys.values()), 10,
                   "the fixed clusters to be ACKed")
    finally:
        envoy.stop()
        inproc.stop()


@pytest.mark.e2e
def test_two_envoys_restarts_of_either_side(tmp_path, engines):
    e1, e2 = engines
    raw, config, plane = _serve_one_model(tmp_path, e1)
    # Both Envoys take the same listener; they share its port (SO_REUSEPORT), as on separate hosts
    # they would each own one. Their admin ports differ.
    first = Envoy(tmp_path, raw, name="envoy-1")
    second = Envoy(tmp_path, raw, name="envoy-2")

    first.wait_serving()
    wait_until(lambda: second.config_versions() == first.config_versions(), 20, "the second Envoy to match")
    assert set(second.endpoints()[f"model:{MODEL}"]) == {_host(e1)}

    # An Envoy started later gets the same configuration.
    second.stop()
    late = Envoy(tmp_path, raw, name="envoy-late")
    wait_until(lambda: late.config_versions() == first.config_versions(), 20, "the late Envoy to match")

    # The control plane dies: Envoys keep serving their last configuration.
    plane.kill()
    assert transcribe(first.url, MODEL).status == 200
    # It comes back with a changed fleet; the running Envoys re-join and apply it.
    grown = copy.deepcopy(raw)
    grown["backends"].append({"url": e2, "models": [MODEL]})
    config.write(grown)
    plane = start_control_plane(tmp_path, config.path, name="control-plane-2")
    for envoy in (first, late):
        wait_until(lambda envoy=envoy: set(envoy.endpoints()[f"model:{MODEL}"]) == {_host(e1), _host(e2)}, 20,
                   f"{envoy.process.name} to re-join")
    assert served_by(first.url, MODEL, ["e1", "e2"], 12)["e2"] > 0


@pytest.mark.e2e
def test_envoy_checks_the_plane_serving_while_up_and_not_serving_when_it_stops(tmp_path, engines):
    """Envoy's xds_cluster health checks (grpc.health.v1): a stopping plane answers NOT_SERVING
    before it ends its log streams, so no Envoy opens one to it meanwhile."""
    raw, _, plane = _serve_one_model(tmp_path, engines[0])
    envoy = Envoy(tmp_path, raw)
    envoy.wait_serving()
    checks = "cluster.xds_cluster.health_check."

    def answered_failures() -> int:  # checks the plane answered, but not SERVING (not a refused connection)
        return envoy.stat(checks + "failure") - envoy.stat(checks + "network_failure")

    wait_until(lambda: envoy.stat(checks + "success") > 0, 10, "a health check answered SERVING")
    assert envoy.stat("cluster.xds_cluster.membership_healthy") == 1 and answered_failures() == 0
    plane.stop()  # SIGTERM: the plane drains, then exits
    wait_until(lambda: answered_failures() > 0, 10, "a health check answered NOT_SERVING")


def registry_of(config) -> Registry:
    registry = Registry.empty()
    registry.set_config(config_entries(config))
    return registry


def test_publish_refuses_an_inconsistent_snapshot(tmp_path):
    """A route to a cluster that does not exist never reaches an Envoy."""
    raw = base_config(free_port(), free_port(), [{"name": MODEL}], [{"url": "http://127.0.0.1:9", "models": [MODEL]}])
    config = parse_config(raw)
    fleet = asyncio.run(resolve_fleet(config, registry_of(config)))
    resources = build_resources(config, fleet, "")
    resources[CLUSTER] = [c for c in resources[CLUSTER] if c.name != f"model:{MODEL}"]
    snapshot = Snapshot.from_resources(resources)
    errors = snapshot.consistency_errors()
    assert any("points at missing cluster" in e for e in errors)
    assert any("has no cluster" in e for e in errors)


BAD_ADDRESS = "fe80::1%25lo"  # as the poisonous URL reached Envoy, which refuses it; validation now keeps it out


def _poisonable(monkeypatch) -> set[str]:
    """Models whose ClusterLoadAssignments get an endpoint Envoy refuses, while they are in the set."""
    from control_plane import builders
    from envoy.config.endpoint.v3 import endpoint_components_pb2

    poisoned: set[str] = set()
    real = builders.build_load_assignment

    def build(model, fleet):
        assignment = real(model, fleet)
        if model in poisoned:
            bad = endpoint_components_pb2.LbEndpoint()
            bad.CopyFrom(assignment.endpoints[0].lb_endpoints[0])
            bad.endpoint.address.socket_address.address = BAD_ADDRESS
            bad.endpoint.hostname = "poison"
            assignment.endpoints[0].lb_endpoints.append(bad)
        return assignment

    monkeypatch.setattr(builders, "build_load_assignment", build)
    return poisoned


def _scrape_rounds(plane, key, rounds: int) -> None:
    """Waits until the control plane has scraped `key` (backend id, model) `rounds` more times."""
    seen = []
    wait_until(lambda: (at := plane.tracker.tracks[key].scraped_at) is not None
               and (not seen or seen[-1] != at) and seen.append(at) is None and len(seen) > rounds,
               10, f"{rounds} scrape rounds", interval=0.02)


@pytest.mark.e2e
def test_a_refused_endpoint_update_never_takes_good_ones_down(tmp_path, monkeypatch):
    poisoned = _poisonable(monkeypatch)
    (_, e1), (_, e2), (_, e3) = [start_engine(tmp_path, model, name) for model, name in
                                 [(MODEL, "e1"), (MODEL, "e2"), (OTHER, "e3")]]
    raw = base_config(free_port(), free_port(), [{"name": MODEL}, {"name": OTHER}],
                      [{"url": e1, "models": [MODEL]}, {"url": e2, "models": [MODEL]}, {"url": e3, "models": [OTHER]}],
                      routing={"load_aware": False})
    inproc = InProcessControlPlane(raw)
    plane = inproc.plane
    envoy = Envoy(tmp_path, raw, name="envoy-1")
    late = None
    try:
        envoy.wait_serving()
        # One change: MODEL's endpoints turn bad while OTHER's weight changes with them.
        poisoned.add(MODEL)
        changed = copy.deepcopy(raw)
        changed["backends"][2]["weight"] = 5
        inproc.run(plane.apply(parse_config(changed)))
        wait_until(lambda: envoy.endpoints()[f"model:{OTHER}"][_host(e3)]["weight"] == "5", 10,
                   "the good update that travelled with the bad one")
        report = wait_until(lambda: (r := inproc.run(_status(plane)))["envoys"][0]["rejected"] and r, 10,
                            "the refusal to show on /status")
        (refused,) = report["envoys"][0]["rejected"]
        assert refused["type"] == "EDS" and refused["resource"] == f"model:{MODEL}"
        assert "malformed IP address" in refused["message"]
        # Envoy keeps MODEL's last good endpoints and serves it.
        assert set(envoy.endpoints()[f"model:{MODEL}"]) == {_host(e1), _host(e2)}
        assert transcribe(envoy.url, MODEL).status == 200 and transcribe(envoy.url, OTHER).status == 200
        nacks = plane.cache.nacks_total

        # A drain whose endpoints Envoy refuses is not finished: Envoy still routes to the engine.
        e1_id = plane.registry.find_url(e1).id
        inproc.run(plane.drain(e1_id, 300))
        wait_until(lambda: plane.cache.nacks_total > nacks, 10, "Envoy to refuse the draining endpoints")
        _scrape_rounds(plane, (e1_id, MODEL), 4)  # two idle rounds would finish an applied drain
        assert plane.registry.get(e1_id).state == "draining"
        assert envoy.endpoints()[f"model:{MODEL}"][_host(e1)]["health_flags"] == "healthy"

        # A new Envoy joining while the bad resource is pending gets every good one.
        late = Envoy(tmp_path, raw, name="envoy-late")
        late.wait_serving()
        wait_until(lambda: transcribe(late.url, OTHER).status == 200, 10, "the late Envoy to serve the good model")
        wait_until(lambda: len(plane.cache.envoys) == 2 and all(
            (ENDPOINT, f"model:{MODEL}") in s.rejected for s in plane.cache.envoys.values()), 10,
            "both Envoys to report the refused resource")

        # Fixed: the endpoints are applied everywhere, the refusals clear, and the drain finishes.
        poisoned.clear()
        inproc.run(plane.apply(plane.config))
        wait_until(lambda: plane.registry.get(e1_id).state == "drained", 10, "the drain to finish")
        assert set(envoy.endpoints()[f"model:{MODEL}"]) == {_host(e2)}
        assert set(late.endpoints()[f"model:{MODEL}"]) == {_host(e2)}
        assert all(not s.rejected for s in plane.cache.envoys.values())
        assert served_by(late.url, MODEL, ["e1", "e2"], 6) == {"e1": 0, "e2": 6}
    finally:
        envoy.stop()
        if late is not None:
            late.stop()
        inproc.stop()


async def _status(plane) -> dict:
    from control_plane.operator.status import status_report

    return status_report(plane.view, asyncio.get_running_loop().time())
