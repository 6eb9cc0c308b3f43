"""Several control planes, one state in etcd: a real three-member etcd on loopback ports (over
TLS, with client certificates: tests/test_etcd_tls.py has the refusals), two control planes, two
Envoys that know both, simulated engines.

The tests that kill things come last; each leaves the rig as the next one needs it.
"""

from __future__ import annotations

import threading
import time

import pytest

from harness.etcd import EtcdCluster
from harness.processes import (AdminClient, Envoy, GatewayConfigFile, base_config, free_port, start_control_plane,
                               start_engine, transcribe, wait_until)

pytestmark = pytest.mark.e2e

MODEL = "whisper-1"


class Dns:
    """A real nameserver on loopback: `engines.test` names the DNS-discovered engines."""

    def __init__(self, addresses: list[str]):
        from dnslib import QTYPE, RR, A
        from dnslib.server import BaseResolver, DNSServer

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                if request.q.qtype == QTYPE.A and str(request.q.qname) == "engines.test.":
                    for address in addresses:
                        reply.add_answer(RR("engines.test.", QTYPE.A, rdata=A(address), ttl=1))
                return reply
        self.port = free_port()
        self.server = DNSServer(Resolver(), port=self.port, address="127.0.0.1")
        self.server.start_thread()


class Rig:
    def __init__(self, folder):
        self.folder = folder
        self.etcd = EtcdCluster(folder / "etcd", tls=folder / "pki")  # clients and peers over TLS, certificates required
        self.engines = [start_engine(folder, MODEL, f"e{i}", time_scale=0.0001)[1] for i in range(3)]
        # Two more engines that only the leader's DNS discovery finds (one name, two addresses).
        dns_port = free_port()
        self.discovered = [start_engine(folder, MODEL, f"d{i}", port=dns_port, host=f"127.0.0.{i + 2}",
                                        time_scale=0.0001)[1] for i in range(2)]
        self.dns = Dns(["127.0.0.2", "127.0.0.3"])
        discovery = [{"name": "engines.test", "port": dns_port, "models": [MODEL], "interval_s": 0.2,
                      "nameserver": f"127.0.0.1:{self.dns.port}"}]
        self.configs, self.planes, self.admins = [], [], []
        # One config for both planes, but for their own ports (xDS, admin): what they serve must
        # be the same, so an Envoy that moves from one to the other is told nothing new.
        shared = base_config(free_port(), free_port(), [{"name": MODEL}], [{"url": self.engines[0], "models": [MODEL]}],
                             state={"etcd": self.etcd.endpoints, "etcd_tls": self.etcd.client_tls},
                             discovery=discovery)
        xds_ports = [free_port(), free_port()]
        for i, xds_port in enumerate(xds_ports):
            raw = dict(shared, listen=dict(shared["listen"], xds_port=xds_port, admin_port=free_port()))
            config = GatewayConfigFile(folder / f"plane{i}" / "gateway.yaml")
            config.path.parent.mkdir(parents=True, exist_ok=True)
            config.write(raw)
            self.configs.append(raw)
            self.start_plane(i, config)
        hosts = ",".join(f"127.0.0.1:{port}" for port in xds_ports)
        # Two Envoys on one port, as two hosts behind a load balancer would be: Linux shares the
        # port between them (Envoy's listeners use SO_REUSEPORT).
        self.envoys = [Envoy(folder, shared, name=f"envoy{i}", node_id=f"envoy{i}", xds_host=hosts) for i in range(2)]
        for envoy in self.envoys:
            envoy.wait_serving()

    def start_plane(self, i: int, config: GatewayConfigFile | None = None) -> None:
        path = config.path if config else self.folder / f"plane{i}" / "gateway.yaml"
        plane = start_control_plane(path.parent, path, name=f"plane{i}-{time.monotonic_ns()}",
                                    state_dir=path.parent / "state")
        admin = AdminClient(f"http://127.0.0.1:{self.configs[i]['listen']['admin_port']}", plane.state_dir)
        if i < len(self.planes):
            self.planes[i], self.admins[i] = plane, admin
        else:
            self.planes.append(plane)
            self.admins.append(admin)

    def leader(self) -> int | None:
        leading = [i for i, admin in enumerate(self.admins) if self.planes[i].alive()
                   and admin.status()["state"]["leader"]]
        return leading[0] if len(leading) == 1 else None


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("planes"))
    yield rig
    rig.etcd.stop()
    rig.dns.server.stop()


