"""The ``host_device`` driver on real loop devices (root only)."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from blockd.devices import _aligned_io, _ioctl
from blockd.devices.base import NodeOptions
from blockd.devices.file import FileDriver
from blockd.devices.host_device import HostDeviceDriver
from blockd.errors import InvalidArgument, ReadOnly

pytestmark = pytest.mark.host

MiB = 1 << 20

# conftest.LoopDevice / conftest's factory (conftest modules are not imported by name).
LoopDevice = Any
LoopFactory = Callable[..., Any]


def options(path: os.PathLike[str] | str, **kw: Any) -> NodeOptions:
    return NodeOptions(driver="host_device", node_name="hd0", filename=os.fspath(path), **kw)


@pytest.fixture
def opened(loop_device: LoopFactory) -> Iterator[Callable[..., HostDeviceDriver]]:
    """Open drivers, closed before the loop devices are detached."""
    drivers: list[HostDeviceDriver] = []

    def open_(dev: LoopDevice | str, **kw: Any) -> HostDeviceDriver:
        driver = HostDeviceDriver.open(options(dev, **kw))
        drivers.append(driver)
        return driver

    yield open_
    for driver in drivers:
        driver.close()


def sysfs_int(dev: LoopDevice, name: str) -> int:
    return int((dev.sysfs / "queue" / name).read_text())


def image_bytes(dev: LoopDevice, offset: int, length: int) -> bytes:
    with open(dev.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def read(driver: HostDeviceDriver, offset: int, length: int) -> bytes:
    view = _aligned_io.aligned_buffer(length)
    assert driver.preadv(offset, [view]) == length
    return bytes(view)


def allocated(dev: LoopDevice) -> int:
    return os.stat(dev.image).st_blocks * 512


def test_size_and_sector_sizes_512(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver]
) -> None:
    dev = loop_device(48 * MiB)
    driver = opened(dev)
    assert driver.getlength() == 48 * MiB
    info = driver.get_info()
    assert info.logical_block_size == 512 == sysfs_int(dev, "logical_block_size")
    assert info.physical_block_size == sysfs_int(dev, "physical_block_size")
    assert (info.request_alignment, info.buffer_alignment) == (1, 1)  # buffered
    assert info.filename == dev.path
    assert info.actual_size == 0  # a device node allocates nothing
    assert not info.read_only_medium and not driver.read_only


def test_sector_size_4096(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver]
) -> None:
    dev = loop_device(16 * MiB, sector_size=4096)
    info = opened(dev, cache_direct=True).get_info()
    assert info.logical_block_size == 4096 == sysfs_int(dev, "logical_block_size")
    assert info.physical_block_size == sysfs_int(dev, "physical_block_size") >= 4096
    assert info.request_alignment == 4096
    assert info.buffer_alignment == 4096


def test_read_only_device(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver]
) -> None:
    dev = loop_device(8 * MiB, read_only=True)
    with pytest.raises(ReadOnly) as info:
        HostDeviceDriver.open(options(dev))
    assert info.value.message == "The device is not writable: Permission denied"
    assert info.value.errno == errno.EACCES

    auto = opened(dev, auto_read_only=True)
    assert auto.read_only
    assert auto.get_info().read_only_medium
    with pytest.raises(ReadOnly):
        auto.pwritev(0, [b"x" * 512])

    ro = opened(dev, read_only=True)
    assert ro.read_only and ro.get_info().read_only_medium
    assert read(ro, 0, 512) == bytes(512)


def test_writes_reach_the_backing_file_and_back(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver]
) -> None:
    dev = loop_device(8 * MiB)
    driver = opened(dev)
    data = os.urandom(3000)
    assert driver.pwritev(1234, [data]) == 3000
    driver.flush()
    assert image_bytes(dev, 1234, 3000) == data

    other = os.urandom(4096)
    with open(dev.image, "r+b") as f:
        f.seek(MiB)
        f.write(other)
        f.flush()
        os.fsync(f.fileno())
    fresh = opened(dev, cache_direct=True)
    assert read(fresh, MiB, 4096) == other


def test_discard_deallocates_in_backing_file(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver]
) -> None:
    dev = loop_device(8 * MiB)
    driver = opened(dev, discard="unmap", cache_direct=True)
    driver.pwritev(MiB, [os.urandom(2 * MiB)])
    driver.flush()
    before = allocated(dev)
    assert before >= 2 * MiB
    driver.discard(MiB, 2 * MiB)
    driver.flush()
    assert allocated(dev) <= before - 2 * MiB + 64 * 1024
    assert read(driver, MiB, 2 * MiB) == bytes(2 * MiB)
    assert driver.get_info().can_discard


def test_discard_keeps_unaligned_edges_and_ignore_mode(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver]
) -> None:
    dev = loop_device(8 * MiB)
    data = os.urandom(64 * 1024)
    ignoring = opened(dev)
    ignoring.pwritev(0, [data])
    ignoring.flush()
    before = allocated(dev)
    ignoring.discard(0, 64 * 1024)  # discard=ignore: nothing happens
    assert allocated(dev) == before
    assert read(ignoring, 0, 64 * 1024) == data

    unmapping = opened(dev, discard="unmap", cache_direct=True)
    unmapping.discard(100, 8192)  # only the whole blocks 512..8192 go
    got = read(unmapping, 0, 64 * 1024)
    assert got[:512] == data[:512]
    assert got[8192:] == data[8192:]


def test_write_zeroes_with_blkzeroout(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver], monkeypatch: Any
) -> None:
    dev = loop_device(8 * MiB)
    driver = opened(dev)
    data = os.urandom(MiB)
    driver.pwritev(0, [data])
    calls: list[tuple[int, int, int]] = []
    real = _ioctl.ioctl_range

    def spy(fd: int, request: int, start: int, length: int) -> None:
        calls.append((request, start, length))
        real(fd, request, start, length)

    monkeypatch.setattr("blockd.devices.host_device.ioctl_range", spy)
    driver.write_zeroes(1000, 100_000)
    assert calls == [(_ioctl.BLKZEROOUT, 1024, 100_864 - 1024)]
    got = read(driver, 0, MiB)
    assert got[1000:101_000] == bytes(100_000)
    assert got[:1000] == data[:1000] and got[101_000:] == data[101_000:]
    driver.flush()
    assert image_bytes(dev, 0, MiB) == got


def test_write_zeroes_falls_back_when_blkzeroout_refused(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver], monkeypatch: Any
) -> None:
    dev = loop_device(8 * MiB)
    driver = opened(dev, cache_direct=True)
    data = os.urandom(MiB)
    driver.pwritev(0, [data])

    def refuse(fd: int, request: int, start: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr("blockd.devices.host_device.ioctl_range", refuse)
    driver.write_zeroes(300, 500_000)
    got = read(driver, 0, MiB)
    assert got[300:500_300] == bytes(500_000)
    assert got[:300] == data[:300] and got[500_300:] == data[500_300:]


def test_direct_4096_aligned_and_unaligned(
    loop_device: LoopFactory, opened: Callable[..., HostDeviceDriver]
) -> None:
    dev = loop_device(4 * MiB, sector_size=4096)
    driver = opened(dev, cache_direct=True)
    # The kernel itself refuses a 512-aligned O_DIRECT read on this device:
    # without the driver's bounce buffers the requests below would fail.
    scratch = _aligned_io.aligned_buffer(8192)
    with pytest.raises(OSError) as info:
        os.preadv(driver.fd, [scratch[:4096]], 512)
    assert info.value.errno == errno.EINVAL

    model = bytearray(4 * MiB)
    aligned = _aligned_io.aligned_buffer(3 * 4096)
    aligned[:] = os.urandom(3 * 4096)
    assert driver.pwritev(8192, [aligned]) == 3 * 4096
    model[8192 : 8192 + 3 * 4096] = aligned

    rng = random.Random(42)
    for _ in range(100):
        offset = rng.randrange(0, 4 * MiB - 1)
        length = rng.randrange(1, min(30000, 4 * MiB - offset) + 1)
        shift = rng.randrange(0, 700)
        if rng.random() < 0.5:
            data = os.urandom(length)
            buf = bytearray(length + shift)
            buf[shift:] = data
            assert driver.pwritev(offset, [memoryview(buf)[shift:]]) == length
            model[offset : offset + length] = data
        else:
            buf = bytearray(length + shift)
            assert driver.preadv(offset, [memoryview(buf)[shift:]]) == length
            assert buf[shift:] == model[offset : offset + length]
    driver.flush()
    assert dev.image.read_bytes()[: 4 * MiB] == model


def test_wrong_file_types_give_qemu_errors(
    loop_device: LoopFactory, tmp_path: Any
) -> None:
    dev = loop_device(4 * MiB)
    regular = tmp_path / "cd.iso"
    regular.write_bytes(bytes(4096))
    with pytest.raises(InvalidArgument) as info:
        HostDeviceDriver.open(options(regular))
    assert info.value.message == (
        f"'host_device' driver requires '{regular}' to be either a character or block device"
    )
    with pytest.raises(InvalidArgument) as info:
        FileDriver.open(NodeOptions(driver="file", node_name="f", filename=dev.path))
    assert info.value.message == f"'file' driver requires '{dev.path}' to be a regular file"


def test_probe_device(loop_device: LoopFactory, tmp_path: Any) -> None:
    dev = loop_device(4 * MiB)
    regular = tmp_path / "plain.img"
    regular.write_bytes(b"")
    assert HostDeviceDriver.probe_device(dev.path) == 100
    assert HostDeviceDriver.probe_device(str(regular)) == 0
    assert FileDriver.probe_device(dev.path) == 0


def test_character_device_is_accepted(opened: Callable[..., HostDeviceDriver]) -> None:
    driver = opened("/dev/zero", read_only=True)
    assert driver.getlength() == 0
    assert driver.get_info().logical_block_size == 512
