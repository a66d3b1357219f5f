"""Opens that may never return, run where they cannot take the control path down.

Opening a path can block in the kernel for ever: a file on an NFS server that went
away, a FUSE file system whose daemon hangs, a disk that stopped answering.  Such a
thread cannot be interrupted, so an open in the control executor would hold one of
its few threads for good, and a handful of them would block every later control
operation.  Here each open runs in a thread of its own (a daemon thread: a stuck one
never holds the process up at exit), at most ``capacity`` at once, and the caller
waits at most ``timeout`` seconds.  Past it the caller gets an error naming the path
and the timeout; the thread is written off but keeps its slot until it returns, so
stuck opens are bounded too.  An open that finds every slot busy waits for one
(within its timeout: opens that are only slow, under load, just queue); only when
every slot is held by an open whose caller already gave up (stuck storage) is the
next one refused at once.  An open that completes after its caller gave up is
undone in its own thread (``undo``: the driver is closed), so nothing leaks and no
half-made node is ever registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from blockd.errors import BlockdError

__all__ = ["DEFAULT_OPEN_THREADS", "DEFAULT_OPEN_TIMEOUT", "OpenRunner"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_OPEN_TIMEOUT = 30.0
"""Seconds an open may take before its caller gets an error (``open-timeout``)."""
DEFAULT_OPEN_THREADS = 16
"""Opens running at once, stuck ones included (``open-threads``)."""


class _Open(Generic[T]):
    """One open: its thread hands the outcome over unless the caller gave up first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, undo: Callable[[T], None] | None,
                 what: str, finished: Callable[[bool], None]) -> None:
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()
        self.undo = undo
        self.what = what
        self.finished = finished  # on the loop: the slot is free again (abandoned or not)
        self.lock = threading.Lock()
        self.handed_over = False  # the outcome is on its way to the caller
        self.abandoned = False  # the caller gave up: undo what the open made

    def run(self, fn: Callable[..., T], args: tuple[object, ...]) -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        with self.lock:
            abandoned = self.abandoned
            self.handed_over = not abandoned
        if abandoned:
            if error is None and self.undo is not None:
                try:
                    self.undo(result)  # type: ignore[arg-type]
                except Exception as exc:
                    log.warning("undoing the late open of %s: %s", self.what, exc)
            log.warning("the open of %s finished after its caller gave up (%s); undone",
                        self.what, "failed" if error is not None else "succeeded")
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is gone (exit)
            self.loop.call_soon_threadsafe(self._deliver, result, error, abandoned)

    def _deliver(self, result: T | None, error: BaseException | None, abandoned: bool) -> None:
        self.finished(abandoned)
        if abandoned or self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)  # type: ignore[arg-type]

    def give_up(self) -> bool:
        """The caller stops waiting; False if the outcome is already on its way."""
        with self.lock:
            if not self.handed_over:
                self.abandoned = True
            return self.abandoned


class OpenRunner:
    """Runs blocking opens with a timeout, in a bounded number of threads of their own."""

    def __init__(self, timeout: float = DEFAULT_OPEN_TIMEOUT,
                 capacity: int = DEFAULT_OPEN_THREADS) -> None:
        self.timeout = timeout
        self.capacity = capacity
        self.running = 0  # opens whose thread has not returned, stuck ones included
        self.abandoned = 0  # of those, the ones whose caller gave up
        self._free: asyncio.Condition | None = None  # notified when a slot frees
        # Times a limit was hit, by name (blockd-query-limits, blockd_limit_hits_total).
        self.limit_hits: dict[str, int] = {}

    def _hit(self, name: str) -> None:
        self.limit_hits[name] = self.limit_hits.get(name, 0) + 1

    async def run(self, what: str, fn: Callable[..., T], *args: object,
                  undo: Callable[[T], None] | None = None) -> T:
        """``fn(*args)`` in a thread of its own; its result, or its exception.

        ``what`` names what is opened in errors and the log; ``undo(result)``
        undoes a result that came too late (it runs in the open's thread).
        Waits for a free slot within the same ``timeout``.  Raises BlockdError
        (EAGAIN) at once when every slot is held by an open whose caller gave up,
        and BlockdError (ETIMEDOUT) after ``timeout`` seconds.
        """
        if self.abandoned >= self.capacity:
            self._hit("open-threads")
            log.warning("refusing to open %s: %d opens are still running (stuck)",
                        what, self.running)
            raise BlockdError(
                f"Could not open '{what}': {self.running} earlier opens have not "
                f"finished (at most {self.capacity} run at once; they may be stuck on "
                "storage that does not answer)", errno.EAGAIN)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        if self.running >= self.capacity:
            await self._wait_for_slot(what, deadline)
        opening: _Open[T] = _Open(loop, undo, what, self._finished)
        self.running += 1
        threading.Thread(target=opening.run, args=(fn, args), name="blockd-open",
                         daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(opening.future),
                                          max(0.0, deadline - loop.time()))
        except TimeoutError:
            if not opening.give_up():
                return await opening.future  # it finished just now
            self.abandoned += 1
            self._hit("open-timeout")
            log.warning("the open of %s did not finish within %g s; giving up on it",
                        what, self.timeout)
            raise BlockdError(
                f"Could not open '{what}': no answer within {self.timeout:g} s "
                "(open-timeout); the storage may be unreachable", errno.ETIMEDOUT) from None
        except asyncio.CancelledError:
            if opening.give_up():
                self.abandoned += 1
            else:  # the outcome arrives with no one to take it: undo it then
                opening.future.add_done_callback(lambda f: self._undo_late(f, opening))
            raise

    async def _wait_for_slot(self, what: str, deadline: float) -> None:
        """Wait until fewer than ``capacity`` opens run; ETIMEDOUT past ``deadline``."""
        if self._free is None:
            self._free = asyncio.Condition()
        loop = asyncio.get_running_loop()
        self._hit("open-queue")
        async with self._free:
            try:
                await asyncio.wait_for(
                    self._free.wait_for(lambda: self.running < self.capacity),
                    max(0.0, deadline - loop.time()))
            except TimeoutError:
                self._hit("open-timeout")
                raise BlockdError(
                    f"Could not open '{what}': no open slot within {self.timeout:g} s "
                    f"(open-timeout; {self.running} opens running)", errno.ETIMEDOUT) from None

    def _undo_late(self, future: asyncio.Future[T], opening: _Open[T]) -> None:
        if future.cancelled() or future.exception() is not None or opening.undo is None:
            return
        threading.Thread(target=opening.undo, args=(future.result(),), name="blockd-open",
                         daemon=True).start()

    def _finished(self, abandoned: bool) -> None:
        self.running -= 1
        if abandoned:
            self.abandoned -= 1
        if self._free is not None:
            asyncio.get_running_loop().create_task(self._notify(self._free))

    @staticmethod
    async def _notify(free: asyncio.Condition) -> None:
        async with free:
            free.notify_all()

    @property
    def stuck(self) -> int:
        """Opens still running whose caller gave up (each holds a thread and a slot)."""
        return self.abandoned