def discovered(admin: AdminClient) -> dict[str, str]:
    """The DNS-discovered backends a plane serves, with their states."""
    return {url: b["state"] for url, b in admin.backends().items() if b["source"] == "dns:engines.test"}


def urls(admin: AdminClient) -> set[str]:
    return set(admin.backends())


def test_a_change_on_one_plane_is_served_by_the_other_within_a_second(rig):
    # What the leader's discovery found, every plane serves.
    for admin in rig.admins:
        wait_until(lambda: discovered(admin) == {url: "active" for url in rig.discovered}, 10, "the DNS engines")
    began = time.monotonic()
    added = rig.admins[0].call("POST", "/backends", {"url": rig.engines[1], "models": [MODEL]})
    assert added.status == 201, added.text
    wait_until(lambda: rig.engines[1] in urls(rig.admins[1]), 1.0, "the other plane to have it")
    seen_after = time.monotonic() - began
    assert seen_after < 1.0
    # Both publish the same versions for the same state: an Envoy switching planes changes nothing.
    wait_until(lambda: rig.admins[0].status()["versions"]["CDS"] == rig.admins[1].status()["versions"]["CDS"], 5,
               "the same cluster version on both")
    for envoy in rig.envoys:
        wait_until(lambda: len(envoy.endpoints().get(f"model:{MODEL}", {})) == 4, 5, "every engine in each Envoy")


