"""Wrong API keys at the edge: what a flood of guesses costs a valid key's requests.

A real control plane and Envoy with auth.api_keys required, a simulated engine that answers at
once (time scale 1e-4). One client sends a valid key's small silent clips (0.5 s WAV) one after
another, --interval apart, from 127.0.0.1; its latencies (send to whole answer) are measured for
--seconds twice, with Envoy's CPU share (utime+stime over the phase's time):

  idle    nothing else reaches Envoy
  flood   meanwhile another process sends --rate requests per second from 127.0.0.2, each with
          another of --distinct wrong keys (by default more than the Lua filter's digest cache
          holds: each is hashed), over --connections keep-alive connections; after its first
          --threshold (auth.bad_keys_per_address) they get 429 rather than 401; --threshold 0
          answers them all 401, as before that limit existed: the same flood, without it

Envoy runs --workers worker threads (default 1: the flood and the valid key share one Lua state
and one core, the worst case). Target: the valid key's p99 during the flood within 1.2x its idle
p99. Loopback only; every phase is bounded in time.

    .venv/bin/python -m bench.bad_keys [--seconds 15] [--rate 2000]

Writes bench/results/bad_keys.json and prints it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import socket
import tempfile
import threading
import time
from pathlib import Path

from bench.datapath import cpu_seconds
from bench.machine import describe_machine
from bench.workload import percentile
from harness.processes import STARTED, GatewayStack, multipart, silent_wav, start_engine, stop_all, wait_until

MODEL = "whisper-large-v3-turbo"
RESULTS = Path(__file__).parent / "results"
VALID_FROM, FLOOD_FROM = "127.0.0.1", "127.0.0.2"
BOUNDARY = "wgboundary7MA4YWxk"
DISTINCT_GUESSES = 20_000  # over the Lua filter's digest cache (4096): every guess is hashed (--distinct)
TARGET_RATIO = 1.2


def _read_answer(connection: socket.socket, pending: bytes) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 answer: (status, bytes read past it, whether the server closes the connection)."""
    received = pending
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return int(lines[0].split()[1]), rest[length:], headers.get("connection", "").lower() == "close"


def _flood_connection(port: int, requests: list[bytes], start: int, step: int, period: float, deadline: float,
                      statuses: dict, lock: threading.Lock) -> None:
    """Sends requests[start::step] round and round, one each `period`, until the deadline."""
    connection, pending, index = None, b"", start
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        next_at += period
        try:
            if connection is None:
                connection = socket.create_connection(("127.0.0.1", port), timeout=10,
                                                      source_address=(FLOOD_FROM, 0))
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pending = b""
            connection.sendall(requests[index])
            status, pending, closing = _read_answer(connection, pending)
        except OSError:
            status, closing = 0, True
        index = (index + step) % len(requests)
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
        if closing and connection is not None:
            connection.close()
            connection = None
    if connection is not None:
        connection.close()


