"""Shared servers: one gateway stack for the routing tests, started once per session."""

from __future__ import annotations

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
