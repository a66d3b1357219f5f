"""Writes and flushes through io_uring: the right operations reach the real kernel ring."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import devio
import pytest

from blockd.aio.uring import UringIo
from blockd.block.device import Device
from blockd.block.node import Node
from blockd.block.registry import Registry
from blockd.devices.base import NodeOptions
from blockd.events import EventBus

MiB = 1 << 20


@pytest.fixture
def image() -> Any:
    # Not tmpfs: files there are served on the loop thread and never reach the ring.
    path = Path("/var/tmp") / f"blockd-uring-{os.getpid()}.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    yield path
    path.unlink()


async def on_ring(path: Path, **device_options: Any) -> tuple[UringIo, Registry, Node, Device]:
    """A registry with a real ring, node f0 on ``path`` and device hd0 (skips without a ring)."""
    uring = UringIo.create()
    if uring is None:
        pytest.skip("io_uring cannot be set up here")
    registry = Registry(executor=ThreadPoolExecutor(2), bus=EventBus())
    registry.workers.uring = uring
    node = await registry.add_node(NodeOptions(driver="file", node_name="f0",
                                               filename=str(path)))
    return uring, registry, node, registry.add_device("hd", "hd0", "f0", **device_options)


async def test_io_uring_route(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uring, registry, node, device = await on_ring(image)
    ring = uring._ring
    seen: list[tuple[str, int]] = []
    real_writev, real_write, real_fsync = ring.prep_writev, ring.prep_write, ring.prep_fsync

    def writev(fd: int, buffers: Any, offset: int, user_data: int, rw_flags: int = 0) -> bool:
        seen.append(("write", rw_flags))
        return real_writev(fd, buffers, offset, user_data, rw_flags)

    def write(fd: int, buf: Any, offset: int, user_data: int, rw_flags: int = 0) -> bool:
        seen.append(("write", rw_flags))
        return real_write(fd, buf, offset, user_data, rw_flags)

    def fsync(fd: int, user_data: int, datasync: bool = True) -> bool:
        seen.append(("fsync", int(datasync)))
        return real_fsync(fd, user_data, datasync)

    monkeypatch.setattr(ring, "prep_writev", writev)
    monkeypatch.setattr(ring, "prep_write", write)
    monkeypatch.setattr(ring, "prep_fsync", fsync)
    assert not node.driver.memory_backed
    payload = os.urandom(64 * 1024)
    await devio.pwrite(device, 4096, payload)
    await devio.pwrite(device, MiB, b"F" * 4096, fua=True)
    await devio.flush(device)
    assert seen == [("write", 0), ("write", os.RWF_DSYNC), ("fsync", 1)]
    data = image.read_bytes()
    assert data[4096:4096 + len(payload)] == payload and data[MiB:MiB + 4096] == b"F" * 4096
    stats = device.stats.to_qmp()
    assert (stats["wr_operations"], stats["flush_operations"]) == (2, 1)
    # Errors come back as errors: a write to a descriptor that is not open for writing.
    ro_fd = os.open(image, os.O_RDONLY)
    os.dup2(ro_fd, node.driver.fd)  # type: ignore[attr-defined]
    os.close(ro_fd)
    with pytest.raises(OSError) as info:
        await devio.pwrite(device, 0, b"x" * 512)
    assert info.value.errno == 9  # EBADF, from the kernel through the ring
    assert device.stats.to_qmp()["failed_wr_operations"] == 1
    await registry.close_all()
    uring.close()


async def test_a_broken_ring_fails_waiting_requests_and_falls_back(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uring, registry, _, device = await on_ring(image, werror="report")

    def refuse() -> int:
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(uring._ring, "submit", refuse)
    with pytest.raises(OSError) as info:
        await devio.pwrite(device, 0, b"a" * 4096)  # queued on the ring when it broke
    assert info.value.errno == 9
    await devio.pwrite(device, 8192, b"b" * 4096)  # the next one goes to the worker threads
    assert image.read_bytes()[8192:12288] == b"b" * 4096
    await registry.close_all()
    monkeypatch.undo()
    uring.close()


async def test_polling_the_ring_completes_without_the_loop(image: Path) -> None:
    """submit_now() + poll(): what the NBD server spins on for a QD1 write."""
    uring = UringIo.create()
    if uring is None:
        pytest.skip("io_uring cannot be set up here")
    fd = os.open(image, os.O_RDWR)
    try:
        results: list[int] = []
        assert uring.write(fd, b"P" * 4096, 8192, 0, results.append)
        assert not uring.poll() and results == []  # queued, not yet submitted
        uring.submit_now()
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            uring.poll()
        assert results == [4096]
        assert not uring.poll()  # nothing left
        assert os.pread(fd, 4096, 8192) == b"P" * 4096
    finally:
        os.close(fd)
        uring.close()


async def test_a_write_with_an_argument_calls_back_with_it(image: Path) -> None:
    """write(..., done, arg) calls done(arg, result): Device.write_on_ring's form."""
    uring = UringIo.create()
    if uring is None:
        pytest.skip("io_uring cannot be set up here")
    fd = os.open(image, os.O_RDWR)
    try:
        results: list[tuple[object, int]] = []
        state = ("request", 7)

        def done(arg: object, result: int) -> None:
            results.append((arg, result))

        assert uring.write(fd, b"Q" * 4096, 0, 0, done, state)
        assert uring.write(fd, b"R" * 512, 4096, 0, done, None)  # None is an argument too
        uring.submit_now()
        deadline = time.monotonic() + 10
        while len(results) < 2 and time.monotonic() < deadline:
            uring.poll()
        assert sorted(results, key=lambda r: r[1]) == [(None, 512), (state, 4096)]
        assert results[0][0] is state or results[1][0] is state
        assert os.pread(fd, 4608, 0) == b"Q" * 4096 + b"R" * 512
    finally:
        os.close(fd)
        uring.close()


