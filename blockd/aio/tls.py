"""TLS credentials from a directory laid out as QEMU's ``tls-creds-x509`` expects.

QEMU reads fixed file names from the object's ``dir``: ``ca-cert.pem`` (always
needed), ``ca-crl.pem`` (optional), and for a server ``server-cert.pem`` and
``server-key.pem`` (for a client ``client-cert.pem`` and ``client-key.pem``,
optional).  The same directory works for blockd and qemu-storage-daemon.  With
``verify-peer`` on (QEMU's default) a server asks for a client certificate and
refuses a client without one signed by the CA.

Loading reads files: call it at start-up or off the event loop.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Literal

from blockd.errors import BlockdError

__all__ = ["TlsCredentials", "TlsError"]

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
_OWN = {"server": ("server-cert.pem", "server-key.pem"),
        "client": ("client-cert.pem", "client-key.pem")}  # fmt: skip


class TlsError(BlockdError):
    """The credentials cannot be loaded or used (the message names the file)."""


@dataclass(frozen=True, slots=True)
class TlsCredentials:
    """A ``tls-creds-x509`` object: where it came from and the ready SSL context."""

    id: str
    dir: str
    endpoint: Literal["client", "server"]
    verify_peer: bool
    context: ssl.SSLContext

    @classmethod
    def load(cls, id: str, directory: str, endpoint: Literal["client", "server"] = "client",
             verify_peer: bool = True) -> TlsCredentials:
        """Read the directory's files; TlsError with QEMU's wording when one is missing."""
        ca = _path(directory, CA_CERT, required=True)
        crl = _path(directory, CA_CRL, required=False)
        cert_name, key_name = _OWN[endpoint]
        server = endpoint == "server"
        cert = _path(directory, cert_name, required=server)
        key = _path(directory, key_name, required=server)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cafile=ca)
            if crl is not None:
                context.load_verify_locations(cafile=crl)
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            if cert is not None and key is not None:
                context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"Unable to load TLS credentials from {directory}: {exc}") from None
        if server:
            context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
        else:
            context.check_hostname = False  # QEMU checks a host name only when given one
            context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
        return cls(id, directory, endpoint, verify_peer, context)

    def server_context(self) -> ssl.SSLContext:
        """The context for a listener; TlsError unless these are server credentials."""
        if self.endpoint != "server":
            raise TlsError("Expecting TLS credentials with a server endpoint")
        return self.context


def _path(directory: str, name: str, *, required: bool) -> str | None:
    path = os.path.join(directory, name)
    if os.access(path, os.R_OK):
        return path
    if not required:
        return None
    reason = os.strerror(2 if not os.path.exists(path) else 13)
    raise TlsError(f"Unable to access credentials {path}: {reason}")
