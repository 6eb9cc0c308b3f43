"""A key's requests-in-flight limit: how far real Envoys over-admit it.

The control plane counts a key's requests from the access logs and grants each Envoy its part of
the free slots (RLQS token buckets, replaced when a slot frees); requests an Envoy lets through
before its first grant, or while an end is on its way in the logs, are what can exceed LIMIT.
A simulated engine that takes about a second per clip, behind a real control plane and one or
two real Envoys on one port. Two loads on one key whose plan allows LIMIT in flight:

- burst: BURST requests sent at once, ROUNDS times (each once the last has ended): how many
  were admitted;
- closed loop: WORKERS clients, each sending its next request as soon as its last is answered,
  and 0.1 s after a 429 (not waiting the 1 s Retry-After says: the worst client), for --seconds.
  Admitted requests' spans (sent to answered, as the client saw them) give how many of the key's
  requests were in flight at once: the most, and the time-weighted mean.

    .venv/bin/python -m bench.in_flight [--seconds 30] [--envoys 2]

Writes bench/results/in_flight.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.machine import describe_machine
from harness.processes import Envoy, GatewayStack, multipart, silent_wav, start_engine, wait_until

MODEL = "whisper-large-v3-turbo"
RESULTS = Path(__file__).parent / "results"
LIMIT = 4
BURST, ROUNDS = 20, 5
WORKERS = 16
RETRY_AFTER_429_S = 0.1


def overlap(spans: list[tuple[float, float]]) -> tuple[int, float]:
    """The most spans open at once, and the time-weighted mean number open over the spans' extent."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    if not events:
        return 0, 0.0
    most = open_ = 0
    area, last = 0.0, events[0][0]
    for at, step in events:
        area += open_ * (at - last)
        last = at
        open_ += step
        most = max(most, open_)
    extent = events[-1][0] - events[0][0]
    return most, area / extent if extent > 0 else 0.0


async def post(session: aiohttp.ClientSession, url: str, body: bytes, secret: str) -> int:
    async with session.post(url, data=body, headers={
            "Content-Type": "multipart/form-data; boundary=wgboundary7MA4YWxk",
            "Authorization": f"Bearer {secret}"}) as response:
        await response.read()
        return response.status


async def bursts(url: str, body: bytes, secret: str, idle) -> list[int]:
    admitted = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(ROUNDS):
            await asyncio.to_thread(idle)
            statuses = await asyncio.gather(*(post(session, url, body, secret) for _ in range(BURST)))
            admitted.append(statuses.count(200))
    return admitted


async def closed_loop(url: str, body: bytes, secret: str, seconds: float) -> dict:
    spans: list[tuple[float, float]] = []
    counts = {"admitted": 0, "refused": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                status = await post(session, url, body, secret)
            except aiohttp.ClientError:
                status = 0
            if status == 200:
                spans.append((sent, time.monotonic()))
                counts["admitted"] += 1
            elif status == 429:
                counts["refused"] += 1
                await asyncio.sleep(RETRY_AFTER_429_S)
            else:
                counts["failed"] += 1

    connector = aiohttp.TCPConnector(limit=WORKERS * 2, force_close=True)  # new connections: spread over Envoys
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(worker(session) for _ in range(WORKERS)))
    most, mean = overlap(spans)
    return counts | {"most_in_flight": most, "mean_in_flight": round(mean, 2)}


def run(log_dir: Path, envoys: int, seconds: float) -> dict:
    engine_process, engine = start_engine(log_dir, MODEL, f"in-flight-{envoys}", seconds_per_request=1.0,
                                          time_scale=1.0, max_num_seqs=64)
    run_dir = Path(tempfile.mkdtemp(prefix=f"envoys-{envoys}-", dir=log_dir))
    stack = GatewayStack(run_dir, MODEL, [engine], auth={"api_keys": "required", "plans": {"bench": {
        "requests_per_minute": 1_000_000, "audio_seconds_per_minute": 1_000_000, "requests_in_flight": LIMIT}}})
    extra = [Envoy(run_dir, stack.raw, name=f"envoy-{i + 2}") for i in range(envoys - 1)]
    try:
        for envoy in extra:
            envoy.wait_serving()
        wait_until(lambda: len(stack.admin.status()["envoys"]) == envoys, 10, "every Envoy connected")
        key = stack.admin.call("POST", "/keys", {"name": "bench", "plan": "bench"}).json()
        url = stack.envoy.url + "/v1/audio/transcriptions"
        body = multipart([("model", MODEL, None), ("file", silent_wav(1.0), "clip.wav")])

        def idle() -> None:
            wait_until(lambda: not any(r["key"] == key["id"] and r["in_flight"]
                                       for r in stack.admin.status()["requests_in_flight"]), 30, "the key idle")

        admitted = asyncio.run(bursts(url, body, key["secret"], idle))
        idle()
        loop = asyncio.run(closed_loop(url, body, key["secret"], seconds))
        return {"envoys": envoys, "limit": LIMIT, "burst": BURST, "burst_admitted": admitted, **loop}
    finally:
        for envoy in extra:
            envoy.stop()
        stack.stop()
        engine_process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="of the closed-loop load")
    parser.add_argument("--envoys", type=int, default=2, help="runs with 1..N Envoys")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-in-flight-"))
    rows = []
    for envoys in range(1, args.envoys + 1):
        rows.append(run(log_dir, envoys, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    report = {"machine": describe_machine(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "in_flight.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
