#!/usr/bin/env python3
"""Micro-benchmark: what I/O accounting costs per request (``blockd/block/stats.py``).

Times ``start()`` + ``done()`` on one :class:`~blockd.block.stats.BlockAcctStats`, the pair
every request pays on the hot path, in a few configurations:

* ``plain``: a device as created (no QMP histogram, no timed intervals);
* ``histogram``: with a QMP-set latency histogram (block-latency-histogram-set);
* ``intervals``: with one timed-statistics interval;
* ``noacct``: :class:`~blockd.block.stats.NoAccounting` (``BLOCKD_NO_ACCOUNTING=1``);
* ``empty``: the loop with two no-op calls, to subtract the harness's own cost.

Most requests never take that pair: the NBD server serves them on the device's fast
path (``Device.try_read`` / ``try_write``), which appends to a log and folds it every
:data:`~blockd.block.stats.FOLD_AT` entries.  ``--fast-path`` times that instead: 4 KiB
reads and writes through ``try_read`` / ``try_write`` of a real file on /dev/shm, once
with accounting and once with ``NoAccounting``, alternating; the difference is what
accounting adds to a request served there.

Each figure is the best of ``--repeats`` runs of ``--requests`` requests, in nanoseconds
per request, with the real clock (``time.monotonic_ns``).  The per-request budget for
accounting is about 200 ns.  Run it with the project's interpreter from the repository
root::

    .venv/bin/python bench/accounting_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockd.block.device import Device
from blockd.block.registry import Registry
from blockd.block.stats import AcctCookie, BlockAcctStats, IoKind, NoAccounting
from blockd.devices.base import NodeOptions
from blockd.events import EventBus


def _time_pairs(start: Callable[[IoKind, int], AcctCookie],
                done: Callable[[AcctCookie], None], requests: int) -> float:
    """Nanoseconds per start+done pair over ``requests`` write requests."""
    kind = IoKind.WRITE
    t0 = time.perf_counter_ns()
    for _ in range(requests):
        done(start(kind, 4096))
    return (time.perf_counter_ns() - t0) / requests


def _configurations() -> dict[str, BlockAcctStats | None]:
    plain = BlockAcctStats()
    histogram = BlockAcctStats()
    histogram.set_histogram(IoKind.WRITE, [10_000, 100_000, 1_000_000, 10_000_000])
    intervals = BlockAcctStats(intervals=[60])
    return {
        "empty": None,
        "noacct": NoAccounting(),
        "plain": plain,
        "histogram": histogram,
        "intervals": intervals,
    }


_BLOCK = 4096
_SPAN = 64 << 20  # the file on /dev/shm: 16,384 blocks, visited in a fixed order


async def _fast_device(path: Path, stats_class: type[BlockAcctStats]) -> Device:
    registry = Registry(executor=ThreadPoolExecutor(1), bus=EventBus())
    registry.stats_class = stats_class
    name = stats_class.__name__
    await registry.add_node(NodeOptions(driver="file", node_name=name, filename=str(path)))
    return registry.add_device("hd", f"d-{name}", name)


def _time_fast(dev: Device, write: bool, requests: int) -> float:
    """Nanoseconds per 4 KiB request served by the device's fast path."""
    buf = bytearray(_BLOCK)
    offsets = [(i * 7919 % (_SPAN // _BLOCK)) * _BLOCK for i in range(requests)]
    if write:
        try_write = dev.try_write
        t0 = time.perf_counter_ns()
        for offset in offsets:
            if not try_write(offset, buf, False):
                raise RuntimeError("the fast path declined a write")
    else:
        try_read = dev.try_read
        t0 = time.perf_counter_ns()
        for offset in offsets:
            if try_read(offset, buf) != _BLOCK:
                raise RuntimeError("the fast path declined a read")
    return (time.perf_counter_ns() - t0) / requests


def fast_path(requests: int, repeats: int) -> None:
    """Print what accounting adds to a request the device serves on its fast path."""
    path = Path("/dev/shm") / f"blockd-accounting-bench-{os.getpid()}.img"
    with open(path, "wb") as f:
        f.truncate(_SPAN)
    try:
        devices = {cls.__name__: asyncio.run(_fast_device(path, cls))
                   for cls in (BlockAcctStats, NoAccounting)}
        print(f"{'fast path':<14}{'accounted':>12}{'not':>8}{'difference':>12}  (ns/request)")
        for kind, write in (("4K read", False), ("4K write", True)):
            best = dict.fromkeys(devices, float("inf"))
            for _ in range(repeats):  # alternating, so that drift hits both alike
                for name, dev in devices.items():
                    best[name] = min(best[name], _time_fast(dev, write, requests))
            on, off = best["BlockAcctStats"], best["NoAccounting"]
            print(f"{kind:<14}{on:>12.1f}{off:>8.1f}{on - off:>12.1f}")
    finally:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fast-path", action="store_true",
                        help="time the device's fast path with and without accounting")
    args = parser.parse_args(argv)
    if args.fast_path:
        fast_path(args.requests, args.repeats)
        return 0
    cookie = AcctCookie(IoKind.WRITE, 4096, 0)

    def nop_start(kind: IoKind, nbytes: int) -> AcctCookie:
        return cookie

    def nop_done(c: AcctCookie) -> None:
        pass

    results: dict[str, float] = {}
    for name, stats in _configurations().items():
        if stats is None:
            start, done = nop_start, nop_done
        else:
            start, done = stats.start, stats.done
        results[name] = min(_time_pairs(start, done, args.requests) for _ in range(args.repeats))
    base = results["empty"]
    print(f"{'configuration':<14}{'ns/request':>12}{'minus harness':>15}")
    for name, ns in results.items():
        print(f"{name:<14}{ns:>12.1f}{ns - base:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
