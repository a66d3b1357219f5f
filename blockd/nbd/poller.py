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

Polling only pays while the client has a CPU of its own.  When the machine is
busy, the spinning loop thread takes the CPU the client needs to send its next
request, and a QD1 client then runs at half the rate it gets with no polling at
all.  The spin notices this from inside: between two of its iterations the clock
jumps (the scheduler ran someone else on this CPU).  A jump over
``PREEMPTED_NS`` ends the spin and pauses all polling of this client for
``CONTENDED_HOLD_NS``; the loop sleeps in epoll meanwhile, as with polling off.
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
PREEMPTED_NS = 50_000  # a gap this long between two spins means the CPU went to someone else
CONTENDED_HOLD_NS = 20_000_000  # then no polling of that client for this long

_monotonic_ns = time.monotonic_ns


class PollHost(Protocol):
    """What the server shares among its clients' pollers: counters, a buffer, the ring."""

    poll_hits: int  # requests (or completions) polling caught
    poll_ns_total: int  # time spent polling
    poll_preempted: int  # spins ended because the loop thread lost its CPU

    def poll_buffer(self) -> bytearray:
        """Where a poll reads into; shared, since what it reads is copied at once."""
        ...

    def uring(self) -> UringIo | None:
        """The daemon's io_uring, if it has one."""
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
        self._hold_until = 0  # no polling before this (monotonic ns): the CPU is contended

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
        stop = now + POLL_SLICE_NS
        while (
            not transport.is_closing() and not client.stopping
            and not client.reading_paused and now < stop and now >= self._hold_until
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
        began = last = now
        uring.submit_now()
        while client.in_flight and now < deadline:
            uring.poll()
            now = _monotonic_ns()
            if now - last > PREEMPTED_NS:
                self._preempted(now)
                break
            last = now
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
        began = last = now
        while True:
            try:
                count = os.readv(self._sock_fd, [buf])
            except BlockingIOError:
                now = _monotonic_ns()
                if now - last > PREEMPTED_NS:
                    self._preempted(now)
                elif now < deadline:
                    last = now
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

    def _preempted(self, now: int) -> None:
        """The spin lost its CPU: the client needs it more; pause polling it."""
        self._hold_until = now + CONTENDED_HOLD_NS
        self._host.poll_preempted += 1
