"""The ``null-co`` driver: a device of a given size that stores nothing (QEMU's block/null.c).

For benchmarks: reads return at once, zero-filled only with ``read-zeroes``
(otherwise the caller's buffers are left as they were, as in QEMU; with it and
no latency, ``reads_zeroes`` lets the NBD server answer reads with holes), writes,
discards and write-zeroes are accepted and dropped, and ``latency-ns`` delays
every read, write and flush.

Its filename is the pseudo-filename QEMU shows, built by
:func:`null_pseudo_filename`: ``null-co://`` when no size or read-zeroes was
given, else ``json:{...}`` with the members in the order QEMU's hash table
yields them.

Raises InvalidArgument for a negative size or latency, ReadOnly for writes to a
read-only node.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Sequence
from typing import ClassVar, Self

from blockd.devices.base import EXTENT_HOLE, EXTENT_ZERO, Buffer, DriverInfo, NodeOptions
from blockd.errors import InvalidArgument, ReadOnly

__all__ = ["NullDriver", "null_pseudo_filename"]

_QDICT_BUCKETS = 512


def _qdict_bucket(key: str) -> int:
    """The bucket QEMU's QDict puts ``key`` in (the TDB string hash, modulo 512)."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _QDICT_BUCKETS


def _qdict_json(items: Sequence[tuple[str, object]]) -> str:
    """``items`` (in insertion order) as QEMU prints a QDict: bucket order, newest first within."""
    numbered = list(enumerate(items))
    numbered.sort(key=lambda entry: (_qdict_bucket(entry[1][0]), -entry[0]))
    return json.dumps(dict(item for _, item in numbered))


def null_pseudo_filename(
    size: int | None = None, read_zeroes: bool | None = None, driver: str = "null-co"
) -> str:
    """QEMU's filename for a null node opened with these explicitly given options.

    ``None`` means "not given".  ``latency-ns`` never appears (QEMU does not
    count it as a strong option).
    """
    items: list[tuple[str, object]] = [("driver", driver)]
    if size is not None:
        items.append(("size", size))
    if read_zeroes is not None:
        items.append(("read-zeroes", read_zeroes))
    if len(items) == 1:
        return f"{driver}://"
    return "json:" + _qdict_json(items)


class NullDriver:
    """An opened null-co node."""

    format_name: ClassVar[str] = "null-co"

    options: NodeOptions

    def __init__(self, options: NodeOptions) -> None:
        if options.size < 0:
            raise InvalidArgument(f"Invalid size {options.size}")
        if options.latency_ns < 0:
            raise InvalidArgument(f"Invalid latency-ns {options.latency_ns}")
        self.options = options
        self.read_only = options.read_only
        # Without a simulated latency nothing here can wait: serve on the loop thread.
        self.memory_backed = options.latency_ns == 0
        # Reads that need nothing at all (a simulated latency still needs its delay).
        self.reads_zeroes = options.read_zeroes and self.memory_backed
        given = options.given
        self.filename = null_pseudo_filename(
            options.size if "size" in given else None,
            options.read_zeroes if "read-zeroes" in given else None,
            self.format_name,
        )

    @classmethod
    def open(cls, options: NodeOptions) -> Self:
        """Open a null node; raise InvalidArgument for impossible options."""
        if options.force_share and not options.read_only:
            raise InvalidArgument("force-share=on can only be used with read-only images")
        return cls(options)

    @classmethod
    def probe_device(cls, filename: str) -> int:
        """100 for a ``null-co://`` filename, else 0."""
        return 100 if filename.startswith(f"{cls.format_name}://") else 0

    def _delay(self) -> None:
        if self.options.latency_ns:
            time.sleep(self.options.latency_ns / 1e9)

    def _clamp(self, offset: int, length: int) -> int:
        return max(0, min(length, self.options.size - offset))

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Zero-fill (with read-zeroes) and return the count up to the end.

        Without read-zeroes nothing is read and the count is 0: QEMU leaves the
        buffers untouched then, but blockd's device layer never hands out memory
        that was not read (its buffers are recycled between clients), so it fills
        what a driver did not.
        """
        self._delay()
        length = self._clamp(offset, sum(memoryview(b).nbytes for b in buffers))
        if not self.options.read_zeroes:
            return 0
        left = length
        for buf in buffers:
            view = memoryview(buf).cast("B")
            n = min(left, view.nbytes)
            view[:n] = bytes(n)
            left -= n
            if not left:
                break
        return length

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"Cannot write to '{self.filename}': node is read-only", errno.EROFS)

    def pwritev(self, offset: int, buffers: Sequence[Buffer], fua: bool = False) -> int:
        """Drop the data; return the count up to the end of the device."""
        self._check_writable()
        self._delay()
        return self._clamp(offset, sum(memoryview(b).nbytes for b in buffers))

    def flush(self) -> None:
        self._delay()

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check_writable()

    def getlength(self) -> int:
        return self.options.size

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """All zeroes with read-zeroes (nothing is stored), else unknown data."""
        length = self._clamp(offset, length)
        return [(length, EXTENT_HOLE | EXTENT_ZERO if self.options.read_zeroes else 0)]

    def get_info(self) -> DriverInfo:
        return DriverInfo(
            filename=self.filename,
            actual_size=0,
            can_discard=True,
            can_write_zeroes=True,
            extra={"read_only": self.read_only},
        )

    def close(self) -> None:
        """Nothing to release."""
