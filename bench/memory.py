"""Envoy's memory under concurrent large uploads: what the container must be given.

One simulated engine (fast, 64 slots), a real control plane and Envoy. `--clients` threads each
send `--rounds` uploads of `--mb` MiB at once, by the model's name and by an alias (an alias
makes the Lua filter rewrite the body, a copy in LuaJIT's memory that Envoy's overload manager
does not see). Envoy's resident memory is sampled every 20 ms: peak, and what is left after.

    .venv/bin/python -m bench.memory [--clients 10] [--mb 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from bench.machine import describe_machine
from engines.common.audio import silent_wav
from harness.processes import STARTED, Envoy, GatewayConfigFile, base_config, free_port, multipart, request, \
    start_control_plane, start_engine

RESULTS = Path(__file__).parent / "results"


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


def run(log_dir: Path, model_field: str, clients: int, mb: int, rounds: int) -> dict:
    _, engine = start_engine(log_dir, "m", f"e-{model_field}", time_scale=0.01, max_num_seqs=64)
    raw = base_config(free_port(), free_port(), [{"name": "m", "aliases": ["whisper-1"]}],
                      [{"url": engine, "models": ["m"]}], limits={"max_heap_mb": 4096, "max_upload_mb": mb + 1})
    config = GatewayConfigFile(log_dir / f"gateway-{model_field}.yaml")
    config.write(raw)
    start_control_plane(log_dir, config.path, name=f"control-plane-{model_field}", state_dir=log_dir / model_field)
    envoy = Envoy(log_dir, raw, name=f"envoy-{model_field}")
    envoy.wait_serving()
    pid = envoy.process.popen.pid
    idle = rss_mib(pid)
    audio = silent_wav(mb * 1024 * 1024 / 32000)  # 16 kHz, 16-bit: 32 kB a second
    body = multipart([("model", model_field, None), ("file", audio, "a.wav")])
    headers = {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk"}
    peak, done, statuses = [idle], threading.Event(), []

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.02)

    def send() -> None:
        for _ in range(rounds):
            statuses.append(request("POST", envoy.url + "/v1/audio/transcriptions", body, headers, timeout=120).status)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    senders = [threading.Thread(target=send) for _ in range(clients)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    done.set()
    sampler.join()
    time.sleep(0.5)
    return {"model_field": model_field, "idle_rss_mib": idle, "peak_rss_mib": peak[0], "after_rss_mib": rss_mib(pid),
            "answers": sorted(set(statuses)), "uploads": len(statuses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    machine = describe_machine()
    try:
        rows = [run(log_dir, field, args.clients, args.mb, args.rounds) for field in ("m", "whisper-1")]
    finally:
        for process in reversed(STARTED):
            process.stop()
    report = {"date": machine["date"], "commit": machine["git_commit"], "machine": machine, "clients": args.clients,
              "mb": args.mb, "rounds": args.rounds, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(report, indent=2))
    for row in rows:
        print(f"model={row['model_field']:<10} idle {row['idle_rss_mib']} MiB, peak {row['peak_rss_mib']} MiB, "
              f"after {row['after_rss_mib']} MiB ({row['uploads']} uploads of {args.mb} MiB, "
              f"{args.clients} at once; answers {row['answers']})")


if __name__ == "__main__":
    main()
