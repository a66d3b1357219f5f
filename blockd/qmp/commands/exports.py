"""NBD exports: nbd-server-start/-stop, block-export-add/-del, query-block-exports,
and the deprecated nbd-server-add/-remove, with qemu-storage-daemon's arguments and texts.
"""

from __future__ import annotations

from blockd.block.exports import NbdAddress
from blockd.errors import InvalidArgument, NotFound, Unsupported
from blockd.qmp.commands.base import Args, CommandContext, CommandTable
from blockd.qmp.schema import (
    ANY,
    BOOL,
    STR,
    UINT32,
    Array,
    Enum,
    Member,
    SimpleUnion,
    Struct,
    Union,
)

__all__ = ["BLOCK_EXPORT_OPTIONS", "NBD_SERVER_OPTIONS", "register"]

_UNIX = Struct({
    "path": Member(STR),
    "abstract": Member(BOOL, optional=True),
    "tight": Member(BOOL, optional=True),
})
_INET = Struct({
    "host": Member(STR),
    "port": Member(STR),
    "numeric": Member(BOOL, optional=True),
    "to": Member(UINT32, optional=True),
    "ipv4": Member(BOOL, optional=True),
    "ipv6": Member(BOOL, optional=True),
    "keep-alive": Member(BOOL, optional=True),
    "mptcp": Member(BOOL, optional=True),
})

# QMP's nbd-server-start uses the legacy form {"type": ..., "data": {...}};
# the command line's --nbd-server uses the flat form (addr.type=unix,addr.path=...).
LEGACY_ADDRESS = SimpleUnion({"unix": _UNIX, "inet": _INET})
FLAT_ADDRESS = Union(Struct({"type": Member(Enum("unix", "inet"))}), "type",
                     {"unix": _UNIX, "inet": _INET})

_SERVER_COMMON = {
    "tls-creds": Member(STR, optional=True),
    "tls-authz": Member(STR, optional=True),
    "max-connections": Member(UINT32, optional=True),
}
NBD_SERVER_START = Struct({"addr": Member(LEGACY_ADDRESS), **_SERVER_COMMON})
NBD_SERVER_OPTIONS = Struct({"addr": Member(FLAT_ADDRESS), **_SERVER_COMMON})

BLOCK_EXPORT_OPTIONS = Union(
    base=Struct({
        "type": Member(Enum("nbd")),
        "id": Member(STR),
        "fixed-iothread": Member(BOOL, optional=True),
        "iothread": Member(STR, optional=True),
        "node-name": Member(STR),
        "writable": Member(BOOL, optional=True),
        "writethrough": Member(BOOL, optional=True),
    }),
    discriminator="type",
    branches={"nbd": Struct({
        "name": Member(STR, optional=True),
        "description": Member(STR, optional=True),
        "bitmaps": Member(Array(ANY), optional=True),
        "allocation-depth": Member(BOOL, optional=True),
    })},
)


def address_from_args(addr: dict[str, object]) -> NbdAddress:
    """An NbdAddress from a validated legacy or flat socket address."""
    data = addr.get("data", addr)
    assert isinstance(data, dict)
    if addr["type"] == "unix":
        if data.get("abstract"):
            raise Unsupported("abstract UNIX sockets are not supported")
        return NbdAddress(path=str(data["path"]))
    try:
        port = int(str(data["port"]))
    except ValueError:
        raise InvalidArgument(f"Port '{data['port']}' should be a number") from None
    return NbdAddress(host=str(data["host"]), port=port)


async def start_server(ctx: CommandContext, args: Args, address: NbdAddress) -> None:
    if args.get("tls-creds") is not None:
        raise NotFound(f"No TLS credentials with id '{args['tls-creds']}'")
    if args.get("tls-authz") is not None:
        raise NotFound(f"No TLS authorization with id '{args['tls-authz']}'")
    max_connections = args.get("max-connections", 100)
    assert isinstance(max_connections, int)
    await ctx.nbd.start(address, max_connections)


