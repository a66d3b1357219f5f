"""OpenRunner: opens that hang time out, are bounded, and are undone when they finish late.

Real threads; the "open" is a call that waits on an event, which is what an open on
a dead file server looks like from Python (the host test uses a real hanging FUSE
file system).
"""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from blockd.block.opens import OpenRunner
from blockd.errors import BlockdError


async def _until(condition: object, timeout: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline
        await asyncio.sleep(0.01)


async def test_an_open_past_its_timeout_fails_and_is_undone_when_it_completes() -> None:
    runner = OpenRunner(timeout=0.1, capacity=4)
    gate = threading.Event()
    undone: list[object] = []

    def hanging_open() -> str:
        gate.wait(5)
        return "fd"

    with pytest.raises(BlockdError) as caught:
        await runner.run("/mnt/nfs/disk.img", hanging_open, undo=undone.append)
    assert caught.value.errno == errno.ETIMEDOUT
    assert "/mnt/nfs/disk.img" in str(caught.value) and "within 0.1 s" in str(caught.value)
    assert (runner.running, runner.stuck) == (1, 1)
    assert runner.limit_hits == {"open-timeout": 1}
    gate.set()
    await _until(lambda: runner.running == 0)
    assert undone == ["fd"] and runner.stuck == 0


async def test_opens_that_finish_in_time_give_their_result_or_error() -> None:
    runner = OpenRunner(timeout=5, capacity=1)
    assert await runner.run("a", lambda: 42) == 42

    def failing() -> None:
        raise OSError(errno.ENOENT, "No such file")

    with pytest.raises(FileNotFoundError):
        await runner.run("b", failing)
    assert runner.running == 0 and runner.limit_hits == {}


async def test_with_every_slot_held_by_a_stuck_open_the_next_is_refused_at_once() -> None:
    runner = OpenRunner(timeout=0.05, capacity=2)
    gate = threading.Event()
    for name in ("x", "y"):
        with pytest.raises(BlockdError):
            await runner.run(name, gate.wait, 5)
    with pytest.raises(BlockdError) as refused:
        await asyncio.wait_for(runner.run("z", lambda: 1), 0.04)  # no wait for a timeout
    assert refused.value.errno == errno.EAGAIN
    assert "2 earlier opens have not finished" in str(refused.value)
    assert runner.limit_hits == {"open-timeout": 2, "open-threads": 1}
    gate.set()
    await _until(lambda: runner.running == 0)
    assert await runner.run("z", lambda: 1) == 1


async def test_a_cancelled_caller_leaves_nothing_open() -> None:
    runner = OpenRunner(timeout=5, capacity=2)
    gate = threading.Event()
    undone: list[object] = []

    def slow_open() -> str:
        gate.wait(5)
        return "fd"

    task = asyncio.ensure_future(runner.run("c", slow_open, undo=undone.append))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    await _until(lambda: runner.running == 0 and undone == ["fd"])


async def test_opens_beyond_capacity_that_are_only_slow_wait_for_a_slot() -> None:
    """Found by bench/load_faults.py: 64 sessions adding nodes at once were refused
    because opens that were merely slow under load filled the slots."""
    runner = OpenRunner(timeout=5, capacity=2)

    def slow(n: int) -> int:
        threading.Event().wait(0.05)
        return n

    results = await asyncio.gather(*(runner.run(f"n{n}", slow, n) for n in range(8)))
    assert results == list(range(8))
    assert runner.running == 0 and runner.limit_hits.get("open-threads") is None
    assert runner.limit_hits["open-queue"] >= 6


async def test_waiting_for_a_slot_counts_against_the_timeout() -> None:
    runner = OpenRunner(timeout=0.2, capacity=1)
    gate = threading.Event()
    first = asyncio.ensure_future(runner.run("a", gate.wait, 5))
    await asyncio.sleep(0.01)
    with pytest.raises(BlockdError, match="no open slot within"):
        await runner.run("b", lambda: 1)
    gate.set()
    with pytest.raises(BlockdError):
        await first  # its own timeout passed too
