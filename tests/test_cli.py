"""The `whisper-gateway` command as an operator uses it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from control_plane.config import DEFAULT_CONFIG_PATH
from control_plane.supervisor import find_envoy
from harness.speech import word_error_rate
from harness.processes import PYTHON, REPO, Process, free_port, request, socket_dir, transcribe, wait_until

pytestmark = pytest.mark.e2e

CLI = [PYTHON, "-m", "control_plane"]
# What control_plane/defaults/sample.wav says (espeak-ng -v en -s 150).
SAMPLE_SENTENCE = "Welcome. Your speech was sent through the gateway and turned into text."


def up_config(tmp_path: Path) -> tuple[Path, dict]:
    raw = {
        "listen": {"address": "127.0.0.1", "port": free_port(), "envoy_admin_port": free_port(),
                   "xds_port": free_port(), "admin_port": free_port(), "envoy_metrics_port": free_port()},
        "models": [{"name": "whisper-large-v3-turbo", "aliases": ["whisper-1"]}, {"name": "whisper-small"}],
        "engines": [
            {"kind": "simulated", "port": free_port(), "model": "whisper-large-v3-turbo", "name": "turbo-a",
             "time_scale": 0.1},
            {"kind": "simulated", "port": free_port(), "model": "whisper-small", "name": "small-a", "time_scale": 5},
        ],
        "longform": {"workers": 1, "socket_dir": socket_dir()},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def default_config_on_free_ports(tmp_path: Path) -> tuple[Path, dict]:
    """The embedded default (real CPU Whisper engines), moved to ports nothing else uses."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["listen"].update(port=free_port(), envoy_admin_port=free_port(), xds_port=free_port(), admin_port=free_port(),
                         envoy_metrics_port=free_port())
    for engine in raw["engines"]:
        engine["port"] = free_port()
    raw["longform"].update(socket_dir=socket_dir())  # several gateways at once on this host
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def start_up(tmp_path: Path, config: tuple[Path, dict] | None = None) -> tuple[Process, dict]:
    path, raw = config or up_config(tmp_path)
    process = Process("up", CLI + ["up", "--config", str(path), "--run-dir", str(tmp_path / "run"),
                                   "--state-dir", str(tmp_path / "state")], tmp_path)
    wait_until(lambda: "  curl " in process.log_text() or not process.alive(), 60, "`up` to print its example")
    assert process.alive(), process.log_text()
    return process, raw


def test_up_prints_a_curl_line_that_works_and_stops_without_orphans(tmp_path):
    process, raw = start_up(tmp_path)
    line = next(text for text in process.log_text().splitlines() if text.startswith("  curl "))
    result = subprocess.run(shlex.split(line), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert "turbo-a transcribed" in answer["text"]
    # A recording over longform.split_above_s (180 s) goes to the worker `up` started, in pieces.
    url = f"http://127.0.0.1:{raw['listen']['port']}"
    recording = transcribe(url, "whisper-1", 200.0)
    assert recording.status == 200, recording.text
    assert recording.json()["text"].count(" turbo-a transcribed chunk 1 of 1 ") == 8  # 27.5 s each (silence), and the rest
    children = children_of(process.popen.pid)
    assert len(children) == 5  # two engines, the longform worker, the control plane, Envoy

    os.kill(process.popen.pid, signal.SIGTERM)  # the `up` process alone, as a service manager would
    assert process.popen.wait(30) == 0
    wait_until(lambda: not any(alive(pid) for pid in children), 15, "every child to exit")
    assert "whisper-gateway stopped" in process.log_text()


def test_up_with_the_default_real_engines_transcribes_its_sample(tmp_path):
    process, raw = start_up(tmp_path, default_config_on_free_ports(tmp_path))
    line = next(text for text in process.log_text().splitlines() if text.startswith("  curl "))
    assert "model=whisper-1" in line
    result = subprocess.run(shlex.split(line), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    transcript = json.loads(result.stdout)["text"]
    assert word_error_rate(SAMPLE_SENTENCE, transcript) <= 0.3, transcript


def test_stopping_up_lets_requests_in_flight_finish(tmp_path):
    process, raw = start_up(tmp_path)
    url = f"http://127.0.0.1:{raw['listen']['port']}"
    # whisper-small's engine runs 5x slower than real time: 90 s of audio takes about 2 s, and
    # the stop arrives while it runs.
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(transcribe, url, "whisper-small", 90)
        admin = f"http://127.0.0.1:{raw['listen']['envoy_admin_port']}"
        wait_until(lambda: "downstream_rq_active: 1" in request(
            "GET", admin + "/stats?filter=^http.whisper.downstream_rq_active$").text, 10, "the request in flight")
        os.kill(process.popen.pid, signal.SIGTERM)
        response = pending.result(30)
    assert response.status == 200, response.text
    assert "chunk 3 of 3" in response.json()["text"]
    assert process.popen.wait(30) == 0


def test_children_die_when_up_is_killed_outright(tmp_path):
    process, raw = start_up(tmp_path)
    children = children_of(process.popen.pid)
    assert len(children) >= 3, children  # engines, control plane, Envoy
    os.kill(process.popen.pid, signal.SIGKILL)
    process.popen.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in children), 15, "the orphaned children to exit")
    assert [pid for pid in children if alive(pid)] == []


