"""Real processes for tests: free ports, readiness with deadlines, and no process left behind."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from control_plane.bootstrap import write_bootstrap
from control_plane.config import parse_config
from control_plane.config.longform import pieces_socket, worker_socket
from control_plane.supervisor import envoy_command, find_envoy
from engines.common.audio import silent_wav

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


_GIVEN_PORTS: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


EPHEMERAL_LOW = _ephemeral_low()  # where the kernel's ports for outgoing connections begin


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (a process's outgoing connection can
    take an ephemeral port before the listener it was meant for binds: it failed so in CI), and
    not handed out before in this process (one config needs five different ones)."""
    while True:
        port = random.randrange(max(1024, EPHEMERAL_LOW - 12000), EPHEMERAL_LOW)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Polls `check` until it returns something truthy; fails the test with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - any failure means "not yet"
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30, context: ssl.SSLContext | None = None) -> Response:
    """`context`: the TLS an https:// URL is checked with."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return Response(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read(), dict(error.headers))


def multipart(parts: list[tuple[str, bytes | str, str | None]], boundary: str = "wgboundary7MA4YWxk") -> bytes:
    """Form parts in the given order: (name, value, filename or None)."""
    out = b""
    for name, value, filename in parts:
        data = value.encode() if isinstance(value, str) else value
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        content_type = "Content-Type: audio/wav\r\n" if filename else ""
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{content_type}\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_form(url: str, parts: list[tuple[str, bytes | str, str | None]], boundary: str = "wgboundary7MA4YWxk",
              content_type: str | None = None, timeout: float = 30, headers: dict | None = None,
              context: ssl.SSLContext | None = None) -> Response:
    """`headers`: more than the Content-Type (Authorization, say); `context`: as `request`'s."""
    sent = {"Content-Type": content_type or f"multipart/form-data; boundary={boundary}"} | (headers or {})
    return request("POST", url, multipart(parts, boundary), sent, timeout, context=context)


def transcribe(base_url: str, model: str | None, seconds: float = 1.0, model_first: bool = True,
               path: str = "/v1/audio/transcriptions", extra: list | None = None, headers: dict | None = None,
               audio: bytes | None = None) -> Response:
    """`audio`: a WAV to send instead of `seconds` of silence."""
    file_part = ("file", audio if audio is not None else silent_wav(seconds), "clip.wav")
    parts = [] if model is None else [("model", model, None)]
    parts = parts + [file_part] if model_first else [file_part] + parts
    return post_form(base_url + path, parts + (extra or []), headers=headers)


STARTED: list[Process] = []


def stop_all(since: int = 0) -> None:
    """Stops every process started after the first `since`, newest first."""
    for process in reversed(STARTED[since:]):
        process.stop()


class Process:
    """A child process in its own process group, logged to a file, always killed at stop()."""

    def __init__(self, name: str, command: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.command = command
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True, cwd=REPO, env={**os.environ, **(env or {})})
        STARTED.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_engine(log_dir: Path, model: str, name: str, port: int | None = None, host: str = "127.0.0.1",
                 **options) -> tuple[Process, str]:
    port = port or free_port()
    command = [PYTHON, "-m", "engines.simulated", "--host", host, "--port", str(port), "--model", model, "--name", name]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    process = Process(f"engine-{name}", command, log_dir)
    # With ssl_certfile: https://localhost (the test certificates' name), checked with no CA.
    tls = ssl._create_unverified_context() if "ssl_certfile" in options else None
    url = f"https://localhost:{port}" if tls else f"http://{host}:{port}"
    if "ssl_ca_certs" in options:  # it wants a client certificate: its log says when it listens
        wait_until(lambda: process.alive() and f"on https://{host}:{port}" in process.log_text(), 20, f"engine {name}")
    else:
        wait_until(lambda: process.alive() and request("GET", url + "/health", timeout=2, context=tls).status == 200,
                   20, f"engine {name} health")
    return process, url


def socket_dir() -> str:
    """A fresh directory for longform.socket_dir: private (mkdtemp's 0700) and short, as a Unix
    socket's path must be (a test's tmp_path may be too long)."""
    return tempfile.mkdtemp(prefix="wg-")


