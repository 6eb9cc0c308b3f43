"""compose.yaml run for real: a docker-compose project of its own (name, env file, free host
ports) over the images `deploy/images.sh` built, and everything it made removed at the end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from harness.processes import REPO, free_port, request, wait_until

COMPOSE = REPO / "compose.yaml"
IMAGES_ENV = REPO / ".docker-images.env"
TOKEN = "compose-suite-admin-token"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr or result.stdout}")
    return result


class ComposeProject:
    """One compose project from the repository's compose.yaml, on ports nothing else uses."""

    def __init__(self, work: Path, name: str, config: str = "./deploy/gateway.yaml", xds_host: str = "control-plane"):
        self.work, self.name = work, name
        self.ports = {"GATEWAY_PORT": free_port(), "ADMIN_PORT": free_port(), "ADMIN_PORT_B": free_port(),
                      "PROMETHEUS_PORT": free_port(), "GRAFANA_PORT": free_port()}
        images = dict(line.split("=", 1) for line in IMAGES_ENV.read_text().split()) if IMAGES_ENV.exists() else {}
        env = {"COMPOSE_PROJECT_NAME": name, "WHISPER_GATEWAY_ADMIN_TOKEN": TOKEN, "GATEWAY_CONFIG": config,
               "XDS_HOST": xds_host, "CPU_THREADS": "1", "GATEWAY_VERSION": "latest", **images,
               **{k: str(v) for k, v in self.ports.items()}}
        self.env_file = work / f"{name}.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        self.url = f"http://127.0.0.1:{self.ports['GATEWAY_PORT']}"
        self.admin = f"https://127.0.0.1:{self.ports['ADMIN_PORT']}"

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        command = ["docker-compose", "-f", str(COMPOSE), "--project-directory", str(REPO), "--env-file",
                   str(self.env_file), "-p", self.name, "--profile", "cpu", "--profile", "ha", *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_GATEWAY")}
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=environment)
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)}: {result.stderr[-3000:]}")
        return result

    def up(self, *services: str, scale: dict[str, int] | None = None) -> None:
        """Starts the named services (and what they depend on); never pulls, never builds."""
        scales = [f"--scale={s}={n}" for s, n in (scale or {}).items()]
        self.run("up", "-d", "--no-build", *scales, *services)

    def exec(self, service: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("exec", "-T", service, *command, timeout=timeout, check=False)

    def containers(self, service: str | None = None) -> list[dict]:
        """The project's containers (running or not), as `docker inspect` shows them."""
        labels = ["--filter", f"label=com.docker.compose.project={self.name}"]
        if service:
            labels += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = docker("ps", "-aq", *labels).stdout.split()
        return json.loads(docker("inspect", *ids).stdout) if ids else []

    def healthy(self, service: str) -> bool:
        found = self.containers(service)
        return bool(found) and all(c["State"].get("Health", {}).get("Status") == "healthy" for c in found)

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", service, check=False).stdout

    def key(self, name: str) -> str:
        """A key made as the README says: `whisper-gateway keys create` in the control plane's container."""
        made = self.exec("control-plane", "whisper-gateway", "keys", "create", name)
        assert made.returncode == 0, made.stderr + made.stdout
        return made.stdout.strip().splitlines()[-1]

    def network(self) -> str:
        return f"{self.name}_default"

    def down(self) -> None:
        """`down -v`, then checks that nothing of the project is left: containers, volumes, networks."""
        self.run("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
        label = f"label=com.docker.compose.project={self.name}"
        left = {"containers": docker("ps", "-aq", "--filter", label).stdout.split(),
                "volumes": docker("volume", "ls", "-q", "--filter", label).stdout.split(),
                "networks": docker("network", "ls", "-q", "--filter", label).stdout.split()}
        assert not any(left.values()), left


def wait_serving(project: ComposeProject, timeout: float = 180) -> None:
    """Envoy's published port answers /v1/models (it got its config from the control plane)."""
    wait_until(lambda: request("GET", project.url + "/v1/models", timeout=3).status == 200, timeout,
               "Envoy in compose to serve /v1/models")


def remove_stale(prefixes: tuple[str, ...]) -> None:
    """Containers, volumes and networks of earlier runs of this suite that died before cleaning up."""
    for kind, listing in (("rm", ["ps", "-aq"]), ("volume", ["volume", "ls", "-q"]), ("network", ["network", "ls", "-q"])):
        for item in docker(*listing, "--filter", "label=com.docker.compose.project").stdout.split():
            project = docker("inspect", "--format", '{{index .Config.Labels "com.docker.compose.project"}}'
                             if kind == "rm" else '{{index .Labels "com.docker.compose.project"}}', item,
                             check=False).stdout.strip()
            if project.startswith(prefixes):
                docker(*(["rm", "-f"] if kind == "rm" else [kind, "rm"]), item, check=False)
