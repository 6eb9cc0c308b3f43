"""Who is at the other end of a stream on the xDS port, from the certificate it proved it holds.

With internal TLS the port requires a client certificate from the internal CA (no handshake
without one), and each service admits a stream only from an Envoy's identity; the node id the
stream then uses must be that identity's (control_plane/internal_pki.py). Without internal TLS
the port is bound to loopback only (config/load.py refuses otherwise) and every local peer is taken
as it says: `Peer.local`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from control_plane.internal_pki import Identity, parse_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    address: str
    identity: Identity | None  # None: a plaintext peer on loopback (no internal TLS)
    secure: bool

    @property
    def label(self) -> str:
        return str(self.identity) if self.identity else f"local {self.address}"

    def problem(self, node_id: str | None = None) -> str | None:
        """Why this peer may not speak as an Envoy (with `node_id`, once it says which), or None."""
        if not self.secure:
            return None
        if self.identity is None or self.identity.role != "envoy":
            return f"{self.label} is not an Envoy's certificate"
        if node_id is not None and not self.identity.may_use_node_id(node_id):
            return f"certificate {self.identity} may not use node id {node_id!r}"
        return None


def peer_of(context: grpc.aio.ServicerContext) -> Peer:
    auth = context.auth_context() or {}
    secure = auth.get("transport_security_type", [b""])[0] == b"ssl"
    identity = None
    for name in auth.get("x509_subject_alternative_name", []):
        identity = parse_identity(name.decode("ascii", "replace"))
        if identity is not None:
            break
    return Peer(context.peer(), identity, secure)


async def authorize(context: grpc.aio.ServicerContext, node_id: str | None = None) -> str:
    """The xDS port's services call this on each stream (and again once it names its node): the
    peer's label, or the stream ends with PERMISSION_DENIED when the peer may not speak as an
    Envoy, or as that node."""
    peer = peer_of(context)
    if why := peer.problem(node_id):
        log.warning("xDS port: stream from %s (%s) refused: %s", peer.label, peer.address, why)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
    return peer.label
