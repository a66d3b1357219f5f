"""Requests through a Device: checks, accounting and events, on real file and null nodes."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import devio
import pytest

from blockd.aio.pipes import Pipe, PipePool
from blockd.aio.uring import UringIo
from blockd.block.registry import Registry
from blockd.devices.base import NodeOptions
from blockd.errors import InvalidArgument, NoMedium, ReadOnly
from blockd.events import BlockIoError, Event, EventBus


@pytest.fixture
def registry() -> Registry:
    return Registry(executor=ThreadPoolExecutor(4), bus=EventBus())


async def test_file_io_is_on_disk_and_accounted(registry: Registry, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    await registry.add_node(NodeOptions(driver="file", node_name="f0", filename=str(img),
                                        discard="unmap"))
    dev = registry.add_device("hd", "hd0", "f0")

    await devio.pwrite(dev, 4096, b"A" * 8192)
    await devio.pwrite(dev, 65536, b"B" * 512, fua=True)
    await devio.flush(dev)
    assert img.read_bytes()[4096:4096 + 8192] == b"A" * 8192
    assert await devio.pread(dev, 4096, 4) == b"AAAA"
    assert await devio.pread(dev, 65536 + 510, 4) == b"BB\0\0"
    await devio.write_zeroes(dev, 4096, 4096)
    assert await devio.pread(dev, 4096, 4096) == b"\0" * 4096
    await devio.discard(dev, 0, 1 << 20)

    stats = dev.block_stats()
    s = stats["stats"]
    assert isinstance(s, dict)
    assert (s["rd_operations"], s["rd_bytes"]) == (3, 4 + 4 + 4096)
    assert (s["wr_operations"], s["wr_bytes"]) == (3, 8192 + 512 + 4096)
    assert (s["flush_operations"], s["unmap_operations"], s["unmap_bytes"]) == (1, 1, 1 << 20)
    assert s["wr_highest_offset"] == 65536 + 512
    assert s["rd_total_time_ns"] > 0 and "idle_time_ns" in s
    assert stats["driver-specific"] == {"driver": "file", "discard-nb-ok": 1,
                                        "discard-nb-failed": 0, "discard-bytes-ok": 1 << 20}


async def test_invalid_and_failed_requests(registry: Registry, tmp_path: Path) -> None:
    await registry.add_node(NodeOptions(driver="null-co", node_name="n0", size=4096,
                                        read_only=True))
    dev = registry.add_device("hd", "hd0", "n0")
    with pytest.raises(InvalidArgument):
        await devio.pread(dev, 4000, 200)
    with pytest.raises(ReadOnly) as info:
        await devio.pwrite(dev, 0, b"x")
    assert info.value.errno == errno.EPERM
    cd = registry.add_device("cd", "cd0", None)
    with pytest.raises(NoMedium):
        await devio.pread(cd, 0, 512)
    s = dev.stats.to_qmp()
    assert (s["invalid_rd_operations"], s["invalid_wr_operations"], s["rd_operations"]) == (1, 1, 0)
    assert cd.stats.to_qmp()["failed_rd_operations"] == 1


async def test_io_error_reports_by_policy(registry: Registry, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 8192)
    node = await registry.add_node(NodeOptions(driver="file", node_name="f0",
                                               filename=str(img)))
    seen: list[Event] = []
    registry.bus.subscribe(seen.append)
    dev = registry.add_device("hd", "hd0", "f0", rerror="ignore")
    # Make the backing fail for real: reads on a directory fd give EISDIR.
    import os
    bad = os.open(tmp_path, os.O_RDONLY)
    os.dup2(bad, node.driver.fd)  # type: ignore[attr-defined]
    os.close(bad)
    data = await devio.pread(dev, 0, 512)  # ignored: completes as success
    assert data == b"\0" * 512
    with pytest.raises(OSError):
        await devio.pwrite(dev, 0, b"x" * 512)  # werror=enospc: not ENOSPC -> report
    assert seen == [
        BlockIoError("hd0", "f0", "read", "ignore", False, os.strerror(errno.EISDIR)),
        BlockIoError("hd0", "f0", "write", "report", False, os.strerror(errno.EBADF)),
    ]
    s = dev.stats.to_qmp()
    assert (s["failed_rd_operations"], s["failed_wr_operations"]) == (1, 1)


async def test_only_successful_writes_raise_wr_highest_offset(
    registry: Registry, tmp_path: Path
) -> None:
    """QEMU moves wr_highest_offset when a write succeeds, not when its error is ignored."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 65536)
    node = await registry.add_node(NodeOptions(driver="file", node_name="f0",
                                               filename=str(img)))
    dev = registry.add_device("hd", "hd0", "f0", werror="ignore")
    await devio.pwrite(dev, 4096, b"x" * 512)
    await devio.write_zeroes(dev, 8192, 4096)
    assert node.wr_highest_offset == 8192 + 4096
    import os
    bad = os.open(tmp_path, os.O_RDONLY)  # writes on a directory fd fail (EBADF)
    os.dup2(bad, node.driver.fd)  # type: ignore[attr-defined]
    os.close(bad)
    await devio.pwrite(dev, 32768, b"y" * 512)  # ignored: completes as success
    s = dev.stats.to_qmp()
    assert (s["failed_wr_operations"], s["wr_operations"]) == (1, 2)
    assert node.wr_highest_offset == 8192 + 4096


