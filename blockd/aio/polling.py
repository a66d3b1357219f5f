"""Adaptive busy-polling for a client's next request (QEMU's IOThread poll-max-ns idea).

A client at queue depth 1 sends its next request a few tens of microseconds
after it receives a reply.  If the server sleeps in epoll meanwhile, each
request pays two wake-ups across CPUs; in a VM each one is an inter-processor
interrupt and a VM exit, and they cost more than serving the request.  Polling
the socket for a short while after the last reply keeps the loop awake for the
request that is about to come.

How long to poll adapts per client, as QEMU adapts its IOThreads' polling: a
request that arrived after the window but soon enough that a longer window would
have caught it grows the window (x2, up to ``max_ns``); a wait longer than
``max_ns`` halves it, down to nothing.  A client that pauses, or that keeps
requests in flight, so costs no polling at all; the loop thread polls at most
``max_ns`` for one client before it serves everything else.

The same window bounds how long the server spins on io_uring for the completion
of a client's single request in flight (a QD1 write), for the same reason.

This class only keeps the arithmetic; the server does the polling.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_NS", "AdaptivePoll"]

DEFAULT_MAX_NS = 128_000
START_NS = 8_000  # the first window once waits are seen to be short


class AdaptivePoll:
    """The polling window of one client, in nanoseconds (0: do not poll)."""

    def __init__(self, max_ns: int = DEFAULT_MAX_NS) -> None:
        self.max_ns = max_ns
        self.window_ns = 0
        self._idle_since: int | None = None

    def idle(self, now_ns: int) -> None:
        """The last reply went out and nothing is in flight: the wait starts."""
        self._idle_since = now_ns

    def busy(self, now_ns: int) -> None:
        """A request arrived: learn from how long the client kept us waiting."""
        since, self._idle_since = self._idle_since, None
        if since is None or not self.max_ns:
            return
        waited = now_ns - since
        if waited <= self.window_ns:
            return  # polling caught it
        if waited > self.max_ns:
            self.window_ns //= 2
            if self.window_ns < START_NS:
                self.window_ns = 0
        elif self.window_ns < self.max_ns:
            self.window_ns = min(max(self.window_ns * 2, START_NS), self.max_ns)
