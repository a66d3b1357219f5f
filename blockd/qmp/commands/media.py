"""Removable-media commands: QEMU's eject, tray and medium commands, and blockd-lock-medium.

Arguments, replies, error texts and events are QEMU's (docs/qmp.md); on a
device holding a host drive they move the real tray (see blockd/block/media.py).
"""

from __future__ import annotations

from blockd.block import media
from blockd.block.device import Device
from blockd.qmp.commands.base import Args, CommandContext, CommandTable
from blockd.qmp.schema import BOOL, STR, Enum, Member, Struct

__all__ = ["register"]

_TARGET = {
    "device": Member(STR, optional=True),
    "id": Member(STR, optional=True),
}


def _target(ctx: CommandContext, args: Args) -> tuple[Device, str]:
    """The device named by ``id`` or ``device`` (exactly one), and the name as given."""
    ident = args.get("id")
    legacy = args.get("device")
    device = ctx.registry.find_device(
        id=ident if isinstance(ident, str) else None,
        device=legacy if isinstance(legacy, str) else None,
    )
    name = ident if isinstance(ident, str) else legacy
    assert isinstance(name, str)
    return device, name


def _by_id(ctx: CommandContext, args: Args) -> tuple[Device, str]:
    name = str(args["id"])
    return ctx.registry.find_device(id=name), name


def register(table: CommandTable) -> None:
    @table.command("eject", Struct({**_TARGET, "force": Member(BOOL, optional=True)}))
    async def eject(ctx: CommandContext, args: Args) -> object:
        device, name = _target(ctx, args)
        await media.eject(ctx.registry, device, name, bool(args.get("force", False)))
        return {}

    @table.command(
        "blockdev-open-tray", Struct({**_TARGET, "force": Member(BOOL, optional=True)})
    )
    async def open_tray(ctx: CommandContext, args: Args) -> object:
        device, name = _target(ctx, args)
        await media.open_tray(ctx.registry, device, name, bool(args.get("force", False)))
        return {}

    @table.command("blockdev-close-tray", Struct(dict(_TARGET)))
    async def close_tray(ctx: CommandContext, args: Args) -> object:
        device, name = _target(ctx, args)
        await media.close_tray(ctx.registry, device, name)
        return {}

    @table.command("blockdev-remove-medium", Struct({"id": Member(STR)}))
    async def remove_medium(ctx: CommandContext, args: Args) -> object:
        device, name = _by_id(ctx, args)
        await media.remove_medium(ctx.registry, device, name)
        return {}

    @table.command(
        "blockdev-insert-medium", Struct({"id": Member(STR), "node-name": Member(STR)})
    )
    async def insert_medium(ctx: CommandContext, args: Args) -> object:
        device, _ = _by_id(ctx, args)
        await media.insert_medium(ctx.registry, device, str(args["node-name"]))
        return {}

    @table.command("blockdev-change-medium", Struct({
        **_TARGET,
        "filename": Member(STR),
        "format": Member(STR, optional=True),
        "force": Member(BOOL, optional=True),
        "read-only-mode": Member(Enum("retain", "read-only", "read-write"), optional=True),
    }))
    async def change_medium(ctx: CommandContext, args: Args) -> object:
        device, name = _target(ctx, args)
        fmt = args.get("format")
        await media.change_medium(
            ctx.registry, device, name, str(args["filename"]),
            fmt if isinstance(fmt, str) else None,
            args.get("read-only-mode", "retain"),  # type: ignore[arg-type]
            bool(args.get("force", False)),
        )
        return {}

    @table.command("blockd-lock-medium", Struct({"id": Member(STR), "locked": Member(BOOL)}))
    async def lock_medium(ctx: CommandContext, args: Args) -> object:
        device, name = _by_id(ctx, args)
        await media.lock_medium(ctx.registry, device, name, bool(args["locked"]))
        return {}
