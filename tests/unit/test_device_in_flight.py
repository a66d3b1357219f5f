"""The per-device in-flight cap and the I/O workers' answer to stuck calls.

A null-co node with a latency runs its reads on the I/O workers; a gate in front of
its driver holds them like storage that stopped answering, so the tests see exactly
how many calls a device lets into its driver and what happens to the rest, and that
a node deleted (or the daemon stopped) with requests still in it is never closed under
them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from blockd.aio.workers import ControlExecutor, IoWorkers
from blockd.block import registry as registry_module
from blockd.block.device import Device
from blockd.block.registry import Registry
from blockd.devices.base import NodeOptions
from blockd.events import EventBus


class Gate:
    """Wraps a driver's preadv: calls wait until the gate opens; counts who is inside."""

    def __init__(self, preadv: object) -> None:
        self._preadv = preadv
        self.open = threading.Event()
        self.inside = 0
        self.most = 0
        self.entered: list[int] = []  # offsets, in the order the calls came in
        self._lock = threading.Lock()

    def __call__(self, offset: int, buffers: Sequence[memoryview]) -> int:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.entered.append(offset)
        try:
            self.open.wait(10)
            return self._preadv(offset, buffers)  # type: ignore[operator, no-any-return]
        finally:
            with self._lock:
                self.inside -= 1


async def _device(registry: Registry, name: str) -> tuple[Device, Gate]:
    node = await registry.add_node(NodeOptions(driver="null-co", node_name=f"{name}-n",
                                               size=1 << 20, latency_ns=1))
    gate = Gate(node.driver.preadv)
    node.driver.preadv = gate  # type: ignore[method-assign]
    node.nowait_read = node.read_now = None
    return registry.add_device("hd", name, node.name), gate


def _reads(device: Device, count: int) -> list[asyncio.Future[object]]:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[object]] = []
    for n in range(count):
        future: asyncio.Future[object] = loop.create_future()
        futures.append(future)

        def done(result: object, exc: BaseException | None,
                 future: asyncio.Future[object] = future) -> None:
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        device.submit_read(n * 4096, 4096, done)
    return futures


