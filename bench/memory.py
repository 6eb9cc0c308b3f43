"""Envoy's memory under concurrent large uploads: what the container must be given.

One simulated engine (fast, 64 slots), a real control plane and Envoy. `--clients` threads each
send `--rounds` uploads of `--mb` MiB at once, by the model's name and by an alias (an alias
makes the Lua filter rewrite the body, a copy in LuaJIT's memory that Envoy's overload manager
does not see). Envoy's resident memory is sampled every 20 ms: peak, and what is left after.

    .venv/bin/python -m bench.memory [--clients 10] [--mb 20] [--rounds 3]

`--slow`: the issue's case instead: `--clients` uploads of `--mb` MiB at once, each sent over
`--seconds` (all admitted or refused before any finishes), against `--heap-mb` of
`limits.max_heap_mb`: peak RSS, and how many were answered 200, 503 (refused before a byte was
buffered) or otherwise.

    .venv/bin/python -m bench.memory --slow [--clients 40] [--mb 24] [--heap-mb 2048] [--seconds 10]

`--streamed`: uploads past `limits.max_upload_mb` (25), which stream to a longform worker unread:
`--clients` uploads of `--mb` MiB at once (silent 16 kHz WAV), split across four fast simulated
engines; Envoy's and the worker's peak RSS, and the answers.

    .venv/bin/python -m bench.memory --streamed [--clients 10] [--mb 200]
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

from bench.machine import describe_machine
from control_plane.supervisor import envoy_workers
from engines.common.audio import silent_wav
from harness.processes import STARTED, Envoy, GatewayConfigFile, base_config, free_port, multipart, request, socket_dir, \
    start_control_plane, start_engine, start_longform_worker, wait_until

RESULTS = Path(__file__).parent / "results"


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


def peak_rss_while(pid: int, clients: int, send) -> int:
    """Envoy's peak RSS (MiB, sampled every 20 ms) while `clients` threads each run send()."""
    peak, done = [rss_mib(pid)], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    senders = [threading.Thread(target=send) for _ in range(clients)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    done.set()
    sampler.join()
    return peak[0]


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
    statuses = []

    def send() -> None:
        for _ in range(rounds):
            statuses.append(request("POST", envoy.url + "/v1/audio/transcriptions", body, headers, timeout=120).status)

    peak = peak_rss_while(pid, clients, send)
    time.sleep(0.5)
    return {"model_field": model_field, "idle_rss_mib": idle, "peak_rss_mib": peak, "after_rss_mib": rss_mib(pid),
            "answers": sorted(set(statuses)), "uploads": len(statuses)}


def slow_upload(port: int, head: bytes, body: bytes, seconds: float) -> str:
    """One upload sent in 20 pieces over `seconds`: its answer's status, or how it ended."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as connection:
            connection.sendall(head)
            step = len(body) // 20 + 1
            for at in range(0, len(body), step):
                connection.sendall(body[at:at + step])
                time.sleep(seconds / 20)
            answer = connection.recv(4096)
            return answer.split(b" ", 2)[1].decode() if answer else "closed"
    except OSError as error:
        return type(error).__name__


def run_slow(log_dir: Path, clients: int, mb: int, heap_mb: int, seconds: float) -> dict:
    _, engine = start_engine(log_dir, "m", "e-slow", time_scale=0.01, max_num_seqs=64)
    raw = base_config(free_port(), free_port(), [{"name": "m"}], [{"url": engine, "models": ["m"]}],
                      limits={"max_heap_mb": heap_mb, "max_upload_mb": mb + 1})
    config = GatewayConfigFile(log_dir / "gateway-slow.yaml")
    config.write(raw)
    start_control_plane(log_dir, config.path, name="control-plane-slow", state_dir=log_dir / "slow")
    envoy = Envoy(log_dir, raw, name="envoy-slow")
    envoy.wait_serving()
    pid = envoy.process.popen.pid
    idle = rss_mib(pid)
    body = multipart([("model", "m", None), ("file", silent_wav(mb * 1024 * 1024 / 32000), "a.wav")])
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=wgboundary7MA4YWxk\r\n\r\n").encode()
    outcomes = []
    peak = peak_rss_while(pid, clients, lambda: outcomes.append(slow_upload(envoy.listen_port, head, body, seconds)))
    counts = {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))}
    return {"heap_mb": heap_mb, "idle_rss_mib": idle, "peak_rss_mib": peak, "answers": counts,
            "workers": envoy_workers()}


def run_streamed(log_dir: Path, clients: int, mb: int) -> dict:
    engines = [start_engine(log_dir, "m", f"e{i}", time_scale=0.001, max_num_seqs=64)[1] for i in range(4)]
    spool, sockets = log_dir / "spool", socket_dir()
    spool.mkdir()
    worker = start_longform_worker(log_dir, sockets, options=("--max-upload-mb", str(mb + 1)), env={"TMPDIR": str(spool)})
    raw = base_config(free_port(), free_port(), [{"name": "m"}], [{"url": url, "models": ["m"]} for url in engines],
                      limits={"max_upload_mb": 25, "max_longform_mb": mb + 1},
                      longform={"workers": 1, "socket_dir": sockets})
    config = GatewayConfigFile(log_dir / "gateway-streamed.yaml")
    config.write(raw)
    start_control_plane(log_dir, config.path, name="control-plane-streamed", state_dir=log_dir / "streamed")
    envoy = Envoy(log_dir, raw, name="envoy-streamed")
    envoy.wait_serving()
    wait_until(lambda: all(h.get("health_flags") == "healthy"
                           for h in envoy.endpoints().get("whisper:longform", {"-": {}}).values()), 10, "the worker healthy")
    pid, worker_pid = envoy.process.popen.pid, worker.popen.pid
    idle = rss_mib(pid)
    seconds = mb * 1024 * 1024 / 32000  # 16 kHz, 16-bit: 32 kB a second
    body = multipart([("model", "m", None), ("file", silent_wav(seconds), "a.wav")])
    headers = {"Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk"}
    statuses, worker_peak, started = [], [rss_mib(worker_pid)], time.monotonic()

    def send() -> None:
        answer = request("POST", envoy.url + "/v1/audio/transcriptions", body, headers, timeout=1800)
        statuses.append(answer.status if answer.status != 200 or answer.json()["usage"]["seconds"] >= int(seconds)
                        else "short")

    def watch_worker() -> None:
        while len(statuses) < clients:
            worker_peak[0] = max(worker_peak[0], rss_mib(worker_pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_worker, daemon=True)
    watcher.start()
    peak = peak_rss_while(pid, clients, send)
    watcher.join()
    return {"idle_rss_mib": idle, "peak_rss_mib": peak, "worker_peak_rss_mib": worker_peak[0],
            "answers": {str(s): statuses.count(s) for s in set(statuses)}, "wall_s": round(time.monotonic() - started, 1),
            "audio_s_each": round(seconds, 1), "workers": envoy_workers()}


def _measured(measure, name: str, machine: dict, settings: dict) -> dict:
    """One measurement's row, its processes stopped however it ended, written to RESULTS/name."""
    try:
        row = measure()
    finally:
        for process in reversed(STARTED):
            process.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(
        {"date": machine["date"], "commit": machine["git_commit"], "machine": machine, **settings, **row}, indent=2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow", action="store_true")
    parser.add_argument("--streamed", action="store_true")
    parser.add_argument("--heap-mb", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    machine = describe_machine()
    if args.streamed:
        row = _measured(lambda: run_streamed(log_dir, args.clients, args.mb), "memory-streamed.json", machine,
                        {"clients": args.clients, "mb": args.mb})
        print(f"{args.clients} streamed uploads of {args.mb} MiB ({row['audio_s_each']} s of audio each) at once, "
              f"{row['workers']} Envoy workers: Envoy idle {row['idle_rss_mib']} MiB, peak {row['peak_rss_mib']} MiB; "
              f"worker peak {row['worker_peak_rss_mib']} MiB; answers {row['answers']} in {row['wall_s']} s")
        return
    if args.slow:
        row = _measured(lambda: run_slow(log_dir, args.clients, args.mb, args.heap_mb, args.seconds), "memory-slow.json",
                        machine, {"clients": args.clients, "mb": args.mb, "seconds": args.seconds})
        print(f"{args.clients} slow uploads of {args.mb} MiB, max_heap_mb {args.heap_mb}, {row['workers']} workers: "
              f"idle {row['idle_rss_mib']} MiB, peak {row['peak_rss_mib']} MiB; answers {row['answers']}")
        return
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
