"""Soak: mixed load through the gateway while faults are injected; failures and memory.

Three simulated engines, real control plane and Envoy. For `--seconds`, clients send clips of
1 to 90 s; every few seconds a fault is injected in turn: an engine killed (and restarted), an
engine answering 503, an engine slowed down tenfold, its metrics hanging, the control plane
killed and restarted. Reports requests, failures by status, and the resident memory of Envoy
and the control plane at start and end.

    .venv/bin/python -m bench.soak [--seconds 120]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

from harness.processes import (
    STARTED,
    Envoy,
    GatewayConfigFile,
    base_config,
    free_port,
    request,
    start_control_plane,
    start_engine,
    transcribe,
    wait_until,
)

MODEL = "whisper-large-v3-turbo"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class Load:
    """`concurrency` clients sending clips of 1 to 90 s until the deadline, counting answers by status."""

    def __init__(self, url: str, concurrency: int, seconds: float):
        self.statuses: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self.deadline = time.monotonic() + seconds
        self._threads = [threading.Thread(target=self._client, args=(url, i)) for i in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _client(self, url: str, seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < self.deadline:
            try:
                status = transcribe(url, MODEL, seconds=local.choice([1, 5, 15, 30, 90]),
                                    extra=[("language", "en", None)]).status
            except OSError:
                status = 0
            with self._lock:
                self.statuses[status] += 1

    def join(self) -> None:
        for thread in self._threads:
            thread.join(60)


def start_engines(log_dir: Path, ports: dict[str, int]) -> dict:
    return {name: start_engine(log_dir, MODEL, name, port=port, max_num_seqs=8, time_scale=0.1)
            for name, port in ports.items()}


def inject(fault: str, victim: str, engines: dict, ports: dict, plane, config_path: Path, log_dir: Path,
           every: float):
    """One fault on one engine (or the control plane), undone; returns the control plane now running."""
    process, url = engines[victim]
    if fault == "kill":
        process.signal(signal.SIGKILL)
        time.sleep(2)
        engines.update(start_engines(log_dir, {victim: ports[victim]}))
    elif fault == "control-plane":
        plane.kill()
        time.sleep(1)
        plane = start_control_plane(log_dir, config_path, name="control-plane-again", state_dir=plane.state_dir)
    else:
        change = {"503": {"requests": "503"}, "slow": {"slowdown": 10}, "metrics": {"metrics": "hang"}}[fault]
        request("POST", url + "/_sim/faults", json.dumps(change).encode(), {"Content-Type": "application/json"})
        time.sleep(every / 2)
        request("POST", url + "/_sim/faults", json.dumps({"requests": "ok", "slowdown": 1, "metrics": "ok"})
                .encode(), {"Content-Type": "application/json"})
    return plane


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fault-every", type=float, default=6.0)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    rng = random.Random(7)
    try:
        ports = {name: free_port() for name in ("e1", "e2", "e3")}
        engines = start_engines(log_dir, ports)
        raw = base_config(free_port(), free_port(), [{"name": MODEL}],
                          [{"url": url, "models": [MODEL]} for _, url in engines.values()],
                          resilience={"health_interval_s": 0.5, "health_timeout_s": 1.0, "unhealthy_threshold": 2,
                                      "ejection_s": 2},
                          timeouts={"route_s": 30})
        config = GatewayConfigFile(log_dir / "gateway.yaml")
        config.write(raw)
        plane = start_control_plane(log_dir, config.path)
        envoy = Envoy(log_dir, raw)
        envoy.wait_serving()
        memory_start = {"envoy_mb": rss_mb(envoy.process.popen.pid), "control_plane_mb": rss_mb(plane.popen.pid)}
        load = Load(envoy.url, args.concurrency, args.seconds)
        faults, injected = itertools.cycle(["kill", "503", "slow", "metrics", "control-plane"]), []
        while time.monotonic() < load.deadline - args.fault_every:
            time.sleep(args.fault_every)
            injected.append(next(faults))
            plane = inject(injected[-1], rng.choice(list(engines)), engines, ports, plane, config.path, log_dir,
                           args.fault_every)
        load.join()
        wait_until(lambda: request("GET", envoy.admin + "/ready").status == 200, 5, "Envoy up")
        total, statuses = sum(load.statuses.values()), load.statuses
        print(json.dumps({
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "faults": collections.Counter(injected),
            "requests": total,
            "failed": {str(k): v for k, v in statuses.items() if k != 200},
            "failed_fraction": round((total - statuses[200]) / max(1, total), 4),
            "memory_start": memory_start,
            "memory_end": {"envoy_mb": rss_mb(envoy.process.popen.pid), "control_plane_mb": rss_mb(plane.popen.pid)},
        }))
    finally:
        for process in reversed(STARTED):
            process.stop()


if __name__ == "__main__":
    main()
