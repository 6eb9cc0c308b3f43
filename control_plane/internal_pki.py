"""The internal CA and the certificates of the gateway's own parts, made with the cryptography library.

Every part has an identity in its certificate, as a URI name `spiffe://whisper-gateway/<role>/<name>`
(Istio's and Envoy Gateway's way): the xDS port admits an Envoy only with a certificate the
internal CA signed, and binds each stream to the name it carries (control_plane/peers.py).
One folder (`internal_tls.dir`) holds the lot:

    ca.pem, ca.key                      the internal CA (ca.key only where certificates are issued)
    control-plane.pem, .key             the control planes' (serverAuth and clientAuth)
    envoy-<name>.pem, .key              an Envoy's; it may use node id <name> or <name>.<anything>
    etcd-ca.pem, etcd-ca.key            etcd's own CA: etcd admits any certificate its CA signed, so
                                        an Envoy's (internal CA) must not be one of them
    etcd-<name>.pem, .key               an etcd member's (etcd's CA)
    etcd-client-<name>.pem, .key        a control plane's to etcd (etcd's CA; its name is the etcd
                                        user when etcd's auth is on)

Files are written whole (a temporary file renamed over the old), so a part that watches the
folder never reads half a certificate; private keys are 0600.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "whisper-gateway"
IDENTITY_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
ROLES = ("control-plane", "envoy", "etcd", "etcd-client")
ETCD_ROLES = ("etcd", "etcd-client")  # signed by etcd's own CA
CA_FILE, CA_KEY_FILE = "ca.pem", "ca.key"
ETCD_CA_FILE, ETCD_CA_KEY_FILE = "etcd-ca.pem", "etcd-ca.key"
CONTROL_PLANE = "control-plane"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # fullmatch; no dots: they separate replicas
CA_DAYS = 3650
LEAF_DAYS = 90
RENEW_WITHIN_DAYS = 30


class PkiProblem(ValueError):
    """Why a certificate cannot be made or used, said for the operator."""


@dataclass(frozen=True)
class Identity:
    role: str
    name: str

    @property
    def uri(self) -> str:
        return f"{IDENTITY_PREFIX}{self.role}/{self.name}"

    def may_use_node_id(self, node_id: str) -> bool:
        """An Envoy's node id is its certificate's name, or that name, a dot and a replica's own
        (`envoy.<hostname>`): replicas sharing one certificate share its trust, as pods of one
        service account do in Istio."""
        return node_id == self.name or node_id.startswith(self.name + ".")

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


def parse_identity(uri: str) -> Identity | None:
    """The identity a URI name states, or None when it is not one of ours."""
    if not uri.startswith(IDENTITY_PREFIX):
        return None
    role, _, name = uri[len(IDENTITY_PREFIX):].partition("/")
    return Identity(role, name) if role in ROLES and NAME_PATTERN.fullmatch(name) else None


def stem(role: str, name: str) -> str:
    """The files' name without suffix: control-plane, envoy-<name>, etcd-<name>."""
    return CONTROL_PLANE if role == CONTROL_PLANE else f"{role}-{name}"


def pair_paths(folder: Path | str, role: str, name: str = CONTROL_PLANE) -> tuple[Path, Path]:
    base = Path(folder) / stem(role, name)
    return base.with_name(base.name + ".pem"), base.with_name(base.name + ".key")


def ca_path(folder: Path | str, role: str | None = None) -> Path:
    """The CA that signs `role`'s certificates (etcd's for its members and clients)."""
    return Path(folder) / (ETCD_CA_FILE if role in ETCD_ROLES else CA_FILE)


def _ca_key_path(folder: Path, role: str | None) -> Path:
    return folder / (ETCD_CA_KEY_FILE if role in ETCD_ROLES else CA_KEY_FILE)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime:
    return datetime.now(timezone.utc)


