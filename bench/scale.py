"""Fleet scale: how far one control plane goes.

Engines (--engines 10,100,300,1000): N engines' `/metrics`, served by one nginx on N loopback
ports, each a real vLLM page (tests/fixtures/vllm/metrics-busy.txt, about 50 kB). A writer
changes a tenth of the pages' queue numbers every second, so weights move. A real control plane
scrapes them every --interval seconds, with one real Envoy connected. Reported, over
--seconds after a warm-up:
  - the control plane's CPU (in cores) and its RSS;
  - the load round (`whisper_gateway_load_round_seconds`: every engine scraped, weights decided
    and published), mean and worst bucket;
  - EDS push-to-ACK;
  - the age of the weights Envoy applies: the round plus the push to the ACK.

Real Envoys (--real-envoys 8): that many real Envoys on one control plane; a drain and a resume
of one engine; the time from the admin call to the last Envoy's ACK (as the control plane records
it, polled every 5 ms).

Envoys (--envoys 1,100,1000): M lightweight Envoys (bench/ads_clients.py: real gRPC, real xDS
protos, subscribing and ACKing as Envoy does) on a control plane with --fleet engines. One
engine is drained, then resumed, --changes times: each is a change on one model. Reported: the
time from the admin call to the last Envoy's receipt of the new endpoints, and the bytes sent
per change over all Envoys.

With --mtls the Envoys phase runs with internal_tls: every lightweight Envoy dials over mutual TLS
with a certificate of the internal CA (what a fleet beyond one host runs).

Config changes with --fleet backends: how long an admin add and a drain take to answer (each
answers once saved and published).

    .venv/bin/python -m bench.scale [--engines 10,100,300,1000] [--envoys 1,100,1000]

Writes bench/results/scale.json and prints a Markdown table. Needs Debian's nginx.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.datapath import cpu_seconds, require
from bench.soak import rss_mb
from bench.machine import describe_machine
from harness.processes import PYTHON, STARTED, Envoy, GatewayStack, Process, free_port, request, wait_until

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm" / "metrics-busy.txt"
MODEL = "whisper-tiny"  # the model the captured page names
RESULTS = Path(__file__).parent / "results"
_QUEUE = re.compile(r"^(vllm:num_requests_(?:running|waiting)\{[^}]*\}) \S+$", re.M)


class Farm:
    """N engines' metrics pages on N ports of one nginx; `vary()` rewrites some pages' queues."""

    def __init__(self, work: Path, count: int):
        self.root = work / "farm"
        self.ports = [free_port() for _ in range(count)]
        self.page = FIXTURE.read_text()
        for port in self.ports:
            (self.root / str(port)).mkdir(parents=True)
            self._write(port, 0, 0)
        listens = "\n".join(f"        listen 127.0.0.1:{port};" for port in self.ports)
        config = work / "farm-nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        config.write_text(f"""{user}
