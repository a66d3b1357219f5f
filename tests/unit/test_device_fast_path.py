"""Device.try_read / try_write / try_read_hole: the synchronous fast path, on real files
and null nodes.

A file on /dev/shm is memory-backed (served on the spot); a file on /var/tmp is
on the disk's file system (reads on the spot only from the page cache, writes
never).  Whenever the fast path declines, the counters must not have moved: the
full path accounts the request.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import devio
import pytest

from blockd.block.device import Device
from blockd.block.registry import Registry
from blockd.block.stats import FOLD_AT, BlockAcctStats, IoKind, NoAccounting
from blockd.devices.base import NodeOptions
from blockd.events import BlockIoError, Event, EventBus

MiB = 1 << 20


@pytest.fixture
def registry() -> Registry:
    return Registry(executor=ThreadPoolExecutor(2), bus=EventBus())


def _image(directory: str, name: str) -> Iterator[Path]:
    path = Path(directory) / f"blockd-fast-{os.getpid()}-{name}.img"
    path.write_bytes(bytes(range(256)) * (MiB // 256))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture
def shm_image(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from _image("/dev/shm", request.node.name)


@pytest.fixture
def disk_image(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from _image("/var/tmp", request.node.name)


async def _device(registry: Registry, path: Path, kind: str = "hd", **options: object) -> Device:
    await registry.add_node(NodeOptions(driver="file", node_name="f0", filename=str(path),
                                        **options))  # type: ignore[arg-type]
    return registry.add_device(kind, "d0", "f0")  # type: ignore[arg-type]


def _counts(dev: Device) -> tuple[object, ...]:
    s = dev.stats.to_qmp()
    return (s["rd_operations"], s["rd_bytes"], s["wr_operations"], s["wr_bytes"],
            s["failed_rd_operations"], s["failed_wr_operations"],
            s["invalid_rd_operations"], s["invalid_wr_operations"], dev.stats.in_flight())


async def test_memory_backed_read_is_served_and_accounted(
    registry: Registry, shm_image: Path
) -> None:
    dev = await _device(registry, shm_image)
    assert dev.node is not None and dev.node.driver.memory_backed
    buf = bytearray(4096)
    assert dev.try_read(8192 + 16, buf) == 4096
    assert buf == shm_image.read_bytes()[8192 + 16:8192 + 16 + 4096]
    assert _counts(dev) == (1, 4096, 0, 0, 0, 0, 0, 0, 0)
    assert dev.stats.to_qmp()["rd_total_time_ns"] > 0
    assert dev.node.in_flight == 0


async def test_memory_backed_write_lands_and_is_accounted(
    registry: Registry, shm_image: Path
) -> None:
    dev = await _device(registry, shm_image)
    assert dev.try_write(65536, b"W" * 4096, False)
    assert dev.try_write(4096, memoryview(b"F" * 512), True)
    data = shm_image.read_bytes()
    assert data[65536:65536 + 4096] == b"W" * 4096 and data[4096:4608] == b"F" * 512
    assert _counts(dev) == (0, 0, 2, 4608, 0, 0, 0, 0, 0)
    assert dev.block_stats()["stats"]["wr_highest_offset"] == 65536 + 4096  # type: ignore[index]


async def test_successes_are_counted_exactly_across_folds(
    registry: Registry, shm_image: Path
) -> None:
    """The fast paths log into the statistics themselves: every request, its bytes and
    its latency (two clock reads, 1 µs apart here) arrive, and the log stays bounded."""
    ticks = itertools.count(0, 1000)
    stats = BlockAcctStats(clock=lambda: next(ticks))
    await registry.add_node(NodeOptions(driver="file", node_name="f0",
                                        filename=str(shm_image)))
    dev = registry.add_device("hd", "d0", "f0", stats=stats)
    requests = FOLD_AT  # three folds' worth of each kind: every success takes 3 entries
    for i in range(requests):
        assert dev.try_write(i * 512, b"w" * 512, False)
        assert dev.try_read(i * 512, bytearray(1024)) == 1024
        assert len(stats.success_log(IoKind.WRITE) or ()) < FOLD_AT
    s = stats.to_qmp()
    assert (s["wr_operations"], s["wr_bytes"], s["wr_total_time_ns"]) == (
        requests, requests * 512, requests * 1000)
    assert (s["rd_operations"], s["rd_bytes"], s["rd_total_time_ns"]) == (
        requests, requests * 1024, requests * 1000)
    assert s["idle_time_ns"] == 1000  # since the last request's end; to_qmp read the clock


async def test_read_past_a_shrunk_file_is_padded_with_zeroes(
    registry: Registry, shm_image: Path
) -> None:
    dev = await _device(registry, shm_image)
    os.truncate(shm_image, 6144)  # the node still believes in 1 MiB
    buf = bytearray(b"\xff" * 4096)
    assert dev.try_read(4096, buf) == 2048
    assert buf[:2048] == (bytes(range(256)) * 8) and buf[2048:] == bytes(2048)
    assert _counts(dev) == (1, 4096, 0, 0, 0, 0, 0, 0, 0)


async def test_memory_backed_reads_go_straight_to_the_descriptor(
    registry: Registry, shm_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory-backed file is read with one os.preadv of the device's own, without
    flags; the driver is not asked."""
    dev = await _device(registry, shm_image)
    node = dev.node
    assert node is not None
    assert (node.read_fd, node.read_flags) == (node.driver.fd, 0)  # type: ignore[attr-defined]

    def no_driver(*args: object) -> int:
        raise AssertionError("the driver was asked")

    monkeypatch.setattr(node, "read_now", no_driver)
    buf = bytearray(4096)
    assert dev.try_read(12288, buf) == 4096 and buf == shm_image.read_bytes()[12288:16384]
    assert _counts(dev)[:2] == (1, 4096)


