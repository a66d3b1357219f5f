"""Device queries and statistics: query-block, query-blockstats, block-latency-histogram-set."""

from __future__ import annotations

from blockd.block.stats import BlockAcctStats, IoKind
from blockd.errors import InvalidArgument
from blockd.qmp.commands.base import Args, CommandContext, CommandTable
from blockd.qmp.schema import BOOL, STR, UINT64, Array, Member, Struct

__all__ = ["register"]

_BOUNDARIES = Array(UINT64)

HISTOGRAM_SET = Struct({
    "id": Member(STR),
    "boundaries": Member(_BOUNDARIES, optional=True),
    "boundaries-read": Member(_BOUNDARIES, optional=True),
    "boundaries-write": Member(_BOUNDARIES, optional=True),
    "boundaries-flush": Member(_BOUNDARIES, optional=True),
})

_HISTOGRAM_KINDS = (("read", IoKind.READ), ("write", IoKind.WRITE), ("flush", IoKind.FLUSH))


def register(table: CommandTable) -> None:
    @table.command("query-block")
    async def query_block(ctx: CommandContext, args: Args) -> object:
        return [device.block_info() for device in ctx.registry.devices.values()]

    @table.command("query-blockstats", Struct({"query-nodes": Member(BOOL, optional=True)}))
    async def query_blockstats(ctx: CommandContext, args: Args) -> object:
        if not args.get("query-nodes"):
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

    @table.command("block-latency-histogram-set", HISTOGRAM_SET)
    async def block_latency_histogram_set(ctx: CommandContext, args: Args) -> object:
        device = ctx.registry.find_device(id=str(args["id"]))
        if len(args) == 1:  # only the id: remove all three histograms
            for _, kind in _HISTOGRAM_KINDS:
                device.stats.set_histogram(kind, None)
            return {}
        common = args.get("boundaries")
        for label, kind in _HISTOGRAM_KINDS:
            chosen = args.get(f"boundaries-{label}", common)
            if chosen is None:
                continue  # not named for this kind: leave it alone
            try:
                device.stats.set_histogram(kind, chosen)  # type: ignore[arg-type]
            except ValueError:
                raise InvalidArgument(
                    f"Device '{args['id']}' set {label} boundaries fail"
                ) from None
        return {}
