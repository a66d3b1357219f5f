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

Polling also needs a CPU to spare.  When tasks queue for the CPUs, the spinning
loop thread takes time others need (on one machine, with one busy process beside
a QD1 client on 2 vCPUs, polling cut 4 KiB reads from 24k to 17k IOPS).
:class:`CpuPressure` tells when that is so, from the kernel's pressure stall
information: the share of time in which some task waited for a CPU.  A QD1
client and a server that does not poll make some of that themselves, each
woken by the other (about 11 % of the time on a 2-vCPU VM, against 2 % while
polling and about 28 % beside one busy process): the threshold sits above it, or
the reading after a pause, made without polling, would renew the pause for good.

``AdaptivePoll`` only keeps the arithmetic; the server does the polling.
"""

from __future__ import annotations

__all__ = [
    "CHECK_NS",
    "DEFAULT_MAX_NS",
    "PAUSE_NS",
    "STALL_SHARE",
    "AdaptivePoll",
    "CpuPressure",
]

DEFAULT_MAX_NS = 128_000
START_NS = 8_000  # the first window once waits are seen to be short
CHECK_NS = 100_000_000  # how often the CPU pressure is read (shorter windows see bursts)
PAUSE_NS = 200_000_000  # no polling for this long once tasks were seen waiting for a CPU
STALL_SHARE = 0.20  # ... in more than this share of the time since the last reading
# A reading longer than this after the last (polling was not asked for meanwhile) judges
# nothing: the time between is stale, and only starts the next window.
_LONGEST_WINDOW_NS = PAUSE_NS + CHECK_NS


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


class CpuPressure:
    """Whether tasks wait for a CPU (then a spin would steal one), from /proc/pressure/cpu.

    The kernel's ``some`` line counts, in microseconds, the time in which at
    least one task was runnable but had no CPU.  A reading every ``CHECK_NS``
    compares its growth with the time passed; above ``STALL_SHARE`` polling
    pauses for ``PAUSE_NS``, and the reading at the end of the pause judges the
    pause the same way.  A reading long after the last (nobody asked meanwhile)
    only starts a new window.  Without pressure information (a kernel without
    PSI) nothing ever pauses.
    """

    def __init__(self, path: str = "/proc/pressure/cpu") -> None:
        self.path = path
        self.contended = False
        self.pauses = 0  # readings that paused polling
        self._next_ns = 0
        self._last: tuple[int, int] | None = None  # (monotonic ns, stalled µs) read last

    def check(self, now_ns: int) -> bool:
        """True while polling is paused because tasks waited for a CPU."""
        if now_ns < self._next_ns:
            return self.contended
        stalled = self.stalled_us()
        last, self._last = self._last, (None if stalled is None else (now_ns, stalled))
        self.contended = (
            stalled is not None and last is not None
            and 0 < now_ns - last[0] <= _LONGEST_WINDOW_NS  # else: only a new window starts
            and (stalled - last[1]) * 1000 > STALL_SHARE * (now_ns - last[0])
        )
        if self.contended:
            self.pauses += 1
            self._next_ns = now_ns + PAUSE_NS
        else:
            self._next_ns = now_ns + CHECK_NS
        return self.contended

    def stalled_us(self) -> int | None:
        """The kernel's total of time some task waited for a CPU, or None without PSI."""
        try:
            with open(self.path, "rb", buffering=0) as f:
                some = f.read(256).split(b"\n", 1)[0]
            return int(some.rsplit(b"total=", 1)[1])
        except (OSError, ValueError, IndexError):
            return None
