"""The ctypes io_uring binding against the real kernel (skipped where io_uring_setup fails)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import platform
import resource
import select
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from blockd.aio import _ring as _uring
from blockd.aio._ring import Ring, UringUnavailable
from blockd.aio.pipes import MAX_PIPES
from blockd.aio.uring import UringIo


def _ring_or_skip(entries: int) -> Ring:
    try:
        return Ring(entries)
    except UringUnavailable as e:
        pytest.skip(f"io_uring unavailable here: {e}")


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = _ring_or_skip(64)
    yield r
    r.close()


@pytest.fixture
def path() -> Iterator[str]:
    """A scratch file on the real filesystem of /var/tmp (not tmpfs)."""
    fd, name = tempfile.mkstemp(prefix="blockd-uring-", dir="/var/tmp")
    os.close(fd)
    yield name
    os.unlink(name)


@pytest.fixture
def rw_fd(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def wait_for(ring: Ring, count: int, timeout: float = 10.0) -> dict[int, int]:
    """Reap until ``count`` completions arrived, sleeping on the eventfd in between."""
    results: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        ring.drain_eventfd()
        for user_data, res in ring.reap():
            assert user_data not in results
            results[user_data] = res
        if len(results) >= count:
            return results
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(results)} of {count} completions after {timeout}s"
        poller = select.poll()  # not select(): a test may hold descriptors above 1,023
        poller.register(ring.eventfd, select.POLLIN)
        poller.poll(left * 1000)


def run(ring: Ring, count: int) -> dict[int, int]:
    assert ring.submit() == count
    return wait_for(ring, count)


def bytes_address(b: bytes) -> int:
    """Address of the first byte of a bytes object's data."""
    addr = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value
    assert addr is not None
    return addr


# -- ABI ---------------------------------------------------------------------------------


def _offsets(cls: type[ctypes.Structure]) -> dict[str, int]:
    return {name: getattr(cls, name).offset for name, *_ in cls._fields_}


def test_struct_sizes_and_offsets_match_linux_io_uring_h() -> None:
    # Values from gcc offsetof/sizeof over <linux/io_uring.h>.
    assert ctypes.sizeof(_uring._SqringOffsets) == 40
    assert ctypes.sizeof(_uring._CqringOffsets) == 40
    assert ctypes.sizeof(_uring._Params) == 120
    assert ctypes.sizeof(_uring._Sqe) == 64
    assert ctypes.sizeof(_uring._Cqe) == 16
    assert ctypes.sizeof(_uring._Iovec) == 16
    assert _offsets(_uring._SqringOffsets) == {
        "head": 0,
        "tail": 4,
        "ring_mask": 8,
        "ring_entries": 12,
        "flags": 16,
        "dropped": 20,
        "array": 24,
        "resv1": 28,
        "user_addr": 32,
    }
    assert _offsets(_uring._CqringOffsets) == {
        "head": 0,
        "tail": 4,
        "ring_mask": 8,
        "ring_entries": 12,
        "overflow": 16,
        "cqes": 20,
        "flags": 24,
        "resv1": 28,
        "user_addr": 32,
    }
    params = _offsets(_uring._Params)
    assert (params["features"], params["wq_fd"], params["resv"]) == (20, 24, 28)
    assert (params["sq_off"], params["cq_off"]) == (40, 80)
    assert _offsets(_uring._Sqe) == {
        "opcode": 0,
        "flags": 1,
        "ioprio": 2,
        "fd": 4,
        "off": 8,
        "addr": 16,
        "len": 24,
        "op_flags": 28,
        "user_data": 32,
        "buf_index": 40,
        "personality": 42,
        "splice_fd_in": 44,
        "addr3": 48,
        "pad2": 56,
    }
    assert _offsets(_uring._Cqe) == {"user_data": 0, "res": 8, "flags": 12}
    # CPython's Py_buffer on a 64-bit build: buf at 0, len at 16.
    assert ctypes.sizeof(_uring.PyBuffer) == 80
    assert (_uring.PyBuffer.buf.offset, _uring.PyBuffer.len.offset) == (0, 16)


