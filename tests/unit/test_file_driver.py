"""The ``file`` driver on real temporary files (and, where marked, a real ramfs mount)."""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockd.devices import _aligned_io, open_driver, posix
from blockd.devices.base import BlockDriver, Buffer, NodeOptions
from blockd.devices.file import FileDriver
from blockd.errors import BlockdError, InvalidArgument, NotFound, ReadOnly

MiB = 1 << 20


def options(path: Path | str, **kw: Any) -> NodeOptions:
    return NodeOptions(driver="file", node_name="f0", filename=str(path), **kw)


@pytest.fixture
def opened() -> Iterator[Callable[..., FileDriver]]:
    """Open FileDrivers and close them all at teardown."""
    drivers: list[FileDriver] = []

    def open_(path: Path | str, **kw: Any) -> FileDriver:
        driver = FileDriver.open(options(path, **kw))
        drivers.append(driver)
        return driver

    yield open_
    for driver in drivers:
        driver.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB of a known pattern
    return path


def read(driver: BlockDriver, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    count = driver.preadv(offset, [memoryview(buf)])
    return bytes(buf[:count])


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- opening -----------------------------------------------------------------


def test_missing_file_gives_qemu_text(tmp_path: Path) -> None:
    path = tmp_path / "missing.img"
    with pytest.raises(NotFound) as info:
        FileDriver.open(options(path))
    assert info.value.message == f"Could not open '{path}': No such file or directory"
    assert info.value.errno == errno.ENOENT


def test_directory_fails_like_qemu(tmp_path: Path) -> None:
    with pytest.raises(BlockdError) as info:
        FileDriver.open(options(tmp_path))
    assert info.value.message == f"Could not open '{tmp_path}': Is a directory"
    assert info.value.errno == errno.EISDIR
    # Read-only, the open succeeds and the type check speaks.
    with pytest.raises(InvalidArgument) as info2:
        FileDriver.open(options(tmp_path, read_only=True))
    assert info2.value.message == f"'file' driver requires '{tmp_path}' to be a regular file"


def test_character_device_is_not_a_regular_file() -> None:
    with pytest.raises(InvalidArgument) as info:
        FileDriver.open(options("/dev/null"))
    assert info.value.message == "'file' driver requires '/dev/null' to be a regular file"
    assert info.value.errno == errno.EINVAL


def test_aio_native_needs_cache_direct_checked_before_opening(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        FileDriver.open(options(tmp_path / "missing.img", aio="native"))
    assert info.value.message == (
        "aio=native was specified, but it requires cache.direct=on, which was not specified."
    )


def test_force_share_needs_read_only(image: Path, opened: Callable[..., FileDriver]) -> None:
    with pytest.raises(InvalidArgument) as info:
        FileDriver.open(options(image, force_share=True))
    assert info.value.message == "force-share=on can only be used with read-only images"
    assert opened(image, force_share=True, read_only=True).read_only


def test_filename_is_required() -> None:
    with pytest.raises(InvalidArgument, match="Parameter 'filename' is missing"):
        FileDriver.open(NodeOptions(driver="file", node_name="f0"))


def test_open_driver_dispatches_and_rejects_unknown(image: Path) -> None:
    driver = open_driver(options(image))
    try:
        assert isinstance(driver, FileDriver)
        assert isinstance(driver, BlockDriver)
    finally:
        driver.close()
    with pytest.raises(InvalidArgument) as info:
        open_driver(NodeOptions(driver="nosuchdrv", node_name="x"))
    assert info.value.message == "Parameter 'driver' does not accept value 'nosuchdrv'"


def test_descriptor_is_close_on_exec(image: Path, opened: Callable[..., FileDriver]) -> None:
    driver = opened(image)
    assert not os.get_inheritable(driver.fd)
    assert os.get_blocking(driver.fd)


def test_close_is_idempotent(image: Path) -> None:
    driver = FileDriver.open(options(image))
    fd = driver.fd
    driver.close()
    driver.close()
    with pytest.raises(OSError):
        os.fstat(fd)


# -- read-only and auto-read-only ----------------------------------------------


def test_read_only_file_opens_read_only(image: Path, opened: Callable[..., FileDriver]) -> None:
    image.chmod(0o444)
    driver = opened(image, read_only=True)
    assert driver.read_only
    assert read(driver, 0, 4) == bytes(range(4))
    for call in (
        lambda: driver.pwritev(0, [b"x"]),
        lambda: driver.discard(0, 4096),
        lambda: driver.write_zeroes(0, 4096),
    ):
        with pytest.raises(ReadOnly) as info:
            call()
        assert info.value.errno == errno.EROFS
    assert image.read_bytes()[:4] == bytes(range(4))


def _deny_write_opens(monkeypatch: pytest.MonkeyPatch, err: int) -> list[int]:
    """Make open(2) refuse O_RDWR like a read-only file would for a non-root user."""
    real_open = os.open
    flags_seen: list[int] = []

    def fake_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        flags_seen.append(flags)
        if flags & os.O_ACCMODE == os.O_RDWR:
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    return flags_seen


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_auto_read_only_falls_back(
    image: Path, opened: Callable[..., FileDriver], monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    flags_seen = _deny_write_opens(monkeypatch, err)
    driver = opened(image, auto_read_only=True)
    assert driver.read_only
    assert [f & os.O_ACCMODE for f in flags_seen] == [os.O_RDWR, os.O_RDONLY]
    assert read(driver, 0, 3) == bytes(range(3))


def test_without_auto_read_only_permission_denied_is_reported(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _deny_write_opens(monkeypatch, errno.EACCES)
    with pytest.raises(BlockdError) as info:
        FileDriver.open(options(image))
    assert info.value.message == f"Could not open '{image}': Permission denied"
    assert info.value.errno == errno.EACCES


def test_auto_read_only_does_not_hide_other_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        FileDriver.open(options(tmp_path / "missing", auto_read_only=True))


# -- reads and writes ----------------------------------------------------------


def test_round_trip_with_mixed_buffer_types(
    image: Path, opened: Callable[..., FileDriver]
) -> None:
    driver = opened(image)
    data = os.urandom(10000)
    count = driver.pwritev(777, [data[:10], bytearray(data[10:5000]), memoryview(data)[5000:]])
    assert count == len(data)
    first, second = bytearray(3), bytearray(len(data) - 3)
    assert driver.preadv(777, [memoryview(first), memoryview(second)]) == len(data)
    assert bytes(first + second) == data
    assert image.read_bytes()[777 : 777 + len(data)] == data
    assert driver.getlength() == MiB


def test_read_past_end_returns_short_count(image: Path, opened: Callable[..., FileDriver]) -> None:
    driver = opened(image)
    buf = bytearray(b"\xaa" * 300)
    assert driver.preadv(MiB - 100, [memoryview(buf)]) == 100
    assert buf[:100] == (bytes(range(256)) * 4096)[-100:]
    assert buf[100:] == b"\xaa" * 200  # past the end: untouched, the caller decides
    assert driver.preadv(MiB + 4096, [memoryview(buf)]) == 0


def test_file_that_shrank_underneath_does_not_crash(
    image: Path, opened: Callable[..., FileDriver]
) -> None:
    driver = opened(image)
    os.truncate(image, 1000)
    assert driver.getlength() == 1000
    assert len(read(driver, 0, 4096)) == 1000
    assert read(driver, 4096, 4096) == b""


def test_write_past_end_grows_file(image: Path, opened: Callable[..., FileDriver]) -> None:
    driver = opened(image)
    assert driver.pwritev(MiB + 10, [b"tail"]) == 4
    assert driver.getlength() == MiB + 14


def test_short_transfers_are_continued(
    image: Path, opened: Callable[..., FileDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = opened(image)
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"r": 0, "w": 0}

    def short_preadv(fd: int, buffers: list[memoryview], offset: int, *a: Any) -> int:
        calls["r"] += 1
        first = memoryview(buffers[0])[:7]  # at most 7 bytes per call
        return real_preadv(fd, [first], offset, *a)

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int, *a: Any) -> int:
        calls["w"] += 1
        return real_pwritev(fd, [memoryview(buffers[0])[:5]], offset, *a)

    monkeypatch.setattr(os, "preadv", short_preadv)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    data = os.urandom(100)
    assert driver.pwritev(50, [data[:30], data[30:]]) == 100
    assert calls["w"] == 20
    assert read(driver, 50, 100) == data
    assert calls["r"] == 15


def test_more_buffers_than_one_syscall_takes(
    image: Path, opened: Callable[..., FileDriver]
) -> None:
    driver = opened(image)
    chunks = [bytes([i % 251]) * 3 for i in range(3000)]  # > IOV_MAX (1024)
    assert driver.pwritev(0, chunks) == 9000
    views = [memoryview(bytearray(3)) for _ in range(3000)]
    assert driver.preadv(0, views) == 9000
    assert b"".join(bytes(v) for v in views) == b"".join(chunks)


# -- fua and flush -------------------------------------------------------------


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[Any, ...]]:
    real = getattr(os, name)
    calls: list[tuple[Any, ...]] = []

    def spy(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(os, name, spy)
    return calls


def test_fua_uses_rwf_dsync(
    image: Path, opened: Callable[..., FileDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = opened(image)
    writes = _spy(monkeypatch, "pwritev")
    syncs = _spy(monkeypatch, "fdatasync")
    assert driver.pwritev(0, [b"durable"], fua=True) == 7
    assert writes and writes[0][3] == os.RWF_DSYNC
    assert syncs == []
    assert image.read_bytes()[:7] == b"durable"


def test_fua_falls_back_to_fdatasync(
    image: Path, opened: Callable[..., FileDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = opened(image)
    real = os.pwritev

    def no_flags(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no pwritev2 flags")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", no_flags)
    syncs = _spy(monkeypatch, "fdatasync")
    assert driver.pwritev(0, [b"durable"], fua=True) == 7
    assert syncs == [(driver.fd,)]
    assert image.read_bytes()[:7] == b"durable"


def test_flush_is_fdatasync_unless_no_flush(
    image: Path, opened: Callable[..., FileDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = _spy(monkeypatch, "fdatasync")
    plain = opened(image)
    no_flush = opened(image, cache_no_flush=True)
    plain.flush()
    no_flush.flush()
    assert syncs == [(plain.fd,)]


# -- discard and write-zeroes --------------------------------------------------


def test_discard_punches_a_hole(image: Path, opened: Callable[..., FileDriver]) -> None:
    driver = opened(image, discard="unmap")
    driver.flush()
    before = allocated(image)
    assert before >= MiB
    driver.discard(0, MiB // 2)
    assert allocated(image) <= before - MiB // 2
    assert read(driver, 0, MiB // 2) == bytes(MiB // 2)
    assert read(driver, MiB // 2, 4) == bytes(range(4))
    assert driver.getlength() == MiB  # KEEP_SIZE
    assert driver.get_info().can_discard


def test_discard_is_a_no_op_without_unmap(image: Path, opened: Callable[..., FileDriver]) -> None:
    driver = opened(image)
    before = allocated(image)
    driver.discard(0, MiB)
    assert allocated(image) == before
    assert read(driver, 0, 4) == bytes(range(4))
    assert not driver.get_info().can_discard


def test_write_zeroes_uses_zero_range(
    image: Path, opened: Callable[..., FileDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = opened(image)
    modes: list[int] = []
    real = posix.fallocate

    def spy(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        real(fd, mode, offset, length)

    monkeypatch.setattr("blockd.devices.file.fallocate", spy)
    writes = _spy(monkeypatch, "pwritev")
    driver.write_zeroes(1000, 5000)
    assert modes == [posix.FALLOC_FL_ZERO_RANGE]
    assert writes == []
    data = image.read_bytes()
    assert data[1000:6000] == bytes(5000)
    assert data[999] == 999 % 256 and data[6000] == 6000 % 256


def test_write_zeroes_may_unmap_punches_hole(
    image: Path, opened: Callable[..., FileDriver]
) -> None:
    driver = opened(image, discard="unmap")
    driver.flush()
    before = allocated(image)
    driver.write_zeroes(0, MiB // 2, may_unmap=True)
    assert allocated(image) <= before - MiB // 2
    assert read(driver, 0, MiB // 2) == bytes(MiB // 2)


def test_write_zeroes_falls_back_to_writing(
    image: Path, opened: Callable[..., FileDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = opened(image)
    calls: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr("blockd.devices.file.fallocate", unsupported)
    monkeypatch.setattr(posix, "ZERO_CHUNK", 64 * 1024)
    writes = _spy(monkeypatch, "pwritev")
    driver.write_zeroes(10, 200_000)
    assert read(driver, 10, 200_000) == bytes(200_000)
    assert read(driver, 0, 10) == bytes(range(10))
    assert read(driver, 200_010, 2) == bytes([200_010 % 256, 200_011 % 256])
    assert len(writes) == 4  # 200000 bytes in 64 KiB chunks
    driver.write_zeroes(0, 10)
    assert calls == [posix.FALLOC_FL_ZERO_RANGE]  # not retried once known unsupported


def test_write_zeroes_on_tmpfs_falls_back_for_real(opened: Callable[..., FileDriver]) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(shm)], capture_output=True, text=True, check=False
    ).stdout.strip()
    if fstype != "tmpfs":
        pytest.skip(f"/dev/shm is {fstype or 'unknown'}, not tmpfs")
    fd, name = tempfile.mkstemp(dir=shm)
    os.close(fd)
    path = Path(name)
    try:
        path.write_bytes(b"\xff" * 65536)
        driver = opened(path)
        with pytest.raises(OSError) as info:  # the kernel fact this test relies on
            posix.fallocate(driver.fd, posix.FALLOC_FL_ZERO_RANGE, 0, 4096)
        assert info.value.errno == errno.EOPNOTSUPP
        driver.write_zeroes(100, 30000)
        data = path.read_bytes()
        assert data[100:30100] == bytes(30000)
        assert data[:100] == b"\xff" * 100 and data[30100:] == b"\xff" * (65536 - 30100)
    finally:
        path.unlink()


# -- O_DIRECT ------------------------------------------------------------------


@pytest.fixture
def direct_dir() -> Iterator[Path]:
    """A directory on a disk filesystem (tmp_path may be tmpfs), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="blockd-direct-", dir="/var/tmp"))
    try:
        probe = path / "probe"
        probe.write_bytes(b"")
        try:
            os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        except OSError as exc:
            pytest.skip(f"/var/tmp does not support O_DIRECT: {exc}")
        yield path
    finally:
        shutil.rmtree(path)


def _misaligned(data: bytes, shift: int) -> memoryview:
    """A view of ``data`` starting ``shift`` bytes past a page boundary."""
    backing = mmap.mmap(-1, len(data) + shift + 1)
    view = memoryview(backing)[shift : shift + len(data)]
    view[:] = data
    return view


def test_direct_info_reports_alignment(direct_dir: Path, opened: Callable[..., FileDriver]) -> None:
    path = direct_dir / "d.img"
    path.write_bytes(os.urandom(64 * 1024))
    info = opened(path, cache_direct=True).get_info()
    assert info.request_alignment in (512, 1024, 2048, 4096)
    assert info.buffer_alignment in (512, 1024, 2048, 4096)
    assert info.logical_block_size == max(512, info.request_alignment)
    buffered = opened(path).get_info()
    assert (buffered.request_alignment, buffered.buffer_alignment) == (1, 1)


def test_direct_unaligned_round_trips(direct_dir: Path, opened: Callable[..., FileDriver]) -> None:
    size = 256 * 1024
    path = direct_dir / "d.img"
    model = bytearray(os.urandom(size))
    path.write_bytes(model)
    driver = opened(path, cache_direct=True)
    assert driver.alignment.request > 1
    rng = random.Random(1234)
    for _ in range(200):
        offset = rng.randrange(0, size - 1)
        length = rng.randrange(1, min(20000, size - offset) + 1)
        if rng.random() < 0.5:
            data = os.urandom(length)
            cut = rng.randrange(0, length + 1)
            bufs: list[Buffer] = [_misaligned(data[:cut], rng.randrange(0, 64)), data[cut:]]
            assert driver.pwritev(offset, bufs) == length
            model[offset : offset + length] = data
        else:
            view = _misaligned(bytes(length), rng.randrange(0, 64))
            assert driver.preadv(offset, [view]) == length
            assert bytes(view) == model[offset : offset + length]
    driver.flush()
    assert path.read_bytes() == model


def test_direct_aligned_request_is_not_bounced(
    direct_dir: Path, opened: Callable[..., FileDriver], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = direct_dir / "d.img"
    path.write_bytes(os.urandom(64 * 1024))
    driver = opened(path, cache_direct=True)
    block = driver.alignment.request
    aligned = mmap.mmap(-1, 2 * block)
    aligned[:] = b"\x5a" * (2 * block)
    writes = _spy(monkeypatch, "pwritev")
    assert driver.pwritev(block, [memoryview(aligned)]) == 2 * block
    assert len(writes) == 1
    sent = writes[0][1][0]
    assert _aligned_io.buffer_address(sent) == _aligned_io.buffer_address(memoryview(aligned))
    assert path.read_bytes()[block : 3 * block] == b"\x5a" * (2 * block)


def test_direct_unaligned_write_at_end_keeps_file_size(
    direct_dir: Path, opened: Callable[..., FileDriver]
) -> None:
    path = direct_dir / "d.img"
    path.write_bytes(b"\x11" * 10000)  # not a multiple of any block size
    driver = opened(path, cache_direct=True)
    assert driver.pwritev(9990, [b"abcde"]) == 5
    assert driver.getlength() == 10000
    assert driver.pwritev(9998, [b"XYZW"]) == 4
    assert driver.getlength() == 10002
    assert path.read_bytes()[9985:] == b"\x11" * 5 + b"abcde" + b"\x11" * 3 + b"XYZW"
    assert len(read(driver, 9000, 4096)) == 1002


def test_direct_concurrent_unaligned_writes_to_one_block(
    direct_dir: Path, opened: Callable[..., FileDriver]
) -> None:
    path = direct_dir / "d.img"
    path.write_bytes(bytes(8192))
    driver = opened(path, cache_direct=True)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so unlocked races would show
    errors: list[BaseException] = []
    try:

        def writer(index: int) -> None:
            try:
                for round_ in range(200):
                    driver.pwritev(index * 10, [bytes([index + 1 + round_ % 2]) * 10])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert errors == []
    data = path.read_bytes()
    for i in range(16):  # every thread's last write survived the others' read-modify-write
        assert data[i * 10 : (i + 1) * 10] == bytes([i + 2]) * 10, i


def test_no_o_direct_support_gives_clear_error(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(InvalidArgument) as info:
        FileDriver.open(options(image, cache_direct=True))
    assert info.value.message == f"Could not open '{image}': filesystem does not support O_DIRECT"
    assert info.value.errno == errno.EINVAL


@pytest.mark.host
def test_no_o_direct_on_real_ramfs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting ramfs needs root")
    mountpoint = tmp_path / "ramfs"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "ramfs", "ramfs", str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode:
        pytest.skip(f"cannot mount ramfs: {result.stderr.strip()}")
    try:
        path = mountpoint / "disk.img"
        path.write_bytes(bytes(4096))
        with pytest.raises(InvalidArgument) as info:
            FileDriver.open(options(path, cache_direct=True))
        assert info.value.message == (
            f"Could not open '{path}': filesystem does not support O_DIRECT"
        )
        FileDriver.open(options(path)).close()  # buffered is fine
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_probe_device(image: Path) -> None:
    assert FileDriver.probe_device(str(image)) == 1
    assert FileDriver.probe_device("/dev/null") == 0
    assert FileDriver.probe_device(str(image) + ".missing") == 0


def test_get_info(image: Path, opened: Callable[..., FileDriver]) -> None:
    info = opened(image, discard="unmap").get_info()
    assert info.filename == str(image)
    assert info.actual_size == allocated(image) > 0
    assert (info.request_alignment, info.buffer_alignment) == (1, 1)
    assert info.logical_block_size == 512
    assert not info.read_only_medium
