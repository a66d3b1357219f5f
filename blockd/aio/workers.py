"""Worker threads for blocking driver calls, with batched hand-off to and from the loop.

Handing each request to a ``ThreadPoolExecutor`` costs a future, a lock and a
wake-up of the event loop per request, which at tens of thousands of requests
per second is most of the time spent.  Here the loop thread appends requests
to a queue and wakes a worker only when none is awake; a worker runs every
queued call and posts the results back in batches, with one loop wake-up per
batch rather than per request.  Completion callbacks always run on the loop
thread, in the order the calls finished.

Theory of operation: ``_pending`` and ``_finished`` are deques (appends and
pops are atomic under the GIL).  ``_wake_scheduled`` is only set by workers
and cleared by the loop *before* it drains ``_finished``, so a result appended
after the drain always schedules a new one.  Idle workers sleep on a
condition; ``_sleeping`` counts them so the loop only notifies when one sleeps,
and both the check and the notification happen under the condition's lock.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockd.aio.uring import UringIo

__all__ = ["Completion", "IoWorkers"]

Completion = Callable[[Any, BaseException | None], None]
_Call = tuple[Callable[..., Any], tuple[Any, ...], Completion]

# Queued calls per awake worker before another worker is woken.
BACKLOG_PER_WORKER = 4


class IoWorkers:
    """A fixed set of threads running blocking calls for one event loop."""

    def __init__(self, threads: int = 4, name: str = "blockd-io") -> None:
        self._threads_wanted = threads
        self._name = name
        self._pending: collections.deque[_Call] = collections.deque()
        self._finished: collections.deque[tuple[Completion, Any, BaseException | None]] = (
            collections.deque()
        )
        self._cond = threading.Condition(threading.Lock())
        self._sleeping = 0
        self._awake = 0  # workers not sleeping (changed under the condition's lock)
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_scheduled = False
        # io_uring for the calls that can use it (set by the daemon once its
        # loop runs); those calls then never reach these threads.
        self.uring: UringIo | None = None

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Completion) -> None:
        """Run ``fn(*args)`` in a worker; ``done(result, exc)`` runs later on the loop thread."""
        if self._loop is None:
            self._start()
        if self._closing:
            raise RuntimeError("I/O workers are closed")
        self._pending.append((fn, args, done))
        # Checked under the lock: a worker that found the queue empty holds the
        # lock until it sleeps, so it cannot miss this notification.  One awake
        # worker drains the queue; another is woken only when the queue grows
        # faster than the awake ones empty it (slow devices), which keeps
        # wake-ups and GIL hand-offs few for fast calls.
        with self._cond:
            if self._sleeping and (
                not self._awake or len(self._pending) > BACKLOG_PER_WORKER * self._awake
            ):
                self._cond.notify()

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for i in range(self._threads_wanted):
            with self._cond:
                self._awake += 1
            thread = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        pending = self._pending
        finished = self._finished
        loop = self._loop
        assert loop is not None
        while True:
            try:
                fn, args, done = pending.popleft()
            except IndexError:
                with self._cond:
                    if self._closing and not pending:
                        self._awake -= 1
                        return
                    if not pending:
                        self._awake -= 1
                        self._sleeping += 1
                        self._cond.wait()
                        self._sleeping -= 1
                        self._awake += 1
                continue
            try:
                finished.append((done, fn(*args), None))
            except BaseException as exc:  # delivered to the completion, never lost
                finished.append((done, None, exc))
            if not self._wake_scheduled:
                self._wake_scheduled = True
                try:
                    loop.call_soon_threadsafe(self._complete)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return

    def _complete(self) -> None:
        self._wake_scheduled = False
        finished = self._finished
        while finished:
            done, result, exc = finished.popleft()
            done(result, exc)

    def close(self) -> None:
        """Let the workers finish what is queued, then stop them (waits for them)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