async def test_ignored_read_error_returns_zeroes_not_stale_memory(
        registry: Registry, tmp_path: Path) -> None:
    import os

    from blockd.aio.buffers import BufferPool

    img = tmp_path / "disk.img"
    img.write_bytes(b"\x01" * (1 << 20))
    node = await registry.add_node(NodeOptions(driver="file", node_name="f0",
                                               filename=str(img)))
    dev = registry.add_device("hd", "hd0", "f0", rerror="ignore")
    pool = BufferPool()
    stale = pool.get(1 << 17)
    stale[:] = b"\xee" * len(stale)
    pool.put(stale)
    bad = os.open(tmp_path, os.O_RDONLY)  # reads of a directory fail for real (EISDIR)
    os.dup2(bad, node.driver.fd)  # type: ignore[attr-defined]
    os.close(bad)
    got: list[object] = []
    dev.submit_read(0, 1 << 17, lambda buf, exc: got.append((buf, exc)), pool)
    while not got:
        await asyncio.sleep(0.01)
    buf, exc = got[0]  # type: ignore[misc]
    assert exc is None and buf is stale
    assert bytes(stale) == bytes(1 << 17)


async def _splice_read(registry: Registry, path: Path, offset: int, length: int,
                       shrink_to: int | None = None,
                       read_only: bool = False) -> tuple[bytes, list[object]]:
    """A large read with pipes on a disk file, io_uring on; the bytes and the worker calls."""
    uring = UringIo.create()
    if uring is None:
        pytest.fail("io_uring is not available on this kernel")
    registry.workers.uring = uring
    worker_calls: list[object] = []
    submit = registry.workers.submit

    def counting_submit(fn: Callable[..., Any], args: tuple[Any, ...], done: Any) -> None:
        worker_calls.append(fn)
        submit(fn, args, done)

    registry.workers.submit = counting_submit  # type: ignore[method-assign]
    pipes = PipePool(limit=1)
    try:
        await registry.add_node(NodeOptions(driver="file", node_name="f0",
                                            filename=str(path), read_only=read_only))
        dev = registry.add_device("hd", "hd0", "f0")
        assert dev.node is not None and dev.node.splice_fd >= 0
        if shrink_to is not None:
            os.truncate(path, shrink_to)
        got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        dev.submit_read(offset, length, lambda res, exc: got.set_result(exc or res),
                        pipes=pipes)
        pipe = await asyncio.wait_for(got, 10)
        assert isinstance(pipe, Pipe), pipe
        assert pipe.held == length
        data = bytes(pipe.take())
        pipes.put(pipe)
        s = dev.block_stats()["stats"]
        assert isinstance(s, dict) and (s["rd_operations"], s["rd_bytes"]) == (1, length)
        return data, worker_calls
    finally:
        pipes.close()
        uring.close()
        registry.workers.uring = None


@pytest.fixture
def disk_path(tmp_path: Path) -> Iterator[Path]:
    """An image on the disk's file system (/tmp may be tmpfs, which is memory-backed)."""
    path = Path("/var/tmp") / f"blockd-device-io-{os.getpid()}-{tmp_path.name}.img"
    yield path
    path.unlink(missing_ok=True)


async def test_large_reads_of_a_disk_file_splice_on_io_uring(registry: Registry,
                                                             disk_path: Path) -> None:
    img = disk_path
    content = os.urandom(4 << 20)
    img.write_bytes(content)
    data, worker_calls = await _splice_read(registry, img, 12345, 512 << 10)
    assert data == content[12345:12345 + (512 << 10)]
    assert worker_calls == []  # no Python thread: the kernel's io-wq did the splice


async def test_large_reads_of_a_read_only_disk_file_splice_on_io_uring(
        registry: Registry, disk_path: Path) -> None:
    # A read-only node has no descriptor for io_uring writes (Node.ring_fd), but a
    # splice only reads: it takes the ring route too.
    img = disk_path
    content = os.urandom(1 << 20)
    img.write_bytes(content)
    data, worker_calls = await _splice_read(registry, img, 4096, 256 << 10, read_only=True)
    assert registry.nodes["f0"].ring_fd == -1
    assert data == content[4096:4096 + (256 << 10)]
    assert worker_calls == []


async def test_a_short_splice_on_io_uring_is_finished_by_a_worker(registry: Registry,
                                                                  disk_path: Path) -> None:
    img = disk_path
    content = os.urandom(2 << 20)
    img.write_bytes(content)
    # The node believes in 2 MiB; the file shrinks under it, so the ring's splice comes
    # back short and a worker pads the rest with zeroes, as the threads' path does.
    data, worker_calls = await _splice_read(registry, img, (1 << 20) - 4096, 65536,
                                            shrink_to=1 << 20)
    assert data == content[(1 << 20) - 4096:1 << 20] + bytes(65536 - 4096)
    assert len(worker_calls) == 1