def test_struct_formats_agree_with_ctypes_layouts() -> None:
    assert _uring._SQE_STRUCT.size == 64
    assert _uring._SQE_HEAD_STRUCT.size == _uring._Sqe.user_data.offset + 8
    assert _uring._CQE_STRUCT.size == 16
    values = (
        2,
        0x11,
        0x2233,
        -5,
        1 << 40,
        0xDEADBEEF00,
        7,
        0x10,
        (1 << 64) - 1,
        9,
        10,
        -11,
        12,
        13,
    )
    sqe = _uring._Sqe(*values)
    assert _uring._SQE_STRUCT.pack(*values) == bytes(sqe)
    assert _uring._SQE_HEAD_STRUCT.pack(*values[:9]) == bytes(sqe)[:40]
    cqe = _uring._Cqe(42, -errno.EBADF, 3)
    assert _uring._CQE_STRUCT.unpack(bytes(cqe)) == (42, -errno.EBADF, 3)


def test_opcodes_and_constants() -> None:
    assert (_uring._IORING_OP_WRITEV, _uring._IORING_OP_FSYNC) == (2, 3)
    assert (_uring._IORING_OP_WRITE, _uring._IORING_OP_SPLICE) == (23, 30)
    assert _uring._IORING_FSYNC_DATASYNC == 1
    assert _uring._IORING_REGISTER_EVENTFD == 4
    assert (_uring._IORING_OFF_CQ_RING, _uring._IORING_OFF_SQES) == (0x8000000, 0x10000000)


def test_unavailable_on_other_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(UringUnavailable) as info:
        Ring(8)
    assert isinstance(info.value, OSError)
    assert "x86_64" in str(info.value)


# -- I/O ---------------------------------------------------------------------------------


def test_ring_geometry(ring: Ring) -> None:
    assert ring.sq_entries == 64
    assert ring.cq_entries == 128
    assert ring.features & _uring._IORING_FEAT_SINGLE_MMAP
    assert (ring.pending, ring.queued, ring.space) == (0, 0, 64)
    assert ring.submit() == 0
    assert ring.reap() == []


def test_write_then_read_back_several_buffers_and_offsets(ring: Ring, rw_fd: int) -> None:
    a, b, c = b"A" * 1000, bytearray(b"B" * 3000), memoryview(bytearray(b"C" * 100))
    assert ring.prep_writev(rw_fd, [a, b, c], 0, user_data=1)
    assert ring.prep_writev(rw_fd, [b"tail" * 1024], 1 << 20, user_data=2)
    assert (ring.queued, ring.pending) == (2, 0)
    assert ring.submit() == 2
    assert (ring.queued, ring.pending) == (0, 2)
    assert wait_for(ring, 2) == {1: 4100, 2: 4096}
    assert ring.pending == 0

    first, second = bytearray(10), bytearray(4090)
    far = memoryview(bytearray(4096))
    assert os.preadv(rw_fd, [first, second], 0) == 4100
    assert os.preadv(rw_fd, [far], 1 << 20) == 4096
    assert os.preadv(rw_fd, [bytearray(100)], (1 << 20) + 4096) == 0  # at EOF
    assert bytes(first + second) == a + b + bytes(c)
    assert far == b"tail" * 1024
    with open(f"/proc/self/fd/{rw_fd}", "rb") as f:
        assert f.read(4100) == a + b + bytes(c)