async def test_disk_file_reads_ask_the_page_cache_and_give_up_on_refused_flags(
    registry: Registry, disk_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buffered file on a disk is read with RWF_NOWAIT; a kernel that refuses the flag
    turns the device's own read off for good (the driver's way then), other errors only
    decline the one request."""
    from blockd.block import device as device_module

    dev = await _device(registry, disk_image)
    node = dev.node
    assert node is not None and node.read_fd >= 0 and node.read_flags == os.RWF_NOWAIT
    assert await devio.pread(dev, 0, 4096) == disk_image.read_bytes()[:4096]  # cached now
    real = os.preadv
    failure = [errno.EIO]

    def refusing(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(failure[0], os.strerror(failure[0]))
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(device_module, "_preadv", refusing)
    buf = bytearray(4096)
    assert dev.try_read(0, buf) is None and node.read_fd >= 0  # EIO: this request only
    failure[0] = errno.EOPNOTSUPP
    assert dev.try_read(0, buf) is None and node.read_fd == -1
    assert dev.try_read(0, buf) == 4096  # the driver's preadv_nowait
    assert buf == disk_image.read_bytes()[:4096]


async def test_memory_backed_plain_writes_go_straight_to_the_descriptor(
    registry: Registry, shm_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain write to a memory-backed file is one os.pwritev of the device's own; a
    FUA write still asks the driver (it makes the write durable)."""
    dev = await _device(registry, shm_image)
    node = dev.node
    assert node is not None and node.write_fd == node.driver.fd  # type: ignore[attr-defined]
    assert node.ring_fd == -1
    asked: list[bool] = []
    real = node.write_now
    assert real is not None

    def driver_write(offset: int, buffers: tuple[bytes, ...], fua: bool) -> int:
        asked.append(fua)
        return real(offset, buffers, fua)

    monkeypatch.setattr(node, "write_now", driver_write)
    assert dev.try_write(8192, b"P" * 4096, False)
    assert dev.try_write(16384, b"D" * 512, True)
    data = shm_image.read_bytes()
    assert data[8192:12288] == b"P" * 4096 and data[16384:16896] == b"D" * 512
    assert asked == [True]
    assert _counts(dev)[2:4] == (2, 4608)
    assert dev.block_stats()["stats"]["wr_highest_offset"] == 16896  # type: ignore[index]


async def test_declines_leave_the_counters_alone(registry: Registry, shm_image: Path) -> None:
    dev = await _device(registry, shm_image, kind="cd")
    before = _counts(dev)
    buf = bytearray(4096)
    assert dev.try_read(MiB - 2048, buf) is None  # past the end
    assert dev.try_read(-4096, buf) is None
    assert not dev.try_write(MiB, b"x" * 512, False)
    dev.pause(publish=False)
    assert dev.try_read(0, buf) is None and not dev.try_write(0, b"x", False)
    dev.resume(publish=False)
    dev.tray_open = True
    assert dev.try_read(0, buf) is None and not dev.try_write(0, b"x", False)
    dev.tray_open = False
    assert _counts(dev) == before
    assert dev.try_read(0, buf) == 4096  # and back on the spot once nothing stands in the way


async def test_read_only_node_declines_writes(registry: Registry, shm_image: Path) -> None:
    dev = await _device(registry, shm_image, read_only=True)
    assert not dev.try_write(0, b"x" * 512, False)
    assert shm_image.read_bytes()[:512] == bytes(range(256)) * 2
    assert _counts(dev) == (0, 0, 0, 0, 0, 0, 0, 0, 0)


