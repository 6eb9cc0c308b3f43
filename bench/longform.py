"""Long recordings split across the fleet (issue 31): one 30-minute recording sent whole to one
engine (today's gateway) against split by a longform worker, on an idle fleet and on a fleet at
70% load from short clips.

Four simulated engines (engines/simulated, GpuProfile's defaults, `--time-scale` wall seconds per
simulated second) behind two gateways that run side by side on the same engines and differ only
in `longform:`: "whole" has no worker, "split" has one (split_above_s 60). Each run sends the
recording once through each, idle then loaded, so machine drift falls on both alike. The
recording is a silent 8 kHz 16-bit WAV (28.8 MB: limits.max_upload_mb and the engines' upload
limit are raised to 64 MB for it); the worker resamples it to 16 kHz pieces.

Loaded: Poisson arrivals of 2-15 s clips at `--load` of the fleet's capacity (200 Hz WAVs, as in
bench/routing.py), for `--warmup` seconds before the recording and until it is answered; the
clips that arrived while it was in flight are the short clips' numbers.

    .venv/bin/python -m bench.longform [--runs 3] [--time-scale 4] [--load 0.7]

Writes bench/results/longform.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aiohttp

from bench.machine import describe_machine
from bench.routing import MODEL, PROFILE, body_for, engine_queue, get_text, wait_idle
from bench.workload import arrivals, engine_capacity, mean_work, percentile
from control_plane.config.longform import LongformConfig
from engines.common.audio import silent_wav
from harness.processes import (STARTED, GatewayStack, multipart, socket_dir, start_engine,
                               start_longform_worker, wait_until)

RESULTS = Path(__file__).parent / "results"
ENGINES = 4
RECORDING_S = 1800.0
RECORDING_RATE = 8000  # Hz: 28.8 MB for 30 minutes
UPLOAD_MB = 64.0
SPLIT_ABOVE_S = 60.0
SHORT_S = (2.0, 15.0)
CONTENT_TYPE = "multipart/form-data; boundary=wgboundary7MA4YWxk"
SAMPLE_EVERY_S = 0.05
IDLE_LIMIT, IDLE_IDEAL = 0.35, 0.25  # split / whole on the idle fleet


def short_lengths(rng: random.Random, count: int) -> list[float]:
    return [rng.uniform(*SHORT_S) for _ in range(count)]


def recording_body(language: bool = True) -> bytes:
    """`language`: the form names it (else the engines, or the first piece, detect it)."""
    return multipart([("model", MODEL, None)] + ([("language", "en", None)] if language else []) +
                     [("file", silent_wav(RECORDING_S, RECORDING_RATE), "recording.wav")])


def pieces_in(text: str) -> list[float]:
    """Seconds of each engine request the answer's text names (engines/simulated's text)."""
    return [float(s) for s in re.findall(r" transcribed chunk \d+ of \d+ \(([\d.]+) s\)", text)]


class Case:
    """One recording through one gateway, with or without short clips around it."""

    def __init__(self, url: str, engines: list[str], recording: bytes, rate: float, warmup: float, seed: int):
        self.url, self.engines, self.recording = url, engines, recording
        self.rate, self.warmup, self.seed = rate, warmup, seed
        self.short: list[tuple[float, float | None]] = []  # (sent at, latency or None when failed)
        self.samples: list[list[int]] = []  # engines' running + waiting, while the recording is out

    async def execute(self) -> dict:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            self.session = session
            start = time.monotonic()
            done = asyncio.Event()
            clips = asyncio.create_task(self._clips(start, done)) if self.rate else None
            await asyncio.sleep(self.warmup if self.rate else 0)
            sampler = asyncio.create_task(self._sample())
            sent = time.monotonic()
            async with session.post(self.url + "/v1/audio/transcriptions", data=self.recording,
                                    headers={"Content-Type": CONTENT_TYPE}) as response:
                text = await response.text()
                status = response.status
            latency = time.monotonic() - sent
            answered = time.monotonic()
            done.set()
            sampler.cancel()
            if clips:
                await clips
            await asyncio.gather(sampler, return_exceptions=True)
        pieces = pieces_in(text) if status == 200 else []
        during = [lat for at, lat in self.short if sent - start <= at <= answered - start]
        served = [lat for lat in during if lat is not None]
        return {"status": status, "latency_s": round(latency, 3), "engine_requests": len(pieces),
                "audio_s": round(sum(pieces), 2), "body": text[:300] if status != 200 else "",
                "short_sent": len(during), "short_failed": len(during) - len(served),
                "short_p50": percentile(served, 0.5) if served else None,
                "short_p99": percentile(served, 0.99) if served else None,
                "short_latency_s": [round(v, 4) for v in served],
                "peak_queue_total": max((sum(s) for s in self.samples), default=0),
                "peak_queue_per_engine": [max((s[i] for s in self.samples), default=0) for i in range(len(self.engines))]}

    async def _clips(self, start: float, done: asyncio.Event) -> None:
        plan = arrivals(self.seed, 3600.0, lambda t: self.rate, lengths_of=short_lengths)
        tasks = []
        for arrival in plan:
            if done.is_set():
                break
            delay = start + arrival.at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(done.wait(), delay)
                    break
                except TimeoutError:
                    pass
            tasks.append(asyncio.create_task(self._clip(arrival.audio_s, time.monotonic() - start)))
        await asyncio.gather(*tasks)

    async def _clip(self, audio_s: float, at: float) -> None:
        sent = time.monotonic()
        try:
            async with self.session.post(self.url + "/v1/audio/transcriptions", data=body_for(audio_s),
                                         headers={"Content-Type": CONTENT_TYPE}) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        self.short.append((at, time.monotonic() - sent if ok else None))

    async def _sample(self) -> None:
        while True:
            pages = await asyncio.gather(*(get_text(self.session, url + "/metrics") for url in self.engines))
            self.samples.append([engine_queue(page) for page in pages])
            await asyncio.sleep(SAMPLE_EVERY_S)


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "runs": len(values)}


def summarize(runs: list[dict]) -> dict:
    table = {}
    for fleet in ("idle", "loaded"):
        for mode in ("whole", "split"):
            rows = [run[fleet][mode] for run in runs if fleet in run]
            if not rows:
                continue
            ok = [r for r in rows if r["status"] == 200]
            entry = {"latency_s": spread([r["latency_s"] for r in ok]) if ok else None,
                     "failed": len(rows) - len(ok), "engine_requests": sorted({r["engine_requests"] for r in ok}),
                     "peak_queue_total": spread([r["peak_queue_total"] for r in rows])}
            if fleet == "loaded":
                short = [v for r in rows for v in r["short_latency_s"]]
                entry |= {"short_clips": len(short), "short_failed": sum(r["short_failed"] for r in rows),
                          "short_p50": percentile(short, 0.5), "short_p99": percentile(short, 0.99),
                          "short_p99_per_run": spread([r["short_p99"] for r in rows if r["short_p99"] is not None])}
            table[f"{fleet}/{mode}"] = entry
        if f"{fleet}/whole" in table and f"{fleet}/split" in table:
            ratios = [run[fleet]["split"]["latency_s"] / run[fleet]["whole"]["latency_s"] for run in runs]
            table[f"{fleet}/ratio"] = spread(ratios)
    return table


def markdown(report: dict) -> str:
    machine, table = report["machine"], report["table"]
    lines = [f"Long recordings, {report['date']}, commit {report['commit']}, {machine['nproc']} cores "
             f"({machine['cpu_model']}), load average {machine['load_average_at_start'][0]} at start; "
             f"{ENGINES} simulated engines (time_scale {report['time_scale']:g}), a {RECORDING_S / 60:g}-minute "
             f"recording; split with pieces_per_engine {report['pieces_per_engine']}, max_share {report['max_share']:g}; "
             f"{report['runs']} runs per case; latency in seconds, median [min-max].", "",
             "| fleet | sent | recording latency | split / whole | engine requests | peak running+waiting (all engines) | "
             "short clips during it: p50 / p99 (pooled) | short p99 per run |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(s: dict | None) -> str:
        return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]" if s else "-"

    for fleet in ("idle", "loaded"):
        for mode in ("whole", "split"):
            row = table.get(f"{fleet}/{mode}")
            if row is None:
                continue
            ratio = cell(table.get(f"{fleet}/ratio")) if mode == "split" else ""
            short = (f"{row['short_p50']:.2f} / {row['short_p99']:.2f} ({row['short_clips']} clips, "
                     f"{row['short_failed']} failed)" if "short_p50" in row else "-")
            lines.append(f"| {fleet}{' ' + format(report['load'], '.0%') if fleet == 'loaded' else ''} | {mode} | "
                         f"{cell(row['latency_s'])}{' (' + str(row['failed']) + ' failed)' if row['failed'] else ''} | "
                         f"{ratio} | {row['engine_requests']} | {cell(row['peak_queue_total'])} | {short} | "
                         f"{cell(row.get('short_p99_per_run'))} |")
    if "idle/ratio" in table:
        ratio = table["idle/ratio"]["median"]
        lines += ["", f"Target on the idle fleet: split at most {IDLE_LIMIT}x of whole (ideal {IDLE_IDEAL}x): "
                  f"{ratio:.2f}x, {'met' if ratio <= IDLE_LIMIT else 'MISSED'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--time-scale", type=float, default=4.0,
                        help="wall seconds per simulated second (GpuProfile's defaults approximate an H100 at 1)")
    parser.add_argument("--load", type=float, default=0.7, help="short clips' load, of the fleet's capacity")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds of short clips before the recording")
    parser.add_argument("--idle-only", action="store_true")
    parser.add_argument("--no-language", action="store_true", help="the recording names no language")
    parser.add_argument("--pieces-per-engine", type=int, default=LongformConfig().pieces_per_engine,
                        help="longform.pieces_per_engine of the split gateway")
    parser.add_argument("--max-share", type=float, default=LongformConfig().max_share,
                        help="longform.max_share of the split gateway")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    profile = replace(PROFILE, time_scale=args.time_scale)
    rate = args.load * ENGINES * engine_capacity(profile) / mean_work(profile, lengths_of=short_lengths)
    RESULTS.mkdir(exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-longform-"))
    machine = describe_machine()
    report = {"date": machine["date"], "commit": machine["git_commit"], "machine": machine, "runs": args.runs,
              "time_scale": args.time_scale, "load": args.load, "short_rate_per_s": round(rate, 2),
              "recording_s": RECORDING_S, "split_above_s": SPLIT_ABOVE_S, "pieces_per_engine": args.pieces_per_engine,
              "max_share": args.max_share, "per_run": []}
    recording = recording_body(not args.no_language)
    try:
        engines = [start_engine(log_dir, MODEL, f"lf-{i}", max_num_seqs=profile.max_num_seqs,
                                time_scale=args.time_scale, max_upload_mb=UPLOAD_MB)[1] for i in range(ENGINES)]
        sockets = socket_dir()
        start_longform_worker(log_dir, sockets)
        limits = {"max_upload_mb": UPLOAD_MB}
        for mode in ("whole", "split"):
            (log_dir / mode).mkdir()
        stacks = {"whole": GatewayStack(log_dir / "whole", MODEL, engines, limits=limits),
                  "split": GatewayStack(log_dir / "split", MODEL, engines, limits=limits,
                                        longform={"workers": 1, "socket_dir": sockets, "split_above_s": SPLIT_ABOVE_S,
                                                  "pieces_per_engine": args.pieces_per_engine,
                                                  "max_share": args.max_share})}
        for stack in stacks.values():
            wait_until(lambda: len(stack.hosts()) == ENGINES
                       and all(h.get("health_flags") == "healthy" for h in stack.hosts().values()), 30, "engines healthy")
        wait_until(lambda: all(h.get("health_flags") == "healthy" for h in
                               stacks["split"].envoy.endpoints().get("whisper:longform", {"-": {}}).values()),
                   30, "Envoy to find the worker healthy")
        for run in range(args.runs):
            results = {}
            for fleet in ("idle",) if args.idle_only else ("idle", "loaded"):
                results[fleet] = {}
                for mode, stack in stacks.items():
                    wait_idle(engines)
                    if fleet == "idle":
                        time.sleep(6.0)  # past decide/longform.py's HOLD_S since the last client's request
                    case = Case(stack.envoy.url, engines, recording, rate if fleet == "loaded" else 0.0,
                                args.warmup, args.seed + run)
                    outcome = asyncio.run(case.execute())
                    results[fleet][mode] = outcome
                    print(f"run {run + 1} {fleet} {mode}: " + json.dumps(
                        {k: v for k, v in outcome.items() if k != "short_latency_s"}), flush=True)
            report["per_run"].append(results)
            report["table"] = summarize(report["per_run"])
            (RESULTS / "longform.json").write_text(json.dumps(report))
    finally:
        for process in reversed(STARTED):
            process.stop()
    text = markdown(report)
    (RESULTS / "longform.md").write_text(text)
    (RESULTS / "longform.json").write_text(json.dumps(report))
    print(text)
    print(f"logs: {log_dir}; results: {RESULTS}")


if __name__ == "__main__":
    main()
