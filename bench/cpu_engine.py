"""Real Whisper on the CPU: real-time factor of one engine, and requests/s of two behind the gateway.

The clip is a 7-second spoken passage (espeak-ng). Needs espeak-ng and sox.

    .venv/bin/python -m bench.cpu_engine [--seconds 20] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.processes import STARTED, GatewayStack, post_form, start_cpu_engine
from harness.speech import SENTENCES, join_clips, speak

MODEL = "whisper-tiny.en"


def clip_seconds(path: Path) -> float:
    return (path.stat().st_size - 44) / 32000


def one(url: str, clip: bytes) -> float:
    started = time.monotonic()
    response = post_form(url + "/v1/audio/transcriptions", [("model", MODEL, None), ("file", clip, "c.wav"),
                                                             ("language", "en", None)], timeout=60)
    assert response.status == 200, response.text
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the throughput run")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    try:
        parts = [speak(text, log_dir / f"s{i}.wav") for i, text in enumerate((SENTENCES[1], SENTENCES[3]))]
        clip_path = join_clips(parts, log_dir / "clip.wav", gap_s=0.1)
        clip, audio_s = clip_path.read_bytes(), clip_seconds(clip_path)

        engines = [start_cpu_engine(log_dir, MODEL, f"cpu-{i}")[1] for i in range(2)]
        one(engines[0], clip)  # warm up
        direct = [one(engines[0], clip) for _ in range(10)]
        rtf = statistics.median(direct) / audio_s

        envoy = GatewayStack(log_dir, MODEL, engines).envoy
        one(envoy.url, clip)
        latencies: list[float] = []
        deadline = time.monotonic() + args.seconds

        def worker(_):
            while time.monotonic() < deadline:
                latencies.append(one(envoy.url, clip))

        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(worker, range(args.concurrency)))
        elapsed = time.monotonic() - started
        ordered = sorted(latencies)
        print(json.dumps({
            "clip_s": round(audio_s, 2),
            "one_engine_median_latency_s": round(statistics.median(direct), 3),
            "real_time_factor": round(rtf, 3),
            "gateway_two_engines": {
                "concurrency": args.concurrency,
                "requests": len(latencies),
                "requests_per_s": round(len(latencies) / elapsed, 2),
                "p50_s": round(ordered[len(ordered) // 2], 3),
                "p95_s": round(ordered[int(len(ordered) * 0.95) - 1], 3),
            },
        }))
    finally:
        for process in reversed(STARTED):
            process.stop()


if __name__ == "__main__":
    main()
