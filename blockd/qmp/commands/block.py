"""Device queries and statistics: query-block, query-blockstats, block-latency-histogram-set."""

from __future__ import annotations

from dataclasses import dataclass

from blockd.block.stats import BlockAcctStats, IoKind
from blockd.errors import InvalidArgument
from blockd.qmp.commands.base import CommandContext, CommandTable, NoArgs
from blockd.qmp.schema import Uint64

__all__ = ["HistogramSetArgs", "QueryBlockstatsArgs", "register"]


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryBlockstatsArgs:
    """query-blockstats: devices' statistics, or nodes' with ``query-nodes``."""

    query_nodes: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class HistogramSetArgs:
    """block-latency-histogram-set: a device's histogram boundaries in nanoseconds.

    ``boundaries`` applies to every kind not named on its own; only ``id``
    removes all three histograms.
    """

    id: str
    boundaries: tuple[Uint64, ...] | None = None
    boundaries_read: tuple[Uint64, ...] | None = None
    boundaries_write: tuple[Uint64, ...] | None = None
    boundaries_flush: tuple[Uint64, ...] | None = None

    def per_kind(self) -> list[tuple[str, IoKind, tuple[int, ...] | None]]:
        """(label, kind, boundaries or None to leave it alone) for reads, writes, flushes."""
        common = self.boundaries
        return [
            (label, kind, own if own is not None else common)
            for label, kind, own in (
                ("read", IoKind.READ, self.boundaries_read),
                ("write", IoKind.WRITE, self.boundaries_write),
                ("flush", IoKind.FLUSH, self.boundaries_flush),
            )
        ]


def register(table: CommandTable) -> None:
    @table.command("query-block")
    async def query_block(ctx: CommandContext, args: NoArgs) -> object:
        return [device.block_info() for device in ctx.registry.devices.values()]

    @table.command("query-blockstats")
    async def query_blockstats(ctx: CommandContext, args: QueryBlockstatsArgs) -> object:
        if not args.query_nodes:
            return [device.block_stats() for device in ctx.registry.devices.values()]
        # Node mode: like QEMU, nodes keep no request accounting of their own
        # (that lives on devices); only wr_highest_offset and the
        # driver-specific discard counters carry data.
        entries: list[object] = []
        for node in ctx.registry.nodes.values():
            idle = BlockAcctStats(account_invalid=False, account_failed=False)
            entry: dict[str, object] = {
                "node-name": node.name,
                "stats": idle.to_qmp(wr_highest_offset=node.wr_highest_offset),
            }
            specific = node.driver_specific_stats()
            if specific is not None:
                entry["driver-specific"] = specific
            entries.append(entry)
        return entries

    @table.command("block-latency-histogram-set")
    async def block_latency_histogram_set(ctx: CommandContext, args: HistogramSetArgs) -> object:
        device = ctx.registry.find_device(id=args.id)
        per_kind = args.per_kind()
        if all(boundaries is None for _, _, boundaries in per_kind):
            for _, kind, _ in per_kind:  # only the id: remove all three histograms
                device.stats.set_histogram(kind, None)
            return {}
        for label, kind, boundaries in per_kind:
            if boundaries is None:
                continue  # not named for this kind: leave it alone
            try:
                device.stats.set_histogram(kind, boundaries)
            except ValueError:
                raise InvalidArgument(f"Device '{args.id}' set {label} boundaries fail") from None
        return {}