def test_read_only_memoryview_slices_of_bytes_are_written_in_place(ring: Ring, rw_fd: int) -> None:
    payload = bytes(range(256)) * 64  # 16 KiB, as an NBD request's received bytes
    view = memoryview(payload)
    slices = [view[100:612], view[5000:9096], view[16383:16384]]
    assert all(s.readonly for s in slices)
    assert ring.prep_writev(rw_fd, slices, 512, user_data=7)

    # The SQE as the kernel will read it ...
    slot = (ring._sqe_tail - 1) & ring._sq_mask
    sqe = _uring._Sqe.from_buffer_copy(ring._sqes[slot * 64 : (slot + 1) * 64])
    assert (sqe.opcode, sqe.fd, sqe.off, sqe.len, sqe.user_data) == (2, rw_fd, 512, 3, 7)
    assert (sqe.flags, sqe.ioprio, sqe.op_flags, sqe.buf_index, sqe.addr3) == (0, 0, 0, 0, 0)
    # ... names iovecs that point into the bytes object itself: nothing was copied.
    iov = (_uring._Iovec * 3).from_address(sqe.addr)
    base = bytes_address(payload)
    assert [(v.iov_base, v.iov_len) for v in iov] == [
        (base + 100, 512),
        (base + 5000, 4096),
        (base + 16383, 1),
    ]
    assert run(ring, 1) == {7: 512 + 4096 + 1}
    got = os.pread(rw_fd, 4609, 512)
    assert got == payload[100:612] + payload[5000:9096] + payload[16383:16384]


def test_buffers_stay_pinned_until_reaped(ring: Ring, rw_fd: int) -> None:
    payload = bytes(8192)
    view = memoryview(payload)[4096:]
    target = bytearray(4096)
    before = sys.getrefcount(view), sys.getrefcount(target)
    assert ring.prep_writev(rw_fd, [view], 0, user_data=1)
    assert ring.prep_writev(rw_fd, [target], 8192, user_data=2)
    assert (sys.getrefcount(view), sys.getrefcount(target)) == (before[0] + 1, before[1] + 1)
    with pytest.raises(BufferError):
        target.extend(b"x")  # a resize could move the buffer: refused while exported
    with pytest.raises(BufferError):
        view.release()
    run(ring, 2)
    assert (sys.getrefcount(view), sys.getrefcount(target)) == before
    target.extend(b"x")
    view.release()


def test_prep_write_copies_small_buffers_and_pins_large_ones(ring: Ring, rw_fd: int) -> None:
    stage = _uring.STAGE_SIZE
    received = os.urandom(stage + 8192)  # as an NBD request's received bytes
    small = memoryview(received)[100:4196]
    large = memoryview(received)[0:stage + 1]
    before = sys.getrefcount(small), sys.getrefcount(large)
    assert ring.prep_write(rw_fd, small, 0, user_data=1)
    assert ring.prep_write(rw_fd, large, 1 << 20, user_data=2)
    assert ring.prep_write(rw_fd, bytearray(b"b" * 512), 4096 * 3, user_data=3)
    assert ring.prep_write(rw_fd, b"", 4096 * 4, user_data=4)
    # The small ones were copied (not pinned), the large one is pinned until reaped.
    assert sys.getrefcount(small) == before[0] and sys.getrefcount(large) == before[1] + 1
    def sqe_of(back: int) -> _uring._Sqe:  # the SQE prepared ``back`` calls ago
        slot = (ring._sqe_tail - back) & ring._sq_mask
        return _uring._Sqe.from_buffer_copy(ring._sqes[slot * 64 : (slot + 1) * 64])

    # One buffer, no iovec (IORING_OP_WRITE): the large one in place, the small one
    # from the ring's copy.
    sqe = sqe_of(3)
    assert (sqe.opcode, sqe.fd, sqe.off, sqe.len, sqe.user_data) == (23, rw_fd, 1 << 20,
                                                                      stage + 1, 2)
    assert sqe.addr == bytes_address(received)
    sqe = sqe_of(4)
    assert (sqe.opcode, sqe.off, sqe.len, sqe.user_data) == (23, 0, 4096, 1)
    assert not bytes_address(received) <= sqe.addr < bytes_address(received) + len(received)
    assert run(ring, 4) == {1: 4096, 2: stage + 1, 3: 512, 4: 0}
    assert sys.getrefcount(large) == before[1]
    assert os.pread(rw_fd, 4096, 0) == received[100:4196]
    assert os.pread(rw_fd, stage + 1, 1 << 20) == received[: stage + 1]
    assert os.pread(rw_fd, 512, 4096 * 3) == b"b" * 512
    # The staging slots are reused: many more small writes than the ring has slots.
    payloads = {i: os.urandom(4096) for i in range(3 * ring.cq_entries)}
    for i, data in payloads.items():
        while not ring.prep_write(rw_fd, data, i * 4096, user_data=100 + i):
            ring.submit()
            wait_for(ring, 1)
    ring.submit()
    while ring.pending:
        wait_for(ring, 1)
    assert all(os.pread(rw_fd, 4096, i * 4096) == data for i, data in payloads.items())


