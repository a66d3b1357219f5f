"""I/O accounting for a device: what ``query-blockstats`` and the metrics report.

This is blockd's counterpart of QEMU's ``BlockAcctStats`` (block/accounting.c),
with the same rules, so that numbers read through QMP mean what they mean in
QEMU:

* ``start`` stamps a request and counts it as in flight; it ends with exactly
  one of ``done`` (success) or ``failed`` (completed with an error).
  A request rejected before submission never starts: it is reported with
  ``invalid``.
* A success adds its bytes, one operation and its latency (``*_total_time_ns``).
* A failure increments ``failed_*`` only.  Its latency goes into
  ``*_total_time_ns``, the idle-time clock and the timed statistics only when
  ``account_failed`` is set.
* An invalid request increments ``invalid_*`` and restarts the idle-time clock
  only when ``account_invalid`` is set.  It never has a latency.
* Every completed request, failed or not, whatever the ``account_*`` flags,
  lands in the latency histogram of its kind (if that kind has one).
* Besides the histograms QMP sets (``block-latency-histogram-set``), every kind
  always keeps a *default* latency histogram with fixed boundaries
  (:data:`DEFAULT_LATENCY_BOUNDARIES_NS`, 50 µs to 10 s) for the Prometheus
  metrics.  QMP never shows it, so ``query-blockstats`` still has no histogram
  member until one is set, as in QEMU.  Its bins are closed on the right (a
  latency equal to a boundary counts in the bin that ends there), which is
  Prometheus' ``le`` rule; QMP's histograms keep QEMU's half-open bins.
* ``idle_time_ns`` is the time since the last accounted request and is absent
  until there has been one.

Time comes from an injectable clock returning integer nanoseconds (a monotonic
clock by default), so tests can drive it exactly.

Successes are counted late, in batches.  A success appends its start, its end
and its size to a short log of its kind; the log is folded into the counters
when it fills (:data:`_FOLD_AT`) and before anything reads or reconfigures them.
The fold runs its per-request work in C (slices, ``map``, ``sum``, a sort and a
few bisects), which costs a fifth of updating every counter in Python per
request, and gives exactly the same numbers: every reader sees the log folded.

The object is not thread-safe: the device layer updates it from the event loop
only.  Readers outside that loop (the Prometheus collector) take a
:class:`StatsSnapshot`, an immutable copy, and never look at live objects.
"""

from __future__ import annotations

import enum
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import sub
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_LATENCY_BOUNDARIES_NS",
    "FOLD_AT",
    "AcctCookie",
    "BlockAcctStats",
    "IoKind",
    "KindStats",
    "LatencyHistogram",
    "StatsSnapshot",
    "TimedStats",
]

_NS_PER_SECOND = 1_000_000_000
_UINT64_MAX = 2**64 - 1

#: Boundaries (ns) of the default latency histograms every device keeps for the
#: metrics: 50 µs to 10 s in 1-2.5-5 steps.
DEFAULT_LATENCY_BOUNDARIES_NS: tuple[int, ...] = (
    50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000,
    10_000_000, 25_000_000, 50_000_000,
    100_000_000, 250_000_000, 500_000_000,
    1_000_000_000, 2_500_000_000, 5_000_000_000,
    10_000_000_000,
)  # fmt: skip


class IoKind(enum.Enum):
    """The kinds of request that are accounted separately (QEMU's BlockAcctType).

    The values are the prefixes QMP uses in member names (``rd_bytes``,
    ``flush_operations``, ``unmap_merged``).
    """

    READ = "rd"
    WRITE = "wr"
    FLUSH = "flush"
    UNMAP = "unmap"

    # Members are singletons compared by identity, so the identity hash is
    # consistent with equality; it avoids Enum's Python-level __hash__ on the
    # per-request dictionary lookups.
    __hash__ = object.__hash__


_FIRST_BOUNDARY_NS = DEFAULT_LATENCY_BOUNDARIES_NS[0]