def flood(port: int, rate: float, seconds: float, connections: int, distinct: int, results) -> None:
    """In its own process: `rate` wrong-key requests a second for `seconds`, `distinct` different
    keys round and round; puts the answers' statuses, the rate achieved and its CPU on `results`."""
    requests = [(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer sk-wg-guess-{i:08d}-{i * 7919 % 100_003:06d}\r\n"
                 f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 0\r\n\r\n").encode()
                for i in range(distinct)]
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    started, cpu = time.monotonic(), time.process_time()
    deadline = started + seconds
    threads = [threading.Thread(target=_flood_connection, args=(port, requests, i, connections,
                                                                connections / rate, deadline, statuses, lock))
               for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    elapsed = time.monotonic() - started
    results.put({"statuses": {str(k): v for k, v in sorted(statuses.items())},
                 "achieved_rate": round(sum(statuses.values()) / elapsed),
                 "client_cpu_share": round((time.process_time() - cpu) / elapsed, 2)})


def valid_latencies(port: int, secret: str, seconds: float, interval: float) -> tuple[list[float], dict]:
    """Sequential clips with a valid key, `interval` apart, for `seconds`: latencies in ms, statuses."""
    body = multipart([("model", MODEL, None), ("file", silent_wav(0.5), "clip.wav")], BOUNDARY)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Authorization": f"Bearer {secret}"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(VALID_FROM, 0))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    try:
        while time.monotonic() < deadline:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
            sent = time.perf_counter()
            connection.request("POST", "/v1/audio/transcriptions", body, headers)
            answer = connection.getresponse()
            answer.read()
            took = (time.perf_counter() - sent) * 1000
            statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
            if answer.status == 200:
                latencies.append(took)
    finally:
        connection.close()
    return latencies, statuses


def summary(latencies: list[float], statuses: dict, envoy_cpu_s: float, seconds: float) -> dict:
    return {"requests": len(latencies), "statuses": statuses, "envoy_cpu_share": round(envoy_cpu_s / seconds, 3),
            "p50_ms": round(percentile(latencies, 0.5), 2) if latencies else None,
            "p99_ms": round(percentile(latencies, 0.99), 2) if latencies else None,
            "max_ms": round(max(latencies), 2) if latencies else None}


def run(args: argparse.Namespace, log_dir: Path) -> dict:
    since = len(STARTED)
    try:
        engine = start_engine(log_dir, MODEL, "bad-keys", time_scale=0.0001, max_num_seqs=256)[1]
        stack = GatewayStack(log_dir, MODEL, [engine], workers=args.workers,
                             auth={"api_keys": "required", "bad_keys_per_address": args.threshold})
        secret = stack.admin.call("POST", "/keys", {"name": "bench"}).json()["secret"]
        port = stack.raw["listen"]["port"]
        wait_until(lambda: set(valid_latencies(port, secret, 0.01, 1.0)[1]) == {"200"}, 10, "the key in Envoy")
        valid_latencies(port, secret, 1.0, args.interval)  # warm-up
        engine_before = stack.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_total")
        envoy = [stack.envoy.process.popen.pid]
        cpu = cpu_seconds(envoy)
        idle = summary(*valid_latencies(port, secret, args.seconds, args.interval), cpu_seconds(envoy) - cpu,
                       args.seconds)

        results = multiprocessing.get_context("spawn").Queue()
        flooder = multiprocessing.get_context("spawn").Process(
            target=flood, args=(port, args.rate, args.seconds + 2.0, args.connections, args.distinct, results))
        flooder.start()
        try:
            time.sleep(1.0)  # the flood under way, its address over the threshold
            cpu = cpu_seconds(envoy)
            during = summary(*valid_latencies(port, secret, args.seconds, args.interval), cpu_seconds(envoy) - cpu,
                             args.seconds)
            flood_result = results.get(timeout=args.seconds + 60)
        finally:
            flooder.join(30)
            if flooder.is_alive():
                flooder.kill()
        engine_requests = stack.envoy.stat(f"cluster.model_{MODEL}.upstream_rq_total") - engine_before
        ratio = during["p99_ms"] / idle["p99_ms"] if idle["p99_ms"] and during["p99_ms"] else None
        return {
            "settings": {"seconds": args.seconds, "interval_s": args.interval, "rate": args.rate,
                         "connections": args.connections, "distinct_guesses": args.distinct,
                         "bad_keys_per_address": args.threshold,
                         "envoy_workers": args.workers},
            "idle": idle, "flood": during, "flood_requests": flood_result,
            # Only the valid key's requests may reach the engine: every guess is answered in Lua.
            "engine_requests": engine_requests,
            "guesses_reached_an_engine": engine_requests != idle["requests"] + during["requests"],
            "p99_ratio": round(ratio, 3) if ratio else None,
            "target": f"p99 during the flood <= {TARGET_RATIO}x idle p99",
            "target_met": ratio is not None and ratio <= TARGET_RATIO,
        }
    finally:
        stop_all(since)  # whatever started, even when a start failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="of each phase")
    parser.add_argument("--rate", type=float, default=2000.0, help="wrong-key requests a second in the flood")
    parser.add_argument("--connections", type=int, default=8, help="the flood's keep-alive connections")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between the valid key's requests")
    parser.add_argument("--workers", type=int, default=1, help="Envoy's --concurrency")
    parser.add_argument("--threshold", type=int, default=20,
                        help="auth.bad_keys_per_address (0: every guess gets 401, as before the limit existed)")
    parser.add_argument("--distinct", type=int, default=DISTINCT_GUESSES,
                        help="different wrong keys (up to 4096 stay in the digest cache: not hashed again)")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-bad-keys-"))
    report = {"machine": describe_machine(), **run(args, log_dir)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bad_keys.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