def test_prep_write_takes_a_cast_view_whole(ring: Ring, rw_fd: int) -> None:
    words = memoryview(bytearray(range(256)) * 4).cast("I")  # not bytes: cannot be staged
    assert ring.prep_write(rw_fd, words, 0, user_data=1)
    assert run(ring, 1) == {1: 1024}
    assert os.pread(rw_fd, 1024, 0) == bytes(range(256)) * 4
    with pytest.raises(TypeError):
        ring.prep_write(rw_fd, "not a buffer", 0, user_data=2)  # type: ignore[arg-type]
    assert (ring.queued, ring.pending) == (0, 0)  # nothing was left behind
    assert len(ring._free_slots) == ring.cq_entries


def test_prep_write_says_full(ring: Ring, rw_fd: int) -> None:
    for i in range(ring.sq_entries):
        assert ring.prep_write(rw_fd, b"x", i, user_data=i + 1)
    assert not ring.prep_write(rw_fd, b"x", 0, user_data=1000)  # the SQ is full
    assert run(ring, ring.sq_entries) == {i + 1: 1 for i in range(ring.sq_entries)}
    with pytest.raises(ValueError):
        ring.prep_write(rw_fd, b"x", -1, user_data=1)


def test_failed_pins_are_undone(ring: Ring, rw_fd: int) -> None:
    ok = bytearray(16)
    space = ring.space
    with pytest.raises(TypeError):
        ring.prep_writev(rw_fd, [ok, "not a buffer"], 0, user_data=1)  # type: ignore[list-item]
    ok.extend(b"x")  # not left pinned
    assert (ring.space, ring.queued, ring.pending) == (space, 0, 0)
    assert ring.submit() == 0


def test_many_buffers_in_one_request(ring: Ring, rw_fd: int) -> None:
    chunks = [bytearray([i]) * (i + 1) for i in range(40)]  # beyond the inline iovec pool
    assert ring.prep_writev(rw_fd, chunks, 3, user_data=1)
    total = sum(map(len, chunks))
    assert run(ring, 1) == {1: total}
    targets = [bytearray(len(c)) for c in chunks]
    assert os.preadv(rw_fd, targets, 3) == total
    assert targets == chunks
    for c in chunks:
        c.append(0)  # all released


def test_writev_with_rwf_dsync(ring: Ring, rw_fd: int) -> None:
    assert ring.prep_writev(rw_fd, [b"fua" * 100], 0, user_data=9, rw_flags=os.RWF_DSYNC)
    assert run(ring, 1) == {9: 300}


def test_fsync_and_fdatasync(ring: Ring, rw_fd: int) -> None:
    os.pwrite(rw_fd, b"dirty" * 1000, 0)
    assert ring.prep_fsync(rw_fd, user_data=1)
    assert ring.prep_fsync(rw_fd, user_data=2, datasync=False)
    assert run(ring, 2) == {1: 0, 2: 0}


def test_errors_come_back_as_negative_errno(ring: Ring, path: str) -> None:
    wfd = os.open(path, os.O_WRONLY)
    rfd = os.open(path, os.O_RDONLY)
    try:
        assert ring.prep_writev(rfd, [b"x" * 512], 0, user_data=2)
        assert ring.prep_writev(wfd, [b"y" * 512], 0, user_data=4)  # still works after
        assert run(ring, 2) == {2: -errno.EBADF, 4: 512}
    finally:
        os.close(wfd)
        os.close(rfd)
    bad = os.open("/dev/null", os.O_RDONLY)
    os.close(bad)
    assert ring.prep_fsync(bad, user_data=5)  # a closed fd
    assert run(ring, 1) == {5: -errno.EBADF}


