"""Pipes for zero-copy reads: filled from real files, drained into real sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockd.aio import pipes
from blockd.aio.pipes import MAX_PIPES, PAGE, Pipe, PipePool, pool_limit
from blockd.devices.base import NodeOptions
from blockd.devices.file import FileDriver

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(4 * MiB)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def driver(image: tuple[Path, bytes]) -> Iterator[FileDriver]:
    drv = FileDriver.open(NodeOptions(driver="file", node_name="n0", filename=str(image[0])))
    yield drv
    drv.close()


def receive_all(sock: socket.socket, length: int) -> bytes:
    chunks = []
    while length:
        chunk = sock.recv(length)
        assert chunk, "peer closed early"
        chunks.append(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def test_fill_then_send_moves_the_exact_range(driver: FileDriver,
                                              image: tuple[Path, bytes]) -> None:
    data = image[1]
    pool = PipePool(limit=2)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    a.setblocking(False)
    with a, b:
        for offset, length in ((0, MiB), (3 * PAGE + 17, 200_000), (4 * MiB - 65536, 65536)):
            pipe = pool.get(offset, length)
            assert pipe is not None
            assert pipe.fill(driver.splice_read, offset, length) == length
            assert pipe.held == length
            pipe.send(a.fileno())
            rest = pipe.take() if pipe.held else b""
            got = receive_all(b, length - len(rest)) + bytes(rest)
            assert got == data[offset:offset + length]
            pool.put(pipe)


def test_a_full_socket_leaves_the_rest_for_take(driver: FileDriver,
                                                image: tuple[Path, bytes]) -> None:
    data = image[1]
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        a.send(b"x" * 100_000)  # fill most of the small default buffer
        pipe = Pipe(MiB)
        try:
            pipe.fill(driver.splice_read, MiB, MiB)
            pipe.send(a.fileno())
            assert 0 < pipe.held < MiB  # the socket took part, not all
            sent = MiB - pipe.held
            rest = pipe.take()
            assert pipe.held == 0
            b.setblocking(True)
            head = receive_all(b, 100_000 + sent)[100_000:]
            assert head + rest == data[MiB:2 * MiB]
        finally:
            pipe.close()


def test_short_backing_is_padded_with_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"\x7f" * 5000)
    drv = FileDriver.open(NodeOptions(driver="file", node_name="n0", filename=str(path)))
    pipe = Pipe(MiB)
    try:
        assert pipe.fill(drv.splice_read, 0, 3 * PAGE) == 5000
        assert pipe.held == 3 * PAGE
        assert bytes(pipe.take()) == b"\x7f" * 5000 + bytes(3 * PAGE - 5000)
    finally:
        pipe.close()
        drv.close()


def test_refill_drops_what_a_failed_try_left(driver: FileDriver,
                                             image: tuple[Path, bytes]) -> None:
    calls = []

    def fails_after_one_chunk(offset: int, length: int, fd: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return driver.splice_read(offset, min(length, 65536), fd)

    pipe = Pipe(MiB)
    try:
        with pytest.raises(OSError):
            pipe.fill(fails_after_one_chunk, 0, 256 * 1024)
        assert pipe.held == 65536  # what got in before the error
        assert pipe.fill(driver.splice_read, 2 * MiB, 256 * 1024) == 256 * 1024
        assert bytes(pipe.take()) == image[1][2 * MiB:2 * MiB + 256 * 1024]
    finally:
        pipe.close()


def test_pool_refuses_what_does_not_fit_and_is_bounded() -> None:
    pool = PipePool(limit=2, capacity=MiB)
    assert pool.get(0, MiB + 1) is None
    assert pool.get(100, MiB) is None  # unaligned: needs one slot more than a pipe has
    first, second = pool.get(0, MiB), pool.get(PAGE, MiB - PAGE)
    assert first is not None and second is not None
    assert pool.get(0, 65536) is None  # the limit
    first.add_zeroes(10)
    pool.put(first)
    again = pool.get(0, 65536)
    assert again is first and again.held == 0
    with pytest.raises(BlockingIOError):
        os.read(again.r, 1)  # emptied when it came back
    pool.put(again)
    pool.put(second)
    pool.close()


def test_pipes_are_sized_to_their_reads_within_a_page_budget() -> None:
    if PAGE != 4096:
        pytest.fail(f"the sizes below assume 4 KiB pages, not {PAGE}")
    pool = PipePool(limit=4, capacity=MiB, page_budget=400)
    try:
        assert pool.get(0, 65536).capacity == 65536  # type: ignore[union-attr]
        assert pool.get(0, 65536 + 1).capacity == 128 << 10  # type: ignore[union-attr]
        assert pool.get(100, 256 << 10).capacity == 512 << 10  # type: ignore[union-attr]
        assert (pool.count, pool.pages) == (3, 16 + 32 + 128)
        pool.close()
        pool = PipePool(limit=4, capacity=MiB, page_budget=200)
        first, second = pool.get(0, 256 << 10), pool.get(0, 256 << 10)
        assert first is not None and second is not None and pool.pages == 64 + 64
        # 128 pages more would be over the budget while both are in use...
        assert pool.get(0, 512 << 10) is None
        pool.put(second)
        # ...a free pipe that is big enough serves a smaller read...
        again = pool.get(0, 65536)
        assert again is second
        pool.put(again)
        pool.put(first)
        # ...and free pipes too small for a read are closed to make room for one that fits.
        big = pool.get(0, 512 << 10)
        assert big is not None and big.capacity == 512 << 10
        assert (first.r == -1) != (second.r == -1)  # one of them closed
        assert (pool.count, pool.pages) == (2, 64 + 128)
        pool.put(big)
    finally:
        pool.close()
    assert (pool.count, pool.pages) == (0, 0)


class ChargedPipes:
    """Pipes as the kernel makes them for a user whose pipes are, or are not, over its
    budget (pipe-user-pages-soft): then it gives 2 pages whatever is asked."""

    def __init__(self) -> None:
        self.over_budget = False
        self.made: list[int] = []  # the capacities asked for


@pytest.fixture
def charged(monkeypatch: pytest.MonkeyPatch) -> ChargedPipes:
    state = ChargedPipes()

    class ChargedPipe(Pipe):
        def __init__(self, capacity: int) -> None:
            super().__init__(2 * PAGE if state.over_budget else capacity)
            state.made.append(capacity)

    monkeypatch.setattr(pipes, "Pipe", ChargedPipe)
    return state


def test_a_refused_pipe_pauses_growth_and_keeps_the_pipes_there_are(
    charged: ChargedPipes,
) -> None:
    made = charged.made
    now = [100.0]
    pool = PipePool(limit=8, capacity=MiB, clock=lambda: now[0])
    try:
        first = pool.get(0, 256 << 10)
        assert first is not None
        pool.put(first)
        charged.over_budget = True
        assert pool.get(0, MiB) is None and len(made) == 2  # refused
        assert pool.get(0, MiB) is None and len(made) == 2  # not asked again at once...
        assert pool.get(0, 65536) is first  # ...and the pipes there are still serve
        pool.put(first)
        now[0] += pipes.REFUSED_PAUSE
        charged.over_budget = False
        big = pool.get(0, MiB)  # asked again after the pause
        assert big is not None and big.capacity == MiB and len(made) == 3
        assert (pool.count, pool.pages) == (2, (256 << 10) // PAGE + MiB // PAGE)
        pool.put(big)
    finally:
        pool.close()


def test_no_free_pipe_is_closed_while_growth_pauses(charged: ChargedPipes) -> None:
    small = (256 << 10) // PAGE
    pool = PipePool(limit=8, capacity=MiB, page_budget=small + MiB // PAGE - 1,
                    clock=lambda: 0.0)
    try:
        first = pool.get(0, 256 << 10)
        assert first is not None
        pool.put(first)
        charged.over_budget = True
        assert pool.get(0, 512 << 10) is None  # refused (room there was): growth pauses
        # 1 MiB would need the free pipe closed; while growth pauses that gains nothing.
        assert pool.get(0, MiB) is None
        assert first.r != -1 and (pool.count, pool.pages) == (1, small)
    finally:
        pool.close()


def test_the_smallest_free_pipe_that_fits_serves_and_no_pipe_is_closed_in_vain() -> None:
    pool = PipePool(limit=4, capacity=MiB, page_budget=MiB // PAGE + 64)
    try:
        big, small = pool.get(0, MiB), pool.get(0, 256 << 10)
        assert big is not None and small is not None
        pool.put(big)
        pool.put(small)
        assert pool.get(0, 65536) is small
        assert pool.get(0, 65536) is big
        pool.put(small)
        # In use alone, big leaves no room for 512 KiB: the free small pipe stays open.
        assert pool.get(0, 512 << 10) is None
        assert small.r != -1 and (pool.count, pool.pages) == (2, MiB // PAGE + 64)
        pool.put(big)
    finally:
        pool.close()


def test_the_pool_takes_an_eighth_of_the_descriptor_limit_at_most() -> None:
    assert pool_limit(256) == 16
    assert pool_limit(1024) == 64
    assert pool_limit(1 << 20) == MAX_PIPES == 256