async def test_a_full_ring_sends_the_write_to_the_workers(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uring, registry, _, device = await on_ring(image)
    monkeypatch.setattr(uring._ring, "prep_writev", lambda *a, **k: False)  # always full
    monkeypatch.setattr(uring._ring, "prep_write", lambda *a, **k: False)
    await devio.pwrite(device, 4096, b"w" * 4096)
    assert image.read_bytes()[4096:8192] == b"w" * 4096
    stats = device.stats.to_qmp()
    assert stats["wr_operations"] == 1 and stats["wr_bytes"] == 4096
    assert device.node is not None and device.node.wr_highest_offset == 8192
    assert device.in_flight == 0 and device.node.in_flight == 0
    await registry.close_all()
    monkeypatch.undo()
    uring.close()


async def test_a_ring_write_that_fails_under_werror_stop_is_held_and_retried(
        image: Path) -> None:
    uring, registry, node, device = await on_ring(image, werror="stop")
    fd = node.driver.fd  # type: ignore[attr-defined]
    saved = os.dup(fd)
    ro_fd = os.open(image, os.O_RDONLY)
    os.dup2(ro_fd, fd)  # writes now fail with EBADF in the kernel
    os.close(ro_fd)
    write = asyncio.ensure_future(devio.pwrite(device, 12288, b"s" * 4096))
    for _ in range(200):
        if device.paused:
            break
        await asyncio.sleep(0.01)
    assert device.paused and not write.done()  # held, not failed
    assert device.stats.to_qmp()["failed_wr_operations"] == 0
    os.dup2(saved, fd)  # the storage is back
    os.close(saved)
    device.resume()
    await asyncio.wait_for(write, 10)
    assert image.read_bytes()[12288:16384] == b"s" * 4096
    stats = device.stats.to_qmp()
    assert stats["wr_operations"] == 1 and stats["failed_wr_operations"] == 0
    assert node.wr_highest_offset == 16384
    assert device.in_flight == 0 and node.in_flight == 0
    await registry.close_all()
    uring.close()


async def test_writes_to_a_memory_backed_file_stay_on_the_loop_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path("/dev/shm") / f"blockd-uring-{os.getpid()}.img"
    path.write_bytes(bytes(MiB))
    try:
        uring, registry, node, device = await on_ring(path)
        assert node.driver.memory_backed
        queued: list[int] = []
        real_writev = uring._ring.prep_writev

        def writev(fd: int, buffers: Any, offset: int, user_data: int,
                   rw_flags: int = 0) -> bool:
            queued.append(offset)
            return real_writev(fd, buffers, offset, user_data, rw_flags)

        monkeypatch.setattr(uring._ring, "prep_writev", writev)
        monkeypatch.setattr(uring._ring, "prep_write",
                            lambda fd, buf, *rest: writev(fd, [buf], *rest))
        await devio.pwrite(device, 4096, b"m" * 4096)
        assert queued == []  # written inline, as the driver is memory-backed
        assert path.read_bytes()[4096:8192] == b"m" * 4096
        assert device.stats.to_qmp()["wr_operations"] == 1
        await registry.close_all()
        monkeypatch.undo()
        uring.close()
    finally:
        path.unlink()