def start_longform_worker(log_dir: Path, sockets: str, index: int = 0, name: str = "longform-worker",
                          options: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Process:
    """Longform worker `index` (`whisper-gateway longform-worker`), as `up` starts it for a config
    with longform.socket_dir `sockets`: on its socket there, sending its pieces to Envoy's pieces
    listener's; `options`: more of its flags, `env`: more of its environment."""
    listen = worker_socket(sockets, index)
    process = Process(name, [PYTHON, "-m", "control_plane", "longform-worker", "--listen", "unix:" + listen,
                             "--pieces", "unix:" + pieces_socket(sockets), *options], log_dir, env=env)
    wait_until(lambda: process.alive() and unix_request("GET", listen, "/health", timeout=2).status == 200, 20, name)
    return process


def unix_request(method: str, path: str, target: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 30) -> Response:
    """An HTTP request over the Unix socket at `path`; a refused or missing socket answers status 0."""
    connection = UnixHTTPConnection(path, timeout)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return Response(response.status, response.read(), dict(response.getheaders()))
    except (FileNotFoundError, ConnectionRefusedError):
        return Response(0, b"", {})
    finally:
        connection.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def start_cpu_engine(log_dir: Path, model: str, name: str, port: int | None = None,
                     tls: tuple[Path, Path] | None = None) -> tuple[Process, str]:
    """A real Whisper (faster-whisper, tiny.en) engine; loading its model takes a few seconds.
    `tls`: (certificate, key) to serve https://localhost with."""
    port = port or free_port()
    command = [PYTHON, "-m", "engines.whisper_cpu", "--port", str(port), "--model", model, "--name", name]
    if tls:
        command += ["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])]
    process = Process(f"engine-{name}", command, log_dir)
    url = f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"
    context = ssl._create_unverified_context() if tls else None
    wait_until(lambda: process.alive() and request("GET", url + "/health", timeout=2, context=context).status == 200,
               60, f"{name} to load its model")
    return process, url


@dataclass
class GatewayConfigFile:
    """A config file a test can rewrite while the control plane runs."""

    path: Path
    raw: dict = field(default_factory=dict)

    def write(self, raw: dict) -> None:
        parse_config(raw)  # tests write valid configs unless they mean not to
        self.raw = raw
        self.path.write_text(yaml.safe_dump(raw))

    def write_text(self, text: str) -> None:
        self.path.write_text(text)


def start_control_plane(log_dir: Path, config_path: Path, name: str = "control-plane",
                        state_dir: Path | None = None) -> Process:
    """`serve` with its own state dir (default: log_dir/state); its admin token is in that dir."""
    state_dir = state_dir or log_dir / "state"
    process = Process(name, [PYTHON, "-m", "control_plane", "serve", "--config", str(config_path),
                             "--state-dir", str(state_dir)], log_dir)
    wait_until(lambda: process.alive() and "xDS (ADS) listening" in process.log_text(), 20, "control plane start")
    process.state_dir = state_dir
    return process


class AdminClient:
    """The control plane's admin API with its token."""

    def __init__(self, url: str, state_dir: Path):
        self.url = url
        self.token = (state_dir / "admin-token").read_text().strip()

    def call(self, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None,
             headers: dict | None = None) -> Response:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token or self.token}"}
        all_headers.update(headers or {})
        return request(method, self.url + path, data, all_headers)

    def backends(self) -> dict[str, dict]:
        return {b["url"]: b for b in self.call("GET", "/backends").json()["data"]}

    def status(self) -> dict:
        return self.call("GET", "/status").json()


class Envoy:
    def __init__(self, log_dir: Path, raw_config: dict, name: str = "envoy", node_id: str | None = None,
                 extra_args: tuple[str, ...] = (), tls: ssl.SSLContext | None = None, xds_host: str | None = None,
                 identity: str | None = None, workers: int | None = None):
        """`tls`: how clients check the listener when the config gives listen.tls; `xds_host`:
        the control planes (host:port,...) when not the config's one; `identity`: with
        internal_tls, the certificate it dials xDS with (envoy-<identity>; default: its node id's);
        `workers`: its worker threads (default: one per CPU)."""
        config = parse_config(raw_config)
        self.tls = tls
        self.listen_port = config.listen.port
        self.admin_port = free_port()
        bootstrap = write_bootstrap(log_dir / f"{name}-bootstrap.yaml", config, node_id or name, xds_host,
                                    self.admin_port, identity)
        command, env = envoy_command(bootstrap, ["--disable-hot-restart", "--log-level", "warn", "--drain-time-s", "1"],
                                     workers)
        self.process = Process(name, command + list(extra_args), log_dir, env=env)
        self.url = f"https://localhost:{self.listen_port}" if config.listen.tls else f"http://127.0.0.1:{self.listen_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"

    def wait_serving(self, timeout: float = 30) -> None:
        wait_until(lambda: self.process.alive() and request("GET", self.url + "/v1/models", timeout=2,
                                                            context=self.tls).status == 200,
                   timeout, "Envoy to serve /v1/models")

    def endpoints(self) -> dict[str, dict[str, dict[str, str]]]:
        """Envoy's /clusters as {cluster: {host:port or socket path: {weight, rq_active, health_flags, ...}}}."""
        text = request("GET", self.admin + "/clusters", timeout=5).text
        result: dict[str, dict[str, dict[str, str]]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and (":" in parts[1] or parts[1].startswith("/")):  # not lines such as default_priority
                cluster, host, key, value = parts
                result.setdefault(cluster, {}).setdefault(host, {})[key] = value
        return result

    def config_versions(self) -> dict[str, str]:
        dump = request("GET", self.admin + "/config_dump", timeout=5).json()
        versions = {}
        for config in dump["configs"]:
            kind = config["@type"].rsplit(".", 1)[-1]
            if kind == "ClustersConfigDump":
                versions["CDS"] = config.get("version_info", "")
            elif kind == "ListenersConfigDump":
                versions["LDS"] = config.get("version_info", "")
            elif kind == "RoutesConfigDump":
                versions["RDS"] = tuple(r.get("version_info", "") for r in config.get("dynamic_route_configs", []))
        return versions

    def stat(self, name: str) -> int:
        """A counter or gauge; Envoy writes the colon in cluster names (model:x) as an underscore."""
        text = request("GET", self.admin + f"/stats?filter=^{name}$", timeout=5).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def stop(self) -> None:
        self.process.stop()


def base_config(xds_port: int, listen_port: int, models: list, backends: list, **sections) -> dict:
    raw = {
        "listen": {"address": "127.0.0.1", "port": listen_port, "xds_port": xds_port,
                   "envoy_admin_port": free_port(), "admin_port": free_port(),
                   "envoy_metrics_port": free_port()},
        "models": models,
        "backends": backends,
    }
    raw.update(sections)
    return raw


def engine_names_in(text: str, names: list[str]) -> dict[str, int]:
    return {name: text.count(f" {name} ") for name in names}


class LoadGenerator:
    """Threads that keep sending clips to one URL, bounded in time and count, until stopped."""

    def __init__(self, base_url: str, model: str, concurrency: int, seconds: float = 30.0,
                 max_seconds: float = 60.0, max_requests: int = 2000, headers: dict | None = None,
                 audio: bytes | None = None, failure_pause_s: float = 0.0):
        """`failure_pause_s`: each thread waits this long after a request that got no answer, as a
        client would, rather than spending the budget on refused connections."""
        import threading

        self._stop = threading.Event()
        self._headers, self._audio, self._pause = headers, audio, failure_pause_s
        self._deadline = time.monotonic() + max_seconds
        self._budget = max_requests
        self._lock = threading.Lock()
        self.statuses: list[int] = []
        self._threads = [threading.Thread(target=self._run, args=(base_url, model, seconds), daemon=True)
                         for _ in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or time.monotonic() > self._deadline or self._budget <= 0:
                return False
            self._budget -= 1
            return True

    def _run(self, base_url: str, model: str, seconds: float) -> None:
        while self._take():
            try:
                status = transcribe(base_url, model, seconds=seconds, extra=[("language", "en", None)],
                                    headers=self._headers, audio=self._audio).status
            except (OSError, http.client.HTTPException):  # refused, reset, or a body cut short
                status = 0
            with self._lock:
                self.statuses.append(status)
            if status == 0 and self._pause:
                self._stop.wait(self._pause)

    def stop(self) -> list[int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.statuses


def raw_http(port: int, data: bytes, timeout: float = 10.0, drip: list[bytes] | None = None,
             drip_every: float = 0.0) -> Response:
    """Sends bytes as they are (for requests no HTTP library would send) and reads one answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        for piece in drip or []:
            time.sleep(drip_every)
            try:
                connection.sendall(piece)
            except OSError:
                break
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = connection.recv(65536)
            if not chunk:
                break
            body += chunk
        return Response(int(lines[0].split()[1]), body, headers)


def served_by(url: str, model: str, names: list[str], count: int) -> dict[str, int]:
    """Sends `count` requests through `url`; how many each named engine answered."""
    text = ""
    for _ in range(count):
        response = transcribe(url, model)
        assert response.status == 200, response.text
        text += response.json()["text"]
    return engine_names_in(text, names)


class GatewayStack:
    """A control plane (own state dir) and an Envoy over a config with the given backends."""

    def __init__(self, tmp_path: Path, model: str, backends: list[str], aliases: tuple[str, ...] = (),
                 envoy_args: tuple[str, ...] = (), listen: dict | None = None, tls: ssl.SSLContext | None = None,
                 workers: int | None = None, **sections):
        """`listen`: settings added to the listen section; `tls`: how clients check listen.tls."""
        self.tmp_path = tmp_path
        self.model = model
        self.raw = base_config(free_port(), free_port(), [{"name": model, "aliases": list(aliases)}],
                               [{"url": url, "models": [model]} for url in backends], **sections)
        self.raw["listen"].update(listen or {})
        self.config = GatewayConfigFile(tmp_path / "gateway.yaml")
        self.config.write(self.raw)
        self.plane = start_control_plane(tmp_path, self.config.path)
        self.envoy = Envoy(tmp_path, self.raw, extra_args=envoy_args, tls=tls, workers=workers)
        self.envoy.wait_serving()
        self.admin = AdminClient(f"http://127.0.0.1:{self.raw['listen']['admin_port']}", self.plane.state_dir)
        self.restarts = 0

    def hosts(self) -> dict[str, dict]:
        """The model's endpoints in Envoy, by host:port."""
        return self.envoy.endpoints().get(f"model:{self.model}", {})

    def restart_plane(self, kill: bool = False) -> None:
        self.plane.kill() if kill else self.plane.stop()
        self.restarts += 1  # a log of its own: start is seen in the log
        self.plane = start_control_plane(self.tmp_path, self.config.path, name=f"control-plane-again-{self.restarts}",
                                         state_dir=self.plane.state_dir)
        self.admin = AdminClient(self.admin.url, self.plane.state_dir)

    def stop(self) -> None:
        self.envoy.stop()
        self.plane.stop()
