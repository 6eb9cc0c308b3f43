"""Two real vLLM engines (CPU build, tiny checkpoint) behind the gateway, started once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.certificates import make_certificates
from harness.processes import (PYTHON, STARTED, GatewayStack, Process, free_port, request, socket_dir,
                               start_longform_worker, wait_until)

MODEL = "whisper-tiny"
HOME = Path(os.environ.get("WHISPER_GATEWAY_VLLM_HOME", Path.home() / ".cache" / "whisper-gateway"))
# Weights that answer PHRASE (engines/vllm/make_tiny_model.py) for any audio, in a few steps.
CHECKPOINT = HOME / "models" / "tiny-whisper-phrase"
PHRASE = " The gateway heard you."
# vLLM on 2 CPU cores loads in about 40 s; two at once take longer.
START_TIMEOUT_S = 300


CORES = {"a": "0", "b": "1"}
# Engine b runs with vLLM's own --api-key and serves HTTPS (vLLM's --ssl-certfile/--ssl-keyfile,
# a certificate of a CA made by the tests): the gateway sends the key (auth.engine_api_key_env)
# and checks the certificate (backend_tls.ca_file); engine a, plain HTTP with no key, ignores both.
ENGINE_KEY = "vllm-engine-key-for-tests"
KEYS = {"b": ENGINE_KEY}
HTTPS = {"b"}


def start_vllm(log_dir: Path, name: str, port: int, certs) -> Process:
    # Each engine on a core of its own, as each GPU engine has its own GPU: otherwise load on one
    # engine slows the other, and the gateway rightly measures both as slow.
    key = ["--api-key", KEYS[name]] if name in KEYS else []
    tls = ["--ssl-certfile", str(certs.server.cert), "--ssl-keyfile", str(certs.server.key)] if name in HTTPS else []
    return Process(f"vllm-{name}", [PYTHON, "-m", "engines.vllm", "--cpu", "--port", str(port), "--model", MODEL,
                                    "--model-path", str(CHECKPOINT), "--max-num-seqs", "2", "--name", name, *key,
                                    *tls], log_dir, env={"VLLM_CPU_OMP_THREADS_BIND": CORES[name]})


def host_of(url: str) -> str:
    """The engine as Envoy names it: IP:port (https engines are reached as localhost)."""
    return url.split("://", 1)[1].replace("localhost", "127.0.0.1")


def wait_healthy(process: Process, url: str, context) -> None:
    wait_until(lambda: process.alive() and request("GET", url + "/health", timeout=5, context=context).status == 200,
               START_TIMEOUT_S, f"{process.name} to load")


LONGFORM_ABOVE_S = 90.0  # above every other test's uploads (61 s at most)


class RealStack:
    def __init__(self, log_dir: Path):
        if not (CHECKPOINT / "model.safetensors").exists():
            pytest.fail("no vLLM CPU build: run `make test-vllm` (it builds one with engines/vllm/setup_cpu.sh)")
        self.log_dir = log_dir
        self.certs = make_certificates(log_dir / "certs")
        self.tls = self.certs.client_context()  # checks engine b's certificate
        self.ports = {"a": free_port(), "b": free_port()}
        self.urls = {name: f"https://localhost:{port}" if name in HTTPS else f"http://127.0.0.1:{port}"
                     for name, port in self.ports.items()}
        self.engines = {name: start_vllm(log_dir, name, port, self.certs) for name, port in self.ports.items()}
        for name, process in self.engines.items():
            wait_healthy(process, self.urls[name], self.tls)
        # vLLM's CPU build answers /metrics slowly while it decodes on both cores: give scrapes
        # the time a GPU engine would never need.
        os.environ["WHISPER_TEST_VLLM_KEY"] = ENGINE_KEY  # the control plane reads it at start
        # A longform worker: recordings over LONGFORM_ABOVE_S go to the engines in pieces.
        sockets = socket_dir()
        self.worker = start_longform_worker(log_dir, sockets)
        self.gateway = GatewayStack(log_dir, MODEL, list(self.urls.values()), longform={
            "workers": 1, "socket_dir": sockets, "split_above_s": LONGFORM_ABOVE_S}, auth={
            "engine_api_key_env": "WHISPER_TEST_VLLM_KEY"}, backend_tls={"ca_file": str(self.certs.ca)}, resilience={
            "health_interval_s": 1, "health_timeout_s": 5, "unhealthy_threshold": 2, "healthy_threshold": 1},
            routing={"scrape_interval_s": 1.0, "scrape_timeout_s": 0.9, "stale_after_s": 4.0})

    def restart(self, name: str) -> None:
        self.engines[name] = start_vllm(self.log_dir, name, self.ports[name], self.certs)
        wait_healthy(self.engines[name], self.urls[name], self.tls)

    def weights(self) -> dict[str, int]:
        hosts = self.gateway.hosts()
        return {name: int(hosts[host_of(url)]["weight"]) for name, url in self.urls.items()}

    def host_counts(self) -> dict[str, int]:
        """Requests Envoy sent to each engine so far (its per-host counters)."""
        hosts = self.gateway.hosts()
        return {name: int(hosts.get(host_of(url), {}).get("rq_total", 0))
                for name, url in self.urls.items()}


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    stack = RealStack(tmp_path_factory.mktemp("real-vllm"))
    yield stack
    for process in reversed(STARTED):
        process.stop()
