"""Data-path cost: what a proxy in front of the engines costs per upload, against plain proxies.

wrk sends the same OpenAI-style transcription upload (the `model` field, then a WAV `file`, the
order the OpenAI SDK sends) at a fixed concurrency over each path, and every path is measured at
two upload sizes (5 s of 16 kHz 16-bit mono audio, about 160 kB, and 30 s, about 1 MB):

  direct    straight to the two simulated engines, one wrk thread each: the floor
  envoy     plain Envoy: static round robin over both engines, router filter only, no Lua
  nginx     Debian's nginx: round robin over both engines, default request buffering
  gateway   whisper-gateway: control plane + Envoy with the model-routing Lua filter
  gateway-r0  the same with resilience.retries 0 (Envoy then keeps no copy of each body)
  gateway-keys  the same with auth.api_keys required and 1000 keys; every request carries one
  gateway-tls   the gateway with listen.tls: HTTPS from wrk (TLS 1.3, certificates made with openssl)
  nginx-tls     nginx with the same kind of certificate on its listener (`ssl`), the same TLS from wrk
  gateway-mtls  the gateway with internal_tls: xDS, the access logs of every try and RLQS over mutual TLS
  gateway-tracing  the gateway with observability.tracing at sampling 1.0: every request's spans
                exported over OTLP/gRPC to a receiver in this process (harness/otlp.py)
  gateway-tracing-1pct  the same at sampling 0.01
  target    --target URL: any OpenAI-compatible router already running (CPU only with --target-pid)

Reported per path and size: requests/s, latency p50/p99, latency added over `direct`, and the
proxy's CPU seconds per 1000 requests (utime+stime of Envoy, or of nginx's master and workers).
A run with any answer other than 200 or any socket error is marked invalid and judged by no target.

Engines answer at once (time scale 1e-4, 256 slots), so the proxy is what is measured. The floor
uses both engines because every proxy spreads its load over both: a Python engine alone is slower
than two behind a proxy on 1 MB uploads, and "added latency" would come out negative. wrk runs
two threads on every path (four connections each at -c 8). Every proxy runs one worker
(--workers): Envoy --concurrency 1, nginx worker_processes 1, leaving the other core of a 2-core
machine to wrk and the engines (the gateway's Envoy gets the same flag; by default Envoy runs a
worker per core). Plain Envoy's and nginx's settings: bench/datapath_envoy.yaml, datapath_nginx.conf.

    .venv/bin/python -m bench.datapath [--quick|--full] [--target URL]

--quick (the default): 5 s per path and size after a 1 s warm-up. --full: 20 s, three rounds
(every path in each round, so load from elsewhere on the machine hits all paths alike), medians.
Writes bench/results/datapath.json and datapath.md and prints the Markdown. Needs Debian's nginx
and wrk (`apt-get install -y nginx wrk`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from bench.machine import command_output, describe_machine
from control_plane.config import LimitsConfig
from control_plane.supervisor import ENVOY_FLAGS, find_envoy
from engines.common.audio import silent_wav
from harness.certificates import make_certificates
from harness.processes import (STARTED, AdminClient, GatewayStack, Process, free_port, multipart, request, start_engine,
                               wait_until)

MODEL = "whisper-large-v3-turbo"
AUDIO_PATH = "/v1/audio/transcriptions"
BOUNDARY = "datapathQx7MA4YWxkTrZu0gW"
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ENVOY_TEMPLATE = BENCH / "datapath_envoy.yaml"
NGINX_TEMPLATE = BENCH / "datapath_nginx.conf"
WRK_SCRIPT = BENCH / "datapath_wrk.lua"
# Upload label -> seconds of 16 kHz 16-bit mono audio (32 000 bytes a second).
SIZES = {"160 kB": 5.0, "1 MB": 30.0}
# An engine that answers in microseconds of simulated work, with room for every connection.
ENGINE_OPTIONS = {"max_num_seqs": 256, "time_scale": 0.0001}
# whisper-gateway against plain Envoy at each size: (name, measure, bound, "min" or "max", digits shown).
TARGETS = (
    ("throughput", "rps", 0.9, "min", 0),
    ("CPU per request", "cpu_s_per_1000", 1.15, "max", 3),
    ("added p50", "added_p50_ms", 1.2, "max", 2),
)
WRK_TIMEOUT_S = 30
WRK_THREADS = 2


@dataclass(frozen=True)
class Upload:
    """One prebuilt request body, in a file wrk reads."""

    label: str
    audio_s: float
    body_path: Path
    content_type: str
    size: int

    def body(self) -> bytes:
        return self.body_path.read_bytes()


@dataclass
class DataPath:
    """A way to the engines: the URL wrk posts to and the processes whose CPU is the proxy's."""

    name: str
    url: str
    proxy_pids: Callable[[], list[int]] = list
    measures_cpu: bool = False
    # host:port addresses wrk's threads connect to in turn instead of the URL's (the floor).
    thread_hosts: tuple[str, ...] = ()
    authorization: str = ""  # the Authorization header every request carries (an API key)
    admin_url: str = ""  # a gateway's admin API


