"""QMP commands, one module per area, gathered into one table.

Each module declares its commands' arguments as frozen dataclasses and registers
handlers that take them (see :mod:`blockd.qmp.commands.base`).
"""

from __future__ import annotations

from blockd.qmp.commands import (
    block,
    control,
    devices,
    exports,
    hotplug,
    media,
    nodes,
    objects,
    runstate,
    scsi,
)
from blockd.qmp.commands.base import Command, CommandContext, CommandTable, NoArgs

__all__ = ["Command", "CommandContext", "CommandTable", "NoArgs", "build_table"]


def build_table() -> CommandTable:
    """The table of every command blockd implements."""
    table = CommandTable()
    for module in (control, nodes, devices, block, media, exports, runstate, scsi, hotplug,
                   objects):
        module.register(table)
    return table