def test_up_refuses_busy_ports_by_name(tmp_path):
    path, raw = up_config(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", raw["listen"]["port"]))
        holder.listen()
        result = subprocess.run(CLI + ["up", "--config", str(path), "--run-dir", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2
    assert f"listen.port {raw['listen']['port']}" in result.stderr


@pytest.mark.parametrize("command", ["serve", "up", "envoy-bootstrap"])
def test_bad_config_stops_every_command_with_the_key_named(tmp_path, command):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [m]\nlisten: {port: 70000}\n")
    result = subprocess.run(CLI + [command, "--config", str(path)], capture_output=True, text=True, timeout=30,
                            cwd=REPO)
    assert result.returncode == 2
    assert "listen.port: 70000 is out of range" in result.stderr


def test_envoy_bootstrap_is_valid_for_envoy(tmp_path):
    out = tmp_path / "bootstrap.yaml"
    result = subprocess.run(CLI + ["envoy-bootstrap", "--node-id", "edge-1", "--xds-host", "control-plane",
                                   "--admin-port", "9999", "-o", str(out)], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    bootstrap = yaml.safe_load(out.read_text())
    assert bootstrap["node"]["id"] == "edge-1"
    assert bootstrap["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9999}
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    endpoint = clusters["xds_cluster"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "control-plane", "port_value": 18000}
    validate = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(out)], capture_output=True, text=True,
                              timeout=60)
    assert validate.returncode == 0, validate.stdout + validate.stderr


def test_serve_stops_cleanly_on_sigterm(tmp_path):
    path, _ = up_config(tmp_path)
    process = Process("serve", CLI + ["serve", "--config", str(path), "--state-dir", str(tmp_path / "state")], tmp_path)
    wait_until(lambda: "xDS (ADS) listening" in process.log_text(), 20, "serve to start")
    started = time.monotonic()
    assert process.stop() == 0
    assert time.monotonic() - started < 8


def test_up_with_internal_tls_and_an_https_listener(tmp_path):
    """`up` makes the internal CA and certificates it lacks, serves xDS over mutual TLS, probes the
    HTTPS listener over TLS and prints an https example."""
    from harness.certificates import make_certificates

    certs = make_certificates(tmp_path / "certs")
    path, raw = up_config(tmp_path)
    raw["listen"]["tls"] = {"cert_file": str(certs.server.cert), "key_file": str(certs.server.key)}
    raw["internal_tls"] = {"dir": str(tmp_path / "pki")}
    path.write_text(yaml.safe_dump(raw))
    process, _ = start_up(tmp_path, (path, raw))
    assert {p.name for p in (tmp_path / "pki").iterdir()} >= {"ca.pem", "control-plane.pem", "envoy-up.pem"}
    line = next(text for text in process.log_text().splitlines() if text.startswith("  curl "))
    assert f"https://127.0.0.1:{raw['listen']['port']}/v1/audio/transcriptions" in line
    result = subprocess.run(shlex.split(line) + ["--cacert", str(certs.ca), "--resolve",
                                                 f"localhost:{raw['listen']['port']}:127.0.0.1"],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "turbo-a transcribed" in json.loads(result.stdout)["text"]
    plane_log = (tmp_path / "run" / "control-plane.log").read_text()
    assert "mutual TLS" in plane_log and "envoy up." in plane_log and "envoy/up" in plane_log
    os.kill(process.popen.pid, signal.SIGTERM)
    assert process.popen.wait(30) == 0


def test_envoy_bootstrap_with_internal_tls_is_valid_for_envoy(tmp_path):
    path, raw = up_config(tmp_path)
    raw["internal_tls"] = {"dir": str(tmp_path / "pki")}
    path.write_text(yaml.safe_dump(raw))
    made = subprocess.run(CLI + ["certs", "init", "--config", str(path), "--envoy", "edge"], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "bootstrap.yaml"
    result = subprocess.run(CLI + ["envoy-bootstrap", "--config", str(path), "--node-id", "edge.host-1", "-o", str(out)],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    bootstrap = yaml.safe_load(out.read_text())
    xds = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "xds_cluster")
    context = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["validation_context"]["trusted_ca"]["filename"] == str((tmp_path / "pki" / "ca.pem").resolve())
    sds = yaml.safe_load((tmp_path / "bootstrap-internal-sds.yaml").read_text())["resources"][0]
    assert sds["tls_certificate"]["certificate_chain"]["filename"].endswith("envoy-edge.pem")
    validate = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(out)], capture_output=True, text=True,
                              timeout=60)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    to_stdout = subprocess.run(CLI + ["envoy-bootstrap", "--config", str(path)], capture_output=True, text=True,
                               timeout=30, cwd=REPO)
    assert to_stdout.returncode == 2 and "give --output" in to_stdout.stderr
