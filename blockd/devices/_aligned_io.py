"""Positional vectored I/O on a file descriptor, safe for O_DIRECT.

Two layers:

* :func:`read_full` / :func:`write_full` loop ``os.preadv``/``os.pwritev`` over
  short transfers and over more buffers than one system call takes.
* :class:`AlignedIO` serves *any* caller buffers and offsets on a descriptor
  that may have been opened with ``O_DIRECT``.  Requests whose offset, lengths
  and buffer addresses already respect the :class:`Alignment` go straight to
  the kernel (the common path: the NBD layer advertises the alignment, so real
  clients send aligned requests).  Anything else is bounced through a
  page-aligned anonymous ``mmap``: reads widen the range to whole blocks and
  copy out the middle; writes that only have misaligned memory are copied into
  an aligned buffer; writes with a misaligned offset or length do a
  read-modify-write of the edge blocks.

Read-modify-write rewrites bytes the caller did not send, so it must not
interleave with another write to the same block.  Writes hold a shared lock and
read-modify-write holds it exclusively; reads take no lock.  This serialises
only the rare path.

Errors: :class:`OSError` with the kernel's errno (``EINVAL`` when a descriptor
without ``O_DIRECT`` support is still handed misaligned requests, ``EIO`` for a
write that makes no progress).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from blockd.devices.pybuffer import PYBUF_SIMPLE, PyBuffer, get_buffer, release_buffer

__all__ = [
    "AlignedIO",
    "Alignment",
    "aligned_buffer",
    "as_byte_views",
    "buffer_address",
    "read_full",
    "write_full",
]

Buffer = memoryview | bytearray | bytes

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


@dataclass(frozen=True, slots=True)
class Alignment:
    """What a descriptor needs: ``request`` for offsets and lengths, ``memory`` for addresses."""

    request: int = 1
    memory: int = 1

    def __post_init__(self) -> None:
        for name, value in (("request", self.request), ("memory", self.memory)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} alignment {value} is not a power of two")


def buffer_address(buf: Buffer) -> int:
    """Return the memory address of a contiguous buffer (read-only ones too).

    Raises BufferError for a non-contiguous buffer.
    """
    view = PyBuffer()
    get_buffer(buf, ctypes.byref(view), PYBUF_SIMPLE)
    try:
        return view.buf or 0
    finally:
        release_buffer(ctypes.byref(view))


def as_byte_views(buffers: Sequence[Buffer]) -> list[memoryview]:
    """Flat unsigned-byte views of ``buffers``, dropping empty ones.

    Raises TypeError/ValueError for buffers that are not C-contiguous.
    """
    views = []
    for buf in buffers:
        view = memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if view.nbytes:
            views.append(view)
    return views


def _consume(views: list[memoryview], count: int) -> list[memoryview]:
    """Drop the first ``count`` bytes from a list of views."""
    index = 0
    while index < len(views) and count >= views[index].nbytes:
        count -= views[index].nbytes
        index += 1
    rest = views[index:]
    if rest and count:
        rest[0] = rest[0][count:]
    return rest


def read_full(fd: int, offset: int, views: Sequence[memoryview]) -> int:
    """Read into ``views`` from ``offset`` until they are full or end of file; return the count."""
    pending = [v for v in views if v.nbytes]
    total = 0
    while pending:
        count = os.preadv(fd, pending[:_IOV_MAX], offset + total)
        if count == 0:
            break
        total += count
        pending = _consume(pending, count)
    return total


def write_full(fd: int, offset: int, views: Sequence[memoryview], flags: int = 0) -> int:
    """Write all of ``views`` at ``offset`` (``flags`` as for pwritev2); return the count.

    Raises OSError(EIO) if the kernel accepts no bytes.
    """
    pending = [v for v in views if v.nbytes]
    total = 0
    while pending:
        batch = pending[:_IOV_MAX]
        if flags:
            count = os.pwritev(fd, batch, offset + total, flags)
        else:
            count = os.pwritev(fd, batch, offset + total)
        if count <= 0:
            raise OSError(errno.EIO, f"write at offset {offset + total} made no progress")
        total += count
        pending = _consume(pending, count)
    return total


class _SharedExclusiveLock:
    """A lock many holders may share, or one may hold exclusively (writer-preferring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def aligned_buffer(size: int) -> memoryview:
    """A zero-filled, page-aligned writable buffer of ``size`` bytes.

    The anonymous mapping is never closed explicitly: it is unmapped when the
    last view of it goes away, so a view kept alive by an exception traceback
    cannot turn an I/O error into a BufferError.
    """
    return memoryview(mmap.mmap(-1, size))


def _scatter(source: memoryview, views: Sequence[memoryview]) -> None:
    """Copy ``source`` into consecutive ``views`` until it runs out."""
    pos = 0
    for view in views:
        if pos >= source.nbytes:
            break
        n = min(view.nbytes, source.nbytes - pos)
        view[:n] = source[pos : pos + n]
        pos += n


def _gather(views: Sequence[memoryview], target: memoryview) -> None:
    """Copy consecutive ``views`` into ``target``."""
    pos = 0
    for view in views:
        target[pos : pos + view.nbytes] = view
        pos += view.nbytes


ReadAt = Callable[[int, Sequence[memoryview]], int]
WriteAt = Callable[[int, Sequence[memoryview], int], int]


class AlignedIO:
    """Reads and writes on one descriptor, bouncing what the alignment does not allow.

    ``keep_size`` makes a read-modify-write that had to extend a regular file
    past its end (to write a whole last block) cut it back, so an unaligned
    write never grows a file by more than the caller wrote.  ``read_at`` and
    ``write_at`` replace the positional system calls for a device reached
    another way (the sg driver sends READ and WRITE commands); they get
    aligned requests only.
    """

    def __init__(
        self,
        fd: int,
        alignment: Alignment,
        keep_size: bool = False,
        *,
        read_at: ReadAt | None = None,
        write_at: WriteAt | None = None,
    ) -> None:
        self.fd = fd
        self.alignment = alignment
        self._keep_size = keep_size
        self._lock = _SharedExclusiveLock()
        self._read_at: ReadAt = read_at or functools.partial(read_full, fd)
        self._write_at: WriteAt = write_at or functools.partial(write_full, fd)

    def _memory_aligned(self, views: Sequence[memoryview]) -> bool:
        mem, req = self.alignment.memory, self.alignment.request
        if mem == 1 and req == 1:
            return True
        for view in views:
            if view.nbytes % req:
                return False
            if mem > 1 and buffer_address(view) % mem:
                return False
        return True

    def _bounds(self, offset: int, length: int) -> tuple[int, int]:
        req = self.alignment.request
        return offset - offset % req, -(-(offset + length) // req) * req

    def read(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Fill ``buffers`` from ``offset``; return the count (short only at end of file)."""
        views = as_byte_views(buffers)
        length = sum(v.nbytes for v in views)
        if not length:
            return 0
        start, end = self._bounds(offset, length)
        if start == offset and end == offset + length and self._memory_aligned(views):
            return self._read_at(offset, views)
        whole = aligned_buffer(end - start)
        got = self._read_at(start, [whole])
        head = offset - start
        count = max(0, min(got - head, length))
        _scatter(whole[head : head + count], views)
        return count

    def write(self, offset: int, buffers: Sequence[Buffer], flags: int = 0) -> int:
        """Write all of ``buffers`` at ``offset``; return the count written."""
        views = as_byte_views(buffers)
        length = sum(v.nbytes for v in views)
        if not length:
            return 0
        start, end = self._bounds(offset, length)
        if start == offset and end == offset + length:
            with self._lock.shared():
                if self._memory_aligned(views):
                    return self._write_at(offset, views, flags)
                whole = aligned_buffer(length)
                _gather(views, whole)
                return self._write_at(offset, [whole], flags)
        with self._lock.exclusive():
            return self._read_modify_write(offset, length, start, end, views, flags)

    def _read_modify_write(
        self,
        offset: int,
        length: int,
        start: int,
        end: int,
        views: Sequence[memoryview],
        flags: int,
    ) -> int:
        req = self.alignment.request
        size_before = os.fstat(self.fd).st_size if self._keep_size else 0
        whole = aligned_buffer(end - start)
        if offset != start:
            self._read_at(start, [whole[:req]])
        if offset + length != end and (end - req > start or offset == start):
            self._read_at(end - req, [whole[end - req - start :]])
        _gather(views, whole[offset - start : offset - start + length])
        self._write_at(start, [whole], flags)
        if self._keep_size and end > size_before:
            os.ftruncate(self.fd, max(size_before, offset + length))
        return length