def test_sq_full_returns_false(rw_fd: int) -> None:
    with _ring_or_skip(4) as ring:
        assert (ring.sq_entries, ring.cq_entries) == (4, 8)
        assert all(ring.prep_fsync(rw_fd, user_data=i) for i in range(4))
        assert ring.space == 0
        assert not ring.prep_fsync(rw_fd, user_data=4)
        assert not ring.prep_writev(rw_fd, [b"x"], 0, user_data=4)
        assert ring.queued == 4
        assert ring.submit() == 4
        # The SQ is empty again, while the 4 requests may still be in flight.
        assert all(ring.prep_writev(rw_fd, [b"y"], i, user_data=10 + i) for i in range(4))
        assert ring.submit() == 4
        # Eight requests not reaped fill the CQ: nothing more until they are reaped.
        assert not ring.prep_fsync(rw_fd, user_data=20)
        assert len(wait_for(ring, 8)) == 8
        assert ring.space == 4
        assert ring.prep_fsync(rw_fd, user_data=20)
        assert run(ring, 1) == {20: 0}


def test_user_data_and_offset_checks(ring: Ring, rw_fd: int) -> None:
    assert ring.prep_fsync(rw_fd, user_data=(1 << 64) - 1)
    with pytest.raises(ValueError, match="in flight"):
        ring.prep_fsync(rw_fd, user_data=(1 << 64) - 1)
    with pytest.raises(ValueError, match="64 bits"):
        ring.prep_fsync(rw_fd, user_data=1 << 64)
    with pytest.raises(ValueError, match="64 bits"):
        ring.prep_fsync(rw_fd, user_data=-1)
    with pytest.raises(ValueError, match="offset"):
        ring.prep_writev(rw_fd, [b"x"], -1, user_data=1)
    with pytest.raises(ValueError, match="offset"):
        ring.prep_write(rw_fd, b"x", -1, user_data=1)
    with pytest.raises(ValueError, match="in flight"):
        ring.prep_write(rw_fd, b"x", 0, user_data=(1 << 64) - 1)
    with pytest.raises(ValueError, match="64 bits"):
        ring.prep_write(rw_fd, b"x", 0, user_data=1 << 64)
    assert run(ring, 1) == {(1 << 64) - 1: 0}


def test_eventfd_becomes_readable_after_completion(ring: Ring, rw_fd: int) -> None:
    ring.drain_eventfd()
    assert select.select([ring.eventfd], [], [], 0)[0] == []
    assert ring.prep_fsync(rw_fd, user_data=1)
    assert select.select([ring.eventfd], [], [], 0)[0] == []  # prepared, not submitted
    assert ring.submit() == 1
    assert select.select([ring.eventfd], [], [], 5.0)[0] == [ring.eventfd]
    ring.drain_eventfd()
    assert select.select([ring.eventfd], [], [], 0)[0] == []
    ring.drain_eventfd()  # draining an empty eventfd does not block
    assert ring.reap() == [(1, 0)]
    assert ring.pending == 0


