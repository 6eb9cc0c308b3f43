"""compose.yaml checked without a Docker engine: a real compose parser, and every entry point
of the project's image run here with the arguments compose gives it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml

from control_plane.config import load_config
from control_plane.config.longform import worker_socket
from harness.processes import PYTHON, REPO, Process, free_port, request, socket_dir, unix_request, wait_until

COMPOSE = REPO / "compose.yaml"
TOKEN = "test-token-for-compose"
# Interpolation as a test sets it: Envoy dials the control plane here instead of by service name.
ENV = {"WHISPER_GATEWAY_ADMIN_TOKEN": TOKEN, "XDS_HOST": "127.0.0.1"}


def compose_config() -> dict:
    """What Debian's docker-compose (no engine needed) makes of compose.yaml, profiles included."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (make test installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_GATEWAY")} | ENV
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", "cpu", "--profile", "observability",
                             "config"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.e2e
def test_compose_file_is_valid_and_complete():
    services = compose_config()["services"]
    assert set(services) == {"certs", "control-plane", "envoy", "lb", "engine", "engine-cpu", "prometheus", "grafana",
                             "control-plane-b", "etcd-0", "etcd-1", "etcd-2"}  # the `ha` profile's too (this parser lists every profile)
    gpu = services["engine"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["engine"]["healthcheck"]["start_period"] in ("15m", "900s", "15m0s")
    assert "openai/whisper-large-v3-turbo" in services["engine"]["command"]
    # The admin API is published on the host's loopback only.
    admin = services["control-plane"]["ports"][0]
    assert (admin.get("host_ip") if isinstance(admin, dict) else admin.split(":")[0]) == "127.0.0.1"


@pytest.mark.e2e
def test_the_admin_token_is_required():
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_GATEWAY")}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=60)
    assert result.returncode != 0 and "WHISPER_GATEWAY_ADMIN_TOKEN" in result.stderr


def test_files_ports_and_variables_exist():
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, service in raw["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} is missing"
    variables = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    documented = set(re.findall(r"^([A-Z_]+)=", (REPO / ".env.example").read_text(), re.M))
    assert variables <= documented, variables - documented
    gateway = load_config(REPO / "deploy" / "gateway.yaml")
    assert gateway.listen.port == 8080 and gateway.listen.admin_port == 18001
    assert {d.name for d in gateway.discovery} == {"engine", "engine-cpu"}
    assert "--served-model-name" in raw["services"]["engine"]["command"]
    served = raw["services"]["engine"]["command"][raw["services"]["engine"]["command"].index("--served-model-name") + 1]
    assert served == gateway.models[0].name
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert targets["envoy"]["static_configs"][0]["targets"] == [f"envoy:{gateway.listen.envoy_metrics_port}"]
    assert targets["control-plane"]["static_configs"][0]["targets"] == [f"control-plane:{gateway.listen.admin_port}"]
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "whisper-gateway.json").read_text())
    assert len(dashboard["panels"]) >= 8
    dockerfile = (REPO / "Dockerfile").read_text()
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (REPO / copied).exists(), copied


def _host_command(service: dict, tmp_path: Path, config: Path) -> list[str]:
    """The service's entry point and arguments, with container paths mapped to this checkout."""
    entrypoint = service.get("entrypoint") or ["whisper-gateway"]
    command = [PYTHON, "-m", "control_plane"] if entrypoint == ["whisper-gateway"] else (
        [PYTHON] + entrypoint[1:] if entrypoint[0] == "python" else entrypoint)
    mapped = []
    for argument in service["command"]:
        argument = argument.replace("/etc/whisper-gateway/gateway.yaml", str(config))
        argument = argument.replace("/var/lib/whisper-gateway", str(tmp_path / "state"))
        argument = argument.replace("/etc/whisper-gateway/pki", str(tmp_path / "pki"))
        mapped.append(argument)
    return command + mapped


