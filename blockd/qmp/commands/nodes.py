"""Node commands: blockdev-add, blockdev-del, query-named-block-nodes.

The blockdev-add schema is QEMU's BlockdevOptions restricted to the drivers
blockd implements: a flat union on ``driver`` whose base is
:class:`BlockdevOptionsBase`, with one branch per kind of driver.  Every member
QEMU accepts for those drivers is accepted here, and those blockd cannot honour
are refused with a clear message rather than silently ignored.  Optional members
are ``None`` when not given, because QEMU shows only given members in some
places (null-co's ``json:{...}`` filename); :func:`node_options` applies
QEMU's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal, TypeVar, get_args

from blockd.devices.base import NodeOptions
from blockd.errors import InvalidArgument, Unsupported
from blockd.qmp.commands.base import CommandContext, CommandTable
from blockd.qmp.schema import Discriminator, Uint64, given_members

__all__ = [
    "SUPPORTED_DRIVERS",
    "BlockdevCacheOptions",
    "BlockdevDelArgs",
    "BlockdevOptions",
    "BlockdevOptionsBase",
    "FileOptions",
    "NullOptions",
    "QueryNamedBlockNodesArgs",
    "SgOptions",
    "node_options",
    "register",
]

T = TypeVar("T")

Driver = Literal["file", "host_cdrom", "host_device", "null-co", "null-aio", "sg"]
SUPPORTED_DRIVERS: tuple[Driver, ...] = get_args(Driver)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevCacheOptions:
    """``cache``: O_DIRECT, and whether flushes are ignored."""

    direct: bool = False
    no_flush: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevOptionsBase:
    """The members every driver takes (QEMU's BlockdevOptionsBase)."""

    driver: Driver
    node_name: str | None = None
    discard: Literal["ignore", "unmap"] | None = None
    cache: BlockdevCacheOptions | None = None
    read_only: bool | None = None
    auto_read_only: bool | None = None
    force_share: bool | None = None
    detect_zeroes: Literal["off", "on", "unmap"] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FileOptions(BlockdevOptionsBase):
    """file, host_device and host_cdrom (QEMU's BlockdevOptionsFile)."""

    driver: Literal["file", "host_cdrom", "host_device"]
    filename: str
    pr_manager: str | None = None
    locking: Literal["auto", "on", "off"] | None = None
    aio: Literal["threads", "native", "io_uring"] | None = None
    aio_max_batch: int | None = None
    drop_cache: bool | None = None
    x_check_cache_dropped: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NullOptions(BlockdevOptionsBase):
    """null-co and null-aio (QEMU's BlockdevOptionsNull)."""

    driver: Literal["null-co", "null-aio"]
    size: int | None = None
    latency_ns: Uint64 | None = None
    read_zeroes: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SgOptions(BlockdevOptionsBase):
    """sg, blockd's SCSI generic driver (not in QEMU): the /dev/sgN node to drive.

    SG_IO bypasses every cache and runs in threads, so file-posix's ``aio``,
    ``locking`` and cache-dropping members do not apply and are not accepted.
    """

    driver: Literal["sg"]
    filename: str


BlockdevOptions = Annotated[FileOptions | NullOptions | SgOptions, Discriminator("driver")]
AnyOptions = FileOptions | NullOptions | SgOptions


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockdevDelArgs:
    """blockdev-del: the node to close."""

    node_name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryNamedBlockNodesArgs:
    """query-named-block-nodes: ``flat`` is accepted (blockd's nodes have no children)."""

    flat: bool = False


def node_options(args: AnyOptions) -> NodeOptions:
    """Turn validated blockdev-add arguments into driver options, with QEMU's defaults.

    Raises InvalidArgument with QEMU's text for combinations QEMU refuses.
    """
    if args.node_name is None:
        raise InvalidArgument("'node-name' must be specified for the root node")
    if isinstance(args, FileOptions) and args.pr_manager is not None:
        raise Unsupported("blockd does not support persistent reservation managers (pr-manager)")
    if args.force_share and not args.read_only:
        raise InvalidArgument("force-share=on can only be used with read-only images")
    if isinstance(args, NullOptions) and args.size is not None and args.size < 0:
        raise InvalidArgument("Parameter 'size' expects a non-negative value")
    cache = args.cache or BlockdevCacheOptions()
    common = NodeOptions(
        driver="null-co" if args.driver == "null-aio" else args.driver,
        node_name=args.node_name,
        read_only=_or(args.read_only, False),
        auto_read_only=_or(args.auto_read_only, False),
        cache_direct=cache.direct,
        cache_no_flush=cache.no_flush,
        discard=_or(args.discard, "ignore"),
        detect_zeroes=_or(args.detect_zeroes, "off"),
        force_share=_or(args.force_share, False),
        given=given_members(args),
    )
    if isinstance(args, FileOptions):
        return replace(
            common, filename=args.filename, aio=_or(args.aio, "threads"),
            locking=_or(args.locking, "auto"),
        )
    if isinstance(args, SgOptions):
        return replace(common, filename=args.filename)
    return replace(
        common, size=_or(args.size, 1 << 30), read_zeroes=_or(args.read_zeroes, False),
        latency_ns=_or(args.latency_ns, 0),
    )


def _or(value: T | None, default: T) -> T:
    """QEMU's default for a member that was not given."""
    return default if value is None else value


def register(table: CommandTable) -> None:
    @table.command("blockdev-add")
    async def blockdev_add(ctx: CommandContext, args: BlockdevOptions) -> object:
        options = node_options(args)
        # The path policy resolves the path (it stats it): in the open's own thread,
        # under the open timeout, like the open itself.
        policy = ctx.path_policy
        await ctx.registry.add_node(options, resolve=policy.resolve if policy else None)
        return {}

    @table.command("blockdev-del")
    async def blockdev_del(ctx: CommandContext, args: BlockdevDelArgs) -> object:
        await ctx.registry.del_node(args.node_name)
        return {}

    @table.command("query-named-block-nodes")
    async def query_named_block_nodes(
        ctx: CommandContext, args: QueryNamedBlockNodesArgs
    ) -> object:
        # Newest first, as QEMU lists them.
        return [node.device_info() for node in reversed(ctx.registry.nodes.values())]
