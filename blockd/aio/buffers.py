"""A pool of large read buffers, so big reads do not pay for fresh memory every time.

Allocating a new 1 MiB buffer per request costs more than reading 1 MiB from the
page cache: the allocator maps fresh pages and the kernel faults each of them in
on first touch.  Buffers come in power-of-two size classes and are handed back
by their user only once nothing refers to their contents any more (for NBD:
once the transport has passed every byte to the kernel).  A returned buffer
still holds old data, so whoever fills it must fill all of it (Device.submit_read
zero-fills the tail of a short read).
"""

from __future__ import annotations

__all__ = ["BufferPool"]

MIN_POOLED = 64 * 1024


class BufferPool:
    """Free lists of bytearrays by power-of-two size, bounded in total bytes."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._max_bytes = max_bytes
        self._held = 0

    @staticmethod
    def size_class(length: int) -> int:
        return 1 << max(length - 1, 1).bit_length()

    def get(self, length: int) -> bytearray:
        """A buffer of at least ``length`` bytes (contents undefined)."""
        size = self.size_class(length)
        free = self._free.get(size)
        if free:
            self._held -= size
            return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        """Give a buffer back; dropped if the pool is full or the size is not a class."""
        size = len(buf)
        if size < MIN_POOLED or size & (size - 1) or self._held + size > self._max_bytes:
            return
        self._free.setdefault(size, []).append(buf)
        self._held += size
