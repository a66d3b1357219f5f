"""Pipes that carry large reads from the page cache to a socket without copying them.

A large read served the plain way is copied twice by the server: from the page
cache into a Python buffer (``preadv``) and from that buffer into the socket
(``send``).  ``splice(2)`` moves page references instead: file -> pipe puts
references to the cached pages in the pipe, pipe -> socket hands them to the
socket (UNIX and TCP sockets take them without a copy), and only the client
copies the data out.  For 1 MiB reads that halves the server's CPU per byte.

A :class:`Pipe` holds one read at a time.  It is filled where the read may
block (an I/O worker, or the loop thread for memory-backed files, which never
wait) and drained on the loop thread, where both ends are non-blocking.  What
the pipe holds are references to page-cache pages, not a snapshot: a write to
the same range that lands before the client has received the data can show
through, exactly as with ``sendfile(2)``.  NBD gives no ordering between a read
and a write that are in flight together, and a client cannot issue a write that
depends on a read before it has received that read's data, so no client can
tell.

The pool is bounded twice.  Each pipe costs two descriptors, so there are at
most :data:`MAX_PIPES` (fewer under a low descriptor limit: :func:`pool_limit`).
And the kernel charges a pipe's capacity, in pages, to its user (unprivileged
users get ``pipe-user-pages-soft``, 16,384 pages by default, across all their
pipes), so a pipe is sized to its read, a power of two from 64 KiB to 1 MiB,
and all of them together hold at most :data:`PAGE_BUDGET` pages: 64 pipes for
1 MiB reads, 256 for nbdcopy's 256 KiB ones.  A read takes the smallest free
pipe that fits; a new one is made while both bounds allow, after closing free
pipes too small to be of use.  When nothing is left, or a read is bigger than
the biggest pipe, the caller uses the copying path.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable

__all__ = ["MIN_SPLICE", "Pipe", "PipePool"]

log = logging.getLogger(__name__)

MIN_SPLICE = 64 * 1024  # below this a copy is cheaper than two splices
PIPE_BYTES = 1 << 20  # the biggest pipe (Linux's default pipe-max-size), the biggest splice
# As many reads as nbdcopy keeps in flight at most (64 on each of up to 4 connections,
# one per thread: 128 on 2 CPUs).  With 64 pipes about half of its reads found none
# free and were copied: 1.5-1.8x the CPU per MiB of splicing them all.
MAX_PIPES = 256
PAGE_BUDGET = 16384  # pages in all the pool's pipes: Linux's default pipe-user-pages-soft
REFUSED_PAUSE = 1.0  # seconds without new pipes after the kernel refused one its size
PAGE = os.sysconf("SC_PAGE_SIZE")

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_SEND_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# fill() gets the driver's splice_read(offset, length, pipe_fd) -> bytes moved.
SpliceRead = Callable[[int, int, int], int]


def _slots(offset: int, length: int) -> int:
    """Pipe slots a splice of this range from the page cache takes (one per page touched)."""
    first = offset // PAGE
    last = (offset + length - 1) // PAGE
    return last - first + 1


class Pipe:
    """One pipe sized for a whole read; ``held`` bytes are in it."""

    def __init__(self, capacity: int) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.capacity = fcntl.fcntl(self.w, F_SETPIPE_SZ, capacity)
        except OSError:  # over the per-user pipe budget: keep the default size
            self.capacity = fcntl.fcntl(self.w, F_GETPIPE_SZ)
        self.held = 0

    def fill(self, splice_read: SpliceRead, offset: int, length: int) -> int:
        """Put ``length`` bytes from ``offset`` in the pipe; return how many the backing had.

        Runs on an I/O worker unless the backing never blocks.  A backing that
        ends early (it shrank) leaves zeroes for the rest, as a short read does.
        A retried read (error policy ``stop``) first drops what the failed try left.
        """
        if self.held:
            self.discard()
        return self.fill_more(splice_read, offset, length)

    def fill_more(self, splice_read: SpliceRead, offset: int, length: int) -> int:
        """:meth:`fill` on top of what the pipe holds (a short splice by io_uring): the
        rest of a read, ``length`` bytes from ``offset``; the count the backing had."""
        held = self.held
        count = 0
        try:
            while count < length:
                moved = splice_read(offset + count, length - count, self.w)
                if moved == 0:
                    break
                count += moved
        finally:
            self.held = held + count
        if count < length:
            self.add_zeroes(length - count)
        return count

    def add_zeroes(self, length: int) -> None:
        """Append zeroes (for a short or failed-but-ignored read).

        An empty pipe always has room.  After a short splice it may not: a pipe has
        about the slots its read needs (see PipePool), and a splice that ended in
        the middle of a page took a whole slot for part of one, so that read fails
        with EIO (the backing shrank under a running node, to a size that is not a
        whole number of pages).
        """
        zeroes = bytes(min(length, 64 * 1024))
        while length > 0:
            try:
                written = os.write(self.w, zeroes[:length])
            except BlockingIOError:
                raise OSError(errno.EIO, "the backing ended before the node's size") from None
            self.held += written
            length -= written

    def send(self, sock_fd: int) -> None:
        """Move as much as the socket takes now; ``held`` says what is left.

        Raises OSError for a broken connection (not for a full socket).
        """
        while self.held:
            try:
                moved = os.splice(self.r, sock_fd, self.held, flags=_SEND_FLAGS)
            except BlockingIOError:
                return
            if moved == 0:
                return
            self.held -= moved

    def take(self) -> bytearray:
        """Copy out what is left (the socket was full: the transport sends it)."""
        buf = bytearray(self.held)
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            done += os.readv(self.r, [view[done:]])
        self.held = 0
        return buf

    def discard(self) -> None:
        """Drop whatever the pipe holds (reads from a non-blocking end never wait)."""
        chunk = bytearray(64 * 1024)
        while True:
            try:
                if os.readv(self.r, [chunk]) == 0:
                    break
            except BlockingIOError:
                break
        self.held = 0

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


def _pipe_max_size() -> int:
    """The biggest pipe an unprivileged process may ask for (/proc/sys/fs/pipe-max-size)."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return PIPE_BYTES


