"""The `ha` profile: two control planes sharing their state in a three-member etcd over TLS. The
leading plane's container killed under load loses nothing; an etcd member cut off from the
network goes unnoticed."""

from __future__ import annotations

import os
import signal
import ssl

from harness.compose import TOKEN, docker
from harness.processes import LoadGenerator, request, wait_until

MODEL = "whisper-1"
UNCHECKED = ssl._create_unverified_context()  # the planes' certificates are checked by the CLI, not here
ADMIN = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def status(url: str) -> dict:
    return request("GET", url + "/status", headers=ADMIN, context=UNCHECKED, timeout=5).json()


def make_key(url: str, name: str):
    return request("POST", url + "/keys", f'{{"name": "{name}"}}'.encode(), ADMIN, context=UNCHECKED, timeout=15)


def key_names(url: str) -> set[str]:
    answer = request("GET", url + "/keys", headers=ADMIN, context=UNCHECKED, timeout=5)
    return {k["name"] for k in answer.json()["data"]}


def test_both_planes_serve_one_state_over_etcd_with_tls(ha):
    made = make_key(ha.admin_b, "made-on-b")
    assert made.status == 201, made.text
    wait_until(lambda: "made-on-b" in key_names(ha.admin), 10, "the key on the other plane")
    assert {status(ha.admin)["state"]["store"], status(ha.admin_b)["state"]["store"]} == {"etcd"}
    assert sorted([status(ha.admin)["state"]["leader"], status(ha.admin_b)["state"]["leader"]]) == [False, True]


def test_the_leading_planes_container_killed_under_load_loses_nothing(ha):
    leader = "control-plane" if status(ha.admin)["state"]["leader"] else "control-plane-b"
    follower_url = ha.admin_b if leader == "control-plane" else ha.admin
    load = LoadGenerator(ha.url, MODEL, concurrency=3, seconds=1.0, max_seconds=120, max_requests=400,
                         headers={"Authorization": f"Bearer {ha.secret}"})
    try:
        wait_until(lambda: len(load.statuses) >= 5, 60, "load before the kill")
        victim = ha.containers(leader)[0]
        os.kill(victim["State"]["Pid"], signal.SIGKILL)
        wait_until(lambda: status(follower_url)["state"]["leader"], 30, "the other plane leading")
        wait_until(lambda: ha.containers(leader)[0]["State"]["Running"]
                   and ha.containers(leader)[0]["RestartCount"] > victim["RestartCount"], 60, "the plane restarted")
        made = make_key(follower_url, "after-the-leader-died")
        assert made.status == 201, made.text
        served = len(load.statuses)
        wait_until(lambda: len(load.statuses) >= served + 10, 90, "requests after the kill")
    finally:
        statuses = load.stop()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def test_an_etcd_member_cut_off_goes_unnoticed(ha):
    member = ha.containers("etcd-0")[0]
    docker("network", "disconnect", ha.network(), member["Id"])
    try:
        for i, url in enumerate((ha.admin, ha.admin_b)):
            made = make_key(url, f"while-etcd-0-is-cut-off-{i}")
            assert made.status == 201, made.text
        wait_until(lambda: {"while-etcd-0-is-cut-off-0", "while-etcd-0-is-cut-off-1"} <= key_names(ha.admin)
                   and {"while-etcd-0-is-cut-off-0", "while-etcd-0-is-cut-off-1"} <= key_names(ha.admin_b),
                   15, "both changes on both planes")
    finally:
        docker("network", "connect", "--alias", "etcd-0", ha.network(), member["Id"])