def init_ca(folder: Path | str, days: int = CA_DAYS, role: str | None = None) -> bool:
    """Makes the internal CA (with an etcd `role`: etcd's) unless the folder has it; True when it made it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if ca_path(folder, role).exists():
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    title = "etcd CA" if role in ETCD_ROLES else "internal CA"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{TRUST_DOMAIN} {title}")])
    now = _now()
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
    _write(_ca_key_path(folder, role), _key_pem(key), private=True)
    _write(ca_path(folder, role), certificate.public_bytes(serialization.Encoding.PEM))
    return True


def _load_ca(folder: Path, role: str | None = None):
    if role in ETCD_ROLES and ca_path(folder).exists():
        init_ca(folder, role=role)  # etcd's CA comes with its first certificate
    try:
        certificate = x509.load_pem_x509_certificate(ca_path(folder, role).read_bytes())
        key = serialization.load_pem_private_key(_ca_key_path(folder, role).read_bytes(), password=None)
    except FileNotFoundError as error:
        raise PkiProblem(f"{error.filename}: no internal CA here; make one with `whisper-gateway certs init`") from None
    return certificate, key


def _alt_names(identity: Identity, hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(folder: Path | str, role: str, name: str = CONTROL_PLANE, hosts: tuple[str, ...] = (),
          days: int = LEAF_DAYS, now: datetime | None = None) -> tuple[Path, Path]:
    """Issues (or re-issues) the certificate of `role`/`name`, signed by the folder's CA; its paths.
    `hosts`: the DNS names and addresses it answers on, for parts that serve (checked by TLS
    clients that dial them by name: etcd's, the admin API's CLI)."""
    folder = Path(folder)
    if role not in ROLES:
        raise PkiProblem(f"role {role!r}: expected one of {', '.join(ROLES)}")
    if not NAME_PATTERN.fullmatch(name):
        raise PkiProblem(f"name {name!r}: 1-63 letters, digits, _ and - (no dots)")
    ca, ca_key = _load_ca(folder, role)
    identity = Identity(role, name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or _now()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if role in ("envoy", "etcd-client") else \
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
               .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.SubjectAlternativeName(_alt_names(identity, hosts)), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    certificate = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = pair_paths(folder, role, name)
    # The key first: a watcher that sees the new certificate finds its key already there.
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@dataclass(frozen=True)
class Issued:
    identity: Identity
    path: Path
    not_after: datetime
    hosts: tuple[str, ...]


def issued(folder: Path | str) -> list[Issued]:
    """Every leaf certificate in the folder with an identity of ours."""
    found = []
    for path in sorted(Path(folder).glob("*.pem")):
        if path.name in (CA_FILE, ETCD_CA_FILE):
            continue
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            continue
        identities = [i for i in map(parse_identity, names.get_values_for_type(x509.UniformResourceIdentifier)) if i]
        if not identities:
            continue
        hosts = tuple(names.get_values_for_type(x509.DNSName)) + \
            tuple(str(a) for a in names.get_values_for_type(x509.IPAddress))
        found.append(Issued(identities[0], path, certificate.not_valid_after_utc, hosts))
    return found


def renew(folder: Path | str, within_days: float = RENEW_WITHIN_DAYS, days: int = LEAF_DAYS) -> list[Issued]:
    """Re-issues every certificate that expires within `within_days` (same identity and names); what it renewed."""
    limit = _now() + timedelta(days=within_days)
    renewed = []
    for item in issued(folder):
        if item.not_after <= limit:
            issue(folder, item.identity.role, item.identity.name, item.hosts, days)
            renewed.append(item)
    return renewed


def issue_missing(folder: Path | str, role: str, name: str = CONTROL_PLANE, hosts: tuple[str, ...] = (),
                  days: int = LEAF_DAYS) -> Path | None:
    """Issues the certificate unless its file is there (renew replaces); its path when it made one."""
    if pair_paths(folder, role, name)[0].exists():
        return None
    return issue(folder, role, name, hosts, days)[0]


def ensure(folder: Path | str, envoys: tuple[str, ...] = (), hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
    """What `up` and tests need: the CA, the control plane's certificate and each named Envoy's,
    made where missing."""
    init_ca(folder)
    issue_missing(folder, CONTROL_PLANE, CONTROL_PLANE, hosts)
    for envoy in envoys:
        issue_missing(folder, "envoy", envoy)


def file_signature(paths) -> tuple:
    """What changes when any of the files is replaced or rewritten (time, size, inode; None if
    missing): an editor's write and an atomic rename both show."""
    def stat(path):
        try:
            s = os.stat(path)
            return s.st_mtime_ns, s.st_size, s.st_ino
        except OSError:
            return None
    return tuple(stat(p) for p in paths)