@dataclass
class Measurement:
    """One wrk run over one path at one size."""

    path: str
    size: str
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    non200: int
    socket_errors: int
    cpu_s: float | None
    cpu_s_per_1000: float | None

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.non200 == 0 and self.socket_errors == 0


@dataclass
class Summary:
    """A path at one size over every round: medians, and the latency it adds over `direct`."""

    path: str
    size: str
    rounds: int
    valid: bool
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1000: float | None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    requests: list[int] = field(default_factory=list)


def find_tool(tool: str) -> str | None:
    """A Debian tool's path; nginx lives in /usr/sbin, which a non-root PATH often lacks."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def require(tool: str) -> str:
    """The tool's path; the benchmark cannot run without it, so stop with how to get it."""
    found = find_tool(tool)
    if not found:
        raise SystemExit(f"{tool} not found: apt-get install -y {tool}")
    return found


def build_uploads(work_dir: Path, model: str, model_first: bool) -> list[Upload]:
    """One body per size: the form the OpenAI SDK sends (model, then file) unless `model_first` is False."""
    uploads = []
    for label, audio_s in SIZES.items():
        parts = [("model", model, None), ("file", silent_wav(audio_s), "audio.wav")]
        body = multipart(parts if model_first else parts[::-1], boundary=BOUNDARY)
        body_path = work_dir / f"body-{model}-{audio_s:g}s.bin"
        body_path.write_bytes(body)
        uploads.append(Upload(label, audio_s, body_path, f"multipart/form-data; boundary={BOUNDARY}", len(body)))
    return uploads


def answers_200(path: DataPath, upload: Upload) -> bool:
    headers = {"Content-Type": upload.content_type} | ({"Authorization": path.authorization} if path.authorization else {})
    context = ssl._create_unverified_context() if path.url.startswith("https://") else None  # as wrk: no check
    return request("POST", path.url, upload.body(), headers, timeout=5, context=context).status == 200


