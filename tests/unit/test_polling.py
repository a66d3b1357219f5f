"""The arithmetic of adaptive polling and the CPU pressure check (blockd/aio/polling.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from blockd.aio.polling import CHECK_NS, PAUSE_NS, START_NS, AdaptivePoll, CpuPressure

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



def pressure(tmp_path: Path, stalled_us: int) -> Path:
    path = tmp_path / "cpu"
    path.write_text(f"some avg10=1.00 avg60=2.00 avg300=3.00 total={stalled_us}\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    return path


MS = 1_000_000


def test_tasks_waiting_for_a_cpu_pause_polling(tmp_path: Path) -> None:
    window_us = CHECK_NS // 1000
    pause_us = PAUSE_NS // 1000
    stalled = 1_000
    pressure(tmp_path, stalled)
    cpu = CpuPressure(str(tmp_path / "cpu"))
    assert cpu.stalled_us() == stalled
    t = 1000 * MS
    assert cpu.check(t) is False  # a first reading has nothing to compare with
    pressure(tmp_path, stalled + window_us)  # 100 %: it would pause, if it were read
    assert cpu.check(t + CHECK_NS - 1) is False  # not read before the window ends
    stalled += window_us * 15 // 100  # 15 %: what a QD1 client makes on its own
    pressure(tmp_path, stalled)
    t += CHECK_NS
    assert cpu.check(t) is False
    stalled += window_us * 25 // 100
    pressure(tmp_path, stalled)
    t += CHECK_NS
    assert cpu.check(t) is True and cpu.pauses == 1
    pressure(tmp_path, 0)  # not read again during the pause
    assert cpu.check(t + PAUSE_NS - 1) is True
    # The pause is judged as any window: 11 % (an unpolled QD1 client's own) ends it ...
    stalled += pause_us * 11 // 100
    pressure(tmp_path, stalled)
    t += PAUSE_NS
    assert cpu.check(t) is False and cpu.pauses == 1
    assert cpu.check(t + CHECK_NS - 1) is False  # kept until the next reading
    stalled += window_us * 30 // 100
    pressure(tmp_path, stalled)
    t += CHECK_NS
    assert cpu.check(t) is True and cpu.pauses == 2
    # ... and 28 % (beside a busy process) renews it.
    stalled += pause_us * 28 // 100
    pressure(tmp_path, stalled)
    t += PAUSE_NS
    assert cpu.check(t) is True and cpu.pauses == 3


def test_a_reading_long_after_the_last_only_starts_a_window(tmp_path: Path) -> None:
    """Nobody asked for a while: what the machine did meanwhile is not held against polling."""
    window_us = CHECK_NS // 1000
    pressure(tmp_path, 0)
    cpu = CpuPressure(str(tmp_path / "cpu"))
    t = 1000 * MS
    assert cpu.check(t) is False
    t += 10 * PAUSE_NS  # two seconds later, tasks waited all through them
    stalled = 10 * PAUSE_NS // 1000
    pressure(tmp_path, stalled)
    assert cpu.check(t) is False and cpu.pauses == 0
    stalled += window_us * 30 // 100  # the window it started is judged
    pressure(tmp_path, stalled)
    assert cpu.check(t + CHECK_NS) is True and cpu.pauses == 1


def test_without_pressure_information_nothing_pauses(tmp_path: Path) -> None:
    missing = CpuPressure(str(tmp_path / "missing"))
    assert missing.check(MS) is False and missing.check(MS + CHECK_NS) is False
    (tmp_path / "garbage").write_text("no numbers here")
    garbage = CpuPressure(str(tmp_path / "garbage"))
    assert garbage.check(MS) is False and garbage.check(MS + CHECK_NS) is False


def test_the_kernel_reports_busy_processes_as_cpu_pressure() -> None:
    """The real /proc/pressure/cpu: more spinners than CPUs make tasks wait."""
    cpu = CpuPressure()
    before = cpu.stalled_us()
    assert before is not None, "this kernel has no pressure stall information"
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range((os.cpu_count() or 1) + 1)]
    try:
        began = time.monotonic_ns()
        cpu.check(began)
        time.sleep(CHECK_NS * 2 / 1e9)  # one window, not so long that it only starts one
        paused = cpu.check(max(time.monotonic_ns(), began + CHECK_NS))
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert paused and cpu.pauses == 1
