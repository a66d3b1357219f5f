"""Where the NBD server listens: a UNIX socket path or a TCP host and port."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NbdAddress"]


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """A UNIX socket (``path``) or a TCP endpoint (``host``, ``port``)."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"tcp:{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """UNIX sockets and loopback TCP addresses stay on this machine."""
        if self.path is not None:
            return True
        return self.host in ("localhost", "::1") or str(self.host).startswith("127.")
