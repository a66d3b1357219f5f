"""Node commands: blockdev-add, blockdev-del, query-named-block-nodes.

The blockdev-add schema is QEMU's BlockdevOptions restricted to the drivers
blockd implements; every member QEMU accepts for those drivers is accepted
here, and those blockd cannot honour are refused with a clear message rather
than silently ignored.
"""

from __future__ import annotations

from typing import Any

from blockd.devices.base import NodeOptions
from blockd.errors import InvalidArgument, Unsupported
from blockd.qmp.commands.base import Args, CommandContext, CommandTable
from blockd.qmp.schema import BOOL, INT, STR, UINT64, Enum, Member, Struct, Union

__all__ = ["BLOCKDEV_OPTIONS", "node_options", "register"]

SUPPORTED_DRIVERS = ("file", "host_cdrom", "host_device", "null-co", "null-aio")

_BASE = Struct({
    "driver": Member(Enum(*SUPPORTED_DRIVERS)),
    "node-name": Member(STR, optional=True),
    "discard": Member(Enum("ignore", "unmap"), optional=True),
    "cache": Member(Struct({
        "direct": Member(BOOL, optional=True),
        "no-flush": Member(BOOL, optional=True),
    }), optional=True),
    "read-only": Member(BOOL, optional=True),
    "auto-read-only": Member(BOOL, optional=True),
    "force-share": Member(BOOL, optional=True),
    "detect-zeroes": Member(Enum("off", "on", "unmap"), optional=True),
})

_FILE = Struct({
    "filename": Member(STR),
    "pr-manager": Member(STR, optional=True),
    "locking": Member(Enum("auto", "on", "off"), optional=True),
    "aio": Member(Enum("threads", "native", "io_uring"), optional=True),
    "aio-max-batch": Member(INT, optional=True),
    "drop-cache": Member(BOOL, optional=True),
    "x-check-cache-dropped": Member(BOOL, optional=True),
})

_NULL = Struct({
    "size": Member(INT, optional=True),
    "latency-ns": Member(UINT64, optional=True),
    "read-zeroes": Member(BOOL, optional=True),
})

BLOCKDEV_OPTIONS = Union(
    base=_BASE,
    discriminator="driver",
    branches={
        "file": _FILE, "host_cdrom": _FILE, "host_device": _FILE,
        "null-co": _NULL, "null-aio": _NULL,
    },
)


def node_options(args: Args) -> NodeOptions:
    """Turn validated blockdev-add arguments into driver options.

    Raises InvalidArgument with QEMU's text for combinations QEMU refuses.
    """
    name = args.get("node-name")
    if not isinstance(name, str):
        raise InvalidArgument("'node-name' must be specified for the root node")
    if args.get("pr-manager") is not None:
        raise Unsupported("blockd does not support persistent reservation managers (pr-manager)")
    if args.get("force-share") and not args.get("read-only"):
        raise InvalidArgument("force-share=on can only be used with read-only images")
    cache: Any = args.get("cache", {})
    driver = str(args["driver"])
    size = args.get("size", 1 << 30)
    if isinstance(size, int) and size < 0:
        raise InvalidArgument("Parameter 'size' expects a non-negative value")
    return NodeOptions(
        driver="null-co" if driver == "null-aio" else driver,
        node_name=name,
        filename=_opt_str(args, "filename"),
        read_only=bool(args.get("read-only", False)),
        auto_read_only=bool(args.get("auto-read-only", False)),
        cache_direct=bool(cache.get("direct", False)),
        cache_no_flush=bool(cache.get("no-flush", False)),
        discard=args.get("discard", "ignore"),  # type: ignore[arg-type]
        detect_zeroes=args.get("detect-zeroes", "off"),  # type: ignore[arg-type]
        aio=args.get("aio", "threads"),  # type: ignore[arg-type]
        locking=args.get("locking", "auto"),  # type: ignore[arg-type]
        force_share=bool(args.get("force-share", False)),
        size=int(size),  # type: ignore[call-overload]
        read_zeroes=bool(args.get("read-zeroes", False)),
        latency_ns=int(args.get("latency-ns", 0)),  # type: ignore[call-overload]
        given=frozenset(args),
    )


def _opt_str(args: Args, key: str) -> str | None:
    value = args.get(key)
    return value if isinstance(value, str) else None


def register(table: CommandTable) -> None:
    @table.command("blockdev-add", BLOCKDEV_OPTIONS)
    async def blockdev_add(ctx: CommandContext, args: Args) -> object:
        await ctx.registry.add_node(node_options(args))
        return {}

    @table.command("blockdev-del", Struct({"node-name": Member(STR)}))
    async def blockdev_del(ctx: CommandContext, args: Args) -> object:
        await ctx.registry.del_node(str(args["node-name"]))
        return {}

    @table.command("query-named-block-nodes", Struct({"flat": Member(BOOL, optional=True)}))
    async def query_named_block_nodes(ctx: CommandContext, args: Args) -> object:
        # Newest first, as QEMU lists them.
        return [node.device_info() for node in reversed(ctx.registry.nodes.values())]