async def test_disk_file_reads_only_from_the_page_cache(
    registry: Registry, disk_image: Path
) -> None:
    dev = await _device(registry, disk_image)
    assert dev.node is not None and not dev.node.driver.memory_backed
    fd = os.open(disk_image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
    finally:
        os.close(fd)
    buf = bytearray(4096)
    assert dev.try_read(0, buf) is None  # not cached: it must not wait for the disk here
    assert _counts(dev) == (0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert await devio.pread(dev, 0, 4096) == disk_image.read_bytes()[:4096]  # full path caches it
    assert dev.try_read(0, buf) == 4096 and buf == disk_image.read_bytes()[:4096]
    assert _counts(dev)[:2] == (2, 8192)
    # Buffered writes to a disk may block: never on the spot.
    assert not dev.try_write(0, b"x" * 4096, False)
    assert _counts(dev)[2:4] == (0, 0)


async def test_error_declines_then_the_full_path_applies_the_policy(
    registry: Registry, shm_image: Path, tmp_path: Path
) -> None:
    node = await registry.add_node(NodeOptions(driver="file", node_name="f0",
                                               filename=str(shm_image)))
    dev = registry.add_device("hd", "d0", "f0", rerror="report")
    seen: list[Event] = []
    registry.bus.subscribe(seen.append)
    bad = os.open(tmp_path, os.O_RDONLY)  # reads on a directory fail with EISDIR
    try:
        os.dup2(bad, node.driver.fd)  # type: ignore[attr-defined]
    finally:
        os.close(bad)
    assert dev.try_read(0, bytearray(4096)) is None
    assert _counts(dev) == (0, 0, 0, 0, 0, 0, 0, 0, 0) and seen == []
    with pytest.raises(OSError) as info:
        await devio.pread(dev, 0, 4096)
    assert info.value.errno == errno.EISDIR
    assert [type(e) for e in seen] == [BlockIoError]
    assert _counts(dev)[4] == 1  # failed once, not twice


async def test_null_reads_are_zeroes_and_writes_are_counted(registry: Registry) -> None:
    await registry.add_node(NodeOptions(driver="null-co", node_name="n0", size=MiB))
    dev = registry.add_device("hd", "d0", "n0")
    buf = bytearray(b"\xff" * 4096)
    assert dev.try_read(4096, buf) == 0  # null-co reads nothing without read-zeroes
    assert buf == bytes(4096)  # and blockd never hands out what was not read
    assert dev.try_write(0, b"x" * 4096, True)
    assert _counts(dev) == (1, 4096, 1, 4096, 0, 0, 0, 0, 0)


async def test_zero_reading_null_reads_are_accounted_as_holes(registry: Registry) -> None:
    """null-co with read-zeroes needs no I/O for a read: the NBD server sends a hole."""
    await registry.add_node(NodeOptions(driver="null-co", node_name="n0", size=MiB,
                                        read_zeroes=True))
    dev = registry.add_device("cd", "d0", "n0")
    assert dev.try_read_hole(MiB - 4096, 4096)
    assert _counts(dev) == (1, 4096, 0, 0, 0, 0, 0, 0, 0)
    before = _counts(dev)
    assert not dev.try_read_hole(MiB - 4096, 8192)  # past the end: the full path refuses it
    assert not dev.try_read_hole(-4096, 4096)
    assert not dev.try_read_hole(0, 0)  # a hole chunk may not be empty
    dev.pause(publish=False)
    assert not dev.try_read_hole(0, 4096)
    dev.resume(publish=False)
    dev.tray_open = True
    assert not dev.try_read_hole(0, 4096)
    dev.tray_open = False
    assert _counts(dev) == before


@pytest.mark.parametrize("options", [
    {"read_zeroes": False},  # reads leave buffers alone: no promise of zeroes
    {"read_zeroes": True, "latency_ns": 1000},  # each read must still take its time
])
async def test_other_null_nodes_send_data(registry: Registry, options: dict[str, object]) -> None:
    await registry.add_node(NodeOptions(driver="null-co", node_name="n0", size=MiB,
                                        **options))  # type: ignore[arg-type]
    dev = registry.add_device("hd", "d0", "n0")
    assert not dev.try_read_hole(0, 4096)
    assert _counts(dev) == (0, 0, 0, 0, 0, 0, 0, 0, 0)


async def test_files_never_read_as_holes(registry: Registry, shm_image: Path) -> None:
    dev = await _device(registry, shm_image)
    assert not dev.try_read_hole(0, 4096)
    assert _counts(dev) == (0, 0, 0, 0, 0, 0, 0, 0, 0)


async def test_accounting_off_counts_nothing(registry: Registry, shm_image: Path) -> None:
    registry.stats_class = NoAccounting
    dev = await _device(registry, shm_image)
    assert dev.try_read(0, bytearray(4096)) == 4096 and dev.try_write(0, b"y" * 4096, False)
    assert _counts(dev) == (0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert dev.stats.success_log(IoKind.READ) is None
    assert dev.stats.clock() == 0  # no clock is read either (that is accounting's cost too)
    assert shm_image.read_bytes()[:4096] == b"y" * 4096
