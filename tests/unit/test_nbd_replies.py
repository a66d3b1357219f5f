"""The NBD reply writer (blockd.nbd.replies) against a fake transport and a fake loop.

Replies are gathered and written once per turn; pooled buffers go back only once the
transport holds nothing; spliced data follows its header, only into an empty transport.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator

import pytest

from blockd.aio.buffers import MIN_POOLED, BufferPool
from blockd.aio.pipes import Pipe, PipePool
from blockd.nbd.replies import MAX_UNSENT, ReplyWriter


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def run_once(self) -> None:
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()


class FakeTransport:
    """Records what is written; ``buffered`` is what it pretends still to hold."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []  # one entry per write/writelines call
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append([bytes(data)])

    def writelines(self, lines: list[bytes | bytearray | memoryview]) -> None:
        self.calls.append([bytes(line) for line in lines])

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def sent(self) -> bytes:
        return b"".join(b"".join(call) for call in self.calls)


class Pool(BufferPool):
    def __init__(self) -> None:
        super().__init__()
        self.returned: list[bytearray] = []

    def put(self, buf: bytearray) -> None:
        self.returned.append(buf)
        super().put(buf)


class Harness:
    def __init__(self, sock_fd: int = -1) -> None:
        self.loop = FakeLoop()
        self.transport = FakeTransport()
        self.buffers = Pool()
        self.pipes = PipePool(limit=4)
        self.turns = 0
        self.backpressure = 0
        self.failures: list[OSError] = []
        self.writer = ReplyWriter(
            self.loop, self.buffers, self.pipes,  # type: ignore[arg-type]
            turn_end=self.turn_end, backpressure=self.on_backpressure,
            failed=self.failures.append,
        )
        self.writer.attach(self.transport, sock_fd)  # type: ignore[arg-type]

    def turn_end(self) -> None:
        self.turns += 1
        self.writer.flush()

    def on_backpressure(self) -> None:
        self.backpressure += 1


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_replies_of_one_turn_go_out_in_one_call(h: Harness) -> None:
    h.writer.write(b"one")
    h.writer.write(b"two")
    h.writer.write(b"three")
    assert h.transport.calls == []
    assert len(h.loop.soon) == 1  # one flush scheduled, however many replies
    h.loop.run_once()
    assert h.turns == 1
    assert h.transport.calls == [[b"one", b"two", b"three"]]
    assert h.writer.out == []
    assert not h.writer.scheduled


def test_a_single_reply_is_a_plain_write_and_an_empty_flush_writes_nothing(h: Harness) -> None:
    h.writer.out.append(b"only")  # what the connection does while it handles input
    assert h.writer.flush()
    assert h.transport.calls == [[b"only"]]
    assert not h.writer.flush()
    assert h.transport.calls == [[b"only"]]


def test_replies_queued_while_a_flush_is_due_are_not_scheduled_again(h: Harness) -> None:
    h.writer.scheduled = True  # the connection is handling input and will flush at the end
    h.writer.write(b"a")
    assert h.loop.soon == []
    h.writer.flush()
    assert h.transport.calls == [[b"a"]]


def test_nothing_is_written_to_a_closing_transport(h: Harness) -> None:
    h.transport.closing = True
    h.writer.write(b"lost")
    h.loop.run_once()
    assert h.transport.calls == []
    assert h.writer.out == []


def test_a_closed_writer_drops_replies_and_returns_pipes(h: Harness) -> None:
    pipe = h.pipes.get(0, MIN_POOLED)
    assert pipe is not None
    h.writer.write_pipe(b"header", pipe)
    h.writer.close()
    assert h.pipes.get(0, MIN_POOLED) is pipe  # back in the pool
    h.loop.run_once()  # the flush the reply had scheduled
    h.writer.write(b"late")
    h.writer.write_data(b"hdr", bytearray(10), 10)
    other = h.pipes.get(0, MIN_POOLED)
    assert other is not None
    h.writer.write_pipe(b"late", other)
    assert h.pipes.get(0, MIN_POOLED) is other
    assert h.writer.out == []
    assert h.loop.soon == []
    h.pipes.put(pipe)
    h.pipes.put(other)
    h.pipes.close()


