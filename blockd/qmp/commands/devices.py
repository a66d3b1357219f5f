"""Device commands: device_add and device_del for blockd's ``cd`` and ``hd`` devices.

QEMU's device_add takes any device model and its properties; blockd has two
models: ``cd`` (removable, with a tray and a medium lock) and ``hd`` (fixed).
Property errors use QEMU's texts with the model name in place of QEMU's.
"""

from __future__ import annotations

from blockd.block import media
from blockd.block.device import ERROR_ACTIONS
from blockd.qmp.commands.base import Args, CommandContext, CommandTable
from blockd.qmp.schema import BOOL, STR, UINT32, Array, Enum, Member, SchemaError, Struct

__all__ = ["DEVICE_ADD", "register"]

MODELS = ("cd", "hd")

DEVICE_ADD = Struct({
    "driver": Member(STR),
    "id": Member(STR),
    "drive": Member(STR, optional=True),
    "rerror": Member(Enum(*ERROR_ACTIONS), optional=True),
    "werror": Member(Enum(*ERROR_ACTIONS), optional=True),
    # QEMU's -drive accounting options, as device properties.
    "stats-intervals": Member(Array(UINT32), optional=True),
    "account-invalid": Member(BOOL, optional=True),
    "account-failed": Member(BOOL, optional=True),
})


def check_device_args(arguments: dict[str, object], keyval: bool = False) -> Args:
    """Validate device_add arguments, naming unknown properties the way QEMU does."""
    driver = arguments.get("driver")
    if isinstance(driver, str):
        if driver not in MODELS:
            raise SchemaError(f"'{driver}' is not a valid device model name")
        for key in arguments:
            if key not in DEVICE_ADD.members:
                raise SchemaError(f"Property '{driver}.{key}' not found")
    return DEVICE_ADD.check(arguments, "", keyval)


def register(table: CommandTable) -> None:
    @table.command("device_add", check_device_args)
    async def device_add(ctx: CommandContext, args: Args) -> object:
        intervals = args.get("stats-intervals", [])
        assert isinstance(intervals, list)
        if 0 in intervals:
            raise SchemaError("Invalid interval length: 0")
        device = ctx.registry.add_device(
            args["driver"],  # type: ignore[arg-type]
            str(args["id"]),
            args.get("drive"),  # type: ignore[arg-type]
            rerror=args.get("rerror", "auto"),  # type: ignore[arg-type]
            werror=args.get("werror", "auto"),  # type: ignore[arg-type]
            stats=ctx.registry.stats_class(
                account_invalid=bool(args.get("account-invalid", True)),
                account_failed=bool(args.get("account-failed", True)),
                intervals=intervals,
            ),
        )
        await media.adopt(ctx.registry, device)
        return {}

    @table.command("device_del", Struct({"id": Member(STR)}))
    async def device_del(ctx: CommandContext, args: Args) -> object:
        ctx.registry.del_device(str(args["id"]))
        return {}
