"""Busy-polling one NBD client on the loop thread instead of sleeping in epoll.

Why, and how the windows adapt, is in :mod:`blockd.aio.polling`.  With nothing in
flight the client's socket is read in a loop for its next request; with a single
request in flight io_uring is reaped in a loop for its completion.  Each has its
own adaptive window, and one client is served this way for at most
``POLL_SLICE_NS`` before the loop runs anything else.

Only a client whose requests come one at a time is polled for its next one.  A
client that keeps many in flight sends them in batches; sleeping in epoll costs
one wake-up per batch, shared by all its requests, so spinning between batches
buys little and costs a CPU the client could use.

No client is polled while tasks wait for a CPU
(:class:`blockd.aio.polling.CpuPressure`): the spin would take the CPU the client
needs, and the loop sleeps in epoll as with polling off.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Protocol

from blockd.aio.polling import AdaptivePoll

if TYPE_CHECKING:
    from blockd.aio.uring import UringIo

__all__ = ["POLL_BUFFER", "POLL_SLICE_NS", "PollHost", "Polled", "Poller"]

POLL_BUFFER = 256 * 1024  # what one poll reads from the socket at most
POLL_SLICE_NS = 1_000_000  # polling serves one client at most this long before the loop runs

_monotonic_ns = time.monotonic_ns


class PollHost(Protocol):
    """What the server shares among its clients' pollers: counters, a buffer, the ring."""

    poll_hits: int  # requests (or completions) polling caught
    poll_ns_total: int  # time spent polling

    def poll_buffer(self) -> bytearray:
        """Where a poll reads into; shared, since what it reads is copied at once."""
        ...

    def uring(self) -> UringIo | None:
        """The daemon's io_uring, if it has one."""
        ...

    def cpus_contended(self, now_ns: int) -> bool:
        """Whether tasks wait for a CPU (then nobody is polled)."""
        ...


class Polled(Protocol):
    """The connection being polled for."""

    in_flight: int
    batch: int  # requests the last batch of input held
    stopping: bool  # no more requests will be read
    reading_paused: bool

    def process(self, data: bytes) -> None:
        """Handle input as ``data_received`` would (without polling afterwards)."""
        ...

    def flush(self) -> None:
        """Send the replies queued so far."""
        ...


class Poller:
    """The polling of one client; :meth:`run` after each batch of input it handled.

    ``requests`` is the window for the client's next request (``busy`` when
    one arrives, ``idle`` once everything is answered); ``completions`` the
    window for a single request's completion.
    """

    def __init__(self, host: PollHost, client: Polled, max_ns: int) -> None:
        self.enabled = max_ns > 0
        self.requests = AdaptivePoll(max_ns)
        self.completions = AdaptivePoll(max_ns)
        self._host = host
        self._client = client
        self._transport: asyncio.Transport | None = None
        self._sock_fd = -1

    def attach(self, transport: asyncio.Transport, sock_fd: int) -> None:
        self._transport = transport
        self._sock_fd = sock_fd

    def close(self) -> None:
        """The connection is gone (its descriptor number may be reused)."""
        self._sock_fd = -1

    def run(self) -> None:
        """Wait on the CPU for what comes next, for as long as polling keeps catching it."""
        transport = self._transport
        if self._sock_fd < 0 or transport is None:
            return
        client = self._client
        now = _monotonic_ns()
        if self._host.cpus_contended(now):
            return
        stop = now + POLL_SLICE_NS
        while (
            not transport.is_closing() and not client.stopping
            and not client.reading_paused and now < stop
        ):
            if client.in_flight:
                caught = self._completion(now)
            elif client.batch > 1:
                return  # requests come in batches: the loop wakes once per batch anyway
            else:
                caught = self._socket(now)
            if not caught:
                return
            now = _monotonic_ns()

    def _completion(self, now: int) -> bool:
        """Spin on io_uring for the client's single request; True if it completed.

        It is submitted at once and the ring reaped in a loop, so a QD1 write
        is answered without the loop sleeping twice.  A device slower than
        the window (or a request not on the ring) stops being polled after a
        few requests: the wait is measured either way.
        """
        client = self._client
        uring = self._host.uring()
        if client.in_flight > 1 or uring is None:
            return False  # a deeper queue keeps the loop busy anyway: serve it normally
        poll = self.completions
        poll.idle(now)
        if not poll.window_ns:
            return False
        deadline = now + poll.window_ns
        began = now
        uring.submit_now()
        while client.in_flight and now < deadline:
            uring.poll()
            now = _monotonic_ns()
        self._host.poll_ns_total += now - began
        if client.in_flight:
            return False  # the completion will wake the loop
        self._host.poll_hits += 1
        client.flush()  # the reply, now rather than at the end of the turn
        return True

    def _socket(self, now: int) -> bool:
        """Read the client's socket in a loop for its next request; True if it came.

        Data read here is what ``data_received`` would have got, and is
        handled the same way; an end of file or an error is left in the socket
        for the transport to find.
        """
        poll = self.requests
        if not poll.window_ns:
            return False
        host = self._host
        buf = host.poll_buffer()
        deadline = now + poll.window_ns
        began = now
        while True:
            try:
                count = os.readv(self._sock_fd, [buf])
            except BlockingIOError:
                now = _monotonic_ns()
                if now < deadline:
                    continue
                host.poll_ns_total += now - began
                return False  # the client is slower than the window: sleep in epoll
            except OSError:
                return False
            break
        now = _monotonic_ns()
        host.poll_ns_total += now - began
        if not count:
            return False
        host.poll_hits += 1
        poll.busy(now)
        self._client.process(bytes(buf[:count]))
        return True
