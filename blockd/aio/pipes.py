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

The pool is bounded (pipes cost two descriptors each); when it is empty, or a
read is bigger than a pipe, the caller uses the copying path.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable

__all__ = ["MIN_SPLICE", "Pipe", "PipePool"]

log = logging.getLogger(__name__)

MIN_SPLICE = 64 * 1024  # below this a copy is cheaper than two splices
PIPE_BYTES = 1 << 20  # capacity asked for each pipe (Linux's default pipe-max-size)
MAX_PIPES = 64
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

        An empty pipe always has room.  After a short splice it usually has,
        but an unaligned range that ended early can leave the pipe a slot short:
        that read fails with EIO (the backing shrank under a running node).
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


class PipePool:
    """At most ``limit`` pipes, made on first need and reused; loop thread only."""

    def __init__(self, limit: int = MAX_PIPES, capacity: int = PIPE_BYTES) -> None:
        self._limit = limit
        self._capacity = capacity
        self._free: list[Pipe] = []
        self._count = 0
        self._broken = limit <= 0

    def get(self, offset: int, length: int) -> Pipe | None:
        """An empty pipe that takes ``length`` bytes from ``offset``, or None (copy instead).

        A pipe holds one page (or part of one) per slot, so an unaligned read
        needs a slot more than its length suggests.
        """
        if self._broken or _slots(offset, length) > self._capacity // PAGE:
            return None
        if self._free:
            return self._free.pop()
        if self._count >= self._limit:
            return None
        try:
            pipe = Pipe(self._capacity)
        except OSError as exc:  # out of descriptors: copy instead
            log.info("no pipe for a spliced read: %s", exc)
            return None
        if pipe.capacity < self._capacity:
            pipe.close()
            self._broken = True  # the system will not give us big pipes: stop trying
            return None
        self._count += 1
        return pipe

    def put(self, pipe: Pipe) -> None:
        """Take a pipe back; one that still holds data is emptied first."""
        if pipe.held:
            pipe.discard()
        self._free.append(pipe)

    def close(self) -> None:
        for pipe in self._free:
            pipe.close()
        self._free.clear()
