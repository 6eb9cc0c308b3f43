"""compose.yaml for real: Docker's engine, the images deploy/images.sh built, docker-compose.
`make test-compose` starts dockerd if none runs and builds the images first."""

from __future__ import annotations

import os
import shutil

import pytest

from harness.compose import IMAGES_ENV, ComposeProject, docker, remove_stale, wait_serving

PREFIXES = ("wgcpu", "wgha")  # this suite's project names


@pytest.fixture(scope="session", autouse=True)
def docker_engine():
    if shutil.which("docker-compose") is None or docker("info", check=False).returncode != 0:
        pytest.fail("no Docker engine or docker-compose: run `make test-compose`, which starts dockerd")
    if not IMAGES_ENV.exists():
        pytest.fail("no images: run `make images` (or `make test-compose`)")
    remove_stale(PREFIXES)


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    """The `cpu` profile from nothing: certificates, control plane, Envoy, one CPU Whisper engine."""
    project = ComposeProject(tmp_path_factory.mktemp("compose-cpu"), f"wgcpu{os.getpid()}")
    try:
        project.up("certs", "control-plane", "envoy", "lb", "engine-cpu")
        wait_serving(project)
        project.secret = project.key("compose-suite")
        yield project
    finally:
        for service in ("control-plane", "envoy"):
            (project.work / f"{service}.log").write_text(project.logs(service))
        project.down()


@pytest.fixture(scope="module")
def ha(tmp_path_factory):
    """The `ha` profile: two control planes on a three-member etcd over TLS, one Envoy that knows both."""
    project = ComposeProject(tmp_path_factory.mktemp("compose-ha"), f"wgha{os.getpid()}",
                             config="./deploy/gateway-ha.yaml", xds_host="control-plane,control-plane-b")
    project.admin_b = f"https://127.0.0.1:{project.ports['ADMIN_PORT_B']}"
    try:
        project.up("certs", "etcd-0", "etcd-1", "etcd-2", "control-plane", "control-plane-b", "envoy", "lb", "engine-cpu")
        wait_serving(project)
        project.secret = project.key("compose-ha-suite")
        yield project
    finally:
        for service in ("control-plane", "control-plane-b", "envoy", "etcd-0"):
            (project.work / f"{service}.log").write_text(project.logs(service))
        project.down()