def wait_answering(path: DataPath, upload: Upload, timeout: float = 30) -> None:
    """A proxy is ready when a real upload comes back 200 (listeners up, engines healthy)."""
    wait_until(lambda: answers_200(path, upload), timeout, f"{path.name} to answer 200", interval=0.2)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (nginx's master and workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of every thread of these processes, in seconds."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm
    return ticks / os.sysconf("SC_CLK_TCK")


def envoy_concurrency(admin_url: str) -> int:
    """The worker count Envoy runs with, to check the wrapper took effect."""
    return int(request("GET", admin_url + "/server_info", timeout=5).json()["command_line_options"]["concurrency"])


def start_engines(log_dir: Path) -> list[str]:
    return [start_engine(log_dir, MODEL, name, **ENGINE_OPTIONS)[1] for name in ("datapath-a", "datapath-b")]


def engine_ports(engine_urls: list[str]) -> dict[str, int]:
    a, b = (urlsplit(url).port for url in engine_urls)
    return {"engine_a_port": a, "engine_b_port": b}


def start_plain_envoy(log_dir: Path, engine_urls: list[str], workers: int) -> DataPath:
    port, admin_port = free_port(), free_port()
    config = log_dir / "plain-envoy.yaml"
    config.write_text(Template(ENVOY_TEMPLATE.read_text()).substitute(
        port=port, admin_port=admin_port, **engine_ports(engine_urls)))
    process = Process("plain-envoy", [find_envoy(), "-c", str(config), "--concurrency", str(workers), *ENVOY_FLAGS],
                      log_dir)
    admin = f"http://127.0.0.1:{admin_port}"
    wait_until(lambda: process.alive() and envoy_concurrency(admin) == workers, 30, "plain Envoy admin")
    return DataPath("envoy", f"http://127.0.0.1:{port}{AUDIO_PATH}", lambda: [process.popen.pid], True)


def start_nginx(log_dir: Path, engine_urls: list[str], workers: int, tls: bool = False) -> DataPath:
    """nginx in front of the engines; `tls`: HTTPS on its listener (a certificate made by openssl)."""
    name = "nginx-tls" if tls else "nginx"
    prefix = log_dir / name
    prefix.mkdir()
    port = free_port()
    config = prefix / "nginx.conf"
    # As root, nginx's workers would switch to `nobody`, who cannot write the private temp dirs.
    user_line = "user root;" if os.geteuid() == 0 else ""
    certs = make_certificates(log_dir / f"{name}-certs") if tls else None
    tls_lines = (f"ssl_certificate {certs.server.cert}; ssl_certificate_key {certs.server.key}; "
                 "ssl_protocols TLSv1.2 TLSv1.3;") if certs else ""
    config.write_text(Template(NGINX_TEMPLATE.read_text()).substitute(
        user_line=user_line, workers=workers, prefix=prefix, port=port, listen_options=" ssl" if tls else "",
        tls_lines=tls_lines, max_body=f"{int(LimitsConfig().max_upload_mb)}m", **engine_ports(engine_urls)))
    process = Process(name, [require("nginx"), "-p", str(prefix), "-c", str(config), "-e", "stderr"], log_dir)
    wait_until(lambda: process.alive() and len(process_tree(process.popen.pid)) == 1 + workers, 20, "nginx workers")
    scheme = "https" if tls else "http"
    return DataPath(name, f"{scheme}://127.0.0.1:{port}{AUDIO_PATH}", lambda: process_tree(process.popen.pid), True)


def start_nginx_with_tls(log_dir: Path, engine_urls: list[str], workers: int) -> DataPath:
    return start_nginx(log_dir, engine_urls, workers, tls=True)


def start_gateway_with_tls(log_dir: Path, engine_urls: list[str], workers: int) -> DataPath:
    """`listen.tls` with an EC P-256 certificate made by openssl, as nginx-tls serves."""
    certs = make_certificates(log_dir / "gateway-tls-certs")
    path = start_gateway(log_dir, engine_urls, workers, "gateway-tls", listen={"tls": {
        "cert_file": str(certs.server.cert), "key_file": str(certs.server.key)}}, tls=certs.client_context())
    return replace(path, url=path.url.replace("https://localhost:", "https://127.0.0.1:"))


def start_gateway_with_internal_tls(log_dir: Path, engine_urls: list[str], workers: int) -> DataPath:
    """`internal_tls`: Envoy's xDS and access-log streams over mutual TLS (certificates from internal_pki)."""
    from control_plane import internal_pki

    folder = log_dir / "gateway-mtls-pki"
    internal_pki.ensure(folder, envoys=("envoy",))
    return start_gateway(log_dir, engine_urls, workers, "gateway-mtls", internal_tls={"dir": str(folder)})


def start_gateway(log_dir: Path, engine_urls: list[str], workers: int, name: str = "gateway",
                  **sections) -> DataPath:
    """A real GatewayStack (its default config unless `sections` say otherwise)."""
    stack_dir = log_dir / name
    stack_dir.mkdir()
    stack = GatewayStack(stack_dir, MODEL, engine_urls, workers=workers, **sections)
    running = envoy_concurrency(stack.envoy.admin)
    if running != workers:
        raise SystemExit(f"the gateway's Envoy runs {running} workers, not {workers}")
    return DataPath(name, stack.envoy.url + AUDIO_PATH, lambda: [stack.envoy.process.popen.pid], True,
                    admin_url=stack.admin.url)


KEYS = int(os.environ.get("BENCH_KEYS", "1000"))


def start_gateway_with_keys(log_dir: Path, engine_urls: list[str], workers: int) -> DataPath:
    """`auth.api_keys: required`, 1000 keys made, requests carrying one of them (envoy/api_keys.lua)."""
    path = start_gateway(log_dir, engine_urls, workers, "gateway-keys", auth={"api_keys": "required", "max_keys": KEYS})
    admin = AdminClient(path.admin_url, log_dir / "gateway-keys" / "state")
    secrets = [admin.call("POST", "/keys", {"name": f"bench-{i}"}).json()["secret"] for i in range(KEYS)]
    return replace(path, authorization=f"Bearer {secrets[KEYS // 2]}")


def start_gateway_with_tracing(log_dir: Path, engine_urls: list[str], workers: int, sampling: float = 1.0,
                               name: str = "gateway-tracing") -> DataPath:
    """observability.tracing: a span per request and per try, exported to an OTLP/gRPC receiver in
    this process (it only counts them; a collector elsewhere would cost Envoy the same)."""
    from harness.otlp import Receiver  # opentelemetry-proto: the test extra

    receiver = Receiver(keep=False)
    COLLECTORS.append(receiver)
    return start_gateway(log_dir, engine_urls, workers, name, observability={
        "tracing": {"otlp_endpoint": f"127.0.0.1:{receiver.port}", "sampling": sampling}})


def start_gateway_with_sampled_tracing(log_dir: Path, engine_urls: list[str], workers: int) -> DataPath:
    return start_gateway_with_tracing(log_dir, engine_urls, workers, 0.01, "gateway-tracing-1pct")


COLLECTORS: list = []  # the tracing paths' receivers, stopped at the end


def start_gateway_without_retries(log_dir: Path, engine_urls: list[str], workers: int) -> DataPath:
    """`resilience.retries: 0`: Envoy's router then keeps no copy of each body for replays."""
    return start_gateway(log_dir, engine_urls, workers, "gateway-r0", resilience={"retries": 0})


def target_url(url: str) -> str:
    """--target may name the server, its /v1, or the transcription URL itself."""
    stripped = url.rstrip("/")
    if stripped.endswith(AUDIO_PATH):
        return stripped
    return stripped + ("/audio/transcriptions" if stripped.endswith("/v1") else AUDIO_PATH)


def run_wrk(path: DataPath, upload: Upload, seconds: int, connections: int) -> dict:
    """One wrk run; the counts and percentiles its script prints, over all its threads."""
    command = [require("wrk"), f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--timeout",
               f"{WRK_TIMEOUT_S}s", "-s", str(WRK_SCRIPT), path.url, "--", str(upload.body_path), upload.content_type]
    env = {**os.environ, "DATAPATH_HOSTS": ",".join(path.thread_hosts), "DATAPATH_AUTHORIZATION": path.authorization}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=seconds + WRK_TIMEOUT_S + 30)
    for line in done.stdout.splitlines():
        if line.startswith("DATAPATH "):
            return json.loads(line.removeprefix("DATAPATH "))
    raise RuntimeError(f"wrk printed no result (exit {done.returncode}): {done.stdout}{done.stderr}")


