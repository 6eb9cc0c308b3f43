"""A real etcd cluster on loopback ports for tests (Debian's etcd-server): members that can be
killed and started again.

`tls=<folder>`: the members speak TLS to clients and to each other, and require a certificate
from the folder's CA on both (--client-cert-auth, --peer-client-cert-auth). The folder is an
internal PKI (control_plane/internal_pki.py): etcd's own CA, the control plane's certificate to
etcd (what `client_tls` names, for `state.etcd_tls`) and one certificate per member, etcd-m<i>,
for localhost and 127.0.0.1; what is missing is made.
"""

from __future__ import annotations

import shutil
import signal
import ssl
from pathlib import Path

from control_plane import internal_pki
from harness.processes import Process, free_port, request, wait_until


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if found is None:
        raise RuntimeError("etcd not found: apt-get install -y etcd-server (make test does)")
    return found


class EtcdCluster:
    def __init__(self, folder: Path, members: int = 3, tls: Path | None = None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.scheme = "http" if tls is None else "https"
        if tls is not None:
            internal_pki.ensure(tls)
            for i in range(members):
                internal_pki.issue_missing(tls, "etcd", f"m{i}", ("localhost", "127.0.0.1"))
            internal_pki.issue_missing(tls, "etcd-client", internal_pki.CONTROL_PLANE)
        self.ports = [(free_port(), free_port()) for _ in range(members)]  # (client, peer)
        self.initial = ",".join(f"m{i}={self.scheme}://127.0.0.1:{peer}" for i, (_, peer) in enumerate(self.ports))
        self.processes: list[Process | None] = [self._start(i, "new") for i in range(members)]
        for i in range(members):
            self.wait_healthy(i)

    def _start(self, i: int, state: str) -> Process:
        client, peer = self.ports[i]
        tls = []
        if self.tls is not None:
            cert, key = internal_pki.pair_paths(self.tls, "etcd", f"m{i}")
            ca = str(internal_pki.ca_path(self.tls, "etcd"))  # etcd's own CA: no Envoy's certificate gets in
            tls = ["--cert-file", str(cert), "--key-file", str(key), "--trusted-ca-file", ca, "--client-cert-auth",
                   "--peer-cert-file", str(cert), "--peer-key-file", str(key), "--peer-trusted-ca-file", ca,
                   "--peer-client-cert-auth"]
        scheme = self.scheme
        return Process(f"etcd-m{i}", [
            etcd_binary(), "--name", f"m{i}", "--data-dir", str(self.folder / f"m{i}"),
            "--listen-client-urls", f"{scheme}://127.0.0.1:{client}",
            "--advertise-client-urls", f"{scheme}://127.0.0.1:{client}",
            "--listen-peer-urls", f"{scheme}://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"{scheme}://127.0.0.1:{peer}",
            "--initial-cluster", self.initial, "--initial-cluster-state", state, "--initial-cluster-token", "whisper-test",
            "--heartbeat-interval", "100", "--election-timeout", "1000", "--log-level", "warn", *tls], self.folder)

    @property
    def client_tls(self) -> dict[str, str] | None:
        """What `state.etcd_tls` takes: etcd's CA and the control plane's certificate to etcd."""
        if self.tls is None:
            return None
        cert, key = internal_pki.pair_paths(self.tls, "etcd-client", internal_pki.CONTROL_PLANE)
        return {"ca_file": str(internal_pki.ca_path(self.tls, "etcd")), "cert_file": str(cert), "key_file": str(key)}

    def ssl_context(self) -> ssl.SSLContext | None:
        """An HTTPS client's TLS to the members, with the control plane's certificate."""
        if self.tls is None:
            return None
        files = self.client_tls
        context = ssl.create_default_context(cafile=files["ca_file"])
        context.load_cert_chain(files["cert_file"], files["key_file"])
        return context

    def url(self, i: int) -> str:
        return f"{self.scheme}://127.0.0.1:{self.ports[i][0]}"

    def wait_healthy(self, i: int, timeout: float = 30) -> None:
        url, context = self.url(i) + "/health", self.ssl_context()
        wait_until(lambda: '"true"' in request("GET", url, timeout=2, context=context).text, timeout,
                   f"etcd member m{i}")

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