def add_export(ctx: CommandContext, args: Args) -> None:
    """block-export-add's checks that need no NBD server, then the export itself."""
    if args.get("iothread") is not None:
        raise NotFound(f'iothread "{args["iothread"]}" not found')
    bitmaps = args.get("bitmaps") or []
    assert isinstance(bitmaps, list)
    if bitmaps:
        first = bitmaps[0]
        name = first if isinstance(first, str) else first.get("name") \
            if isinstance(first, dict) else first
        raise NotFound(f"Bitmap '{name}' is not found")
    if args.get("allocation-depth"):
        raise Unsupported("allocation-depth is not supported by blockd")
    export = ctx.registry.add_export(
        str(args["id"]), str(args["node-name"]),
        name=args.get("name"),  # type: ignore[arg-type]
        description=str(args.get("description", "")),
        writable=bool(args.get("writable", False)),
        writethrough=bool(args.get("writethrough", False)),
        nbd_running=ctx.nbd.running,
    )
    try:
        ctx.nbd.export_added(export)
    except BaseException:
        ctx.registry.remove_export(export, announce=False)
        raise


def register(table: CommandTable) -> None:
    @table.command("nbd-server-start", NBD_SERVER_START)
    async def nbd_server_start(ctx: CommandContext, args: Args) -> object:
        addr = args["addr"]
        assert isinstance(addr, dict)
        await start_server(ctx, args, address_from_args(addr))
        return {}

    @table.command("nbd-server-stop")
    async def nbd_server_stop(ctx: CommandContext, args: Args) -> object:
        await ctx.nbd.stop()
        return {}

    @table.command("block-export-add", BLOCK_EXPORT_OPTIONS)
    async def block_export_add(ctx: CommandContext, args: Args) -> object:
        add_export(ctx, args)
        return {}

    @table.command("block-export-del", Struct({
        "id": Member(STR), "mode": Member(Enum("safe", "hard"), optional=True)}))
    async def block_export_del(ctx: CommandContext, args: Args) -> object:
        export = ctx.registry.find_export(str(args["id"]))
        await ctx.nbd.delete_export(export, hard=args.get("mode") == "hard")
        return {}

    @table.command("query-block-exports")
    async def query_block_exports(ctx: CommandContext, args: Args) -> object:
        return [e.info() for e in reversed(ctx.registry.exports.values())]  # newest first

    @table.command("nbd-server-add", Struct({
        "device": Member(STR),
        "name": Member(STR, optional=True),
        "description": Member(STR, optional=True),
        "writable": Member(BOOL, optional=True),
        "bitmap": Member(STR, optional=True),
    }), deprecated=True)
    async def nbd_server_add(ctx: CommandContext, args: Args) -> object:
        device = str(args["device"])
        node = ctx.registry.nodes.get(device)
        if node is None:
            raise NotFound(f"Cannot find device='{device}' nor node-name='{device}'")
        if not ctx.nbd.running:
            raise InvalidArgument("NBD server not running")
        name = str(args.get("name", device))
        export_args: Args = {
            "type": "nbd", "id": name, "node-name": device, "name": name,
            # nbd-server-add quietly exports a read-only node read-only.
            "writable": bool(args.get("writable", False)) and not node.read_only,
        }
        if "description" in args:
            export_args["description"] = args["description"]
        if "bitmap" in args:
            export_args["bitmaps"] = [args["bitmap"]]
        add_export(ctx, export_args)
        return {}

    @table.command("nbd-server-remove", Struct({
        "name": Member(STR), "mode": Member(Enum("safe", "hard"), optional=True)}),
        deprecated=True)
    async def nbd_server_remove(ctx: CommandContext, args: Args) -> object:
        export = ctx.registry.find_export(str(args["name"]))
        await ctx.nbd.delete_export(export, hard=args.get("mode") == "hard")
        return {}
