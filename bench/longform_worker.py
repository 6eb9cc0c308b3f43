"""A longform worker's own cost: CPU per recording, with a pieces endpoint that answers at once.

A real worker process (`whisper-gateway longform-worker`) is sent `--recordings` silent WAVs of
`--seconds` at `--rate` Hz at once; its pieces go to an endpoint in this process that answers
each with a one-word JSON transcript. Prints the wall time and the worker's CPU (user + system,
from /proc): what one worker can feed a fleet.

    .venv/bin/python -m bench.longform_worker [--recordings 40] [--seconds 1500] [--rate 16000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import aiohttp
from aiohttp import web

from engines.common.audio import silent_wav
from harness.processes import REPO, free_port, multipart

CONTENT_TYPE = "multipart/form-data; boundary=wgboundary7MA4YWxk"


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def run(recordings: int, seconds: float, rate: int) -> dict:
    pieces = 0

    async def piece(request: web.Request) -> web.Response:
        nonlocal pieces
        await request.read()
        pieces += 1
        return web.json_response({"text": " x", "usage": {"type": "duration", "seconds": 30}})

    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", piece)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    pieces_port, worker_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", pieces_port).start()
    worker = subprocess.Popen([sys.executable, "-m", "control_plane", "longform-worker", "--listen",
                               f"127.0.0.1:{worker_port}", "--pieces", f"http://127.0.0.1:{pieces_port}"],
                              cwd=REPO, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{worker_port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
            for _ in range(200):
                try:
                    async with session.get(url + "/health") as answer:
                        if answer.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            body = multipart([("model", "m", None), ("language", "en", None), ("file", silent_wav(seconds, rate), "a.wav")])

            async def one() -> int:
                async with session.post(url + "/v1/audio/transcriptions", data=body,
                                        headers={"Content-Type": CONTENT_TYPE}) as answer:
                    await answer.read()
                    return answer.status

            cpu, started = cpu_seconds(worker.pid), time.monotonic()
            statuses = await asyncio.gather(*[one() for _ in range(recordings)])
            wall, cpu = time.monotonic() - started, cpu_seconds(worker.pid) - cpu
    finally:
        worker.terminate()
        worker.wait(20)
        await runner.cleanup()
    return {"statuses": sorted(set(statuses)), "pieces": pieces, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "audio_s_per_cpu_s": round(recordings * seconds / cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=1500.0)
    parser.add_argument("--rate", type=int, default=16000)
    args = parser.parse_args()
    row = asyncio.run(run(args.recordings, args.seconds, args.rate))
    print(f"{args.recordings} recordings of {args.seconds:g} s at {args.rate} Hz at once: answers {row['statuses']}, "
          f"{row['pieces']} pieces, {row['wall_s']} s, worker CPU {row['cpu_s']} s "
          f"({row['audio_s_per_cpu_s']} audio-seconds per CPU-second)")


if __name__ == "__main__":
    main()