#: Kinds that may carry a latency histogram and appear in timed statistics.
_TIMED_KINDS = (IoKind.READ, IoKind.WRITE, IoKind.FLUSH)

#: Log entries (three per success) after which a kind's log is folded into its
#: counters: the fold's fixed cost spread over 256 requests, the log at most a few KiB.
#: Public as FOLD_AT for callers that append to a :meth:`BlockAcctStats.success_log`.
FOLD_AT = _FOLD_AT = 3 * 256


@dataclass(slots=True)
class AcctCookie:
    """A started request, returned by :meth:`BlockAcctStats.start`.

    Hand it back to ``done`` or ``failed`` when the request completes.  Only the
    first completion counts; completing the same cookie again does nothing
    (as in QEMU, which clears the cookie's type once it is accounted).
    """

    kind: IoKind
    nbytes: int
    start_ns: int
    completed: bool = field(default=False, init=False, compare=False)


class LatencyHistogram(NamedTuple):
    """A copy of a latency histogram (QMP ``BlockLatencyHistogramInfo``).

    ``boundaries`` are in nanoseconds, strictly ascending and positive.
    ``bins`` has one more element than ``boundaries``: bin ``i`` counts the
    latencies in ``[boundaries[i-1], boundaries[i])``, the first bin starting
    at 0 and the last one open towards +infinity.
    """

    boundaries: tuple[int, ...]
    bins: tuple[int, ...]

    def to_qmp(self) -> dict[str, object]:
        """The QMP ``BlockLatencyHistogramInfo`` object."""
        return {"boundaries": list(self.boundaries), "bins": list(self.bins)}


class KindStats(NamedTuple):
    """Every counter of one kind of request, copied at snapshot time.

    A named tuple, not a frozen dataclass: a scrape of 1,000 devices makes
    4,000 of these, and a tuple is built several times faster.
    """

    nbytes: int
    """Bytes of successful requests."""
    operations: int
    """Successful requests."""
    total_time_ns: int
    """Summed latency of successful requests (and failed ones if account_failed)."""
    failed: int
    """Requests that completed with an error."""
    invalid: int
    """Requests rejected before submission."""
    merged: int
    """Requests merged into others."""
    in_flight: int
    """Requests started and not yet completed."""
    histogram: LatencyHistogram | None
    """The latency histogram, if one is set for this kind."""
    default_histogram: LatencyHistogram | None = None
    """The always-on histogram over :data:`DEFAULT_LATENCY_BOUNDARIES_NS` (never in QMP).

    Its bins are closed on the right: bin ``i`` counts latencies in
    ``(boundaries[i-1], boundaries[i]]``.
    """


@dataclass(frozen=True, slots=True)
class TimedStats:
    """Latency statistics over one configured interval (QMP ``BlockDeviceTimedStats``).

    Latencies are in nanoseconds; every value is 0 when no accounted request of
    that kind completed in the window being reported.  The queue depths are the
    summed latency of the window divided by the time the window has covered,
    i.e. the average number of requests of that kind that were being served.
    """

    interval_length: int
    min_rd_latency_ns: int
    max_rd_latency_ns: int
    avg_rd_latency_ns: int
    min_wr_latency_ns: int
    max_wr_latency_ns: int
    avg_wr_latency_ns: int
    min_flush_latency_ns: int
    max_flush_latency_ns: int
    avg_flush_latency_ns: int
    avg_rd_queue_depth: float
    avg_wr_queue_depth: float

    def to_qmp(self) -> dict[str, object]:
        """The QMP ``BlockDeviceTimedStats`` object, members in schema order."""
        return {
            "interval_length": self.interval_length,
            "min_rd_latency_ns": self.min_rd_latency_ns,
            "max_rd_latency_ns": self.max_rd_latency_ns,
            "avg_rd_latency_ns": self.avg_rd_latency_ns,
            "min_wr_latency_ns": self.min_wr_latency_ns,
            "max_wr_latency_ns": self.max_wr_latency_ns,
            "avg_wr_latency_ns": self.avg_wr_latency_ns,
            "min_flush_latency_ns": self.min_flush_latency_ns,
            "max_flush_latency_ns": self.max_flush_latency_ns,
            "avg_flush_latency_ns": self.avg_flush_latency_ns,
            "avg_rd_queue_depth": self.avg_rd_queue_depth,
            "avg_wr_queue_depth": self.avg_wr_queue_depth,
        }