def test_small_read_data_is_not_pooled(h: Harness) -> None:
    h.writer.write_data(b"hdr", bytearray(b"x" * 100), 100)
    h.loop.run_once()
    assert h.transport.calls == [[b"hdr", b"x" * 100]]
    assert h.buffers.returned == []


def test_a_pooled_buffer_returns_once_the_transport_is_empty(h: Harness) -> None:
    buf = h.buffers.get(MIN_POOLED + 1)  # a 128 KiB class buffer, longer than the data
    buf[: MIN_POOLED + 1] = b"d" * (MIN_POOLED + 1)
    h.writer.write_data(b"hdr", buf, MIN_POOLED + 1)
    h.transport.buffered = 10  # the transport keeps a reference to part of it
    h.writer.pause_writing()
    h.loop.run_once()
    assert h.transport.calls == [[b"hdr", b"d" * (MIN_POOLED + 1)]]  # only the data's length
    assert h.buffers.returned == []
    # Another pooled reply is queued but not written when the transport drains.
    second = h.buffers.get(MIN_POOLED)
    h.writer.write_data(b"hdr2", second, MIN_POOLED)
    h.transport.buffered = 0
    h.writer.drained()
    assert h.buffers.returned == [buf]  # not the one still queued
    h.loop.run_once()
    assert h.buffers.returned == [buf, second]  # written into an empty transport: back at once


def test_backlog_is_signalled_while_the_transport_holds_too_much(h: Harness) -> None:
    h.writer.write(b"r")
    h.loop.run_once()
    assert h.backpressure == 0 and not h.writer.backlogged()
    h.writer.pause_writing()
    h.transport.buffered = MAX_UNSENT
    assert not h.writer.backlogged()
    h.transport.buffered = MAX_UNSENT + 1
    assert h.writer.backlogged()
    h.writer.write(b"more")
    h.loop.run_once()
    assert h.backpressure == 1  # the connection re-evaluates reading after each write
    h.transport.buffered = 0
    h.writer.drained()
    assert not h.writer.backlogged()


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    with a, b:
        yield a, b


def _filled(pipes: PipePool, data: bytes) -> Pipe:
    pipe = pipes.get(0, len(data))
    assert pipe is not None
    os.write(pipe.w, data)
    pipe.held = len(data)
    return pipe


def _receive(sock: socket.socket, length: int) -> bytes:
    out = b""
    while len(out) < length:
        chunk = sock.recv(length - len(out))
        assert chunk
        out += chunk
    return out


def test_spliced_data_follows_its_header_and_the_replies_before_it(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    h = Harness(a.fileno())
    data = os.urandom(MIN_POOLED)
    h.writer.write(b"first")
    h.writer.write_pipe(b"header", _filled(h.pipes, data))
    h.loop.run_once()
    # The queued reply and the header go in one call, then the pipe into the socket.
    assert h.transport.calls == [[b"first", b"header"]]
    assert _receive(b, len(data)) == data
    pipe = h.pipes.get(0, MIN_POOLED)
    assert pipe is not None  # given back
    h.pipes.put(pipe)
    h.pipes.close()


def test_spliced_replies_wait_until_the_transport_drained(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    h = Harness(a.fileno())
    data = os.urandom(MIN_POOLED)
    h.transport.buffered = 5  # earlier replies still in the transport
    h.writer.write(b"queued")
    h.writer.write_pipe(b"header", _filled(h.pipes, data))
    h.loop.run_once()
    assert h.transport.calls == [[b"queued"]]  # the spliced reply waits
    h.transport.buffered = 0
    h.writer.drained()
    assert h.transport.calls == [[b"queued"], [b"header"]]
    assert _receive(b, len(data)) == data
    h.pipes.close()


def test_a_failed_splice_reports_the_error_and_returns_the_pipe(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    a, b = sockets
    h = Harness(a.fileno())
    b.close()  # the peer is gone: splicing into the socket fails with EPIPE
    pipe = _filled(h.pipes, os.urandom(MIN_POOLED))
    h.writer.write_pipe(b"header", pipe)
    h.loop.run_once()
    assert [exc.errno for exc in h.failures] == [errno.EPIPE]
    assert h.pipes.get(0, MIN_POOLED) is pipe  # given back, emptied
    assert not pipe.held
    h.pipes.put(pipe)
    h.pipes.close()
