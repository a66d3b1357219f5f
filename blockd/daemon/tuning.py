"""Switches for the data path's speed-ups, read once from the environment at start.

They exist to measure what each speed-up gains (bench/README.md): a benchmark
runs blockd beside a copy of itself with one of them off.  Nothing else in
blockd reads the environment; the parts that care get these values from the
composition root.

=========================  =====================================================
``BLOCKD_IO_URING=0``      buffered writes and flushes go to worker threads
``BLOCKD_SPLICE=0``        large reads are copied, not spliced through pipes
``BLOCKD_POLL_MAX_NS=N``   busy-poll window for NBD clients (0: no polling)
``BLOCKD_NO_ACCOUNTING=1`` no I/O statistics (benchmarks of their cost only)
``BLOCKD_EVENT_LOOP=asyncio``  plain asyncio instead of uvloop
=========================  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from blockd.aio.polling import DEFAULT_MAX_NS

__all__ = ["Tuning"]


@dataclass(frozen=True, slots=True)
class Tuning:
    """The data path's switches; the defaults are what users run."""

    io_uring: bool = True
    splice: bool = True
    poll_max_ns: int = DEFAULT_MAX_NS
    accounting: bool = True
    uvloop: bool = True

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Tuning:
        """The switches as the environment sets them (see the module's table)."""
        return cls(
            io_uring=environ.get("BLOCKD_IO_URING") != "0",
            splice=environ.get("BLOCKD_SPLICE") != "0",
            poll_max_ns=_poll_max_ns(environ.get("BLOCKD_POLL_MAX_NS")),
            accounting=environ.get("BLOCKD_NO_ACCOUNTING") != "1",
            uvloop=environ.get("BLOCKD_EVENT_LOOP") != "asyncio",
        )


def _poll_max_ns(value: str | None) -> int:
    """``BLOCKD_POLL_MAX_NS``: a window in ns (negative: 0); unset or not a number: default."""
    if value is None:
        return DEFAULT_MAX_NS
    try:
        return max(0, int(value))
    except ValueError:
        return DEFAULT_MAX_NS
