"""Blocking file calls submitted from the event loop through io_uring.

Buffered writes to ext4 files and to block devices, and fdatasync, may wait
for a disk, and the kernel refuses RWF_NOWAIT for them.  Handing each one to a
Python worker thread costs wake-ups and GIL hand-offs per request.  With
io_uring the loop thread queues the operation and the kernel performs it (on its
own worker threads when it would block); the loop learns of completions through
an eventfd it watches.  Submissions made during one turn of the loop go to the
kernel in one system call.

Where io_uring cannot be set up (old kernel, seccomp, non-x86_64, or
``BLOCKD_IO_URING=0``) nothing uses this, and requests go to the worker threads.

Stuck requests hold a kernel worker each (the ring raises io-wq's caps, see
``MAX_BOUNDED_WORKERS``), not the others'.  At shutdown a ring that still has
some is given up (:meth:`UringIo.abandon`), not waited for.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any

from blockd.aio._ring import BufferLike, Ring, UringUnavailable

__all__ = ["UringIo"]

log = logging.getLogger(__name__)

Completion = Callable[[int], None]  # the result: a count, or -errno
_MAX_TAG = 1 << 63
_PLAIN: Any = object()  # write()'s ``arg`` when ``done`` takes the result alone


def _plain(done: Completion, result: int) -> None:
    done(result)


class UringIo:
    """One ring per event loop; callbacks run on the loop thread."""

    def __init__(self, ring: Ring, loop: asyncio.AbstractEventLoop) -> None:
        self._ring = ring
        self._loop = loop
        # By tag: (fn, arg), called as fn(arg, result) on completion.
        self._callbacks: dict[int, tuple[Callable[[Any, int], None], Any]] = {}
        self._next = 1
        self._submit_scheduled = False
        self._broken = False
        loop.add_reader(ring.eventfd, self.poll)

    @classmethod
    def create(cls, entries: int = 256) -> UringIo | None:
        """A ring for the running loop, or None where io_uring is not available."""
        try:
            ring = Ring(entries)
        except (UringUnavailable, OSError) as exc:
            log.info("io_uring unavailable (%s); blocking calls use worker threads", exc)
            return None
        return cls(ring, asyncio.get_running_loop())

    def write(self, fd: int, buf: BufferLike, offset: int, rw_flags: int,
              done: Callable[..., None], arg: Any = _PLAIN) -> bool:
        """Queue a write of one buffer; False when the ring is full or broken (use another
        route).  Written out rather than through :meth:`_tag`: this is the per-write hot path.

        The completion calls ``done(result)``, or ``done(arg, result)`` where ``arg`` is
        given: a caller's bound method and the request's state then take the place of a
        closure made for every write.
        """
        if self._broken:
            return False
        tag = self._next
        self._next = tag + 1 if tag < _MAX_TAG else 1
        if not self._ring.prep_write(fd, buf, offset, tag, rw_flags):
            return False
        self._callbacks[tag] = (_plain, done) if arg is _PLAIN else (done, arg)
        if not self._submit_scheduled:
            self._submit_scheduled = True
            self._loop.call_soon(self._submit)
        return True

    def fdatasync(self, fd: int, done: Completion) -> bool:
        """Queue an fdatasync; False when the ring is full or broken."""
        return self._queue(done, lambda tag: self._ring.prep_fsync(fd, tag, datasync=True))

    def splice(self, fd_in: int, off_in: int, pipe_w: int, length: int,
               done: Completion) -> bool:
        """Queue a splice from ``fd_in`` into a pipe; False when the ring is full or broken.

        The kernel's io-wq worker does it (it may wait for the disk): no Python thread.
        """
        return self._queue(
            done, lambda tag: self._ring.prep_splice(fd_in, off_in, pipe_w, length, tag))

    def _queue(self, done: Completion, prep: Callable[[int], bool]) -> bool:
        """Tag ``done``, have ``prep(tag)`` fill an SQE, and submit at the end of the turn;
        False (nothing queued) when the ring is full or broken."""
        if self._broken:
            return False
        tag = self._tag(done)
        if not prep(tag):
            del self._callbacks[tag]
            return False
        self._schedule_submit()
        return True

    def _tag(self, done: Completion) -> int:
        tag = self._next
        self._next = tag + 1 if tag < _MAX_TAG else 1
        self._callbacks[tag] = (_plain, done)
        return tag

    def _schedule_submit(self) -> None:
        if not self._submit_scheduled:
            self._submit_scheduled = True
            self._loop.call_soon(self._submit)

    def _submit(self) -> None:
        self._submit_scheduled = False
        if self._broken:
            return  # broken, given up or closed since this was scheduled
        try:
            self._ring.submit()
        except OSError as exc:
            # Not a transient refusal (those leave requests queued): the ring takes
            # nothing more, and new requests go to threads.  What it had not taken
            # fails now.  What it had taken still runs in the kernel, on buffers and
            # pipes its callers hold, so those wait for their completions as before.
            log.error("io_uring submission failed: %s; using worker threads from now on", exc)
            self._broken = True
            for tag in self._ring.discard_queued():
                fn, arg = self._callbacks.pop(tag)
                fn(arg, -(exc.errno or errno.EIO))
            return
        if self._ring.queued:  # the kernel took only part: try again next turn
            self._schedule_submit()

    def submit_now(self) -> None:
        """Submit what is queued at once instead of at the end of this loop turn."""
        if self._submit_scheduled and not self._broken:
            self._submit()

    def poll(self) -> bool:
        """Run the callbacks of every completion available now; True if there was any.

        Never waits.  Its system call (the eventfd read) is also what lets the
        kernel post completions that finished while this thread ran Python
        (COOP_TASKRUN), so a caller may spin on it for a short while.
        """
        self._ring.drain_eventfd()
        completed = self._ring.reap()
        pop = self._callbacks.pop
        for tag, result in completed:
            entry = pop(tag, None)
            if entry is not None:
                entry[0](entry[1], result)
        return bool(completed)

    def abandon(self) -> None:
        """Stop watching and give the ring up with requests stuck in it (see Ring.abandon)."""
        self._loop.remove_reader(self._ring.eventfd)
        self._broken = True
        self._ring.abandon()

    def close(self) -> None:
        """Stop watching, wait for what is in flight, release the ring."""
        self._loop.remove_reader(self._ring.eventfd)
        self._broken = True
        self._ring.close()
