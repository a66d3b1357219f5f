"""Device commands: device_add and device_del for blockd's ``cd`` and ``hd`` devices.

QEMU's device_add takes any device model and its properties; blockd has two
models: ``cd`` (removable, with a tray and a medium lock) and ``hd`` (fixed).
Property errors use QEMU's texts with the model name in place of QEMU's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import get_args

from blockd.block import media
from blockd.block.device import DeviceKind, ErrorAction
from blockd.qmp.commands.base import CommandContext, CommandTable
from blockd.qmp.schema import SchemaError, Uint32, struct_of

__all__ = ["DeviceAddArgs", "DeviceDelArgs", "check_device_model", "register"]

MODELS = get_args(DeviceKind)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceAddArgs:
    """device_add: the model (``driver``), the device id and its properties."""

    driver: DeviceKind
    id: str
    drive: str | None = None
    rerror: ErrorAction = "auto"
    werror: ErrorAction = "auto"
    # QEMU's -drive accounting options, as device properties.
    stats_intervals: tuple[Uint32, ...] = ()
    account_invalid: bool = True
    account_failed: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceDelArgs:
    """device_del: the device to remove."""

    id: str


def check_device_model(arguments: Mapping[str, object]) -> None:
    """device_add's check before the schema's: the model, then its property names.

    QEMU looks the model up first and then names an unknown property after it
    ("Property 'hd.serial' not found"), where the schema would say "unexpected".
    """
    driver = arguments.get("driver")
    if not isinstance(driver, str):
        return  # missing or mistyped: the schema says so in QEMU's words
    if driver not in MODELS:
        raise SchemaError(f"'{driver}' is not a valid device model name")
    known = struct_of(DeviceAddArgs).names
    for key in arguments:
        if key not in known:
            raise SchemaError(f"Property '{driver}.{key}' not found")


def register(table: CommandTable) -> None:
    @table.command("device_add", precheck=check_device_model)
    async def device_add(ctx: CommandContext, args: DeviceAddArgs) -> object:
        if 0 in args.stats_intervals:
            raise SchemaError("Invalid interval length: 0")
        device = ctx.registry.add_device(
            args.driver, args.id, args.drive, rerror=args.rerror, werror=args.werror,
            stats=ctx.registry.stats_class(
                account_invalid=args.account_invalid,
                account_failed=args.account_failed,
                intervals=args.stats_intervals,
            ),
        )
        await media.adopt(ctx.registry, device)
        return {}

    @table.command("device_del")
    async def device_del(ctx: CommandContext, args: DeviceDelArgs) -> object:
        ctx.registry.del_device(args.id)
        return {}
