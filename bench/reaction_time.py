"""Reaction time: foreign load starts on an engine -> Envoy's /clusters shows its lower weight.

Two simulated engines behind a real control plane and Envoy, at the default scrape interval.
Each trial waits for equal weights, starts clients sending straight to one engine, and polls
Envoy's admin API every 5 ms until that engine's weight has dropped. Prints median and p95.

    .venv/bin/python -m bench.reaction_time [--trials 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.workload import percentile
from harness.processes import (
    STARTED,
    Envoy,
    GatewayConfigFile,
    LoadGenerator,
    base_config,
    free_port,
    start_control_plane,
    start_engine,
    wait_until,
)

MODEL = "whisper-large-v3-turbo"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.25, help="routing.scrape_interval_s")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-reaction-"))
    try:
        engines = {name: start_engine(log_dir, MODEL, name, max_num_seqs=4)[1] for name in ("loaded", "other")}
        raw = base_config(free_port(), free_port(), [{"name": MODEL}],
                          [{"url": url, "models": [MODEL]} for url in engines.values()],
                          routing={"scrape_interval_s": args.interval, "scrape_timeout_s": args.interval * 0.8,
                                   "stale_after_s": max(1.0, args.interval * 4)})
        config = GatewayConfigFile(log_dir / "gateway.yaml")
        config.write(raw)
        start_control_plane(log_dir, config.path)
        envoy = Envoy(log_dir, raw)
        envoy.wait_serving()
        loaded = engines["loaded"].removeprefix("http://")
        other = engines["other"].removeprefix("http://")

        def weights() -> tuple[int, int]:
            hosts = envoy.endpoints()[f"model:{MODEL}"]
            return int(hosts[loaded]["weight"]), int(hosts[other]["weight"])

        reactions = []
        for _ in range(args.trials):
            wait_until(lambda: weights()[0] == weights()[1], 20, "equal weights")
            time.sleep(args.interval * 2)  # start at a random point of the scrape cycle
            started = time.monotonic()
            load = LoadGenerator(engines["loaded"], MODEL, concurrency=10, max_seconds=20)
            while True:
                w_loaded, w_other = weights()
                if w_loaded < w_other:
                    reactions.append(time.monotonic() - started)
                    break
                if time.monotonic() - started > 10:
                    raise SystemExit("no reaction within 10 s")
                time.sleep(0.005)
            load.stop()
        result = {
            "trials": len(reactions),
            "scrape_interval_s": args.interval,
            "median_s": round(statistics.median(reactions), 3),
            "p95_s": round(percentile(reactions, 0.95), 3),
            "max_s": round(max(reactions), 3),
        }
        print(json.dumps(result))
    finally:
        for process in reversed(STARTED):
            process.stop()


if __name__ == "__main__":
    main()
