"""Shared servers: one gateway stack for the routing tests, started once per session; and the
line between the two layers of tests: a test that starts a real process (Envoy, an engine, a
control plane, etcd, openssl, an encoder, docker, a Python child) is marked `e2e`, and one that is
not marked may not start any (`make unit` runs those: `pytest -m "not e2e"`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness.processes import (
    STARTED,
    stop_all,
    Envoy,
    GatewayConfigFile,
    base_config,
    free_port,
    start_control_plane,
    start_engine,
)

MODEL_A = "whisper-large-v3-turbo"
MODEL_B = "whisper-small"


# -- the unit layer starts no process ------------------------------------------------------------------------------

_unmarked: list = []  # the running test (setup, call and teardown), when it is not marked e2e
_refused: dict[str, list[str]] = {}  # test id -> what it tried to start


def _refuse(what: str) -> None:
    if _unmarked:
        item = _unmarked[0]
        _refused.setdefault(item.nodeid, []).append(what)
        raise RuntimeError(f"{item.nodeid} starts a process ({what}) but is not marked e2e "
                           f"(pytestmark = pytest.mark.e2e, or @pytest.mark.e2e on the test)")


def _guarded(real, describe):
    def guarded(*args, **kwargs):
        _refuse(describe(*args, **kwargs))
        return real(*args, **kwargs)
    return guarded


# Every way a test could start a child: subprocess (and so subprocess.run and asyncio's subprocesses,
# which open a Popen), a bare fork (multiprocessing, os.spawn*), posix_spawn and os.system.
subprocess.Popen._execute_child = _guarded(subprocess.Popen._execute_child, lambda self, args, *_, **__: repr(args))
for _name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
    if hasattr(os, _name):
        setattr(os, _name, _guarded(getattr(os, _name), lambda *args, _name=_name, **__: f"os.{_name}{args[:1]!r}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Module and session fixtures start their processes in the setup of the first test that asks
    for them, so that test's marker decides."""
    if item.get_closest_marker("e2e") is None:
        _unmarked.append(item)
    try:
        yield
    finally:
        _unmarked.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A refusal fails the test even where the test caught the error it raised."""
    outcome = yield
    report = outcome.get_result()
    refused = _refused.pop(item.nodeid, None)  # reported once, in the phase it happened in
    if refused and report.passed:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} tried to start a process but is not marked e2e: " + "; ".join(refused)


@pytest.fixture(scope="session", autouse=True)
def reap_at_exit():
    """What module and session fixtures started is stopped when the run ends, whatever happened."""
    yield
    stop_all()


@pytest.fixture(autouse=True)
def reap_processes():
    """Whatever a test started and left running is stopped when it ends, pass or fail."""
    before = len(STARTED)
    yield
    stop_all(before)


class Stack:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.processes = []
        self.engine_urls: dict[str, str] = {}

    def add_engine(self, model: str, name: str, **options) -> str:
        process, url = start_engine(self.log_dir, model, name, **options)
        self.processes.append(process)
        self.engine_urls[name] = url
        return url

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    """Control plane + Envoy + three simulated engines: two for MODEL_A, one for MODEL_B."""
    log_dir = tmp_path_factory.mktemp("gateway")
    stack = Stack(log_dir)
    try:
        a1 = stack.add_engine(MODEL_A, "a1")
        a2 = stack.add_engine(MODEL_A, "a2")
        b1 = stack.add_engine(MODEL_B, "b1")
        raw = base_config(
            xds_port=free_port(), listen_port=free_port(),
            models=[{"name": MODEL_A, "aliases": ["whisper-1"]}, {"name": MODEL_B}],
            backends=[{"url": a1, "models": [MODEL_A]}, {"url": a2, "models": [MODEL_A]},
                      {"url": b1, "models": [MODEL_B]}],
            limits={"max_upload_mb": 8},
        )
        config = GatewayConfigFile(log_dir / "gateway.yaml")
        config.write(raw)
        stack.processes.append(start_control_plane(log_dir, config.path))
        envoy = Envoy(log_dir, raw)
        stack.processes.append(envoy.process)
        envoy.wait_serving()
        stack.envoy = envoy
        stack.url = envoy.url
        yield stack
    finally:
        stack.stop()