worker_processes 1; daemon off; master_process on; pid {work}/farm.pid; error_log stderr warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off; keepalive_timeout 300s; keepalive_requests 1000000;
    client_body_temp_path {work}/b; proxy_temp_path {work}/p; fastcgi_temp_path {work}/f;
    uwsgi_temp_path {work}/u; scgi_temp_path {work}/s;
    server {{
{listens}
        root {self.root}/$server_port;
        location = /health {{ default_type application/json; return 200 '{{}}'; }}
        location = /metrics {{ default_type text/plain; try_files /metrics =404; }}
    }}
}}
""")
        nginx = require("nginx")
        self.process = Process("farm-nginx", [nginx, "-p", str(work), "-c", str(config), "-e", "stderr"], work)
        wait_until(lambda: request("GET", f"http://127.0.0.1:{self.ports[-1]}/metrics", timeout=2).status == 200, 30,
                   "the farm")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._vary, daemon=True)

    def _write(self, port: int, running: int, waiting: int) -> None:
        values = iter([running, waiting])
        page = _QUEUE.sub(lambda m: f"{m.group(1)} {float(next(values))}", self.page, count=2)
        target = self.root / str(port) / "metrics"
        staged = target.with_suffix(".new")
        staged.write_text(page)
        os.replace(staged, target)

    def _vary(self) -> None:
        rng = random.Random(7)
        while not self._stop.wait(1.0):
            for port in rng.sample(self.ports, max(1, len(self.ports) // 10)):
                self._write(port, rng.randint(0, 8), rng.randint(0, 12))

    def start_varying(self) -> None:
        self._thread.start()

    def urls(self, host: str = "127.0.0.1") -> list[str]:
        return [f"http://{host}:{port}" for port in self.ports]

    def stop(self) -> None:
        self._stop.set()
        self.process.stop()


def histogram(metrics: str, name: str, labels: str = "") -> tuple[float, float, dict[float, float]]:
    """(sum, count, {le: cumulative count}) of a histogram on a Prometheus page."""
    total = count = 0.0
    buckets = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}_sum{{{labels}}}" if labels else f"{name}_sum "):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count{{{labels}}}" if labels else f"{name}_count "):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_bucket{{"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            if labels and labels not in line:
                continue
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return total, count, buckets


def window(before: tuple, after: tuple) -> dict:
    """Mean and the upper bound of the bucket holding the worst observation, between two readings."""
    total, count = after[0] - before[0], after[1] - before[1]
    worst = None
    for le in sorted(after[2]):
        if after[2][le] - before[2].get(le, 0.0) >= count:
            worst = le
            break
    return {"mean_s": round(total / count, 4) if count else None, "worst_bucket_s": worst, "count": int(count)}


def stack_for(work: Path, urls: list[str], interval: float, **sections) -> GatewayStack:
    routing = {"scrape_interval_s": interval, "scrape_timeout_s": round(interval * 0.8, 3),
               "stale_after_s": max(1.0, 4 * interval)}
    work.mkdir(parents=True, exist_ok=True)
    return GatewayStack(work, MODEL, urls, routing=routing, **sections)


def measure_engines(count: int, interval: float, seconds: float, warmup: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"scale-{count}-"))
    farm = Farm(work, count)
    try:
        stack = stack_for(work / "gw", farm.urls(), interval)
        pid = stack.plane.popen.pid
        wait_until(lambda: len(stack.hosts()) == count, 120, f"{count} engines in Envoy")
        farm.start_varying()
        time.sleep(warmup)
        rss_start = rss_mb(pid)
        metrics = stack.admin.call("GET", "/metrics").text
        rounds0 = histogram(metrics, "whisper_gateway_load_round_seconds")
        acks0 = histogram(metrics, "whisper_gateway_xds_push_ack_seconds", 'type="EDS"')
        cpu0, wall0 = cpu_seconds([pid]), time.monotonic()
        samples = []  # RSS (MB) at each tenth of the window: flat, or growing?
        for _ in range(10):
            time.sleep(seconds / 10)
            samples.append(round(rss_mb(pid), 1))
        cpu1, wall1 = cpu_seconds([pid]), time.monotonic()
        metrics = stack.admin.call("GET", "/metrics").text
        rounds = window(rounds0, histogram(metrics, "whisper_gateway_load_round_seconds"))
        acks = window(acks0, histogram(metrics, "whisper_gateway_xds_push_ack_seconds", 'type="EDS"'))
        fresh = sum(1 for e in stack.admin.status()["endpoints"] if e["health"] == "ok")
        result = {"engines": count, "interval_s": interval, "cpu_cores": round((cpu1 - cpu0) / (wall1 - wall0), 3),
                  "rss_mb_start": round(rss_start, 1), "rss_mb_end": samples[-1], "rss_mb_samples": samples,
                  "seconds": seconds, "round": rounds,
                  "eds_push_to_ack": acks, "fresh_engines": fresh,
                  "weights_age_s": round((rounds["mean_s"] or 0) + (acks["mean_s"] or 0), 4)}
        stack.stop()
        return result
    finally:
        farm.stop()


def measure_config_changes(count: int, host: str) -> dict:
    """With `count` backends named by `host` (an address, or a name to resolve): the time an add
    and a drain take to answer."""
    work = Path(tempfile.mkdtemp(prefix=f"scale-config-{count}-"))
    farm = Farm(work, count + 1)
    try:
        stack = stack_for(work / "gw", farm.urls(host)[:count], 1.0)
        wait_until(lambda: len(stack.hosts()) == count, 120, f"{count} engines in Envoy")
        began = time.monotonic()
        added = stack.admin.call("POST", "/backends", {"url": farm.urls(host)[count], "models": [MODEL]})
        add_s = time.monotonic() - began
        assert added.status == 201, added.text
        began = time.monotonic()
        drained = stack.admin.call("POST", f"/backends/{added.json()['id']}/drain", {})
        drain_s = time.monotonic() - began
        assert drained.status == 202, drained.text
        stack.stop()
        return {"backends": count, "host": host, "add_s": round(add_s, 3), "drain_s": round(drain_s, 3)}
    finally:
        farm.stop()


def measure_envoys(count: int, fleet: int, changes: int, mtls: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"scale-envoys-{count}-"))
    farm = Farm(work, fleet)
    try:
        sections, tls = {}, []
        if mtls:
            from bench.ads_clients import IDENTITY
            from control_plane import internal_pki

            internal_pki.ensure(work / "pki", envoys=("envoy", IDENTITY))
            sections, tls = {"internal_tls": {"dir": str(work / "pki")}}, ["--pki", str(work / "pki")]
        stack = stack_for(work / "gw", farm.urls(), 1.0, **sections)
        wait_until(lambda: len(stack.hosts()) == fleet, 120, f"{fleet} engines in Envoy")
        out = work / "clients.jsonl"
        xds = f"127.0.0.1:{stack.raw['listen']['xds_port']}"
        clients = Process("ads-clients", [PYTHON, "-m", "bench.ads_clients", "--xds", xds, "--streams", str(count),
                                          "--out", str(out), *tls], work)
        wait_until(lambda: len(stack.admin.status()["envoys"]) == count + 1, 120, f"{count} lightweight Envoys")
        wait_until(lambda: all(e["acked"].get("EDS") and e["acked"].get("RDS") for e in stack.admin.status()["envoys"]),
                   120, "every Envoy configured")
        backend_id = next(iter(stack.admin.backends().values()))["id"]
        marks = []
        for i in range(changes):
            action = "drain" if i % 2 == 0 else "resume"
            marks.append(time.monotonic())
            answer = stack.admin.call("POST", f"/backends/{backend_id}/{action}", {})
            assert answer.status in (200, 202), answer.text
            time.sleep(2.0)
        clients.popen.send_signal(signal.SIGTERM)
        clients.popen.wait(60)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        fanouts, sizes = [], []
        for start in marks:
            firsts: dict[int, tuple[float, int]] = {}
            for stream, type_url, _, size, at in records:
                if type_url.endswith("ClusterLoadAssignment") and start <= at < start + 2.0 and stream not in firsts:
                    firsts[stream] = (at, size)
            if len(firsts) == count:
                fanouts.append(max(at for at, _ in firsts.values()) - start)
                sizes.append(sum(size for _, size in firsts.values()))
        stack.stop()
        return {"envoys": count, "fleet": fleet, "changes": changes, "mtls": mtls, "complete": len(fanouts),
                "last_envoy_s": sorted(round(f, 4) for f in fanouts),
                "median_last_envoy_s": round(sorted(fanouts)[len(fanouts) // 2], 4) if fanouts else None,
                "bytes_per_change": int(sum(sizes) / len(sizes)) if sizes else None}
    finally:
        farm.stop()


def measure_real_envoys(count: int, fleet: int, changes: int) -> dict:
    """`count` real Envoys on one control plane: time from a change to the last one's ACK, read
    from the control plane's record of each Envoy's applied versions."""
    work = Path(tempfile.mkdtemp(prefix=f"scale-real-{count}-"))
    farm = Farm(work, fleet)
    try:
        stack = stack_for(work / "gw", farm.urls(), 1.0)
        extra = [Envoy(work, stack.raw, name=f"envoy-{i}", node_id=f"envoy-{i}") for i in range(count - 1)]
        wait_until(lambda: len(stack.admin.status()["envoys"]) == count, 120, f"{count} Envoys")
        backend_id = next(iter(stack.admin.backends().values()))["id"]
        times = []
        for i in range(changes):
            before = stack.admin.status()["versions"]["EDS"]
            began = time.monotonic()
            answer = stack.admin.call("POST", f"/backends/{backend_id}/{'drain' if i % 2 == 0 else 'resume'}", {})
            assert answer.status in (200, 202), answer.text
            version = wait_until(lambda: (v := stack.admin.status()["versions"]["EDS"]) != before and v, 10, "a version")
            wait_until(lambda: all(e["acked"].get("EDS") == version for e in stack.admin.status()["envoys"]), 10,
                       "every Envoy's ACK", interval=0.005)
            times.append(time.monotonic() - began)
            time.sleep(1.0)
        for envoy in extra:
            envoy.stop()
        stack.stop()
        return {"envoys": count, "real": True, "fleet": fleet, "changes": changes,
                "last_ack_s": sorted(round(t, 4) for t in times), "median_last_ack_s": round(sorted(times)[len(times) // 2], 4)}
    finally:
        farm.stop()


def render(results: dict) -> str:
    machine = results["machine"]
    lines = [f"# Fleet scale ({machine['nproc']} cores, {machine['cpu_model']}, commit {machine['git_commit']}, "
             f"{machine['date']})", "",
             "| engines | interval s | CPU cores | RSS MB start/end | round mean s (worst <=) | EDS push->ACK s | "
             "weights age s | fresh |", "|---|---|---|---|---|---|---|---|"]
    for r in results["engines"]:
        lines.append(f"| {r['engines']} | {r['interval_s']} | {r['cpu_cores']} | {r['rss_mb_start']}/{r['rss_mb_end']} | "
                     f"{r['round']['mean_s']} ({r['round']['worst_bucket_s']}) | {r['eds_push_to_ack']['mean_s']} | "
                     f"{r['weights_age_s']} | {r['fresh_engines']} |")
    if results["envoys"]:
        lines += ["", "| Envoys | engines | last Envoy's receipt s (median, all) | bytes per change |", "|---|---|---|---|"]
        for r in results["envoys"]:
            lines.append(f"| {r['envoys']} | {r['fleet']} | {r['median_last_envoy_s']} ({r['last_envoy_s']}) | "
                         f"{r['bytes_per_change']} |")
    if results.get("real_envoys"):
        lines += ["", "| real Envoys | engines | last ACK s (median, all) |", "|---|---|---|"]
        for r in results["real_envoys"]:
            lines.append(f"| {r['envoys']} | {r['fleet']} | {r['median_last_ack_s']} ({r['last_ack_s']}) |")
    if results["config"]:
        lines += ["", "| backends | URLs name | add answered s | drain answered s |", "|---|---|---|---|"]
        for r in results["config"]:
            lines.append(f"| {r['backends']} | {r['host']} | {r['add_s']} | {r['drain_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="10,100,300,1000", help="fleet sizes to scrape (empty: none)")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--envoys", default="1,100,1000", help="lightweight Envoy counts (empty: none)")
    parser.add_argument("--fleet", type=int, default=100, help="engines behind the Envoys phase")
    parser.add_argument("--changes", type=int, default=6)
    parser.add_argument("--config-backends", default="1000", help="fleet sizes for the config-change timing")
    parser.add_argument("--real-envoys", default="8", help="real Envoy counts (empty: none)")
    parser.add_argument("--mtls", action="store_true", help="the Envoys phase over mutual TLS (internal_tls)")
    args = parser.parse_args()
    sizes = lambda text: [int(n) for n in text.split(",") if n]  # noqa: E731
    results = {"machine": describe_machine(), "engines": [], "envoys": [], "config": [], "real_envoys": []}
    try:
        for count in sizes(args.engines):
            results["engines"].append(measure_engines(count, args.interval, args.seconds, args.warmup))
            print(json.dumps(results["engines"][-1]), file=sys.stderr, flush=True)
        for count in sizes(args.config_backends):
            for host in ("127.0.0.1", "localhost"):  # addresses, and names resolved on each change
                results["config"].append(measure_config_changes(count, host))
                print(json.dumps(results["config"][-1]), file=sys.stderr, flush=True)
        for count in sizes(args.real_envoys):
            results["real_envoys"].append(measure_real_envoys(count, args.fleet, args.changes))
            print(json.dumps(results["real_envoys"][-1]), file=sys.stderr, flush=True)
        for count in sizes(args.envoys):
            results["envoys"].append(measure_envoys(count, args.fleet, args.changes, args.mtls))
            print(json.dumps(results["envoys"][-1]), file=sys.stderr, flush=True)
    finally:
        for process in reversed(STARTED):
            process.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2))
    print(render(results))


if __name__ == "__main__":
    main()
