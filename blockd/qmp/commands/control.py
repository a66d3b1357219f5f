"""Control commands: query-version, query-commands, quit, blockd-query-limits."""

from __future__ import annotations

from blockd.qmp.commands.base import CommandContext, CommandTable, NoArgs

__all__ = ["register"]


def register(table: CommandTable) -> None:
    @table.command("query-version")
    async def query_version(ctx: CommandContext, args: NoArgs) -> object:
        return ctx.version

    @table.command("query-commands")
    async def query_commands(ctx: CommandContext, args: NoArgs) -> object:
        # qmp_capabilities is handled by the session but is a command all the same.
        return [{"name": "qmp_capabilities"}] + [{"name": n} for n in ctx.command_names()]

    @table.command("blockd-query-limits")
    async def query_limits(ctx: CommandContext, args: NoArgs) -> object:
        # blockd's extension: the bounds on what clients can make it hold, and hits.
        return ctx.limits()

    @table.command("quit")
    async def quit_(ctx: CommandContext, args: NoArgs) -> object:
        ctx.request_quit()
        return {}