def test_ten_thousand_operations_in_batches(rw_fd: int) -> None:
    count, size = 10_000, 512
    blob = b"".join(i.to_bytes(4, "little") * (size // 4) for i in range(count))
    view = memoryview(blob)
    with _ring_or_skip(256) as ring:
        # Writes in a scrambled order, as many per batch as the ring takes.
        order = [(i * 7919) % count for i in range(count)]
        results: dict[int, int] = {}
        it = iter(order)
        nxt = next(it, None)
        while nxt is not None or ring.pending:
            while nxt is not None and ring.prep_writev(
                rw_fd, [view[nxt * size : (nxt + 1) * size]], nxt * size, user_data=nxt
            ):
                nxt = next(it, None)
            ring.submit()
            results.update(wait_for(ring, 1))
        assert results == dict.fromkeys(range(count), size)

        assert os.pread(rw_fd, len(blob), 0) == blob
        assert ring.pending == 0


def test_close_waits_for_in_flight_requests_and_releases_everything(rw_fd: int) -> None:
    ring = _ring_or_skip(8)
    ring_fd, efd = ring._fd, ring.eventfd
    target = bytearray(b"\x5a" * (1 << 20))
    unsubmitted = bytearray(16)
    assert ring.prep_writev(rw_fd, [target], 0, user_data=1)
    assert ring.prep_fsync(rw_fd, user_data=2)
    assert ring.submit() == 2
    assert ring.prep_writev(rw_fd, [unsubmitted], 1 << 20, user_data=3)
    ring.close()
    assert ring.closed
    # The write finished before close returned; the unsubmitted one never ran.
    assert os.pread(rw_fd, (1 << 20) + 16, 0) == b"\x5a" * (1 << 20)
    target.extend(b"x")
    unsubmitted.extend(b"x")
    for fd in (ring_fd, efd):
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    assert ring.eventfd == -1
    assert (ring.pending, ring.queued, ring.space) == (0, 0, 0)
    ring.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        ring.prep_fsync(rw_fd, user_data=4)
    with pytest.raises(ValueError, match="closed"):
        ring.submit()
    with pytest.raises(ValueError, match="closed"):
        ring.reap()


def test_context_manager_and_many_rings_do_not_leak_fds(rw_fd: int) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with _ring_or_skip(32) as ring:
            assert ring.prep_writev(rw_fd, [b"z" * 64], 0, user_data=1)
            ring.submit()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_completions_reach_the_eventfd_without_interrupting_the_loop(ring: Ring,
                                                                      rw_fd: int) -> None:
    """COOP_TASKRUN (5.19+): no interrupt per completion, yet no completion is missed.

    A completion that lands while the thread runs Python (no system calls) is
    posted when the thread next enters the kernel; entering select() with it
    pending must not sleep past it.
    """
    if not ring.setup_flags & _uring._IORING_SETUP_COOP_TASKRUN:
        pytest.skip(f"kernel {platform.release()} has no IORING_SETUP_COOP_TASKRUN")
    for i in range(200):
        assert ring.prep_fsync(rw_fd, user_data=i + 1)  # fsync runs on an io-wq worker
        assert ring.submit() == 1
        if i % 2:
            spin_until = time.perf_counter() + 0.0005  # busy in userspace meanwhile
            while time.perf_counter() < spin_until:
                pass
        readable, _, _ = select.select([ring.eventfd], [], [], 10)
        assert readable, f"completion {i + 1} never signalled the eventfd"
        ring.drain_eventfd()
        assert ring.reap() == [(i + 1, 0)]


def test_one_reap_across_the_end_of_the_completion_ring(ring: Ring, rw_fd: int) -> None:
    """Completions that wrap around the CQ's end come back whole and in order, and
    every kind of entry (staged, pinned, fsync) gives its slot back."""
    cq = ring.cq_entries
    for i in range(cq - 3):  # move the CQ head to 3 entries before the end
        if not ring.prep_write(rw_fd, b"f", i, user_data=1000 + i):
            run(ring, ring.queued)
            assert ring.prep_write(rw_fd, b"f", i, user_data=1000 + i)
    run(ring, ring.queued)
    assert ring._cq_head.value & ring._cq_mask == cq - 3
    big = os.urandom(_uring.STAGE_SIZE + 1)
    kinds = [b"a" * 512, big, None, b"b" * 4096, big, None, b"c", b"d" * 100]
    for i, data in enumerate(kinds):
        if data is None:
            assert ring.prep_fsync(rw_fd, user_data=i)
        else:
            assert ring.prep_write(rw_fd, data, (1 << 20) + i * (1 << 16), user_data=i)
    assert ring.submit() == len(kinds)
    deadline = time.monotonic() + 10
    while ring._cq_tail.value - ring._cq_head.value < len(kinds):  # all in before one reap
        assert time.monotonic() < deadline
        time.sleep(0.001)
    ring.drain_eventfd()
    reaped = ring.reap()
    assert sorted(reaped) == sorted(
        (i, 0 if data is None else len(data)) for i, data in enumerate(kinds))
    assert (ring.pending, len(ring._free_slots)) == (0, cq)
    assert os.pread(rw_fd, len(big), (1 << 20) + (1 << 16)) == big


def test_splice_moves_file_bytes_into_a_pipe_and_leaves_clean_sqes(ring: Ring, rw_fd: int) -> None:
    content = os.urandom(256 * 1024)
    os.pwrite(rw_fd, content, 0)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for each splice whole
        for i, (offset, length) in enumerate(((0, 65536), (4096 + 17, 100_000), (200_000, 56_144))):
            assert ring.prep_splice(rw_fd, offset, w, length, 100 + i)
            assert run(ring, 1) == {100 + i: length}
            assert os.read(r, length) == content[offset:offset + length]
        # A splice sets its SQE's splice_fd_in; once the kernel has read the SQE, every
        # SQE's last 24 bytes are zero again (the other requests write only the first 40).
        sqes = bytes(ring._sqes)
        assert all(sqes[i * 64 + 40:(i + 1) * 64] == bytes(24) for i in range(len(sqes) // 64))
        # Past the end of the file a splice moves what there is.
        assert ring.prep_splice(rw_fd, len(content) - 10, w, 4096, 200)
        assert run(ring, 1) == {200: 10}
        assert os.read(r, 4096) == content[-10:]
        with pytest.raises(ValueError, match="offset"):
            ring.prep_splice(rw_fd, -2, w, 4096, 201)
    finally:
        os.close(r)
        os.close(w)


def _io_workers(owner: int) -> int:
    """Kernel io_uring worker threads serving thread ``owner`` (named iou-wrk-<owner>)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == f"iou-wrk-{owner}"
        except FileNotFoundError:
            pass
    return count


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """The soft descriptor limit raised to the hard one for a test (as the daemon does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_waiting_splices_hold_a_bounded_number_of_kernel_threads(many_descriptors: None) -> None:
    # More splices than the cap, from empty pipes: they all wait in io-wq, where the
    # kernel would otherwise start a worker thread for each.  The io-wq belongs to the
    # thread that submits: a new one here, so that no other test's workers count.
    n = _uring.MAX_UNBOUND_WORKERS + 16
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4 * n + 64:
        pytest.fail(f"the test needs {4 * n + 64} descriptors; the hard limit is lower")
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(2 * n)]
    sources, sinks = pipes[:n], pipes[n:]
    made: list[tuple[Ring, int]] = []
    submitted, finish = threading.Event(), threading.Event()
    unblocked = False
    ring = _ring_or_skip(2 * n)  # skips here, not in the thread
    assert ring.workers_capped
    assert _uring.MAX_UNBOUND_WORKERS >= MAX_PIPES  # every splice of the pool starts at once

    def submit() -> None:
        # The requests belong to this thread: it stays alive until they are done (a
        # thread's exit cancels them).
        made.append((ring, threading.get_native_id()))
        for i, ((src_r, _), (_, dst_w)) in enumerate(zip(sources, sinks, strict=True)):
            ring.prep_splice(src_r, -1, dst_w, 100, i)
        ring.submit()
        submitted.set()
        finish.wait(30)

    submitter = threading.Thread(target=submit)
    submitter.start()
    try:
        assert submitted.wait(10)
        time.sleep(0.5)
        workers = _io_workers(made[0][1])
        for _, src_w in sources:
            os.write(src_w, b"z" * 100)
        unblocked = True
        assert 1 <= workers <= _uring.MAX_UNBOUND_WORKERS
        assert wait_for(ring, n) == dict.fromkeys(range(n), 100)
        assert all(os.read(dst_r, 200) == b"z" * 100 for dst_r, _ in sinks)
    finally:
        if not unblocked:  # close() waits for the splices: let them finish
            for _, src_w in sources:
                os.write(src_w, b"z" * 100)
        finish.set()
        submitter.join()
        ring.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_discarded_requests_release_everything_they_held(ring: Ring, rw_fd: int) -> None:
    # What a broken ring's caller does with the requests the kernel never took.
    stage = _uring.STAGE_SIZE
    large = bytearray(stage + 1)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        space = ring.space
        assert ring.prep_write(rw_fd, b"s" * 512, 0, user_data=1)  # staged in a slot
        assert ring.prep_write(rw_fd, large, 4096, user_data=2)  # pinned
        assert ring.prep_splice(rw_fd, 0, w, 4096, user_data=3)  # sets the SQE's tail
        assert ring.queued == 3 and ring.space == space - 3
        assert sorted(ring.discard_queued()) == [1, 2, 3]
        assert (ring.queued, ring.pending, ring.space) == (0, 0, space)
        large.extend(b"x")  # no longer exported (BufferError while pinned)
        sqes = bytes(ring._sqes)
        assert all(sqes[i * 64 + 40:(i + 1) * 64] == bytes(24) for i in range(len(sqes) // 64))
        # The positions are reused, and the user_data with them.
        assert ring.prep_write(rw_fd, b"t" * 512, 0, user_data=1)
        assert run(ring, 1) == {1: 512}
        assert os.pread(rw_fd, 512, 0) == b"t" * 512
    finally:
        os.close(r)
        os.close(w)


async def test_a_broken_ring_fails_only_what_the_kernel_had_not_taken() -> None:
    # A splice the kernel took waits in io-wq on an empty pipe.  Then io_uring_enter
    # fails for good: the request it had not taken fails at once, the one it had
    # keeps its pipe and its callback until the kernel completes it.
    uring = UringIo.create()
    if uring is None:
        pytest.skip("io_uring unavailable here")
    ring = uring._ring
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(4)]  # blocking: the splice waits
    (src_a, src_a_w), (dst_a, dst_a_w), (src_b, _), (_, dst_b_w) = pipes
    results: dict[str, int] = {}
    fed = False
    try:
        assert uring.splice(src_a, -1, dst_a_w, 100, lambda res: results.setdefault("a", res))
        uring.submit_now()
        assert ring.pending == 1 and ring.queued == 0
        real_enter = ring._enter
        ring._enter = lambda *args: -errno.EBADF  # type: ignore[method-assign]
        assert uring.splice(src_b, -1, dst_b_w, 100, lambda res: results.setdefault("b", res))
        uring.submit_now()
        ring._enter = real_enter  # type: ignore[method-assign]
        assert results == {"b": -errno.EBADF}
        assert ring.pending == 1 and ring.queued == 0
        assert not uring.splice(src_b, -1, dst_b_w, 100, lambda res: None)  # threads now
        os.write(src_a_w, b"a" * 100)
        fed = True
        for _ in range(500):
            if "a" in results:
                break
            await asyncio.sleep(0.01)
        assert results == {"b": -errno.EBADF, "a": 100}
        assert os.read(dst_a, 200) == b"a" * 100
        assert ring.pending == 0
        # The dropped SQE left nothing behind: the ring still runs what it is given.
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            os.write(w, b"x" * 10)
            assert ring.prep_splice(r, -1, dst_a_w, 10, 7)
            assert run(ring, 1) == {7: 10}
        finally:
            os.close(r)
            os.close(w)
    finally:
        if not fed:  # close() waits for the splice: let it finish
            os.write(src_a_w, b"a" * 100)
        uring.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_io_wq_may_give_every_stuck_request_a_worker_of_its_own(ring: Ring) -> None:
    # Read back the submitting thread's caps (zeroes change nothing; the kernel writes
    # back what is in force): both kinds as many as MAX_*_WORKERS, not the kernel's
    # default of 4 bounded workers per CPU that a few stuck fsyncs would fill.
    counts = (ctypes.c_uint32 * 2)(0, 0)
    assert _uring._sys_register(
        _uring._NR_IO_URING_REGISTER, ring._fd, _uring._IORING_REGISTER_IOWQ_MAX_WORKERS,
        ctypes.addressof(counts), 2) >= 0
    assert list(counts) == [_uring.MAX_BOUNDED_WORKERS, _uring.MAX_UNBOUND_WORKERS]