def measure(path: DataPath, upload: Upload, seconds: int, warmup: int, connections: int, round_: int) -> Measurement:
    """A warm-up run, then a measured one with the proxy's CPU time read around it."""
    run_wrk(path, upload, warmup, connections)
    pids = path.proxy_pids() if path.measures_cpu else []
    before = cpu_seconds(pids)
    result = run_wrk(path, upload, seconds, connections)
    cpu = cpu_seconds(pids) - before if path.measures_cpu else None
    requests = result["requests"]
    elapsed = result["duration_us"] / 1e6
    return Measurement(
        path=path.name, size=upload.label, round=round_, requests=requests, seconds=round(elapsed, 3),
        rps=round(requests / elapsed, 1),
        **{f"{key}_ms": round(result[f"{key}_us"] / 1000, 3) for key in ("p50", "p90", "p99", "mean", "max")},
        non200=result["non200"],
        socket_errors=sum(result[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts")),
        cpu_s=None if cpu is None else round(cpu, 3),
        cpu_s_per_1000=None if cpu is None or not requests else round(cpu / requests * 1000, 4),
    )


def median_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 4) if present else None


def summarize(measurements: list[Measurement]) -> list[Summary]:
    """Medians per path and size, then the latency each path adds over `direct` at that size."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.path, m.size), []).append(m)
    summaries = [
        Summary(path=path, size=size, rounds=len(runs), valid=all(run.valid for run in runs),
                errors=sum(run.non200 + run.socket_errors for run in runs),
                rps=median_or_none([run.rps for run in runs]), p50_ms=median_or_none([run.p50_ms for run in runs]),
                p99_ms=median_or_none([run.p99_ms for run in runs]),
                cpu_s_per_1000=median_or_none([run.cpu_s_per_1000 for run in runs]),
                requests=[run.requests for run in runs])
        for (path, size), runs in groups.items()
    ]
    floors = {s.size: s for s in summaries if s.path == "direct"}
    for s in summaries:
        floor = floors.get(s.size)
        if floor is not None and s.path != "direct":
            s.added_p50_ms = round(s.p50_ms - floor.p50_ms, 3)
            s.added_p99_ms = round(s.p99_ms - floor.p99_ms, 3)
    return summaries


def judge_targets(summaries: list[Summary]) -> list[dict]:
    """whisper-gateway over plain Envoy for each target and size; invalid runs judge nothing."""
    by_key = {(s.path, s.size): s for s in summaries}
    verdicts = []
    for size in SIZES:
        gateway, plain = by_key.get(("gateway", size)), by_key.get(("envoy", size))
        if gateway is None or plain is None:
            continue
        for name, key, bound, kind, digits in TARGETS:
            ours, theirs = getattr(gateway, key), getattr(plain, key)
            ratio, verdict = None, "invalid run"
            if gateway.valid and plain.valid:
                if ours is None or theirs is None or theirs <= 0:
                    verdict = "n/a (plain Envoy's figure is not positive)"
                else:
                    ratio = round(ours / theirs, 3)
                    verdict = "pass" if (ratio >= bound if kind == "min" else ratio <= bound) else "miss"
            verdicts.append({"size": size, "target": name, "gateway": ours, "envoy": theirs, "ratio": ratio,
                             "bound": f"{'>=' if kind == 'min' else '<='} {bound}x", "verdict": verdict,
                             "digits": digits})
    return verdicts


def machine_info() -> dict:
    """What the numbers depend on, with the versions of the tools compared."""
    tools = {tool: command_output([find_tool(tool), "-v"]) if find_tool(tool) else "not installed"
             for tool in ("nginx", "wrk")}
    return {**describe_machine(), "envoy": command_output([find_envoy(), "--version"]), **tools}


def cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(summaries: list[Summary], verdicts: list[dict], settings: dict, machine: dict) -> str:
    lines = [
        (f"# Data path: {settings['seconds']} s per path and size, {settings['rounds']} round(s), "
         f"wrk -c {settings['connections']}, {settings['workers']} proxy worker(s)"),
        "",
        (f"{machine['nproc']} cores ({machine['cpu_model']}), commit {machine['git_commit']}, {machine['date']}, "
         f"load average {machine['load_average_at_start'][0]} at start; form fields {settings['field_order']}. "
         f"Times in ms; added = path minus direct (both engines, no proxy); CPU = the proxy's seconds per 1000 "
         f"requests (Envoy's process, nginx's master and workers). An invalid run had answers other than 200."),
        "",
        "| path | size | req/s | p50 | p99 | added p50 | added p99 | CPU s/1000 req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        name = s.path if s.valid else f"{s.path} (INVALID: {s.errors} errors)"
        lines.append(f"| {name} | {s.size} | {s.rps:.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} | "
                     f"{cell(s.added_p50_ms, 2)} | {cell(s.added_p99_ms, 2)} | {cell(s.cpu_s_per_1000, 3)} |")
    if verdicts:
        lines += ["", "whisper-gateway / plain Envoy:", "",
                  "| size | target | gateway | plain Envoy | ratio | bound | result |", "|---|---|---|---|---|---|---|"]
        for v in verdicts:
            lines.append(f"| {v['size']} | {v['target']} | {cell(v['gateway'], v['digits'])} | {cell(v['envoy'], v['digits'])} | "
                         f"{cell(v['ratio'], 2)} | {v['bound']} | {v['verdict']} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="5 s runs, one round (default)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full", help="20 s runs, three rounds")
    parser.add_argument("--target", help="an OpenAI-compatible router already running, measured as path `target`")
    parser.add_argument("--target-model", default=MODEL, help="the model name the --target router serves")
    parser.add_argument("--target-pid", type=int, action="append",
                        help="a process of the --target router whose CPU to count (repeat); e.g. another build's "
                             "Envoy, measured interleaved with this one")
    parser.add_argument("--seconds", type=int, help="seconds per measured run (overrides the mode)")
    parser.add_argument("--rounds", type=int, help="rounds over every path (overrides the mode)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each measured run")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (requests in flight)")
    parser.add_argument("--workers", type=int, default=1, help="Envoy --concurrency and nginx worker_processes")
    parser.add_argument("--model-last", action="store_true", help="send the file first and `model` last")
    parser.add_argument("--paths", default="direct,envoy,nginx,gateway,gateway-r0", help="comma-separated subset to run")
    args = parser.parse_args()
    full = args.mode == "full"
    args.seconds = args.seconds or (20 if full else 5)
    args.rounds = args.rounds or (3 if full else 1)
    return args


def run(args: argparse.Namespace, log_dir: Path) -> tuple[list[Measurement], dict]:
    """Starts every path over the same two engines, then measures them round by round."""
    require("wrk")
    engine_urls = start_engines(log_dir)
    wanted = args.paths.split(",")
    starters = {"envoy": start_plain_envoy, "nginx": start_nginx, "gateway": start_gateway,
                "gateway-r0": start_gateway_without_retries, "gateway-keys": start_gateway_with_keys,
                "gateway-tls": start_gateway_with_tls, "nginx-tls": start_nginx_with_tls,
                "gateway-mtls": start_gateway_with_internal_tls, "gateway-tracing": start_gateway_with_tracing,
                "gateway-tracing-1pct": start_gateway_with_sampled_tracing}
    floor = DataPath("direct", engine_urls[0] + AUDIO_PATH, thread_hosts=tuple(urlsplit(u).netloc for u in engine_urls))
    paths = [floor] if "direct" in wanted else []
    paths += [start(log_dir, engine_urls, args.workers) for name, start in starters.items() if name in wanted]
    ours = build_uploads(log_dir, MODEL, not args.model_last)
    uploads = {path.name: ours for path in paths}
    if args.target:
        pids = list(args.target_pid or [])
        paths.append(DataPath("target", target_url(args.target), proxy_pids=lambda: pids, measures_cpu=bool(pids)))
        uploads["target"] = build_uploads(log_dir, args.target_model, not args.model_last)
    for path in paths:
        wait_answering(path, uploads[path.name][0])
    measurements = []
    for round_ in range(1, args.rounds + 1):
        for size in range(len(SIZES)):
            for path in paths:
                m = measure(path, uploads[path.name][size], args.seconds, args.warmup, args.connections, round_)
                measurements.append(m)
                print(f"round {round_} {m.size:>6} {m.path:<8} {m.rps:8.0f} req/s  p50 {m.p50_ms:7.2f} ms  "
                      f"p99 {m.p99_ms:7.2f} ms  cpu/1000 {cell(m.cpu_s_per_1000, 3):>6}"
                      f"{'' if m.valid else f'  INVALID ({m.non200} non-200, {m.socket_errors} socket errors)'}",
                      file=sys.stderr, flush=True)
    settings = {"seconds": args.seconds, "warmup_s": args.warmup, "rounds": args.rounds,
                "connections": args.connections, "workers": args.workers, "wrk_threads": WRK_THREADS,
                "field_order": "file, model" if args.model_last else "model, file (as the OpenAI SDK sends)",
                "engine_options": ENGINE_OPTIONS,
                "uploads": {u.label: {"audio_s": u.audio_s, "bytes": u.size} for u in ours},
                "target": args.target}
    if COLLECTORS:  # the tracing paths': spans their receivers took (a check that they were exported)
        settings["spans_exported"] = [receiver.count for receiver in COLLECTORS]
    return measurements, settings


def stop_on_signal(signum: int, frame: object) -> None:
    """SIGTERM, and SIGINT even where a shell ignored it (a background job), unwind like Ctrl-C,
    so the finally block stops every process started."""
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_on_signal)
    machine = machine_info()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-datapath-"))
    try:
        measurements, settings = run(args, log_dir)
    finally:
        for process in reversed(STARTED):
            process.stop()
        for receiver in COLLECTORS:
            receiver.stop()
    summaries = summarize(measurements)
    verdicts = judge_targets(summaries)
    markdown = render_markdown(summaries, verdicts, settings, machine)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "datapath.json").write_text(json.dumps({
        "machine": machine, "settings": settings, "summary": [asdict(s) for s in summaries],
        "targets": verdicts, "runs": [{**asdict(m), "valid": m.valid} for m in measurements],
        "logs": str(log_dir)}, indent=2) + "\n")
    (RESULTS / "datapath.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