@pytest.mark.e2e
def test_the_images_entry_points_run_with_composes_arguments(tmp_path):
    services = compose_config()["services"]
    # The mounted config, on free ports so the test can run beside anything.
    raw = yaml.safe_load((REPO / "deploy" / "gateway.yaml").read_text())
    raw["listen"].update(port=free_port(), envoy_metrics_port=free_port(), xds_port=free_port(),
                         admin_port=free_port(), envoy_admin_port=free_port())
    engine_port = free_port()
    raw["discovery"] = []
    raw["backends"] = [{"url": f"http://127.0.0.1:{engine_port}", "models": ["whisper"]}]
    raw["internal_tls"]["dir"] = str(tmp_path / "pki")
    raw["listen"]["proxy_protocol"] = False  # no `lb` in front here: the test talks to Envoy itself
    raw["longform"].update(socket_dir=socket_dir())  # the container's /tmp/whisper-gateway, here beside other tests'
    worker = worker_socket(raw["longform"]["socket_dir"], 0)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(raw))
    # The one-shot `certs` service first: the internal CA and certificates the others mount.
    made = subprocess.run(_host_command(services["certs"], tmp_path, config), capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert made.returncode == 0, made.stderr
    ca = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))

    cpu = _host_command(services["engine-cpu"], tmp_path, config)
    cpu[cpu.index("--port") + 1] = str(engine_port)
    engine = Process("engine-cpu", cpu, tmp_path)
    plane = Process("control-plane", _host_command(services["control-plane"], tmp_path, config), tmp_path,
                    env={"WHISPER_GATEWAY_ADMIN_TOKEN": TOKEN})
    envoy = Process("envoy", _host_command(services["envoy"], tmp_path, config), tmp_path)
    listen = raw["listen"]
    wait_until(lambda: request("GET", f"http://127.0.0.1:{engine_port}/health", timeout=2).status == 200, 60,
               "the CPU engine")
    admin = f"https://127.0.0.1:{listen['admin_port']}"  # the internal CA's certificate, beyond loopback
    wait_until(lambda: request("GET", admin + "/healthz", timeout=2, context=ca).status == 200, 20,
               "the control plane")
    wait_until(lambda: request("GET", f"http://127.0.0.1:{listen['port']}/v1/models", timeout=2).status == 200, 30,
               "Envoy, configured by the control plane")
    # The healthchecks compose runs inside the containers pass here too.
    for name, port in (("control-plane", listen["admin_port"]), ("envoy", listen["envoy_metrics_port"])):
        test = services[name]["healthcheck"]["test"]
        script = test[test.index("-c") + 1].replace("18001", str(port)).replace("9902", str(port))
        assert subprocess.run([PYTHON, "-c", script], timeout=30).returncode == 0, name
    # Prometheus's targets: Envoy's metrics listener and the control plane's /metrics.
    envoy_metrics = request("GET", f"http://127.0.0.1:{listen['envoy_metrics_port']}/stats/prometheus")
    assert envoy_metrics.status == 200 and "envoy_cluster_upstream_rq" in envoy_metrics.text
    assert request("GET", f"http://127.0.0.1:{listen['envoy_metrics_port']}/quitquitquit").status == 404
    plane_metrics = request("GET", admin + "/metrics", context=ca).text
    assert "whisper_gateway_connected_envoys 1.0" in plane_metrics
    assert 'whisper_gateway_endpoint_weight{backend="' in plane_metrics
    # The longform worker the Envoy container starts beside Envoy: Envoy finds it healthy.
    wait_until(lambda: unix_request("GET", worker, "/health", timeout=2).status == 200, 20, "the worker")
    wait_until(lambda: f"whisper:longform::{worker}::health_flags::healthy" in request(
        "GET", f"http://127.0.0.1:{listen['envoy_admin_port']}/clusters", timeout=2).text, 10, "Envoy to check the worker")
    # It goes with its Envoy: a container runtime's SIGTERM reaches Envoy (PID 1) alone.
    os.kill(envoy.popen.pid, signal.SIGTERM)

    wait_until(lambda: unix_request("GET", worker, "/health", timeout=2).status == 0, 10, "the worker to stop with Envoy")
    for process in (envoy, plane, engine):
        process.stop()


@pytest.mark.e2e
def test_the_ha_profile_runs_two_control_planes_on_etcd():
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_GATEWAY")} | ENV | {
        "GATEWAY_CONFIG": "./deploy/gateway-ha.yaml", "XDS_HOST": "control-plane,control-plane-b"}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", "ha", "config"], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"control-plane", "control-plane-b", "etcd-0", "etcd-1", "etcd-2", "envoy"} <= set(services)
    assert "control-plane,control-plane-b" in services["envoy"]["command"]
    for name in ("control-plane", "control-plane-b", "envoy"):
        mounted = [v for v in services[name]["volumes"] if (v["target"] if isinstance(v, dict) else v.split(":")[1])
                   == "/etc/whisper-gateway/gateway.yaml"]
        source = mounted[0]["source"] if isinstance(mounted[0], dict) else mounted[0].split(":")[0]
        assert source.endswith("deploy/gateway-ha.yaml"), (name, source)
    config = load_config(REPO / "deploy" / "gateway-ha.yaml")
    assert config.state.etcd == ("etcd-0:2379", "etcd-1:2379", "etcd-2:2379")
    assert config.listen == load_config(REPO / "deploy" / "gateway.yaml").listen
