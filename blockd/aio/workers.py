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

Stuck calls: a call that blocks for ever (a read from a dead NFS server, a disk
that no longer answers) holds its thread for ever.  While calls wait, the loop
looks every ``STALL_CHECK`` seconds whether a worker took any call since the
last look; if none did, every awake worker is stuck, so the sleeping ones are
woken and, with none asleep, a thread is added for each waiting call, up to
``max_threads``.  Threads beyond the first ``threads`` leave after
``IDLE_EXIT`` seconds without work.  Each device admits a bounded number of
requests (Device.max_in_flight), so one stuck device holds at most that many
threads and the others' calls still find one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockd.aio.uring import UringIo

__all__ = ["Completion", "ControlExecutor", "IoWorkers"]

Completion = Callable[[Any, BaseException | None], None]
_Call = tuple[Callable[..., Any], tuple[Any, ...], Completion]

# Queued calls per awake worker before another worker is woken.
BACKLOG_PER_WORKER = 4
MAX_THREADS = 256  # threads at most, stuck ones included
STALL_CHECK = 0.01  # seconds between looks at a queue no worker takes from
IDLE_EXIT = 30.0  # seconds an added thread waits for work before it leaves


class IoWorkers:
    """A fixed set of threads running blocking calls for one event loop."""

    def __init__(self, threads: int = 4, name: str = "blockd-io",
                 max_threads: int = MAX_THREADS) -> None:
        self._threads_wanted = threads
        self.max_threads = max(threads, max_threads)
        self._taken = 0  # calls taken by workers (only compared, so lost updates are harmless)
        self._stall_check: asyncio.TimerHandle | None = None
        self._started = 0  # threads ever started (for their names)
        self.threads_added = 0  # threads started because the others were stuck
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
        if self._stall_check is None:
            assert self._loop is not None
            self._stall_check = self._loop.call_later(STALL_CHECK, self._check_stall,
                                                      self._taken)

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for _ in range(self._threads_wanted):
            self._add_thread()

    def _add_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self._name}-{self._started}",
                                  daemon=True)  # a stuck one must not keep the process alive
        self._started += 1
        with self._cond:
            self._awake += 1
            self._threads.append(thread)
        thread.start()

    def _check_stall(self, taken: int) -> None:
        """Calls wait: if no worker took one since the last look, add workers (see above)."""
        self._stall_check = None
        if not self._pending or self._closing:
            return
        if self._taken == taken:
            with self._cond:
                sleeping = self._sleeping
                if sleeping:
                    self._cond.notify_all()
                room = self.max_threads - len(self._threads)
            if not sleeping and room > 0:
                for _ in range(min(room, len(self._pending))):
                    self._add_thread()
                    self.threads_added += 1
        assert self._loop is not None
        self._stall_check = self._loop.call_later(STALL_CHECK, self._check_stall, self._taken)

    @property
    def thread_count(self) -> int:
        """Threads running now, stuck ones included."""
        return len(self._threads)

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
                        self._threads.remove(threading.current_thread())
                        return
                    if not pending:
                        self._awake -= 1
                        self._sleeping += 1
                        woken = self._cond.wait(IDLE_EXIT)
                        self._sleeping -= 1
                        if (not woken and not pending and not self._closing
                                and len(self._threads) > self._threads_wanted):
                            self._threads.remove(threading.current_thread())
                            return  # an added thread, idle for long: not needed any more
                        self._awake += 1
                continue
            self._taken += 1
            try:
                finished.append((done, fn(*args), None))
            except BaseException as exc:  # delivered to the completion, never lost
                finished.append((done, None, exc))
            if not self._wake_scheduled:
                self._wake_scheduled = True
                try:
                    loop.call_soon_threadsafe(self._complete)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    with self._cond:
                        self._awake -= 1
                        self._threads.remove(threading.current_thread())
                    return

    def _complete(self) -> None:
        self._wake_scheduled = False
        finished = self._finished
        while finished:
            done, result, exc = finished.popleft()
            done(result, exc)

    def close(self, timeout: float | None = None) -> int:
        """Let the workers finish what is queued, then stop them.

        Waits for them, for at most ``timeout`` seconds (None: as long as it takes);
        returns how many are still running then (stuck in a call: left behind, they
        are daemon threads and do not hold the process up).
        """
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cond:
            return len(self._threads)


class ControlExecutor(concurrent.futures.Executor):
    """A small pool of daemon threads for control calls (close, tray, ioctls).

    Like ``ThreadPoolExecutor``, except that its threads are daemon threads: the
    interpreter joins every ThreadPoolExecutor thread at exit, so one stuck in the
    kernel (a close on a dead NFS mount, an ioctl to a drive that hangs) would keep
    the daemon from ever exiting, whatever the shutdown bound says.
    """

    def __init__(self, threads: int, name: str = "blockd-ctl") -> None:
        self._max = threads
        self._name = name
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any],
                                             Callable[..., Any], tuple[Any, ...],
                                             dict[str, Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._busy = 0  # threads inside a call
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, fn, args, kwargs))
            if (self._busy + self._queue.qsize() > len(self._threads)
                    and len(self._threads) < self._max):
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}_{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            with self._lock:
                self._busy += 1
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
            with self._lock:
                self._busy -= 1

    @property
    def busy(self) -> int:
        """Threads inside a call now (stuck ones included)."""
        with self._lock:
            return self._busy

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
