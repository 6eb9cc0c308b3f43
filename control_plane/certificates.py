"""TLS certificates from PEM files: read, checked, and watched for replacement.

The control plane reads the files, not Envoy: it checks a new certificate before any Envoy
sees it (it parses, its key matches, it has not expired), sends it to every Envoy over SDS
(control_plane/builders/secrets.py), and keeps the one before serving when a replacement is
broken, saying why on `/status` and in the log. Envoys on other hosts need no copy of the
files; the xDS port carries the keys, so it stays on loopback or a private network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control_plane.config import BackendTlsConfig, ListenTlsConfig
from control_plane.internal_pki import file_signature

log = logging.getLogger(__name__)
EXPIRY_WARNING = timedelta(days=14)


class CertificateProblem(ValueError):
    """Why a certificate file cannot serve, said for the operator (the config key first)."""


@dataclass(frozen=True)
class KeyPair:
    chain: bytes  # PEM, leaf first
    key: bytes = field(repr=False)  # PEM; never logged nor shown
    subject: str
    not_after: datetime
    fingerprint: str  # SHA-256 of the leaf's DER, as `openssl x509 -fingerprint -sha256` shows it

    def describe(self) -> dict:
        return {"subject": self.subject, "not_after": self.not_after.isoformat(), "sha256": self.fingerprint}


@dataclass(frozen=True)
class Authority:
    pem: bytes  # one or more CA certificates
    path: str
    count: int

    def describe(self) -> dict:
        return {"file": self.path, "certificates": self.count}


@dataclass(frozen=True)
class TlsMaterial:
    """Everything the gateway's TLS needs, as last read whole and good."""

    listener: KeyPair | None = None  # listen.tls
    client_ca: Authority | None = None  # listen.tls.client_ca_file
    backend_ca: Authority | None = None  # backend_tls.ca_file, else the system's bundle
    backend_client: KeyPair | None = None  # backend_tls.cert_file / key_file

    @property
    def checks_engines(self) -> bool:
        """There is a CA to check https:// engines against; without one none is served."""
        return self.backend_ca is not None


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CertificateProblem(f"{key}: cannot read {path}: {error.strerror}") from None


PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _certificates(data: bytes, path: str, key: str) -> list[x509.Certificate]:
    """Each PEM certificate in the file, in order. One that does not parse is left out: system
    bundles hold a few that newer parsers refuse (a negative serial number, say)."""
    certificates = []
    for block in PEM_CERTIFICATE.findall(data):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            continue
    if not certificates:
        raise CertificateProblem(f"{key}: {path} holds no PEM certificate")
    return certificates


