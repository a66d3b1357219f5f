"""QMP commands, one module per area, gathered into one table."""

from __future__ import annotations

from blockd.qmp.commands import block, control, devices, exports, media, nodes, runstate
from blockd.qmp.commands.base import Args, Command, CommandContext, CommandTable

__all__ = ["Args", "Command", "CommandContext", "CommandTable", "build_table"]


def build_table() -> CommandTable:
    """The table of every command blockd implements."""
    table = CommandTable()
    for module in (control, nodes, devices, block, media, exports, runstate):
        module.register(table)
    return table