def read_own(folder: Path | str, role: str = CONTROL_PLANE, name: str = CONTROL_PLANE) -> tuple[bytes, bytes, bytes]:
    """(CA, certificate chain, key) as PEM, checked as every certificate file is
    (certificates.read_pair: it parses, the key is its own, it is valid now), and issued by the
    folder's CA. PkiProblem says what is wrong."""
    from control_plane.certificates import CertificateProblem, read_authority, read_pair, utc_now

    cert_path, key_path = pair_paths(folder, role, name)
    label = f"internal_tls.dir ({cert_path.stem})"
    try:
        pair = read_pair(str(cert_path), str(key_path), label, utc_now())
        authority = read_authority(str(ca_path(folder, role)), f"{label} CA")
    except CertificateProblem as problem:
        raise PkiProblem(f"{problem} (make it with `whisper-gateway certs init`)") from None
    leaf = x509.load_pem_x509_certificate(pair.chain)
    try:
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(authority.pem))
    except Exception as error:  # InvalidSignature, ValueError, TypeError
        raise PkiProblem(f"{label}: {cert_path.name} was not issued by {ca_path(folder, role).name} "
                         f"({type(error).__name__})") from None
    return authority.pem, pair.chain, pair.key


class ServerCredentials:
    """The xDS port's mutual TLS: the control plane's certificate, and every client's required and
    checked against the internal CA. Replaced files are taken on the next handshake once they are
    good together (a broken replacement keeps the last good ones, and `problem` says why), so
    Envoys already connected keep their streams and new ones meet the new certificate."""

    def __init__(self, folder: Path | str):
        import grpc

        self.folder = Path(folder)
        cert, key = pair_paths(self.folder, CONTROL_PLANE)
        self.paths = [ca_path(self.folder), cert, key]
        self._seen = self._checked = file_signature(self.paths)
        self.problem: str | None = None
        ca_pem, chain, key_pem = read_own(self.folder)
        self.credentials = grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(key_pem, chain)], root_certificates=ca_pem),
            self._fetch, require_client_authentication=True)

    def poll(self) -> None:
        """From the plane's certificate loop: a replacement that cannot serve is reported (`problem`)
        even before a handshake would try it."""
        signature = file_signature(self.paths)
        if signature == self._checked:
            return
        self._checked = signature
        try:
            read_own(self.folder)
        except PkiProblem as problem:
            self._refuse(str(problem))
            return
        self.problem = None

    def _refuse(self, problem: str) -> None:
        if problem != self.problem:
            logging.getLogger(__name__).error("internal certificates changed but cannot serve, keeping the "
                                              "ones before: %s", problem)
        self.problem = problem

    def _fetch(self):
        import grpc

        signature = file_signature(self.paths)
        if signature == self._seen:
            return None
        try:
            ca_pem, chain, key_pem = read_own(self.folder)
        except PkiProblem as problem:
            self._refuse(str(problem))
            return None
        self._seen, self.problem = signature, None
        logging.getLogger(__name__).info("internal certificates changed: new xDS connections use them")
        return grpc.ssl_server_certificate_configuration([(key_pem, chain)], root_certificates=ca_pem)


def channel_credentials(folder: Path | str, role: str = CONTROL_PLANE, name: str = CONTROL_PLANE):
    """A gRPC client's mutual TLS with this folder's CA and the part's own certificate (etcd, tests)."""
    import grpc

    ca_pem, chain, key_pem = read_own(folder, role, name)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=chain)
