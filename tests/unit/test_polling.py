"""The arithmetic of adaptive polling (blockd/aio/polling.py)."""

from __future__ import annotations

from blockd.aio.polling import START_NS, AdaptivePoll

US = 1000


def wait(poll: AdaptivePoll, ns: int, at: int = 10**9) -> int:
    poll.idle(at)
    poll.busy(at + ns)
    return poll.window_ns


def test_short_waits_grow_the_window_up_to_the_limit() -> None:
    poll = AdaptivePoll(max_ns=100 * US)
    assert poll.window_ns == 0
    assert wait(poll, 50 * US) == START_NS
    assert wait(poll, 50 * US) == 2 * START_NS
    assert wait(poll, 50 * US) == 4 * START_NS
    assert wait(poll, 50 * US) == 8 * START_NS  # 64 us: now covers a 50 us wait
    assert wait(poll, 50 * US) == 8 * START_NS
    assert wait(poll, 90 * US) == 100 * US  # capped at the limit
    assert wait(poll, 90 * US) == 100 * US


def test_a_wait_the_window_covered_changes_nothing() -> None:
    poll = AdaptivePoll(max_ns=100 * US)
    poll.window_ns = 32 * US
    assert wait(poll, 20 * US) == 32 * US


def test_long_waits_halve_the_window_and_then_stop_polling() -> None:
    poll = AdaptivePoll(max_ns=128 * US)
    poll.window_ns = 64 * US
    assert wait(poll, 5_000 * US) == 32 * US
    assert wait(poll, 5_000 * US) == 16 * US
    assert wait(poll, 5_000 * US) == 8 * US
    assert wait(poll, 5_000 * US) == 0  # below the starting window: off
    assert wait(poll, 5_000 * US) == 0


def test_no_limit_means_no_polling() -> None:
    poll = AdaptivePoll(max_ns=0)
    assert wait(poll, 1 * US) == 0


def test_only_waits_that_started_idle_count() -> None:
    poll = AdaptivePoll(max_ns=100 * US)
    poll.busy(10**9)  # a request while others were in flight: no wait measured
    assert poll.window_ns == 0