class StatsSnapshot(NamedTuple):
    """An immutable copy of every counter of a :class:`BlockAcctStats`.

    This is what the metrics layer reads.  :meth:`to_qmp` renders it as QMP's
    ``BlockDeviceStats``.
    """

    taken_ns: int
    """Clock reading at which the snapshot was taken."""
    read: KindStats
    write: KindStats
    flush: KindStats
    unmap: KindStats
    in_flight: int
    """Requests of all kinds started and not yet completed."""
    idle_ns: int | None
    """Nanoseconds since the last accounted request; None if there was none yet."""
    account_invalid: bool
    account_failed: bool
    timed: tuple[TimedStats, ...]
    """One entry per configured interval, in configuration order."""

    def kind(self, kind: IoKind) -> KindStats:
        """The counters of one kind of request."""
        if kind is IoKind.READ:
            return self.read
        if kind is IoKind.WRITE:
            return self.write
        if kind is IoKind.FLUSH:
            return self.flush
        return self.unmap

    @property
    def histograms(self) -> dict[IoKind, LatencyHistogram]:
        """The latency histograms that are set, by kind."""
        return {
            kind: hist for kind in _TIMED_KINDS if (hist := self.kind(kind).histogram) is not None
        }

    def to_qmp(self, *, wr_highest_offset: int = 0) -> dict[str, object]:
        """QMP ``BlockDeviceStats``: every member, in the schema's order.

        ``idle_time_ns`` is present only once a request has been accounted; the
        histogram members only for the kinds that have a histogram set.
        ``wr_highest_offset`` belongs to the node, not to the accounting, so
        the caller supplies it.
        """
        rd, wr, fl, un = self.read, self.write, self.flush, self.unmap
        out: dict[str, object] = {
            "rd_bytes": rd.nbytes,
            "wr_bytes": wr.nbytes,
            "unmap_bytes": un.nbytes,
            "rd_operations": rd.operations,
            "wr_operations": wr.operations,
            "flush_operations": fl.operations,
            "unmap_operations": un.operations,
            "rd_total_time_ns": rd.total_time_ns,
            "wr_total_time_ns": wr.total_time_ns,
            "flush_total_time_ns": fl.total_time_ns,
            "unmap_total_time_ns": un.total_time_ns,
            "wr_highest_offset": wr_highest_offset,
            "rd_merged": rd.merged,
            "wr_merged": wr.merged,
            "unmap_merged": un.merged,
        }
        if self.idle_ns is not None:
            out["idle_time_ns"] = self.idle_ns
        out.update(
            {
                "failed_rd_operations": rd.failed,
                "failed_wr_operations": wr.failed,
                "failed_flush_operations": fl.failed,
                "failed_unmap_operations": un.failed,
                "invalid_rd_operations": rd.invalid,
                "invalid_wr_operations": wr.invalid,
                "invalid_flush_operations": fl.invalid,
                "invalid_unmap_operations": un.invalid,
                "account_invalid": self.account_invalid,
                "account_failed": self.account_failed,
                "timed_stats": [t.to_qmp() for t in self.timed],
            }
        )
        for kind, stats in ((IoKind.READ, rd), (IoKind.WRITE, wr), (IoKind.FLUSH, fl)):
            if stats.histogram is not None:
                out[f"{kind.value}_latency_histogram"] = stats.histogram.to_qmp()
        return out


