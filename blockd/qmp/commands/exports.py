"""NBD exports: nbd-server-start/-stop, block-export-add/-del, query-block-exports,
and the deprecated nbd-server-add/-remove, with qemu-storage-daemon's arguments and texts.

The socket address comes in two forms: QMP's nbd-server-start takes QEMU's legacy
``{"type": "unix", "data": {"path": ...}}`` (:data:`SocketAddressLegacy`), the command
line's ``--nbd-server`` the flat ``addr.type=unix,addr.path=...`` (:data:`SocketAddress`).
Both give the same dataclasses, :class:`UnixSocketAddress` or :class:`InetSocketAddress`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from blockd.block.exports import NbdAddress
from blockd.errors import InvalidArgument, NotFound, Unsupported
from blockd.qmp.commands.base import CommandContext, CommandTable, NoArgs
from blockd.qmp.schema import Discriminator, Uint32

__all__ = [
    "BlockExportOptions",
    "ExportDelArgs",
    "InetSocketAddress",
    "NbdServerAddArgs",
    "NbdServerArgs",
    "NbdServerOptions",
    "NbdServerRemoveArgs",
    "NbdServerStartArgs",
    "SocketAddress",
    "SocketAddressBase",
    "SocketAddressLegacy",
    "UnixSocketAddress",
    "add_export",
    "address_from_args",
    "register",
    "start_server",
]

DeleteMode = Literal["safe", "hard"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketAddressBase:
    """What every socket address has: its type."""

    type: Literal["unix", "inet"]


@dataclass(frozen=True, slots=True, kw_only=True)
class UnixSocketAddress(SocketAddressBase):
    """A UNIX socket (QEMU's UnixSocketAddress); blockd has no abstract sockets."""

    type: Literal["unix"]
    path: str
    abstract: bool = False
    tight: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class InetSocketAddress(SocketAddressBase):
    """A TCP address (QEMU's InetSocketAddress); the port is a string, as in QEMU."""

    type: Literal["inet"]
    host: str
    port: str
    numeric: bool | None = None
    to: Uint32 | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None
    keep_alive: bool | None = None
    mptcp: bool | None = None


SocketAddress = Annotated[UnixSocketAddress | InetSocketAddress, Discriminator("type")]
SocketAddressLegacy = Annotated[
    UnixSocketAddress | InetSocketAddress, Discriminator("type", legacy=True)
]


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdServerArgs:
    """The NBD server's options; the subclasses say which form ``addr`` takes."""

    addr: UnixSocketAddress | InetSocketAddress
    tls_creds: str | None = None
    tls_authz: str | None = None
    max_connections: Uint32 = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdServerStartArgs(NbdServerArgs):
    """nbd-server-start (QMP): the legacy address form."""

    addr: SocketAddressLegacy


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdServerOptions(NbdServerArgs):
    """``--nbd-server`` (command line, QEMU's NbdServerOptions): the flat address form."""

    addr: SocketAddress


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockExportOptions:
    """block-export-add: QEMU's BlockExportOptions, whose only type in blockd is ``nbd``
    (so the union is one struct: the base members, then the nbd branch's)."""

    type: Literal["nbd"]
    id: str
    fixed_iothread: bool | None = None
    iothread: str | None = None
    node_name: str
    writable: bool = False
    writethrough: bool = False
    name: str | None = None
    description: str = ""
    bitmaps: tuple[object, ...] = ()  # BlockDirtyBitmapOrStr; blockd has no bitmaps
    allocation_depth: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportDelArgs:
    """block-export-del: the export id; ``hard`` disconnects its clients."""

    id: str
    mode: DeleteMode = "safe"


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdServerAddArgs:
    """nbd-server-add (deprecated): export ``device`` under ``name`` (also the export id)."""

    device: str
    name: str | None = None
    description: str = ""
    writable: bool = False
    bitmap: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NbdServerRemoveArgs:
    """nbd-server-remove (deprecated): the export id, as block-export-del."""

    name: str
    mode: DeleteMode = "safe"


def address_from_args(addr: UnixSocketAddress | InetSocketAddress) -> NbdAddress:
    """An NbdAddress from a validated socket address."""
    if isinstance(addr, UnixSocketAddress):
        if addr.abstract:
            raise Unsupported("abstract UNIX sockets are not supported")
        return NbdAddress(path=addr.path)
    try:
        port = int(addr.port)
    except ValueError:
        raise InvalidArgument(f"Port '{addr.port}' should be a number") from None
    return NbdAddress(host=addr.host, port=port)


async def start_server(ctx: CommandContext, args: NbdServerArgs) -> None:
    """nbd-server-start and ``--nbd-server``: QEMU's checks in QEMU's order, then start."""
    address = address_from_args(args.addr)
    creds = None
    if args.tls_creds is not None:
        creds = ctx.objects.get(args.tls_creds)
        if creds is None:
            raise NotFound(f"No TLS credentials with id '{args.tls_creds}'")
        creds.server_context()  # TlsError unless a server endpoint
    if args.tls_authz is not None:
        raise NotFound(f"No TLS authorization with id '{args.tls_authz}'")
    await ctx.nbd.start(address, args.max_connections, creds)


def add_export(ctx: CommandContext, args: BlockExportOptions) -> None:
    """block-export-add's checks that need no NBD server, then the export itself."""
    if args.iothread is not None:
        raise NotFound(f'iothread "{args.iothread}" not found')
    if args.bitmaps:
        raise NotFound(f"Bitmap '{_bitmap_name(args.bitmaps[0])}' is not found")
    if args.allocation_depth:
        raise Unsupported("allocation-depth is not supported by blockd")
    export = ctx.registry.add_export(
        args.id, args.node_name,
        name=args.name,
        description=args.description,
        writable=args.writable,
        writethrough=args.writethrough,
        nbd_running=ctx.nbd.running,
    )
    try:
        ctx.nbd.export_added(export)
    except BaseException:
        ctx.registry.remove_export(export, announce=False)
        raise


def _bitmap_name(bitmap: object) -> object:
    """The name in a BlockDirtyBitmapOrStr: a bare name or ``{"node": ..., "name": ...}``."""
    return bitmap.get("name") if isinstance(bitmap, dict) else bitmap


def register(table: CommandTable) -> None:
    @table.command("nbd-server-start")
    async def nbd_server_start(ctx: CommandContext, args: NbdServerStartArgs) -> object:
        await start_server(ctx, args)
        return {}

    @table.command("nbd-server-stop")
    async def nbd_server_stop(ctx: CommandContext, args: NoArgs) -> object:
        await ctx.nbd.stop()
        return {}

    @table.command("block-export-add")
    async def block_export_add(ctx: CommandContext, args: BlockExportOptions) -> object:
        add_export(ctx, args)
        return {}

    @table.command("block-export-del")
    async def block_export_del(ctx: CommandContext, args: ExportDelArgs) -> object:
        export = ctx.registry.find_export(args.id)
        await ctx.nbd.delete_export(export, hard=args.mode == "hard")
        return {}

    @table.command("query-block-exports")
    async def query_block_exports(ctx: CommandContext, args: NoArgs) -> object:
        return [e.info() for e in reversed(ctx.registry.exports.values())]  # newest first

    @table.command("nbd-server-add", deprecated=True)
    async def nbd_server_add(ctx: CommandContext, args: NbdServerAddArgs) -> object:
        node = ctx.registry.nodes.get(args.device)
        if node is None:
            raise NotFound(f"Cannot find device='{args.device}' nor node-name='{args.device}'")
        if not ctx.nbd.running:
            raise InvalidArgument("NBD server not running")
        name = args.name if args.name is not None else args.device
        add_export(ctx, BlockExportOptions(
            type="nbd", id=name, node_name=args.device, name=name,
            description=args.description,
            # nbd-server-add quietly exports a read-only node read-only.
            writable=args.writable and not node.read_only,
            bitmaps=(args.bitmap,) if args.bitmap is not None else (),
        ))
        return {}

    @table.command("nbd-server-remove", deprecated=True)
    async def nbd_server_remove(ctx: CommandContext, args: NbdServerRemoveArgs) -> object:
        export = ctx.registry.find_export(args.name)
        await ctx.nbd.delete_export(export, hard=args.mode == "hard")
        return {}
