"""Tests for blockd.block.stats: QEMU's block accounting rules, driven by a fake clock."""

from __future__ import annotations

import pytest

from blockd.block.stats import (
    DEFAULT_LATENCY_BOUNDARIES_NS,
    AcctCookie,
    BlockAcctStats,
    IoKind,
    LatencyHistogram,
    NoAccounting,
    StatsSnapshot,
    TimedStats,
)

S = 1_000_000_000  # one second in ns
T0 = 5_000  # the fake clock's starting point


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        self.now += ns


# The members of QMP BlockDeviceStats (QEMU 7.2) in schema order, without the
# optional ones (idle_time_ns and the three histograms).
REQUIRED_KEYS = [
    "rd_bytes",
    "wr_bytes",
    "unmap_bytes",
    "rd_operations",
    "wr_operations",
    "flush_operations",
    "unmap_operations",
    "rd_total_time_ns",
    "wr_total_time_ns",
    "flush_total_time_ns",
    "unmap_total_time_ns",
    "wr_highest_offset",
    "rd_merged",
    "wr_merged",
    "unmap_merged",
    "failed_rd_operations",
    "failed_wr_operations",
    "failed_flush_operations",
    "failed_unmap_operations",
    "invalid_rd_operations",
    "invalid_wr_operations",
    "invalid_flush_operations",
    "invalid_unmap_operations",
    "account_invalid",
    "account_failed",
    "timed_stats",
]
ALL_KEYS_ORDERED = [
    *REQUIRED_KEYS[:15],
    "idle_time_ns",
    *REQUIRED_KEYS[15:],
    "rd_latency_histogram",
    "wr_latency_histogram",
    "flush_latency_histogram",
]
TIMED_KEYS = [
    "interval_length",
    "min_rd_latency_ns",
    "max_rd_latency_ns",
    "avg_rd_latency_ns",
    "min_wr_latency_ns",
    "max_wr_latency_ns",
    "avg_wr_latency_ns",
    "min_flush_latency_ns",
    "max_flush_latency_ns",
    "avg_flush_latency_ns",
    "avg_rd_queue_depth",
    "avg_wr_queue_depth",
]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stats(clock: FakeClock) -> BlockAcctStats:
    return BlockAcctStats(clock=clock)


def io(
    stats: BlockAcctStats,
    clock: FakeClock,
    kind: IoKind,
    nbytes: int,
    latency: int,
    *,
    ok: bool = True,
) -> None:
    """One request of ``latency`` ns, starting now."""
    cookie = stats.start(kind, nbytes)
    clock.advance(latency)
    if ok:
        stats.done(cookie)
    else:
        stats.failed(cookie)


# -- QMP shape -----------------------------------------------------------------


def test_fresh_stats_are_all_zero_without_idle_time(stats: BlockAcctStats) -> None:
    qmp = stats.to_qmp()
    assert list(qmp) == REQUIRED_KEYS
    expected: dict[str, object] = dict.fromkeys(REQUIRED_KEYS, 0)
    expected.update(account_invalid=True, account_failed=True, timed_stats=[])
    assert qmp == expected


