"""Exports: a device made reachable over NBD.

An :class:`Export` names the device its requests go through.  Exporting a node
that a device holds uses that device (so the export sees its tray, error
policy and statistics); exporting a bare node creates an *implicit* device
named after the export id, so that the I/O still shows in query-block and
query-blockstats (qemu-storage-daemon leaves such I/O invisible).  The implicit
device disappears with its export.

:class:`ExportService` is what the QMP commands need of the NBD server; the
daemon hands them the real one (``blockd.nbd.server.NbdServer``), so neither
wire package imports the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from blockd.aio.tls import TlsCredentials
from blockd.block.device import Device

__all__ = ["MAX_NBD_STRING", "Export", "ExportService", "NbdAddress", "check_export_id"]

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
# The NBD protocol limits names and descriptions to 4096 bytes.
MAX_NBD_STRING = 4096


def check_export_id(value: str) -> bool:
    """QEMU's rule for export ids: a letter, then letters, digits, '-', '.', '_'."""
    return bool(_ID.match(value))


@dataclass(eq=False)
class Export:
    """One NBD export and the device its requests go through."""

    id: str
    name: str
    description: str
    device: Device
    node_name: str
    writable: bool
    writethrough: bool = False
    implicit_device: bool = False
    shutting_down: bool = False
    clients: set[object] = field(default_factory=set)

    def info(self) -> dict[str, object]:
        """QEMU's BlockExportInfo for query-block-exports."""
        return {
            "id": self.id,
            "type": "nbd",
            "node-name": self.node_name,
            "shutting-down": self.shutting_down,
        }


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



class ExportService(Protocol):
    """The NBD server as the QMP export commands drive it."""

    @property
    def running(self) -> bool:
        """Whether the server listens (nbd-server-start has run)."""
        ...

    async def start(self, address: NbdAddress, max_connections: int,
                    tls: TlsCredentials | None = None) -> None:
        """nbd-server-start (TLS required when ``tls`` is given); raises BlockdError."""
        ...

    async def stop(self, *, missing_ok: bool = False) -> None:
        """nbd-server-stop: close the listener and remove every export."""
        ...

    def export_added(self, export: Export) -> None:
        """Check that a new export can be served now; raises BlockdError if not."""
        ...

    async def delete_export(self, export: Export, *, hard: bool) -> None:
        """block-export-del (``hard``: disconnect its clients)."""
        ...