async def _until(condition: object, timeout: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_device_lets_at_most_its_cap_into_the_driver_and_the_rest_wait_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    workers = IoWorkers(2)
    registry = Registry(executor=ThreadPoolExecutor(2), bus=EventBus(), workers=workers,
                        device_max_in_flight=3)
    device, gate = await _device(registry, "hd0")
    with caplog.at_level(logging.INFO, logger="blockd.block.device"):
        futures = _reads(device, 10)
        await _until(lambda: gate.inside == 3)
        await asyncio.sleep(0.1)  # the workers would take more if the device let them
        assert (gate.inside, device.in_flight) == (3, 3)
        assert registry.limit_hits == {"device-in-flight": 7}
        assert sorted(gate.entered) == [0, 4096, 8192]  # the first three; later ones wait
        gate.open.set()
        await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert gate.most == 3
    assert device.in_flight == 0 and device.node is not None and device.node.in_flight == 0
    assert sorted(gate.entered) == [n * 4096 for n in range(10)]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("more wait their turn" in m for m in messages) == 1  # once for the burst
    assert sum("below the device-in-flight limit again (7 requests waited)" in m
               for m in messages) == 1
    workers.close()


async def test_a_stuck_device_leaves_threads_for_the_others() -> None:
    """Two threads, both stuck in one device: the workers add threads (not more than the
    device's cap is stuck), and the other device's read completes."""
    workers = IoWorkers(2, max_threads=16)
    registry = Registry(executor=ThreadPoolExecutor(2), bus=EventBus(), workers=workers,
                        device_max_in_flight=4)
    stuck, stuck_gate = await _device(registry, "stuck")
    other, other_gate = await _device(registry, "other")
    other_gate.open.set()
    held = _reads(stuck, 20)
    await _until(lambda: stuck_gate.inside == 4)
    assert await asyncio.wait_for(_reads(other, 1)[0], 5) is not None
    assert stuck_gate.inside == 4 and workers.thread_count <= 16
    assert workers.threads_added >= 1
    stuck_gate.open.set()
    await asyncio.wait_for(asyncio.gather(*held), 5)
    assert workers.close(timeout=5) == 0


async def test_closing_the_workers_is_bounded_with_a_call_stuck() -> None:
    workers = IoWorkers(1)
    gate = threading.Event()
    workers.submit(gate.wait, (), lambda result, exc: None)
    await asyncio.sleep(0.05)
    assert workers.close(timeout=0.2) == 1  # left behind: a daemon thread
    gate.set()


async def test_block_status_obeys_the_cap_too() -> None:
    workers = IoWorkers(2)
    registry = Registry(executor=ThreadPoolExecutor(2), bus=EventBus(), workers=workers,
                        device_max_in_flight=1)
    device, gate = await _device(registry, "hd0")
    node = device.node
    assert node is not None
    entered = threading.Event()
    release = threading.Event()

    def lookup(offset: int, length: int) -> list[tuple[int, int]]:
        entered.set()
        release.wait(5)
        return [(length, 0)]

    node.block_status = lookup
    loop = asyncio.get_running_loop()
    first: asyncio.Future[object] = loop.create_future()
    device.submit_block_status(0, 4096, lambda r, e: first.set_result(r))
    await asyncio.to_thread(entered.wait, 5)
    read = _reads(device, 1)[0]
    await asyncio.sleep(0.05)
    assert gate.inside == 0 and registry.limit_hits == {"device-in-flight": 1}
    gate.open.set()
    release.set()
    assert await asyncio.wait_for(first, 5) == [(4096, 0)]
    await asyncio.wait_for(read, 5)
    workers.close()


def test_the_control_executor_runs_calls_on_daemon_threads() -> None:
    executor = ControlExecutor(2)
    assert executor.submit(lambda: threading.current_thread().daemon).result(5) is True
    gate = threading.Event()
    executor.submit(gate.wait)
    stuck = executor.submit(gate.wait)
    for _ in range(500):
        if executor.busy == 2:
            break
        threading.Event().wait(0.01)
    queued = executor.submit(lambda: 1)
    executor.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled() and executor.busy == 2 and not stuck.done()
    gate.set()
    assert stuck.result(5) is True


async def test_a_deleted_node_with_requests_left_is_closed_only_when_they_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A queued request looks its descriptor up when it starts: closing the node under
    # it could hand the number to another open.
    monkeypatch.setattr(registry_module, "QUIESCE_TIMEOUT", 0.05)
    registry = Registry(executor=ThreadPoolExecutor(1), bus=EventBus())
    node = await registry.add_node(NodeOptions(driver="null-co", node_name="n0"))
    closed: list[bool] = []
    monkeypatch.setattr(node.driver, "close", lambda: closed.append(True))
    node.in_flight = 1  # a request still in the driver
    await registry.del_node("n0")
    assert "n0" not in registry.nodes
    await asyncio.sleep(0.2)  # several of the (shortened) waits
    assert closed == []
    node.in_flight = 0
    node.wake_idle()
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed == [True]


async def test_shutdown_waits_for_deleted_nodes_too_and_names_those_left_open(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(registry_module, "QUIESCE_TIMEOUT", 0.05)
    registry = Registry(executor=ThreadPoolExecutor(1), bus=EventBus())
    stuck = await registry.add_node(NodeOptions(driver="null-co", node_name="stuck"))
    ending = await registry.add_node(NodeOptions(driver="null-co", node_name="ending"))
    closed: list[str] = []
    monkeypatch.setattr(stuck.driver, "close", lambda: closed.append("stuck"))

    def close_fails() -> None:
        closed.append("ending")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ending.driver, "close", close_fails)
    stuck.in_flight = ending.in_flight = 1
    await registry.del_node("stuck")
    await registry.del_node("ending")
    assert {n.name for n in registry.closing} == {"stuck", "ending"}
    ending.in_flight = 0
    ending.wake_idle()
    with caplog.at_level(logging.WARNING):
        assert await registry.close_all(timeout=0.3) == ["stuck"]
    assert closed == ["ending"]  # the stuck one is left open, not closed under its request
    assert "node ending: closing it after its last request failed" in caplog.text
    assert registry.closing == []