def pool_limit(fd_limit: int) -> int:
    """How many pipes a daemon with this descriptor limit pools: a sixteenth of it (with
    two descriptors each, an eighth of it), 256 at most; 64 under a soft limit of 1,024."""
    return min(MAX_PIPES, fd_limit // 16)


class PipePool:
    """At most ``limit`` pipes holding at most ``page_budget`` pages, each sized to a
    read (a power of two of pages, up to ``capacity``), made on first need and reused;
    loop thread only."""

    def __init__(self, limit: int = MAX_PIPES, capacity: int = PIPE_BYTES,
                 page_budget: int = PAGE_BUDGET, clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self._limit = limit
        self._budget = page_budget
        self._clock = clock
        self._min_pages = max(1, MIN_SPLICE // PAGE)
        # Any pipe may have its default size (16 pages) whatever pipe-max-size says.
        self._max_pages = min(capacity, max(_pipe_max_size(), 16 * PAGE)) // PAGE
        # Free pipes by size in pages, smallest first (the sizes a read may ask for).
        self._free: dict[int, list[Pipe]] = {}
        size = self._min_pages
        while size < self._max_pages:
            self._free[size] = []
            size *= 2
        self._free[self._max_pages] = []
        self._count = 0
        self._pages = 0  # in every pipe made and not closed
        self._grow_after = 0.0  # no new pipe before then (the kernel refused one)
        self._broken = limit <= 0 or self._max_pages < self._min_pages

    @property
    def limit(self) -> int:
        """The most pipes the pool holds."""
        return self._limit

    @property
    def page_budget(self) -> int:
        """The most pages all its pipes hold together."""
        return self._budget

    @property
    def count(self) -> int:
        """Pipes made and not closed (in use or free)."""
        return self._count

    @property
    def pages(self) -> int:
        """Their capacity in pages, what the kernel charges the daemon's user for."""
        return self._pages

    def get(self, offset: int, length: int) -> Pipe | None:
        """An empty pipe that takes ``length`` bytes from ``offset``, or None (copy instead).

        A pipe holds one page (or part of one) per slot, so an unaligned read
        needs a slot more than its length suggests.
        """
        slots = _slots(offset, length)
        if self._broken or slots > self._max_pages:
            return None
        size = 0  # the smallest size that fits: a new pipe's, if no free one fits
        for pages, free in self._free.items():
            if pages >= slots:
                if free:
                    return free.pop()
                size = size or pages
        if self._clock() < self._grow_after or not self._room_for(size):
            return None
        try:
            pipe = Pipe(size * PAGE)
        except OSError as exc:  # out of descriptors: copy instead
            log.info("no pipe for a spliced read: %s", exc)
            return None
        if pipe.capacity < size * PAGE:
            # The kernel charges pipes to their user, and this user's are over its
            # budget (pipe-user-pages-soft; other processes of the user count too):
            # make do with the pipes there are, and ask again in a while.
            pipe.close()
            self._grow_after = self._clock() + REFUSED_PAUSE
            log.info("a pipe of %d KiB refused; no new pipes for %g s",
                     size * PAGE >> 10, REFUSED_PAUSE)
            return None
        self._count += 1
        self._pages += pipe.capacity // PAGE
        return pipe

    def _room_for(self, size: int) -> bool:
        """Make room for a pipe of ``size`` pages, closing free pipes (all too small for
        the read that asks) if that is enough; False, closing none, if it is not."""
        free_count = sum(len(free) for free in self._free.values())
        free_pages = sum(pages * len(free) for pages, free in self._free.items())
        if (self._count - free_count >= self._limit
                or self._pages - free_pages + size > self._budget):
            return False
        while self._count >= self._limit or self._pages + size > self._budget:
            if not self._close_a_free_pipe():
                return False  # cannot happen (counted above), but never spin
        return True

    def _close_a_free_pipe(self) -> bool:
        """Close one free pipe, the biggest; False if there is none."""
        for free in reversed(self._free.values()):
            if free:
                self._forget(free.pop())
                return True
        return False

    def _forget(self, pipe: Pipe) -> None:
        self._count -= 1
        self._pages -= pipe.capacity // PAGE
        pipe.close()

    def put(self, pipe: Pipe) -> None:
        """Take a pipe back; one that still holds data is emptied first."""
        if pipe.held:
            pipe.discard()
        free = self._free.get(pipe.capacity // PAGE)
        if free is None:  # a size the pool does not ask for (the kernel rounded it)
            self._forget(pipe)
        else:
            free.append(pipe)

    def close(self) -> None:
        for free in self._free.values():
            for pipe in free:
                self._forget(pipe)
            free.clear()