def test_to_qmp_has_every_member_in_schema_order(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_intervals([60])
    for kind in (IoKind.READ, IoKind.WRITE, IoKind.FLUSH):
        stats.set_histogram(kind, [100])
    io(stats, clock, IoKind.READ, 512, 10)
    qmp = stats.to_qmp(wr_highest_offset=4096)
    assert list(qmp) == ALL_KEYS_ORDERED
    assert qmp["wr_highest_offset"] == 4096
    timed = qmp["timed_stats"]
    assert isinstance(timed, list)
    assert list(timed[0]) == TIMED_KEYS


def test_account_flags_reported(clock: FakeClock) -> None:
    qmp = BlockAcctStats(clock=clock, account_invalid=False, account_failed=False).to_qmp()
    assert qmp["account_invalid"] is False
    assert qmp["account_failed"] is False


# -- success, failure, invalid, merged ------------------------------------------


def test_success_adds_bytes_operations_and_time(stats: BlockAcctStats, clock: FakeClock) -> None:
    io(stats, clock, IoKind.READ, 4096, 1_000)
    io(stats, clock, IoKind.READ, 512, 3_000)
    io(stats, clock, IoKind.WRITE, 1024, 7_000)
    io(stats, clock, IoKind.FLUSH, 0, 11_000)
    io(stats, clock, IoKind.UNMAP, 65536, 13_000)
    qmp = stats.to_qmp()
    assert qmp["rd_bytes"] == 4608
    assert qmp["rd_operations"] == 2
    assert qmp["rd_total_time_ns"] == 4_000
    assert qmp["wr_bytes"] == 1024
    assert qmp["wr_operations"] == 1
    assert qmp["wr_total_time_ns"] == 7_000
    assert qmp["flush_operations"] == 1
    assert qmp["flush_total_time_ns"] == 11_000
    assert qmp["unmap_bytes"] == 65536
    assert qmp["unmap_operations"] == 1
    assert qmp["unmap_total_time_ns"] == 13_000
    assert qmp["idle_time_ns"] == 0
    for kind in ("rd", "wr", "flush", "unmap"):
        assert qmp[f"failed_{kind}_operations"] == 0
        assert qmp[f"invalid_{kind}_operations"] == 0


def test_account_is_start_then_done(clock: FakeClock) -> None:
    """The synchronous path's single call leaves exactly what start + done leave."""
    by_cookie, by_account = (BlockAcctStats(clock=clock, intervals=[60]) for _ in range(2))
    for stats in (by_cookie, by_account):
        stats.set_histogram(IoKind.WRITE, [1_000, 5_000])
    for latency, nbytes in ((700, 4096), (2_000, 512), (9_000, 65536)):
        cookie = by_cookie.start(IoKind.WRITE, nbytes)
        start = by_account.clock()
        clock.advance(latency)
        by_cookie.done(cookie)
        by_account.account(IoKind.WRITE, nbytes, start)
    assert by_account.to_qmp() == by_cookie.to_qmp()
    assert by_account.histogram(IoKind.WRITE) == by_cookie.histogram(IoKind.WRITE)
    assert by_account.to_qmp()["wr_operations"] == 3
    assert by_account.in_flight() == 0


@pytest.mark.parametrize("account_failed", [True, False])
def test_failure_counts_only_failed_and_time_if_account_failed(
    clock: FakeClock, account_failed: bool
) -> None:
    stats = BlockAcctStats(clock=clock, account_failed=account_failed)
    io(stats, clock, IoKind.WRITE, 4096, 2_500, ok=False)
    clock.advance(100)
    qmp = stats.to_qmp()
    assert qmp["failed_wr_operations"] == 1
    assert qmp["wr_bytes"] == 0
    assert qmp["wr_operations"] == 0
    if account_failed:
        assert qmp["wr_total_time_ns"] == 2_500
        assert qmp["idle_time_ns"] == 100
    else:
        assert qmp["wr_total_time_ns"] == 0
        assert "idle_time_ns" not in qmp


def test_failure_without_account_failed_keeps_earlier_idle_time(clock: FakeClock) -> None:
    stats = BlockAcctStats(clock=clock, account_failed=False)
    io(stats, clock, IoKind.READ, 512, 1_000)
    io(stats, clock, IoKind.READ, 512, 5_000, ok=False)
    assert stats.to_qmp()["idle_time_ns"] == 5_000
    assert stats.to_qmp()["rd_total_time_ns"] == 1_000


@pytest.mark.parametrize("account_invalid", [True, False])
def test_invalid_counts_and_touches_idle_only_if_account_invalid(
    clock: FakeClock, account_invalid: bool
) -> None:
    stats = BlockAcctStats(clock=clock, account_invalid=account_invalid)
    stats.invalid(IoKind.READ)
    stats.invalid(IoKind.UNMAP)
    stats.invalid(IoKind.UNMAP)
    clock.advance(700)
    qmp = stats.to_qmp()
    assert qmp["invalid_rd_operations"] == 1
    assert qmp["invalid_unmap_operations"] == 2
    assert qmp["invalid_wr_operations"] == 0
    assert qmp["rd_operations"] == 0
    assert qmp["rd_total_time_ns"] == 0
    assert stats.in_flight() == 0
    if account_invalid:
        assert qmp["idle_time_ns"] == 700
    else:
        assert "idle_time_ns" not in qmp


def test_invalid_requests_never_enter_histograms_or_timed_stats(
    stats: BlockAcctStats, clock: FakeClock
) -> None:
    stats.set_histogram(IoKind.READ, [10])
    stats.set_intervals([1])
    stats.invalid(IoKind.READ)
    hist = stats.histogram(IoKind.READ)
    assert hist is not None
    assert hist.bins == (0, 0)
    assert stats.snapshot().timed[0].max_rd_latency_ns == 0


def test_merged(stats: BlockAcctStats) -> None:
    stats.merged(IoKind.READ, 3)
    stats.merged(IoKind.READ, 2)
    stats.merged(IoKind.WRITE, 1)
    stats.merged(IoKind.UNMAP, 4)
    stats.merged(IoKind.FLUSH, 6)  # kept, but QMP has no flush_merged
    qmp = stats.to_qmp()
    assert (qmp["rd_merged"], qmp["wr_merged"], qmp["unmap_merged"]) == (5, 1, 4)
    assert "flush_merged" not in qmp
    assert stats.snapshot().flush.merged == 6
    assert "idle_time_ns" not in qmp  # merging is not an access
    with pytest.raises(ValueError):
        stats.merged(IoKind.READ, -1)


# -- in flight -----------------------------------------------------------------


def test_in_flight_per_kind_and_total(stats: BlockAcctStats, clock: FakeClock) -> None:
    r1 = stats.start(IoKind.READ, 512)
    r2 = stats.start(IoKind.READ, 512)
    w1 = stats.start(IoKind.WRITE, 512)
    f1 = stats.start(IoKind.FLUSH, 0)
    assert stats.in_flight(IoKind.READ) == 2
    assert stats.in_flight(IoKind.WRITE) == 1
    assert stats.in_flight(IoKind.FLUSH) == 1
    assert stats.in_flight(IoKind.UNMAP) == 0
    assert stats.in_flight() == 4
    assert stats.snapshot().in_flight == 4
    stats.done(r1)
    stats.failed(w1)
    assert stats.in_flight(IoKind.READ) == 1
    assert stats.in_flight(IoKind.WRITE) == 0
    assert stats.in_flight() == 2
    stats.done(r2)
    stats.done(f1)
    assert stats.in_flight() == 0
    snap = stats.snapshot()
    assert (snap.read.in_flight, snap.write.in_flight, snap.in_flight) == (0, 0, 0)


def test_cookie_records_kind_bytes_and_start(stats: BlockAcctStats, clock: FakeClock) -> None:
    cookie = stats.start(IoKind.WRITE, 8192)
    assert (cookie.kind, cookie.nbytes, cookie.start_ns) == (IoKind.WRITE, 8192, T0)
    assert isinstance(cookie, AcctCookie)


def test_completing_a_cookie_twice_counts_once(stats: BlockAcctStats, clock: FakeClock) -> None:
    cookie = stats.start(IoKind.READ, 512)
    clock.advance(10)
    stats.done(cookie)
    clock.advance(10)
    stats.done(cookie)
    stats.failed(cookie)
    snap = stats.snapshot()
    assert (snap.read.operations, snap.read.failed, snap.read.nbytes) == (1, 0, 512)
    assert snap.read.total_time_ns == 10
    assert snap.in_flight == 0


# -- idle time -----------------------------------------------------------------


def test_idle_time_absent_then_present(stats: BlockAcctStats, clock: FakeClock) -> None:
    assert "idle_time_ns" not in stats.to_qmp()
    assert stats.snapshot().idle_ns is None
    cookie = stats.start(IoKind.READ, 512)
    clock.advance(1_000)
    assert "idle_time_ns" not in stats.to_qmp()  # starting is not an access
    stats.done(cookie)
    assert stats.to_qmp()["idle_time_ns"] == 0
    clock.advance(2_441_547_399)
    assert stats.to_qmp()["idle_time_ns"] == 2_441_547_399
    assert stats.snapshot().idle_ns == 2_441_547_399


def test_idle_time_present_after_access_at_clock_zero() -> None:
    clock = FakeClock(0)
    stats = BlockAcctStats(clock=clock)
    io(stats, clock, IoKind.FLUSH, 0, 0)
    clock.advance(5)
    assert stats.to_qmp()["idle_time_ns"] == 5


# -- histograms ----------------------------------------------------------------


def test_histogram_bins_are_half_open(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_histogram(IoKind.READ, [10, 20, 30])
    for latency in (0, 9, 10, 19, 20, 29, 30, 10**12):
        io(stats, clock, IoKind.READ, 1, latency)
    assert stats.histogram(IoKind.READ) == LatencyHistogram((10, 20, 30), (2, 2, 2, 2))
    assert stats.to_qmp()["rd_latency_histogram"] == {
        "boundaries": [10, 20, 30],
        "bins": [2, 2, 2, 2],
    }


def test_histogram_edges_one_below_at_and_one_above(
    stats: BlockAcctStats, clock: FakeClock
) -> None:
    stats.set_histogram(IoKind.WRITE, [10_000, 100_000, 1_000_000])
    for latency in (9_999, 10_000, 10_001, 99_999, 100_000, 999_999, 1_000_000):
        io(stats, clock, IoKind.WRITE, 1, latency)
    hist = stats.histogram(IoKind.WRITE)
    assert hist is not None
    assert hist.bins == (1, 3, 2, 1)


def test_histogram_per_kind(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_histogram(IoKind.READ, [100])
    stats.set_histogram(IoKind.FLUSH, [5, 50])
    io(stats, clock, IoKind.READ, 1, 150)
    io(stats, clock, IoKind.FLUSH, 0, 5)
    io(stats, clock, IoKind.WRITE, 1, 5)
    assert stats.histogram(IoKind.READ) == LatencyHistogram((100,), (0, 1))
    assert stats.histogram(IoKind.FLUSH) == LatencyHistogram((5, 50), (0, 1, 0))
    assert stats.histogram(IoKind.WRITE) is None
    qmp = stats.to_qmp()
    assert "rd_latency_histogram" in qmp
    assert "flush_latency_histogram" in qmp
    assert "wr_latency_histogram" not in qmp
    snap = stats.snapshot()
    assert set(snap.histograms) == {IoKind.READ, IoKind.FLUSH}


@pytest.mark.parametrize("account_failed", [True, False])
def test_failed_requests_always_enter_histogram(clock: FakeClock, account_failed: bool) -> None:
    stats = BlockAcctStats(clock=clock, account_failed=account_failed)
    stats.set_histogram(IoKind.READ, [100])
    io(stats, clock, IoKind.READ, 512, 50, ok=False)
    io(stats, clock, IoKind.READ, 512, 500, ok=False)
    assert stats.to_qmp()["rd_latency_histogram"] == {"boundaries": [100], "bins": [1, 1]}


def test_empty_boundaries_make_one_bin(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_histogram(IoKind.FLUSH, [])
    io(stats, clock, IoKind.FLUSH, 0, 0)
    io(stats, clock, IoKind.FLUSH, 0, 10**9)
    assert stats.histogram(IoKind.FLUSH) == LatencyHistogram((), (2,))
    assert stats.to_qmp()["flush_latency_histogram"] == {"boundaries": [], "bins": [2]}


def test_setting_a_histogram_again_zeroes_it(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_histogram(IoKind.READ, [10])
    io(stats, clock, IoKind.READ, 1, 20)
    stats.set_histogram(IoKind.READ, [10])
    assert stats.histogram(IoKind.READ) == LatencyHistogram((10,), (0, 0))
    stats.set_histogram(IoKind.READ, [5, 15, 25])
    assert stats.histogram(IoKind.READ) == LatencyHistogram((5, 15, 25), (0, 0, 0, 0))


def test_removing_a_histogram(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_histogram(IoKind.WRITE, [10])
    io(stats, clock, IoKind.WRITE, 1, 20)
    stats.set_histogram(IoKind.WRITE, None)
    assert stats.histogram(IoKind.WRITE) is None
    assert "wr_latency_histogram" not in stats.to_qmp()
    io(stats, clock, IoKind.WRITE, 1, 20)  # nothing to count into: no error
    stats.set_histogram(IoKind.WRITE, None)  # removing twice is fine
    stats.set_histogram(IoKind.WRITE, [10])
    assert stats.histogram(IoKind.WRITE) == LatencyHistogram((10,), (0, 0))


@pytest.mark.parametrize(
    "boundaries",
    [[0], [0, 10], [-5], [10, 10], [20, 10], [10, 30, 20], [True], [1.5], ["10"], [2**64]],
)
def test_invalid_boundaries_rejected_and_histogram_unchanged(
    stats: BlockAcctStats, clock: FakeClock, boundaries: list[object]
) -> None:
    stats.set_histogram(IoKind.READ, [100])
    io(stats, clock, IoKind.READ, 1, 150)
    with pytest.raises(ValueError):
        stats.set_histogram(IoKind.READ, boundaries)  # type: ignore[arg-type]
    assert stats.histogram(IoKind.READ) == LatencyHistogram((100,), (0, 1))


def test_largest_uint64_boundary_accepted(stats: BlockAcctStats) -> None:
    stats.set_histogram(IoKind.READ, [1, 2**64 - 1])
    assert stats.histogram(IoKind.READ) == LatencyHistogram((1, 2**64 - 1), (0, 0, 0))


def test_unmap_has_no_histogram(stats: BlockAcctStats) -> None:
    with pytest.raises(ValueError):
        stats.set_histogram(IoKind.UNMAP, [10])
    with pytest.raises(ValueError):
        stats.set_histogram(IoKind.UNMAP, None)
    assert stats.histogram(IoKind.UNMAP) is None


def test_histogram_copy_is_frozen_and_detached(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_histogram(IoKind.READ, [10])
    hist = stats.histogram(IoKind.READ)
    assert hist is not None
    io(stats, clock, IoKind.READ, 1, 1)
    assert hist.bins == (0, 0)
    with pytest.raises(AttributeError):
        hist.bins = (1, 1)  # type: ignore[misc]


def test_histogram_boundaries_accept_any_sequence(stats: BlockAcctStats) -> None:
    stats.set_histogram(IoKind.READ, (10, 20))
    stats.set_histogram(IoKind.WRITE, range(1, 4))
    assert stats.histogram(IoKind.READ) == LatencyHistogram((10, 20), (0, 0, 0))
    assert stats.histogram(IoKind.WRITE) == LatencyHistogram((1, 2, 3), (0, 0, 0, 0))


# -- timed statistics ------------------------------------------------------------


def zero_timed(interval: int) -> dict[str, object]:
    out: dict[str, object] = dict.fromkeys(TIMED_KEYS, 0)
    out.update(interval_length=interval, avg_rd_queue_depth=0.0, avg_wr_queue_depth=0.0)
    return out


def test_timed_stats_are_zero_without_io(clock: FakeClock) -> None:
    stats = BlockAcctStats(clock=clock, intervals=[60, 3600])
    assert stats.to_qmp()["timed_stats"] == [zero_timed(60), zero_timed(3600)]
    timed = stats.snapshot().timed
    assert isinstance(timed[0], TimedStats)
    assert isinstance(timed[0].avg_rd_queue_depth, float)


def test_timed_stats_follow_configuration_order(clock: FakeClock) -> None:
    stats = BlockAcctStats(clock=clock, intervals=[3600, 1, 60, 1])
    assert [t.interval_length for t in stats.snapshot().timed] == [3600, 1, 60, 1]


def test_timed_stats_window_rollover(clock: FakeClock) -> None:
    # A 60 s interval uses two 80 s windows; started at T0, window A first
    # expires at T0+40 s and window B at T0+80 s, then each every 80 s.
    stats = BlockAcctStats(clock=clock, intervals=[60])

    def at(seconds: int) -> TimedStats:
        clock.now = T0 + seconds * S
        (timed,) = stats.snapshot().timed
        return timed

    def read_at(seconds: int, latency: int) -> None:
        clock.now = T0 + seconds * S
        io(stats, clock, IoKind.READ, 512, latency)

    read_at(10, 100)  # completes at 10 s + 100 ns
    read_at(20, 301)
    t = at(30)  # window A (expires at 40 s) has both reads, covering 70 s
    assert (t.min_rd_latency_ns, t.max_rd_latency_ns, t.avg_rd_latency_ns) == (100, 301, 200)
    assert t.avg_rd_queue_depth == 401 / (70 * S)
    assert t.avg_wr_queue_depth == 0.0

    t = at(40)  # A expires exactly now; B (expires at 80 s) still has both reads, 40 s in
    assert (t.min_rd_latency_ns, t.max_rd_latency_ns, t.avg_rd_latency_ns) == (100, 301, 200)
    assert t.avg_rd_queue_depth == 401 / (40 * S)

    clock.now = T0 + 50 * S
    io(stats, clock, IoKind.WRITE, 512, 500)  # goes into A (reset at 40 s) and B

    t = at(79)  # still B: the reads and the write
    assert t.max_rd_latency_ns == 301
    assert (t.min_wr_latency_ns, t.max_wr_latency_ns, t.avg_wr_latency_ns) == (500, 500, 500)
    assert t.avg_wr_queue_depth == 500 / (79 * S)

    t = at(85)  # B expired at 80 s; A (since 40 s, expires at 120 s) has only the write
    assert (t.min_rd_latency_ns, t.max_rd_latency_ns, t.avg_rd_latency_ns) == (0, 0, 0)
    assert t.avg_rd_queue_depth == 0.0
    assert t.max_wr_latency_ns == 500
    assert t.avg_wr_queue_depth == 500 / (45 * S)

    t = at(130)  # B (since 80 s) is empty
    assert t.to_qmp() == zero_timed(60)


def test_timed_stats_windows_stay_on_their_grid_after_long_silence(clock: FakeClock) -> None:
    stats = BlockAcctStats(clock=clock, intervals=[60])
    clock.now = T0 + 1000 * S + 7  # many periods later, off the grid by 7 ns
    io(stats, clock, IoKind.FLUSH, 0, 40)  # completes at 1000 s + 47 ns
    # A expires on T0 + 40 s + k*80 s, B on T0 + k*80 s.  Now A was last reset
    # at 1000 s (expires 1080 s), B at 960 s (expires 1040 s): B reports, 40 s in.
    (t,) = stats.snapshot().timed
    assert (t.min_flush_latency_ns, t.max_flush_latency_ns, t.avg_flush_latency_ns) == (40, 40, 40)
    clock.now = T0 + 1040 * S  # B expires; A (since 1000 s) has the flush
    (t,) = stats.snapshot().timed
    assert t.max_flush_latency_ns == 40
    clock.now = T0 + 1080 * S  # A expires; B (since 1040 s) is empty
    (t,) = stats.snapshot().timed
    assert t.max_flush_latency_ns == 0


def test_timed_stats_average_is_integer_division(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_intervals([1])
    for latency in (100, 201, 3):
        io(stats, clock, IoKind.WRITE, 1, latency)
    (t,) = stats.snapshot().timed
    assert (t.min_wr_latency_ns, t.max_wr_latency_ns, t.avg_wr_latency_ns) == (3, 201, 101)


@pytest.mark.parametrize("account_failed", [True, False])
def test_failed_requests_in_timed_stats_only_if_account_failed(
    clock: FakeClock, account_failed: bool
) -> None:
    stats = BlockAcctStats(clock=clock, account_failed=account_failed, intervals=[60])
    io(stats, clock, IoKind.READ, 512, 900, ok=False)
    (t,) = stats.snapshot().timed
    assert t.max_rd_latency_ns == (900 if account_failed else 0)


def test_unmap_is_not_in_timed_stats(clock: FakeClock) -> None:
    stats = BlockAcctStats(clock=clock, intervals=[60])
    io(stats, clock, IoKind.UNMAP, 4096, 900)
    assert stats.to_qmp()["timed_stats"] == [zero_timed(60)]


def test_set_intervals_restarts_windows(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_intervals([60])
    io(stats, clock, IoKind.READ, 1, 10)
    clock.advance(S)
    stats.set_intervals([60, 10])
    assert stats.to_qmp()["timed_stats"] == [zero_timed(60), zero_timed(10)]
    clock.advance(S)
    io(stats, clock, IoKind.READ, 1, 10)
    assert [t.max_rd_latency_ns for t in stats.snapshot().timed] == [10, 10]
    stats.set_intervals([])
    assert stats.to_qmp()["timed_stats"] == []
    io(stats, clock, IoKind.READ, 1, 10)  # no intervals: nothing to update


@pytest.mark.parametrize("intervals", [[0], [-1], [60, 0], [True], [1.5], ["60"]])
def test_invalid_intervals_rejected(
    stats: BlockAcctStats, clock: FakeClock, intervals: list[object]
) -> None:
    stats.set_intervals([5])
    with pytest.raises(ValueError):
        stats.set_intervals(intervals)  # type: ignore[arg-type]
    assert [t.interval_length for t in stats.snapshot().timed] == [5]
    with pytest.raises(ValueError):
        BlockAcctStats(clock=clock, intervals=intervals)  # type: ignore[arg-type]


# -- snapshots -----------------------------------------------------------------


def test_snapshot_copies_every_counter(clock: FakeClock) -> None:
    stats = BlockAcctStats(clock=clock, account_invalid=False, intervals=[60])
    stats.set_histogram(IoKind.WRITE, [1_000])
    io(stats, clock, IoKind.READ, 4096, 300)
    io(stats, clock, IoKind.READ, 4096, 200, ok=False)
    io(stats, clock, IoKind.WRITE, 1024, 2_000)
    stats.invalid(IoKind.FLUSH)
    stats.merged(IoKind.UNMAP, 2)
    pending = stats.start(IoKind.UNMAP, 1 << 20)
    clock.advance(50)
    snap = stats.snapshot()
    assert isinstance(snap, StatsSnapshot)
    assert snap.taken_ns == clock.now
    assert snap.read.nbytes == 4096
    assert snap.read.operations == 1
    assert snap.read.failed == 1
    assert snap.read.total_time_ns == 500
    assert snap.read.histogram is None
    assert snap.write.nbytes == 1024
    assert snap.write.histogram == LatencyHistogram((1_000,), (0, 1))
    assert snap.flush.invalid == 1
    assert snap.unmap.merged == 2
    assert snap.unmap.in_flight == 1
    assert snap.in_flight == 1
    assert snap.idle_ns == 50
    assert (snap.account_invalid, snap.account_failed) == (False, True)
    assert snap.timed[0].max_rd_latency_ns == 300
    assert snap.kind(IoKind.READ) is snap.read
    assert snap.kind(IoKind.WRITE) is snap.write
    assert snap.kind(IoKind.FLUSH) is snap.flush
    assert snap.kind(IoKind.UNMAP) is snap.unmap
    assert snap.histograms == {IoKind.WRITE: snap.write.histogram}
    # Later activity does not change it.
    stats.done(pending)
    io(stats, clock, IoKind.WRITE, 1024, 2_000)
    assert snap.write.operations == 1
    assert snap.unmap.in_flight == 1
    assert snap.write.histogram == LatencyHistogram((1_000,), (0, 1))
    with pytest.raises(AttributeError):
        snap.idle_ns = 0  # type: ignore[misc]


def test_snapshot_to_qmp_matches_live_to_qmp(stats: BlockAcctStats, clock: FakeClock) -> None:
    stats.set_histogram(IoKind.READ, [10])
    io(stats, clock, IoKind.READ, 1, 5)
    clock.advance(3)
    assert stats.snapshot().to_qmp(wr_highest_offset=9) == stats.to_qmp(wr_highest_offset=9)


def test_reference_example_hd1(clock: FakeClock) -> None:
    """The numbers of the hd1 example in the QMP reference, rebuilt from events."""
    stats = BlockAcctStats(clock=clock)
    stats.set_histogram(IoKind.READ, [10000, 100000, 1000000])
    stats.set_histogram(IoKind.WRITE, [10000, 100000, 1000000])
    stats.set_histogram(IoKind.FLUSH, [10000, 100000, 1000000])
    io(stats, clock, IoKind.READ, 512, 31236, ok=False)
    io(stats, clock, IoKind.WRITE, 512, 1_277_540)
    io(stats, clock, IoKind.WRITE, 512, 1_277_540)
    clock.advance(2441547399)
    assert stats.to_qmp(wr_highest_offset=5632) == {
        "account_failed": True,
        "account_invalid": True,
        "failed_flush_operations": 0,
        "failed_rd_operations": 1,
        "failed_unmap_operations": 0,
        "failed_wr_operations": 0,
        "flush_operations": 0,
        "flush_total_time_ns": 0,
        "idle_time_ns": 2441547399,
        "invalid_flush_operations": 0,
        "invalid_rd_operations": 0,
        "invalid_unmap_operations": 0,
        "invalid_wr_operations": 0,
        "rd_bytes": 0,
        "rd_merged": 0,
        "rd_operations": 0,
        "rd_total_time_ns": 31236,
        "timed_stats": [],
        "unmap_bytes": 0,
        "unmap_merged": 0,
        "unmap_operations": 0,
        "unmap_total_time_ns": 0,
        "wr_bytes": 1024,
        "wr_highest_offset": 5632,
        "wr_merged": 0,
        "wr_operations": 2,
        "wr_total_time_ns": 2555080,
        "rd_latency_histogram": {"bins": [0, 1, 0, 0], "boundaries": [10000, 100000, 1000000]},
        "wr_latency_histogram": {"bins": [0, 0, 0, 2], "boundaries": [10000, 100000, 1000000]},
        "flush_latency_histogram": {"bins": [0, 0, 0, 0], "boundaries": [10000, 100000, 1000000]},
    }


def test_io_kind_values_are_qmp_prefixes() -> None:
    assert [k.value for k in IoKind] == ["rd", "wr", "flush", "unmap"]
    assert IoKind("flush") is IoKind.FLUSH
    assert {IoKind.READ: 1}[IoKind("rd")] == 1


def test_retry_counts_nothing_but_leaves_flight() -> None:
    clock = iter(range(0, 10_000, 100)).__next__
    stats = BlockAcctStats(clock=clock)
    cookie = stats.start(IoKind.WRITE, 512)
    assert stats.in_flight(IoKind.WRITE) == 1
    stats.retry(cookie)
    stats.retry(cookie)  # idempotent, like done/failed
    assert stats.in_flight() == 0
    qmp = stats.to_qmp()
    assert (qmp["wr_operations"], qmp["failed_wr_operations"], qmp["wr_total_time_ns"]) == (0, 0, 0)
    assert "idle_time_ns" not in qmp


# -- default histograms (metrics only) ------------------------------------------------


def test_default_boundaries_are_50us_to_10s_ascending() -> None:
    bounds = DEFAULT_LATENCY_BOUNDARIES_NS
    assert bounds[0] == 50_000 and bounds[-1] == 10 * S
    assert list(bounds) == sorted(set(bounds))


def test_default_histogram_bins_are_closed_on_the_right(
    stats: BlockAcctStats, clock: FakeClock
) -> None:
    for latency in (1, 50_000, 50_001, 100_000, 10 * S, 10 * S + 1, 100 * S):
        io(stats, clock, IoKind.WRITE, 512, latency)
    hist = stats.snapshot().write.default_histogram
    assert hist is not None and hist.boundaries == DEFAULT_LATENCY_BOUNDARIES_NS
    bins = list(hist.bins)
    assert len(bins) == len(DEFAULT_LATENCY_BOUNDARIES_NS) + 1
    assert bins[0] == 2  # 1 ns and exactly 50 µs
    assert bins[1] == 2  # 50 µs + 1 ns and exactly 100 µs
    assert bins[-2] == 1  # exactly 10 s
    assert bins[-1] == 2  # beyond 10 s
    assert sum(bins) == 7


def test_default_histogram_counts_failures_and_is_never_in_qmp(
    stats: BlockAcctStats, clock: FakeClock
) -> None:
    io(stats, clock, IoKind.READ, 512, 2_000_000)
    io(stats, clock, IoKind.READ, 512, 3_000_000, ok=False)
    io(stats, clock, IoKind.FLUSH, 0, 1_000)
    stats.invalid(IoKind.READ)  # never started: no latency
    snap = stats.snapshot()
    assert snap.read.default_histogram is not None
    assert sum(snap.read.default_histogram.bins) == 2
    assert (snap.read.operations, snap.read.failed, snap.read.invalid) == (1, 1, 1)
    assert snap.flush.default_histogram is not None
    assert snap.flush.default_histogram.bins[0] == 1
    qmp = stats.to_qmp()
    assert list(qmp) == [*REQUIRED_KEYS[:15], "idle_time_ns", *REQUIRED_KEYS[15:]]
    assert snap.histograms == {}


def test_default_histogram_runs_beside_a_qmp_histogram(
    stats: BlockAcctStats, clock: FakeClock
) -> None:
    io(stats, clock, IoKind.READ, 512, 60_000)
    stats.set_histogram(IoKind.READ, [100])
    io(stats, clock, IoKind.READ, 512, 60_000)
    snap = stats.snapshot()
    assert snap.read.histogram == LatencyHistogram((100,), (0, 1))
    assert snap.read.default_histogram is not None
    assert snap.read.default_histogram.bins[1] == 2  # both, before and after the set
    stats.set_histogram(IoKind.READ, None)
    io(stats, clock, IoKind.READ, 512, 60_000)
    snap = stats.snapshot()
    assert snap.read.default_histogram is not None
    assert (snap.read.default_histogram.bins[1], snap.read.operations) == (3, 3)


def test_retried_requests_are_not_in_the_default_histogram(
    stats: BlockAcctStats, clock: FakeClock
) -> None:
    cookie = stats.start(IoKind.WRITE, 512)
    clock.advance(1_000)
    stats.retry(cookie)
    snap = stats.snapshot()
    assert snap.write.default_histogram is not None
    assert sum(snap.write.default_histogram.bins) == snap.write.operations == 0


def test_no_accounting_counts_nothing(clock: FakeClock) -> None:
    stats = NoAccounting(clock=clock)
    io(stats, clock, IoKind.READ, 512, 1_000)
    io(stats, clock, IoKind.WRITE, 512, 1_000, ok=False)
    stats.invalid(IoKind.FLUSH)
    snap = stats.snapshot()
    for kind in (snap.read, snap.write, snap.flush):
        assert kind.default_histogram is not None
        assert (kind.operations, kind.failed, kind.invalid, kind.nbytes) == (0, 0, 0, 0)
        assert sum(kind.default_histogram.bins) == 0


# -- successes counted late, in batches ------------------------------------------


def test_logged_successes_count_as_if_counted_one_by_one(clock: FakeClock) -> None:
    """Every reader sees the logged successes folded: bytes, operations, total time, idle
    time, both histograms and the timed statistics agree with a request-by-request model,
    whether a read comes after one request or after many (several folds)."""
    import random
    from bisect import bisect_left, bisect_right

    rng = random.Random(1729)
    stats = BlockAcctStats(clock=clock, intervals=[60])
    qmp_bounds = [20_000, 60_000, 1_000_000, 300_000_000]
    model = {"bytes": 0, "ops": 0, "time": 0, "failed": 0,
             "bins": [0] * (len(DEFAULT_LATENCY_BOUNDARIES_NS) + 1), "qmp": None}
    last_access = None
    lat_min, lat_max, lat_sum, lat_n = None, 0, 0, 0
    for i in range(3_000):
        if i == 1_000:
            stats.set_histogram(IoKind.READ, qmp_bounds)
            model["qmp"] = [0] * (len(qmp_bounds) + 1)
        # Latencies from 1 ns to 20 s, across every boundary; some exactly on one.
        latency = (rng.choice(DEFAULT_LATENCY_BOUNDARIES_NS + tuple(qmp_bounds))
                   if rng.random() < 0.1 else int(10 ** rng.uniform(0, 10.3)))
        nbytes = rng.choice((512, 4096, 65536, 1 << 20))
        ok = rng.random() < 0.95
        if rng.random() < 0.5:
            start = stats.begin(IoKind.READ)
            clock.advance(latency)
            if ok:
                stats.end(IoKind.READ, nbytes, start)
            else:
                stats.failed(AcctCookie(IoKind.READ, nbytes, start))
        else:
            io(stats, clock, IoKind.READ, nbytes, latency, ok=ok)
        model["bins"][bisect_left(DEFAULT_LATENCY_BOUNDARIES_NS, latency)] += 1
        if model["qmp"] is not None:
            model["qmp"][bisect_right(qmp_bounds, latency)] += 1
        if ok:
            model["bytes"] += nbytes
            model["ops"] += 1
        else:
            model["failed"] += 1
        model["time"] += latency
        last_access = clock.now
        lat_min = latency if lat_min is None else min(lat_min, latency)
        lat_max = max(lat_max, latency)
        lat_sum += latency
        lat_n += 1
        if rng.random() < 0.05 or i == 2_999:  # an invalid request restarts the idle time
            clock.advance(3)
            stats.invalid(IoKind.READ)
            last_access = clock.now
        if rng.random() < 0.01 or i == 2_999:
            clock.advance(7)
            snap = stats.snapshot()
            rd = snap.read
            assert (rd.nbytes, rd.operations, rd.failed, rd.total_time_ns) == (
                model["bytes"], model["ops"], model["failed"], model["time"])
            assert rd.default_histogram is not None
            assert list(rd.default_histogram.bins) == model["bins"]
            if model["qmp"] is not None:
                assert rd.histogram is not None and list(rd.histogram.bins) == model["qmp"]
            assert snap.idle_ns == clock.now - last_access
    # The 60 s interval's window (80 s long) has seen every request iff the run lasted
    # less than 40 s of fake time; otherwise compare only what the window can see.
    timed = stats.snapshot().timed[0]
    assert timed.max_rd_latency_ns <= lat_max and timed.min_rd_latency_ns >= (lat_min or 0)
    if clock.now - T0 < 40 * S:
        assert (timed.min_rd_latency_ns, timed.max_rd_latency_ns,
                timed.avg_rd_latency_ns) == (lat_min, lat_max, lat_sum // lat_n)


def test_the_success_log_stays_short_without_readers(stats: BlockAcctStats,
                                                     clock: FakeClock) -> None:
    """Nobody reads the counters for 100,000 requests: the log is folded as it fills,
    so what the accounting holds does not grow with the requests."""
    from blockd.block import stats as stats_module

    for _ in range(100_000):
        start = stats.begin(IoKind.WRITE)
        clock.advance(3)
        stats.end(IoKind.WRITE, 4096, start)
        stats.account(IoKind.READ, 512, clock.now - 5)
    held = [len(c.log) for c in stats._counters.values()]
    assert max(held) < stats_module._FOLD_AT
    assert stats.snapshot().write.operations == 100_000
    assert stats.snapshot().read.nbytes == 512 * 100_000


def test_a_new_histogram_counts_only_what_completes_after_it(stats: BlockAcctStats,
                                                             clock: FakeClock) -> None:
    """Successes still in the log when a histogram is set belong to the time before it."""
    for _ in range(5):
        io(stats, clock, IoKind.WRITE, 4096, 10)
    stats.set_histogram(IoKind.WRITE, [100])
    io(stats, clock, IoKind.WRITE, 4096, 200)
    hist = stats.histogram(IoKind.WRITE)
    assert hist is not None and hist.bins == (0, 1)
