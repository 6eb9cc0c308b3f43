"""A real etcd cluster on loopback ports for tests (Debian's etcd-server): members that can be
killed and started again."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from harness.processes import Process, free_port, request, wait_until


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if found is None:
        raise RuntimeError("etcd not found: apt-get install -y etcd-server (make test does)")
    return found


class EtcdCluster:
    def __init__(self, folder: Path, members: int = 3):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ports = [(free_port(), free_port()) for _ in range(members)]  # (client, peer)
        self.initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(self.ports))
        self.processes: list[Process | None] = [self._start(i, "new") for i in range(members)]
        for i in range(members):
            self.wait_healthy(i)

    def _start(self, i: int, state: str) -> Process:
        client, peer = self.ports[i]
        return Process(f"etcd-m{i}", [
            etcd_binary(), "--name", f"m{i}", "--data-dir", str(self.folder / f"m{i}"),
            "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", self.initial, "--initial-cluster-state", state, "--initial-cluster-token", "whisper-test",
            "--heartbeat-interval", "100", "--election-timeout", "1000", "--log-level", "warn"], self.folder)

    def wait_healthy(self, i: int, timeout: float = 30) -> None:
        url = f"http://127.0.0.1:{self.ports[i][0]}/health"
        wait_until(lambda: '"true"' in request("GET", url, timeout=2).text, timeout, f"etcd member m{i}")

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{client}" for client, _ in self.ports]

    def pause(self, i: int) -> None:
        """The member hangs: its connections stay open and nothing is answered."""
        self.processes[i].signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        self.processes[i].signal(signal.SIGCONT)

    def kill(self, i: int) -> None:
        self.processes[i].kill()
        self.processes[i] = None

    def start(self, i: int) -> None:
        self.processes[i] = self._start(i, "existing")

    def stop(self) -> None:
        for i, process in enumerate(self.processes):
            if process is not None:
                process.signal(signal.SIGCONT)  # a paused member could not stop
                process.stop()
                self.processes[i] = None
