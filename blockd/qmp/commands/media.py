"""Removable-media commands: QEMU's eject, tray and medium commands, and blockd-lock-medium.

Arguments, replies, error texts and events are QEMU's (docs/qmp.md); on a
device holding a host drive they move the real tray (see blockd/block/media.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from blockd.block import media
from blockd.block.device import Device
from blockd.block.media import ReadOnlyMode
from blockd.qmp.commands.base import CommandContext, CommandTable

__all__ = [
    "ChangeMediumArgs",
    "DeviceIdArgs",
    "EjectArgs",
    "InsertMediumArgs",
    "LockMediumArgs",
    "TargetArgs",
    "register",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetArgs:
    """The device a tray command acts on: ``id`` or the legacy ``device`` name, exactly one."""

    device: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EjectArgs(TargetArgs):
    """eject and blockdev-open-tray: ``force`` opens a locked tray."""

    force: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeMediumArgs(TargetArgs):
    """blockdev-change-medium: the image to open and swap in."""

    filename: str
    format: str | None = None
    force: bool = False
    read_only_mode: ReadOnlyMode = "retain"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceIdArgs:
    """blockdev-remove-medium: the device, by id only."""

    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class InsertMediumArgs:
    """blockdev-insert-medium: the device and the free node to insert."""

    id: str
    node_name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LockMediumArgs:
    """blockd-lock-medium: the device and whether to lock its tray."""

    id: str
    locked: bool


def _target(ctx: CommandContext, args: TargetArgs) -> tuple[Device, str]:
    """The device named by ``id`` or ``device`` (exactly one), and the name as given."""
    device = ctx.registry.find_device(id=args.id, device=args.device)
    given = args.id if args.id is not None else args.device
    return device, given if given is not None else device.id  # find_device saw one


def register(table: CommandTable) -> None:
    @table.command("eject")
    async def eject(ctx: CommandContext, args: EjectArgs) -> object:
        device, name = _target(ctx, args)
        await media.eject(ctx.registry, device, name, args.force)
        return {}

    @table.command("blockdev-open-tray")
    async def open_tray(ctx: CommandContext, args: EjectArgs) -> object:
        device, name = _target(ctx, args)
        await media.open_tray(ctx.registry, device, name, args.force)
        return {}

    @table.command("blockdev-close-tray")
    async def close_tray(ctx: CommandContext, args: TargetArgs) -> object:
        device, name = _target(ctx, args)
        await media.close_tray(ctx.registry, device, name)
        return {}

    @table.command("blockdev-remove-medium")
    async def remove_medium(ctx: CommandContext, args: DeviceIdArgs) -> object:
        device = ctx.registry.find_device(id=args.id)
        await media.remove_medium(ctx.registry, device, args.id)
        return {}

    @table.command("blockdev-insert-medium")
    async def insert_medium(ctx: CommandContext, args: InsertMediumArgs) -> object:
        device = ctx.registry.find_device(id=args.id)
        await media.insert_medium(ctx.registry, device, args.node_name)
        return {}

    @table.command("blockdev-change-medium")
    async def change_medium(ctx: CommandContext, args: ChangeMediumArgs) -> object:
        device, name = _target(ctx, args)
        filename = await ctx.allowed_path(args.filename)
        await media.change_medium(
            ctx.registry, device, name, filename, args.format,
            args.read_only_mode, args.force,
        )
        return {}

    @table.command("blockd-lock-medium")
    async def lock_medium(ctx: CommandContext, args: LockMediumArgs) -> object:
        device = ctx.registry.find_device(id=args.id)
        await media.lock_medium(ctx.registry, device, args.id, args.locked)
        return {}
