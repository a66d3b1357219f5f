#!/usr/bin/env python3
"""Micro-benchmark: what I/O accounting costs per request (``blockd/block/stats.py``).

Times ``start()`` + ``done()`` on one :class:`~blockd.block.stats.BlockAcctStats`, the pair
every request pays on the hot path, in a few configurations:

* ``plain``: a device as created (no QMP histogram, no timed intervals);
* ``histogram``: with a QMP-set latency histogram (block-latency-histogram-set);
* ``intervals``: with one timed-statistics interval;
* ``noacct``: :class:`~blockd.block.stats.NoAccounting` (``BLOCKD_NO_ACCOUNTING=1``);
* ``empty``: the loop with two no-op calls, to subtract the harness's own cost.

Each figure is the best of ``--repeats`` runs of ``--requests`` requests, in nanoseconds
per request, with the real clock (``time.monotonic_ns``).  The per-request budget for
accounting is about 200 ns.  Run it with the project's interpreter from the repository
root::

    .venv/bin/python bench/accounting_bench.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockd.block.stats import AcctCookie, BlockAcctStats, IoKind, NoAccounting


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
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