# --------------------------------------------------------------------------
# Timed averages


class _Window:
    """Latency sum, count, minimum and maximum collected until ``expiration``."""

    __slots__ = ("count", "expiration", "high", "low", "total")

    def __init__(self, expiration: int) -> None:
        self.expiration = expiration
        self.total = 0
        self.count = 0
        self.low = _UINT64_MAX
        self.high = 0

    def reset(self) -> None:
        self.total = 0
        self.count = 0
        self.low = _UINT64_MAX
        self.high = 0


class _TimedAverage:
    """Minimum, maximum, average and sum of latencies over a sliding window.

    Theory of operation (the scheme of QEMU's util/timed-average.c).  Keeping
    every sample of the last N seconds would cost memory and time per request,
    so only two running aggregates ("windows") are kept.  Each window lasts
    ``period`` nanoseconds, then is emptied and starts over; the two are
    staggered by half a period, so one of them always restarts halfway through
    the other's life.  Every sample is added to both.  A reader is answered
    from the *older* window, the one that will expire first: it has been
    collecting for at least half a period and less than a whole one, so its
    figures describe the last ``period/2`` to ``period`` nanoseconds.

    To make that range centre on the requested interval ``I``, the period is
    ``4/3 * I``: the reported data then cover between ``2/3 I`` and ``4/3 I``,
    ``I`` on average.  For a 60-second interval the windows last 80 seconds
    and restart 40 seconds apart.

    Windows expire lazily, on the next sample or read.  An expired window is
    emptied and its next expiration is put back on its original grid
    (``start + k * period``), however many periods went by unobserved, so the
    two windows stay exactly half a period apart.

    ``elapsed`` is how long the reported window has been collecting; queue
    depth = ``sum / elapsed``.
    """

    __slots__ = ("_next_expiry", "period", "w0", "w1")

    def __init__(self, interval_ns: int, now: int) -> None:
        self.period = interval_ns * 4 // 3
        self.w0 = _Window(now + self.period // 2)
        self.w1 = _Window(now + self.period)
        self._next_expiry = self.w0.expiration

    def _expire(self, now: int) -> None:
        period = self.period
        for w in (self.w0, self.w1):
            if w.expiration <= now:
                w.reset()
                w.expiration = now + period - (now - w.expiration) % period
        self._next_expiry = min(self.w0.expiration, self.w1.expiration)

    def account(self, now: int, value: int) -> None:
        """Add one latency sample observed at ``now``."""
        if now >= self._next_expiry:
            self._expire(now)
        for w in (self.w0, self.w1):
            w.total += value
            w.count += 1
            if value < w.low:
                w.low = value
            if value > w.high:
                w.high = value

    def current(self, now: int) -> tuple[_Window, int]:
        """The window to report at ``now`` and how long it has been collecting."""
        if now >= self._next_expiry:
            self._expire(now)
        w = self.w0 if self.w0.expiration < self.w1.expiration else self.w1
        return w, self.period - (w.expiration - now)


class _Interval:
    """The timed averages of one configured interval, one per timed kind."""

    __slots__ = ("averages", "seconds")

    def __init__(self, seconds: int, now: int) -> None:
        self.seconds = seconds
        interval_ns = seconds * _NS_PER_SECOND
        self.averages = {kind: _TimedAverage(interval_ns, now) for kind in _TIMED_KINDS}

    def report(self, now: int) -> TimedStats:
        rd = self._figures(IoKind.READ, now)
        wr = self._figures(IoKind.WRITE, now)
        fl = self._figures(IoKind.FLUSH, now)
        return TimedStats(
            interval_length=self.seconds,
            min_rd_latency_ns=rd[0],
            max_rd_latency_ns=rd[1],
            avg_rd_latency_ns=rd[2],
            min_wr_latency_ns=wr[0],
            max_wr_latency_ns=wr[1],
            avg_wr_latency_ns=wr[2],
            min_flush_latency_ns=fl[0],
            max_flush_latency_ns=fl[1],
            avg_flush_latency_ns=fl[2],
            avg_rd_queue_depth=rd[3],
            avg_wr_queue_depth=wr[3],
        )

    def _figures(self, kind: IoKind, now: int) -> tuple[int, int, int, float]:
        """(min, max, integer average, queue depth) of ``kind``'s reported window."""
        w, elapsed = self.averages[kind].current(now)
        depth = w.total / elapsed if elapsed > 0 else 0.0
        if not w.count:
            return 0, 0, 0, depth
        return w.low, w.high, w.total // w.count, depth


# --------------------------------------------------------------------------
# Live counters


class _Counters:
    """The live counters of one kind of request.

    There is no live count of successful requests: every completed request,
    successful or failed, lands in exactly one bin of ``default_bins``, so
    ``operations`` is their sum minus ``failed``.  Successes not yet counted wait
    in ``log`` as ``start, end, nbytes`` triples (see the module docstring); every
    counter is exact only after :meth:`BlockAcctStats._fold`.
    """

    __slots__ = (
        "bins",
        "boundaries",
        "default_bins",
        "failed",
        "in_flight",
        "invalid",
        "log",
        "merged",
        "nbytes",
        "timed",
        "total_time_ns",
    )

    def __init__(self) -> None:
        self.nbytes = 0
        self.total_time_ns = 0
        self.failed = 0
        self.invalid = 0
        self.merged = 0
        self.in_flight = 0
        self.boundaries: tuple[int, ...] = ()
        self.bins: list[int] | None = None
        self.default_bins = [0] * (len(DEFAULT_LATENCY_BOUNDARIES_NS) + 1)
        self.timed: tuple[_TimedAverage, ...] = ()
        self.log: list[int] = []

    def histogram(self) -> LatencyHistogram | None:
        if self.bins is None:
            return None
        return LatencyHistogram(self.boundaries, tuple(self.bins))

    @property
    def operations(self) -> int:
        """Successful requests (see the class docstring)."""
        return sum(self.default_bins) - self.failed

    def copy(self) -> KindStats:
        return KindStats(
            nbytes=self.nbytes,
            operations=self.operations,
            total_time_ns=self.total_time_ns,
            failed=self.failed,
            invalid=self.invalid,
            merged=self.merged,
            in_flight=self.in_flight,
            histogram=self.histogram(),
            default_histogram=LatencyHistogram(
                DEFAULT_LATENCY_BOUNDARIES_NS, tuple(self.default_bins)
            ),
        )


def _check_intervals(seconds: Iterable[object]) -> tuple[int, ...]:
    out: list[int] = []
    for s in seconds:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueError(f"Invalid interval length: {s!r}")
        out.append(s)
    return tuple(out)


def _check_boundaries(boundaries: Sequence[object]) -> tuple[int, ...]:
    out: list[int] = []
    prev = 0
    for b in boundaries:
        if isinstance(b, bool) or not isinstance(b, int):
            raise ValueError(f"histogram boundary is not an integer: {b!r}")
        if b <= prev or b > _UINT64_MAX:
            raise ValueError(
                "histogram boundaries must be strictly ascending, positive "
                f"64-bit integers: {list(boundaries)!r}"
            )
        out.append(b)
        prev = b
    return tuple(out)


def _count_into(
    bins: list[int],
    boundaries: tuple[int, ...],
    ordered: list[int],
    bisect: Callable[[list[int], int], int],
) -> None:
    """Add the ascending latencies ``ordered`` to ``bins`` over ``boundaries``.

    With ``bisect_right`` a bin is closed on the right (the default histogram),
    with ``bisect_left`` open on the right (QMP's): the latencies below a
    boundary are those before ``bisect(ordered, boundary)``.
    """
    below = 0
    for i, boundary in enumerate(boundaries):
        upto = bisect(ordered, boundary)
        if upto != below:
            bins[i] += upto - below
            below = upto
        if below == len(ordered):
            return
    bins[len(boundaries)] += len(ordered) - below


class BlockAcctStats:
    """The I/O accounting of one device (QEMU's BlockAcctStats).

    ``clock`` returns integer nanoseconds from an arbitrary origin and must not
    go backwards.  ``account_invalid`` and ``account_failed`` are QEMU's flags
    of the same names (both true for devices, false for node-level entries).
    ``intervals`` are the timed-statistics window lengths in seconds
    (``stats-intervals``), as for :meth:`set_intervals`.

    Raises ValueError for an invalid interval.
    """

    __slots__ = (
        "_account_failed",
        "_account_invalid",
        "_counters",
        "_intervals",
        "_last_access_ns",
        "clock",
    )

    def __init__(
        self,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
        account_invalid: bool = True,
        account_failed: bool = True,
        intervals: Sequence[int] = (),
    ) -> None:
        self.clock = clock  # public: callers of account() time their requests with it
        self._account_invalid = account_invalid
        self._account_failed = account_failed
        self._counters: dict[IoKind, _Counters] = {kind: _Counters() for kind in IoKind}
        self._last_access_ns: int | None = None
        self._intervals: tuple[_Interval, ...] = ()
        self.set_intervals(intervals)

    @property
    def account_invalid(self) -> bool:
        """Whether invalid requests restart the idle-time clock."""
        return self._account_invalid

    @property
    def account_failed(self) -> bool:
        """Whether failed requests count in total time, idle time and timed stats."""
        return self._account_failed

    # -- hot path ----------------------------------------------------------

    def start(self, kind: IoKind, nbytes: int) -> AcctCookie:
        """Stamp a request that is being submitted; it counts as in flight."""
        self._counters[kind].in_flight += 1
        return AcctCookie(kind, nbytes, self.clock())

    def begin(self, kind: IoKind) -> int:
        """:meth:`start` without a cookie, for a route that keeps the start time itself.

        Returns the start time; the request counts as in flight until :meth:`end`
        (or until a cookie made of the same start time is completed).
        """
        self._counters[kind].in_flight += 1
        return self.clock()

    def end(self, kind: IoKind, nbytes: int, start_ns: int) -> None:
        """Account a request started with :meth:`begin` that completed successfully."""
        c = self._counters[kind]
        c.in_flight -= 1
        log = c.log
        log.append(start_ns)  # three appends: cheaper than extending by a tuple
        log.append(self.clock())
        log.append(nbytes)
        if len(log) >= _FOLD_AT:
            self._fold(c)

    def done(self, cookie: AcctCookie) -> None:
        """Account a request that completed successfully."""
        if cookie.completed:
            return
        cookie.completed = True
        self._counters[cookie.kind].in_flight -= 1
        self.account(cookie.kind, cookie.nbytes, cookie.start_ns)

    def account(self, kind: IoKind, nbytes: int, start_ns: int) -> None:
        """Account a request that ran to success synchronously, started at ``start_ns``.

        The same as :meth:`start` then :meth:`done`, without a cookie: the
        loop thread's fast path never has one in flight.  It only logs the
        request; the counters take it at the next fold.
        """
        c = self._counters[kind]
        log = c.log
        log.append(start_ns)  # three appends: cheaper than extending by a tuple
        log.append(self.clock())
        log.append(nbytes)
        if len(log) >= _FOLD_AT:
            self._fold(c)

    def success_log(self, kind: IoKind) -> list[int] | None:
        """The live log of ``kind``'s successes, for a caller on the hot path; None: count none.

        :meth:`account` without the call: the caller appends ``start_ns, end_ns,
        nbytes`` (its own reads of :attr:`clock`) for each request that ran to
        success, then calls :meth:`fold` once the log holds :data:`FOLD_AT`
        entries or more.  The list stays the same object for the life of these
        statistics (folding empties it in place).  :class:`NoAccounting` returns None.
        """
        return self._counters[kind].log

    def kind_counters(self, kind: IoKind) -> _Counters:
        """The live counters of ``kind``, for a hot path that does :meth:`begin` and
        :meth:`end` itself: it adds 1 to ``in_flight`` where it would call ``begin``,
        and takes 1 off it (and logs the success in :meth:`success_log`, if that is
        not None) where it would call ``end``.  The object stays the same for the
        life of these statistics."""
        return self._counters[kind]

    def fold(self, kind: IoKind) -> None:
        """Count what :meth:`success_log` holds for ``kind`` now (it is then empty)."""
        self._fold(self._counters[kind])

    def _fold(self, c: _Counters) -> None:
        """Count the successes logged for one kind, in the order they completed."""
        log = c.log
        if not log:
            return
        ends = log[1::3]
        latencies = list(map(sub, ends, log[0::3]))
        c.nbytes += sum(log[2::3])
        c.total_time_ns += sum(latencies)
        log.clear()
        last = ends[-1]
        if self._last_access_ns is None or last > self._last_access_ns:
            self._last_access_ns = last
        for average in c.timed:
            for now, latency in zip(ends, latencies, strict=True):
                average.account(now, latency)
        if c.bins is None and max(latencies) <= _FIRST_BOUNDARY_NS:
            c.default_bins[0] += len(latencies)  # the usual case: all in the first bin
            return
        latencies.sort()
        _count_into(c.default_bins, DEFAULT_LATENCY_BOUNDARIES_NS, latencies, bisect_right)
        if c.bins is not None:
            _count_into(c.bins, c.boundaries, latencies, bisect_left)

    def _fold_all(self) -> None:
        for c in self._counters.values():
            if c.log:
                self._fold(c)

    def failed(self, cookie: AcctCookie) -> None:
        """Account a request that completed with an error."""
        if cookie.completed:
            return
        cookie.completed = True
        c = self._counters[cookie.kind]
        if c.log:
            self._fold(c)  # the timed statistics take samples in completion order
        now = self.clock()
        latency = now - cookie.start_ns
        c.in_flight -= 1
        c.failed += 1
        c.default_bins[bisect_left(DEFAULT_LATENCY_BOUNDARIES_NS, latency)] += 1
        if c.bins is not None:
            c.bins[bisect_right(c.boundaries, latency)] += 1
        if self._account_failed:
            c.total_time_ns += latency
            self._last_access_ns = now
            for average in c.timed:
                average.account(now, latency)

    def retry(self, cookie: AcctCookie) -> None:
        """Take back a request whose error paused its device: it will be tried again.

        QEMU does not count such an attempt at all (a request that stopped the
        VM and later succeeds is not a failure), so only the in-flight count moves.
        """
        if cookie.completed:
            return
        cookie.completed = True
        self._counters[cookie.kind].in_flight -= 1

    def invalid(self, kind: IoKind) -> None:
        """Account a request rejected before submission (it was never started)."""
        self._counters[kind].invalid += 1
        if self._account_invalid:
            self._last_access_ns = self.clock()

    def merged(self, kind: IoKind, count: int) -> None:
        """Account ``count`` requests merged into others.

        Raises ValueError if ``count`` is negative.
        """
        if count < 0:
            raise ValueError(f"merged request count must not be negative: {count}")
        self._counters[kind].merged += count

    # -- queries -----------------------------------------------------------

    def in_flight(self, kind: IoKind | None = None) -> int:
        """Requests started and not yet completed, of one kind or of all."""
        if kind is not None:
            return self._counters[kind].in_flight
        return sum(c.in_flight for c in self._counters.values())

    def histogram(self, kind: IoKind) -> LatencyHistogram | None:
        """A copy of the latency histogram of ``kind``, or None if none is set."""
        c = self._counters[kind]
        self._fold(c)
        return c.histogram()

    def snapshot(self, *, timed: bool = True) -> StatsSnapshot:
        """An immutable copy of every counter, taken at the current clock reading.

        ``timed=False`` leaves the interval statistics out (the metrics do not
        show them, and a scrape of many devices should not compute them).
        """
        self._fold_all()
        now = self.clock()
        c = self._counters
        last = self._last_access_ns
        return StatsSnapshot(
            taken_ns=now,
            read=c[IoKind.READ].copy(),
            write=c[IoKind.WRITE].copy(),
            flush=c[IoKind.FLUSH].copy(),
            unmap=c[IoKind.UNMAP].copy(),
            in_flight=sum(k.in_flight for k in c.values()),
            idle_ns=None if last is None else now - last,
            account_invalid=self._account_invalid,
            account_failed=self._account_failed,
            timed=tuple(interval.report(now) for interval in self._intervals) if timed else (),
        )

    def to_qmp(self, *, wr_highest_offset: int = 0) -> dict[str, object]:
        """QMP ``BlockDeviceStats`` for this device (see StatsSnapshot.to_qmp)."""
        return self.snapshot().to_qmp(wr_highest_offset=wr_highest_offset)

    # -- configuration -----------------------------------------------------

    def set_intervals(self, seconds: Sequence[int]) -> None:
        """Replace the timed-statistics intervals (lengths in seconds).

        Every interval starts afresh, with empty windows, at the current clock
        reading.  Reported in the given order; duplicates are allowed.
        Raises ValueError, changing nothing, unless every length is a positive
        integer.
        """
        lengths = _check_intervals(seconds)
        self._fold_all()  # what completed before belongs to the old intervals
        now = self.clock() if lengths else 0
        self._intervals = tuple(_Interval(s, now) for s in lengths)
        for kind in _TIMED_KINDS:
            c = self._counters[kind]
            c.timed = tuple(i.averages[kind] for i in self._intervals)

    def set_histogram(self, kind: IoKind, boundaries: Sequence[int] | None) -> None:
        """Set (with all bins zero) or, given None, remove the histogram of ``kind``.

        ``boundaries`` are nanoseconds, strictly ascending and positive; ``[]``
        makes a single bin.  Raises ValueError, leaving the current histogram
        as it was, for invalid boundaries or for ``IoKind.UNMAP`` (only reads,
        writes and flushes have histograms).
        """
        if kind not in _TIMED_KINDS:
            raise ValueError(f"{kind.name} requests have no latency histogram")
        c = self._counters[kind]
        self._fold(c)  # what completed before belongs to the old histogram
        if boundaries is None:
            c.bins = None
            c.boundaries = ()
            return
        checked = _check_boundaries(boundaries)
        c.boundaries = checked
        c.bins = [0] * (len(checked) + 1)


class NoAccounting(BlockAcctStats):
    """Counts nothing.  Only for measuring what accounting costs (``BLOCKD_NO_ACCOUNTING=1``).

    It reads no clock either: a request's clock readings are accounting's cost too.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.clock = int  # int() is 0: a C call, cheaper than any Python function

    def start(self, kind: IoKind, nbytes: int) -> AcctCookie:
        return AcctCookie(kind, nbytes, 0)

    def done(self, cookie: AcctCookie) -> None:
        pass

    def end(self, kind: IoKind, nbytes: int, start_ns: int) -> None:
        self._counters[kind].in_flight -= 1  # begin() counted it

    def account(self, kind: IoKind, nbytes: int, start_ns: int) -> None:
        pass

    def success_log(self, kind: IoKind) -> list[int] | None:
        return None

    def failed(self, cookie: AcctCookie) -> None:
        pass

    def retry(self, cookie: AcctCookie) -> None:
        pass

    def invalid(self, kind: IoKind) -> None:
        pass
