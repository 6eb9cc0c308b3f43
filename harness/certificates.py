"""Certificates made with Debian's `openssl` for tests and benchmarks: a CA, server and client
certificates it signs, an expired one, and a second CA with its own, in a folder."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The names a test server answers on; the server certificates carry both.
SERVER_NAMES = "DNS:localhost,IP:127.0.0.1"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: Pair  # localhost, signed by ca
    server_next: Pair  # another one for localhost, for rotation
    client: Pair  # a client certificate signed by ca
    expired_client: Pair  # the same, expired
    expired: Pair  # localhost, signed by ca, expired
    misnamed: Pair  # signed by ca for elsewhere.example, not localhost
    other_ca: Path
    other_server: Pair  # localhost, signed by other_ca
    other_client: Pair  # a client certificate signed by other_ca

    def client_context(self, client: Pair | None = None) -> ssl.SSLContext:
        """What a client that trusts this CA uses, with a client certificate if given."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key(folder: Path, name: str) -> Path:
    path = folder / f"{name}.key"
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=folder)
    return path


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key = _key(folder, name)
    cert = folder / f"{name}.pem"
    _openssl("req", "-x509", "-key", str(key), "-out", str(cert), "-days", "30", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return cert, key


def _signed(folder: Path, name: str, ca: tuple[Path, Path], usage: str, days: int = 30,
            server_names: str = SERVER_NAMES) -> Pair:
    key = _key(folder, name)
    request, cert, extensions = folder / f"{name}.csr", folder / f"{name}.pem", folder / f"{name}.ext"
    names = f"subjectAltName={server_names}\n" if usage == "serverAuth" else ""
    extensions.write_text(f"{names}extendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-new", "-key", str(key), "-out", str(request), "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", str(days), "-extfile", str(extensions), "-out", str(cert), cwd=folder)
    return Pair(cert, key)


def make_certificates(folder: Path) -> Certificates:
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = _ca(folder, "test-ca"), _ca(folder, "other-ca")
    return Certificates(
        ca=ca[0], server=_signed(folder, "server", ca, "serverAuth"),
        server_next=_signed(folder, "server-next", ca, "serverAuth"),
        client=_signed(folder, "client", ca, "clientAuth"),
        expired_client=_signed(folder, "expired-client", ca, "clientAuth", days=-1),
        expired=_signed(folder, "expired", ca, "serverAuth", days=-1),
        misnamed=_signed(folder, "misnamed", ca, "serverAuth", server_names="DNS:elsewhere.example"),
        other_ca=other[0], other_server=_signed(folder, "other-server", other, "serverAuth"),
        other_client=_signed(folder, "other-client", other, "clientAuth"))
