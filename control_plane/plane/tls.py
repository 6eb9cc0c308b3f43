"""The TLS the plane serves and dials with: the certificate files (listen.tls, backend_tls) that
the Envoys are served as secrets, the engines' client context for the scrapes, the admin API's
and the xDS port's (internal_tls). Read and checked at start; replaced files are picked up while
running. Their config sections hold until a restart (a reload keeps them).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

from control_plane.certificates import AdminTls, CertificateFiles, CertificateProblem, TlsMaterial, engine_client_context
from control_plane.config import GatewayConfig
from control_plane.internal_pki import ServerCredentials
from control_plane.plane import StartupError

log = logging.getLogger(__name__)

# How often the certificate files are looked at: a replaced one is served within about this.
CERTIFICATE_POLL_S = 1.0


class Tls:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.certificates = CertificateFiles(config.listen.tls, config.backend_tls)  # the last good set
        self.engine_tls: ssl.SSLContext | None = None  # the scrapes' TLS to https:// engines
        self.admin: AdminTls | None = None  # the admin API's
        self.xds: ServerCredentials | None = None  # internal_tls: the xDS port's mutual TLS

    def load(self) -> TlsMaterial:
        """The TLS files read and checked: the engines' client context, the admin API's and the xDS port's."""
        try:
            material = self.certificates.load()
            self.engine_tls = engine_client_context(self.config.backend_tls, material)
            if (admin_files := self.config.admin_tls) is not None:
                self.admin = AdminTls(*admin_files, label="internal_tls" if self.config.internal_tls else "listen.tls")
            if self.config.internal_tls is not None:
                self.xds = ServerCredentials(self.config.internal_tls.dir)
        except (OSError, ValueError) as error:  # CertificateProblem, PkiProblem and ssl.SSLError among them
            raise StartupError(str(error)) from None
        return material

    def serves_https_engines(self) -> bool:
        """Whether there is a CA to check https:// engines against (else none is taken)."""
        return self.certificates.current is not None and self.certificates.current.checks_engines

    def internal_status(self) -> dict | None:
        return None if self.xds is None else {"dir": str(self.xds.folder), "problem": self.xds.problem}

    async def watch(self, publish_secrets: Callable[[TlsMaterial], Awaitable[None]]) -> None:
        """Looks at the files every CERTIFICATE_POLL_S, for as long as the plane runs."""
        while True:
            await asyncio.sleep(CERTIFICATE_POLL_S)
            try:
                if self.xds is not None:
                    self.xds.poll()
                await self.rotate(publish_secrets)
            except Exception:
                log.exception("certificate check failed; trying again")

    async def rotate(self, publish_secrets: Callable[[TlsMaterial], Awaitable[None]]) -> None:
        """Replaced certificate files, once good as a whole, go to every Envoy as SDS secrets
        (`publish_secrets`), and to the scrapes; a broken replacement changes nothing
        (CertificateFiles says why). The admin API watches its own files (listen.tls's or the
        internal certificate: AdminTls.poll)."""
        if self.admin is not None:
            self.admin.poll()
        material = self.certificates.poll()
        if material is None:
            return
        try:  # everything that can fail first: the files are served everywhere or nowhere
            if material.checks_engines != self.certificates.current.checks_engines:
                raise CertificateProblem("backend_tls.ca_file: the CA for https:// engines appeared or went away; "
                                         "that takes a restart")
            engine_tls = engine_client_context(self.config.backend_tls, material)
        except (OSError, ValueError) as error:  # CertificateProblem and ssl.SSLError among them
            self.certificates.reject(str(error))
            return
        await publish_secrets(material)
        self.engine_tls = engine_tls
