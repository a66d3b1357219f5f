"""Hotplug commands (blockd extensions): blockd-query-hotplug and blockd-hotplug-rescan.

The rules live in the configuration file; these commands show what hotplug
does with them and ask for a full rescan (after udevd came back, or to check
that every device is where the rules say).
"""

from __future__ import annotations

from blockd.qmp.commands.base import CommandContext, CommandTable, NoArgs

__all__ = ["register"]

_OFF: dict[str, object] = {
    "enabled": False, "monitor": "off", "udevd-running": False,
    "events": {"seen": 0, "acted": 0, "ignored": 0, "lost": 0},
    "rescans": 0, "rules": [], "devices": [],
}


def register(table: CommandTable) -> None:
    @table.command("blockd-query-hotplug")
    async def query_hotplug(ctx: CommandContext, args: NoArgs) -> object:
        if ctx.hotplug is None:
            return dict(_OFF)
        return ctx.hotplug.query()

    @table.command("blockd-hotplug-rescan")
    async def rescan(ctx: CommandContext, args: NoArgs) -> object:
        if ctx.hotplug is not None:
            ctx.hotplug.recheck_udevd()
            await ctx.hotplug.rescan()
        return {}
