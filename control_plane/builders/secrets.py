"""TLS in Envoy's terms: the SDS secrets made from the certificate files, and the TLS contexts
that name them. Pure.

Certificates travel as SDS secrets over the same ADS stream as everything else, so a new file
reaches every Envoy without a listener or cluster change (no connection is drained): the
listener and clusters name the secrets, and only the secrets' content changes on rotation.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2

from control_plane.builders.common import ads_source, pack
from control_plane.certificates import Authority, KeyPair, TlsMaterial
from control_plane.config import GatewayConfig
from control_plane.names import BACKEND_CA_SECRET, BACKEND_CLIENT_SECRET, CLIENT_CA_SECRET, LISTENER_CERT_SECRET

TLS_SOCKET = "envoy.transport_sockets.tls"
# HTTP/2 first for clients that speak it (the OpenAI SDK's httpx speaks HTTP/1.1 unless told).
ALPN = ["h2", "http/1.1"]


def _pair(name: str, pair: KeyPair) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=pair.chain),
        private_key=base_pb2.DataSource(inline_bytes=pair.key)))


def _authority(name: str, authority: Authority) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=authority.pem)))


def build_secrets(material: TlsMaterial | None) -> list[secret_pb2.Secret]:
    """One secret per configured file set, under the names the TLS contexts below use."""
    if material is None:
        return []
    secrets = []
    if material.listener:
        secrets.append(_pair(LISTENER_CERT_SECRET, material.listener))
    if material.client_ca:
        secrets.append(_authority(CLIENT_CA_SECRET, material.client_ca))
    if material.backend_ca:
        secrets.append(_authority(BACKEND_CA_SECRET, material.backend_ca))
    if material.backend_client:
        secrets.append(_pair(BACKEND_CLIENT_SECRET, material.backend_client))
    return secrets


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def _versions() -> common_pb2.TlsParameters:
    return common_pb2.TlsParameters(tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2,
                                    tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3)


def downstream_transport_socket(config: GatewayConfig) -> base_pb2.TransportSocket:
    """The audio listener's TLS: TLS 1.2-1.3, ALPN h2 and http/1.1, client certificates as configured."""
    tls = config.listen.tls
    common = tls_pb2.CommonTlsContext(tls_params=_versions(), alpn_protocols=ALPN,
                                         tls_certificate_sds_secret_configs=[_sds(LISTENER_CERT_SECRET)])
    if tls.client_certificates != "off":
        common.validation_context_sds_secret_config.CopyFrom(_sds(CLIENT_CA_SECRET))
    context = tls_pb2.DownstreamTlsContext(common_tls_context=common)
    if tls.client_certificates == "required":
        context.require_client_certificate.value = True
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def upstream_transport_socket(config: GatewayConfig) -> base_pb2.TransportSocket:
    """TLS to an https:// engine: SNI is the URL's host name (the endpoint's hostname), and the
    engine's certificate must name it and chain to backend_tls.ca_file (or the system's CAs,
    control_plane/certificates.py)."""
    backend = config.backend_tls
    common = tls_pb2.CommonTlsContext(tls_params=_versions(),
                                      validation_context_sds_secret_config=_sds(BACKEND_CA_SECRET))
    if backend.cert_file:
        common.tls_certificate_sds_secret_configs.append(_sds(BACKEND_CLIENT_SECRET))
    context = tls_pb2.UpstreamTlsContext(common_tls_context=common, auto_host_sni=True, auto_sni_san_validation=True)
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))