def test_changes_made_on_both_at_once_lose_nothing(rig):
    answers = []

    def make(admin, name):
        answers.append(admin.call("POST", "/keys", {"name": name}).status)
    threads = [threading.Thread(target=make, args=(rig.admins[i % 2], f"team-{i}")) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [201] * 12
    for admin in rig.admins:
        wait_until(lambda: {f"team-{i}" for i in range(12)} <= {k["name"] for k in admin.call("GET", "/keys").json()["data"]},
                   2, "every key on every plane")


def usage_requests(admin: AdminClient) -> int:
    answer = admin.call("GET", "/usage")
    assert answer.status == 200, answer.text
    return sum(row["requests"] for row in answer.json()["data"])


def test_usage_is_one_figure_over_both_planes(rig):
    """Each plane writes the requests logged to it as its own records in etcd; either sums them all."""
    before = usage_requests(rig.admins[0])
    assert usage_requests(rig.admins[1]) == before
    for _ in range(10):
        assert transcribe(rig.envoys[0].url, MODEL).status == 200
    for admin in rig.admins:
        wait_until(lambda: usage_requests(admin) == before + 10, 10, "the requests on the usage of each plane")


def test_one_leader_finishes_a_drain_once(rig):
    wait_until(lambda: rig.leader() is not None, 10, "one leader")
    follower = 1 - rig.leader()
    entry = rig.admins[follower].backends()[rig.engines[1]]
    drained = rig.admins[follower].call("POST", f"/backends/{entry['id']}/drain", {"timeout_s": 60})
    assert drained.status == 202
    wait_until(lambda: rig.engines[1] not in urls(rig.admins[0]) and rig.engines[1] not in urls(rig.admins[1]), 15,
               "the drain finished and the API backend gone everywhere")
    # The other plane sees the backend go through etcd's watch as the leader writes its log line:
    # wait for the line, then look that there is one only.
    def finished() -> list[int]:
        return [plane.log_text().count(f"drain of {entry['id']}") for plane in rig.planes]

    wait_until(lambda: sum(finished()) >= 1, 10, "the leader's log of the drain")
    assert sorted(finished()) == [0, 1], finished()  # once, by the leader


def test_losing_an_etcd_member_goes_unnoticed(rig):
    """First the member in use hangs (connections open, nothing answered), then it is killed; it
    stays down for the tests after this one: two of three keep etcd's quorum."""
    def changes_work(label: str) -> None:
        for i, admin in enumerate(rig.admins):
            began = time.monotonic()
            answer = admin.call("POST", "/keys", {"name": f"{label}-{i}"})
            assert answer.status == 201, answer.text
            assert time.monotonic() - began < 5  # a slower answer, never a failed one
        for envoy in rig.envoys:
            assert transcribe(envoy.url, MODEL).status == 200
        for admin in rig.admins:  # and the watch still delivers the other plane's change
            wait_until(lambda: {f"{label}-0", f"{label}-1"} <= {k["name"] for k in admin.call("GET", "/keys").json()["data"]},
                       3, "both changes on both planes")
    rig.etcd.pause(0)
    try:
        changes_work("member-hangs")
    finally:
        rig.etcd.resume(0)
    rig.etcd.wait_healthy(0)
    rig.etcd.kill(0)
    changes_work("member-killed")


def test_killing_a_control_plane_under_load_fails_nothing(rig):
    failures, done, stop = [], [0], threading.Event()

    def load(envoy):
        while not stop.is_set():
            answer = transcribe(envoy.url, MODEL)
            (done.__setitem__(0, done[0] + 1) if answer.status == 200 else failures.append(answer.status))
    threads = [threading.Thread(target=load, args=(envoy,)) for envoy in rig.envoys for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: rig.leader() is not None, 10, "a leader")
        leader = rig.leader()
        wait_until(lambda: done[0] >= 20, 20, "load")
        rig.planes[leader].kill()
        other = rig.admins[1 - leader]
        wait_until(lambda: len(other.status()["envoys"]) == 2, 15, "both Envoys on the other plane")
        wait_until(lambda: other.status()["state"]["leader"], 10, "the other plane to lead")
        # The engines the old leader's discovery found stay in service: a change of leader drains nothing.
        assert discovered(other) == {url: "active" for url in rig.discovered}
        before = done[0]
        wait_until(lambda: done[0] >= before + 20, 20, "load after the kill")
        # The survivor still changes the fleet, and the Envoys apply it.
        assert other.call("POST", "/backends", {"url": rig.engines[2], "models": [MODEL]}).status == 201
        for envoy in rig.envoys:
            wait_until(lambda: any(h.endswith(rig.engines[2].rsplit(":", 1)[1])
                                   for h in envoy.endpoints().get(f"model:{MODEL}", {})), 5, "the change in every Envoy")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []


def test_without_etcd_changes_get_503_and_serving_goes_on(rig):
    """Last: the etcd members it starts again are stopped when it ends."""
    survivor = next(admin for admin, plane in zip(rig.admins, rig.planes) if plane.alive())
    rig.etcd.stop()
    refused = survivor.call("POST", "/keys", {"name": "while-etcd-is-down"})
    assert refused.status == 503, refused.text
    assert "etcd does not answer" in refused.json()["error"]["message"]
    for envoy in rig.envoys:
        assert transcribe(envoy.url, MODEL).status == 200
    assert survivor.call("GET", "/backends").status == 200  # reading still works
    for i in range(3):
        rig.etcd.start(i)
    for i in range(3):
        rig.etcd.wait_healthy(i)
    wait_until(lambda: survivor.call("POST", "/keys", {"name": "etcd-is-back"}).status == 201, 15,
               "changes accepted again")
    wait_until(lambda: survivor.status()["state"]["leader"], 15, "leading again")
    # Losing leadership with etcd drained nothing, and the leader's discovery runs again.
    assert discovered(survivor) == {url: "active" for url in rig.discovered}