def read_pair(cert_path: str, key_path: str, key: str, now: datetime) -> KeyPair:
    """A certificate chain and its private key; CertificateProblem when they cannot serve now."""
    chain = _read(cert_path, f"{key}.cert_file")
    secret = _read(key_path, f"{key}.key_file")
    leaf = _certificates(chain, cert_path, f"{key}.cert_file")[0]
    try:
        private = serialization.load_pem_private_key(secret, password=None)
    except TypeError:
        raise CertificateProblem(f"{key}.key_file: {key_path} is encrypted; give the key unencrypted") from None
    except (ValueError, serialization.UnsupportedAlgorithm):
        raise CertificateProblem(f"{key}.key_file: {key_path} holds no PEM private key") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, raw) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, raw):
        raise CertificateProblem(f"{key}.key_file: {key_path} is not the key of the certificate in {cert_path}")
    not_after = leaf.not_valid_after_utc
    if not_after <= now:
        raise CertificateProblem(f"{key}.cert_file: the certificate in {cert_path} expired on {not_after:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now:
        raise CertificateProblem(f"{key}.cert_file: the certificate in {cert_path} is not valid before "
                                 f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    return KeyPair(chain, secret, leaf.subject.rfc4514_string(), not_after, fingerprint)


def read_authority(path: str, key: str) -> Authority:
    data = _read(path, key)
    certificates = _certificates(data, path, key)
    # Re-encoded from what parsed: comments and other text in a bundle stay behind.
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    return Authority(pem, path, len(certificates))


def system_bundle() -> str | None:
    """The system's CA bundle (Debian's ca-certificates), as OpenSSL finds it."""
    paths = ssl.get_default_verify_paths()
    return next((p for p in (paths.cafile, paths.openssl_cafile) if p and os.path.isfile(p)), None)


def _engine_authority(backends: BackendTlsConfig) -> Authority | None:
    """What https:// engines are checked against: backend_tls.ca_file, else the system's CAs
    (Envoy checks an engine's name only against a CA it is given, so the bundle is sent too);
    None when there is neither: then no https:// engine is served."""
    if backends.ca_file:
        return read_authority(backends.ca_file, "backend_tls.ca_file")
    bundle = system_bundle()
    return read_authority(bundle, "the system CA bundle") if bundle else None


def read_material(listen: ListenTlsConfig | None, backends: BackendTlsConfig, now: datetime) -> TlsMaterial:
    """Every configured file, checked; CertificateProblem for the first that cannot serve."""
    return TlsMaterial(
        listener=read_pair(listen.cert_file, listen.key_file, "listen.tls", now) if listen else None,
        client_ca=read_authority(listen.client_ca_file, "listen.tls.client_ca_file")
        if listen and listen.client_ca_file else None,
        backend_ca=_engine_authority(backends),
        backend_client=read_pair(backends.cert_file, backends.key_file, "backend_tls", now)
        if backends.cert_file and backends.key_file else None)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class CertificateFiles:
    """The configured files, re-read when one of them changes (size, time or inode: an editor's
    write and an atomic rename both show). `current` is the last set that was good as a whole."""

    def __init__(self, listen: ListenTlsConfig | None, backends: BackendTlsConfig):
        self.listen, self.backends = listen, backends
        named = [listen.cert_file, listen.key_file, listen.client_ca_file] if listen else []
        # Looked at every poll; the system bundle is found once.
        self.paths = [p for p in named + [backends.ca_file or system_bundle(), backends.cert_file, backends.key_file]
                      if p]
        self.current: TlsMaterial | None = None
        self.problem: str | None = None  # why the files as they are now are not served
        self._seen: tuple | None = None
        self._warned: set[str] = set()

    def _signature(self) -> tuple:
        return file_signature(self.paths)

    def load(self) -> TlsMaterial:
        """At start: the files must be good (CertificateProblem says why not)."""
        self._seen = self._signature()
        self.current, self.problem = read_material(self.listen, self.backends, utc_now()), None
        return self.current

    def poll(self) -> TlsMaterial | None:
        """New material to serve when the files changed and are good (the caller then `accept`s or
        `reject`s it); None when nothing is to be sent. Files that cannot serve are read again
        each time until they can (a certificate not yet valid becomes valid without a change)."""
        signature = self._signature()
        if signature == self._seen and self.problem is None:
            self._warn_expiry()
            return None
        self._seen = signature
        try:
            material = read_material(self.listen, self.backends, utc_now())
        except CertificateProblem as problem:
            self.reject(str(problem))
            return None
        if material == self.current:
            self.problem = None
            return None
        return material

    def accept(self, material: TlsMaterial) -> None:
        """`material` is served now."""
        self.current, self.problem = material, None
        log.info("certificate files changed: every Envoy, the admin API and the scrapes use them now")

    def reject(self, why: str) -> None:
        """The files, or the material from the last poll, cannot be served: tried again next poll."""
        if why != self.problem:
            log.error("certificate files changed but cannot serve, keeping the ones before: %s", why)
        self.problem = why

    def _warn_expiry(self) -> None:
        """Once per served certificate, when it has less than EXPIRY_WARNING left."""
        material = self.current or TlsMaterial()
        for pair in (material.listener, material.backend_client):
            if pair and pair.fingerprint not in self._warned and pair.not_after - utc_now() < EXPIRY_WARNING:
                self._warned.add(pair.fingerprint)
                log.warning("the certificate %s expires on %s: replace its files", pair.subject,
                            f"{pair.not_after:%Y-%m-%d %H:%M} UTC")

    def status(self) -> dict:
        """For `/status`: what is served (never a key), and why a change is not."""
        material = self.current or TlsMaterial()
        shown = {name: item.describe() for name, item in vars(material).items() if item is not None}
        return {"served": shown, "problem": self.problem}


def engine_client_context(backends: BackendTlsConfig, material: TlsMaterial | None) -> ssl.SSLContext:
    """The control plane's own TLS to https:// engines (scrapes, model lookups), checked as
    Envoy checks them: against backend_tls.ca_file (or the system's roots), by host name."""
    authority = material.backend_ca if material else None
    context = ssl.create_default_context(cadata=authority.pem.decode("ascii") if authority else None)
    if backends.cert_file and backends.key_file:
        context.load_cert_chain(backends.cert_file, backends.key_file)
    return context


class AdminTls:
    """The admin API's TLS: the control plane's internal certificate (internal_tls) or listen.tls's,
    as GatewayConfig.admin_tls names them. The files are watched (`poll`): a replacement that is
    good (it parses, its key matches, it is valid now) is taken on the next handshake, each
    handshake being switched to the context of the moment, so a rotation builds a new context
    rather than changing a live one; a broken one keeps the last good certificate."""

    def __init__(self, cert_file: str, key_file: str, label: str = "listen.tls"):
        self.cert_file, self.key_file, self.label = cert_file, key_file, label  # label: the config key, for errors
        self.problem: str | None = None  # why the files as they are now are not served
        self._seen = self._signature()
        self.current = self.load()
        self.context = self.current  # the one the server holds; `_pick` moves each handshake to `current`
        self.context.sni_callback = self._pick

    def _signature(self) -> tuple:
        return file_signature((self.cert_file, self.key_file))

    def load(self) -> ssl.SSLContext:
        """A context from the files as they are now, checked as listen.tls's are (CertificateProblem)."""
        read_pair(self.cert_file, self.key_file, self.label, utc_now())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def poll(self) -> bool:
        """Takes replaced files once they are good; True when the certificate served changed."""
        signature = self._signature()
        if signature == self._seen and self.problem is None:
            return False
        self._seen = signature
        try:
            context = self.load()
        except (OSError, ValueError) as error:  # CertificateProblem and ssl.SSLError among them
            if str(error) != self.problem:
                log.error("the admin API's certificate files changed but cannot serve, keeping the ones before: %s",
                          error)
            self.problem = str(error)
            return False
        self.current, self.problem = context, None
        log.info("the admin API serves the certificate in %s now", self.cert_file)
        return True

    def _pick(self, connection, server_name, context) -> None:
        connection.context = self.current
