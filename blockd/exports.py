"""Exports: a device made reachable over NBD.

An :class:`Export` names the device its requests go through.  Exporting a node
that a device holds uses that device (so the export sees its tray, error
policy and statistics); exporting a bare node creates an *implicit* device
named after the export id, so that the I/O still shows in query-block and
query-blockstats (qemu-storage-daemon leaves such I/O invisible).  The implicit
device disappears with its export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .block import Device

__all__ = ["MAX_NBD_STRING", "Export", "check_export_id"]

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
