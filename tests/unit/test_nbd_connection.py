"""The NBD connection adapter (blockd.nbd.connection) with a fake transport and device.

What is checked is the one way out: every failure ends the connection through
``NbdClient.disconnect`` (graceful or hard, logged once), requests in flight
still complete with their replies dropped, and errors become NBD error replies.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
from collections.abc import Callable, Sequence

import pytest

from blockd.aio.buffers import BufferPool
from blockd.aio.pipes import PipePool
from blockd.block.exports import Export
from blockd.errors import NoMedium
from blockd.nbd.connection import MAX_IN_FLIGHT, NbdClient
from blockd.nbd.protocol import ExportInfo

REQUEST, SIMPLE, IHAVEOPT = 0x25609513, 0x67446698, 0x49484156454F5054
EXPORT_NAME = 1
READ, WRITE, DISC, FLUSH = 0, 1, 2, 3
NBD_EIO, NBD_ENOSPC = 5, 28

Done = Callable[[object, BaseException | None], None]


class FakeTransport:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed
        self.data += bytes(data)

    def writelines(self, lines: Sequence[bytes | bytearray | memoryview]) -> None:
        for line in lines:
            self.write(line)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def set_write_buffer_limits(self, high: int = 0, low: int = 0) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def take(self) -> bytes:
        data, self.data = self.data, b""
        return data


class FakeNode:
    reads_zeroes = False
    ring_fd = 3  # a descriptor: writes try the ring first (FakeDevice.ring says if it takes them)


class FakeDevice:
    """Serves nothing on the spot; keeps each submitted request's callback."""

    def __init__(self) -> None:
        self.node = FakeNode()
        self.pending: list[Done] = []
        self.fail_with: BaseException | None = None
        self.ring = False  # whether writes take write_on_ring (the io_uring route)

    def try_read(self, offset: int, buf: bytearray) -> int | None:
        return None

    def try_write(self, offset: int, data: memoryview, fua: bool) -> bool:
        return False

    def try_read_hole(self, offset: int, length: int) -> bool:
        return False

    def write_on_ring(self, offset: int, data: memoryview, fua: bool,
                      done: Callable[[int, int, BaseException | None], None],
                      token: int) -> bool:
        """Device.write_on_ring: taken only when ``ring`` is set; completed as the others."""
        if not self.ring:
            return False
        length = len(data)
        self.pending.append(lambda result, exc: done(token, length, exc))
        return True

    def _submit(self, done: Done) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.pending.append(done)

    def submit_write(self, offset: int, data: memoryview, fua: bool, done: Done) -> None:
        self._submit(done)

    def submit_flush(self, done: Done) -> None:
        self._submit(done)

    def submit_read(self, offset: int, length: int, done: Done, *pools: object) -> None:
        self._submit(done)


class FakeServer:
    def __init__(self, device: FakeDevice, max_connections: int = 100) -> None:
        self.export = Export("e0", "disk", "", device, "n0", writable=True)  # type: ignore[arg-type]
        self.info = ExportInfo(
            name="disk", description="", size=1 << 20, read_only=False, can_flush=True,
            can_fua=True, can_trim=True, can_write_zeroes=True, can_fast_zero=False,
            can_multi_conn=True, can_allocation=False, handle=self.export,
        )
        self.catalog = self
        self.buffers = BufferPool()
        self.pipes = PipePool(limit=0)
        self.poll_max_ns = 0
        self.tls = None  # plaintext (TLS is tested with real peers: tests/host/test_tls.py)
        self.poll_hits = self.poll_ns_total = 0
        self.clients: set[NbdClient] = set()
        self.max_connections = max_connections
        self.hits: dict[str, int] = {}
        self.gone: list[NbdClient] = []

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info if name == "disk" else None

    def cpus_contended(self, now_ns: int) -> bool:
        return False

    def names(self) -> Sequence[tuple[str, str]]:
        return [("disk", "")]

    def admit(self, client: NbdClient) -> bool:
        self.clients.add(client)
        return len(self.clients) <= self.max_connections

    def limit_hit(self, name: str) -> None:
        self.hits[name] = self.hits.get(name, 0) + 1

    @property
    def connection_count(self) -> int:
        return len(self.clients)

    def client_gone(self, client: NbdClient) -> None:
        self.clients.discard(client)
        self.gone.append(client)


def request(command: int, cookie: int, offset: int = 0, length: int = 0,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST, 0, command, cookie, offset, length) + payload


def simple_replies(data: bytes) -> list[tuple[int, int]]:
    """(cookie, error) of simple replies without payload."""
    out = []
    while data:
        magic, error, cookie = struct.unpack_from(">IIQ", data)
        assert magic == SIMPLE
        out.append((cookie, error))
        data = data[16:]
    return out


class Connected:
    def __init__(self, max_connections: int = 100) -> None:
        self.device = FakeDevice()
        self.server = FakeServer(self.device, max_connections)
        self.client = NbdClient(self.server)  # type: ignore[arg-type]
        self.transport = FakeTransport()
        self.client.connection_made(self.transport)  # type: ignore[arg-type]

    def negotiate(self) -> None:
        # Fixed newstyle, no zeroes; NBD_OPT_EXPORT_NAME goes straight to transmission.
        self.transport.take()
        self.client.data_received(struct.pack(">I", 3) + struct.pack(
            ">QII", IHAVEOPT, EXPORT_NAME, 4) + b"disk")
        assert len(self.transport.take()) == 10  # size and transmission flags
        assert self.client.device is self.device

    def lost(self) -> None:
        self.client.connection_lost(None)


@pytest.fixture
async def c() -> Connected:
    conn = Connected()
    conn.negotiate()
    return conn


async def test_a_protocol_violation_disconnects_gracefully(
    c: Connected, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "blockd.nbd")
    c.client.data_received(request(FLUSH, 7) + b"\x00" * 28)  # a bad magic after the flush
    assert c.transport.closed and not c.transport.aborted
    assert c.client.stopping
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "broke the protocol" in caplog.records[0].getMessage()
    # The flush still completes; its reply is dropped.
    (done,) = c.device.pending
    done(None, None)
    assert c.transport.data == b""
    assert c.client.in_flight == 0
    assert len(caplog.records) == 1  # no second disconnect
    c.lost()
    assert c.server.gone == [c.client]


async def test_an_internal_error_disconnects_and_is_logged_with_its_traceback(
    c: Connected, caplog: pytest.LogCaptureFixture
) -> None:
    c.device.fail_with = RuntimeError("a bug")
    c.client.data_received(request(FLUSH, 1) + request(FLUSH, 2))
    assert c.transport.closed
    (record,) = caplog.records
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert "a bug" in record.getMessage()
    assert c.device.pending == []  # the second request was not read


async def test_disconnect_is_idempotent(c: Connected, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "blockd.nbd")
    c.client.disconnect(logging.INFO, "first")
    c.client.disconnect(logging.INFO, "second", hard=True)
    assert c.transport.closed and not c.transport.aborted
    assert [r.getMessage() for r in caplog.records] == ["NBD: first"]


async def test_a_hard_disconnect_drops_queued_replies_and_in_flight_ones(c: Connected) -> None:
    c.client.data_received(request(WRITE, 1, 0, 4, b"abcd") + request(FLUSH, 2))
    assert c.client.in_flight == 2
    first, second = c.device.pending
    first(None, None)  # completes through the loop: a flush is scheduled
    c.client.disconnect(logging.DEBUG, "export deleted", hard=True)
    assert c.transport.aborted
    second(None, None)
    await asyncio.sleep(0)  # the scheduled flush runs and writes nothing
    c.lost()
    assert c.transport.data == b""
    assert c.client.in_flight == 0


async def test_disc_waits_for_requests_in_flight_then_sends_their_replies(c: Connected) -> None:
    c.client.data_received(request(WRITE, 1, 0, 4, b"abcd") + request(DISC, 2))
    assert not c.transport.closed  # the write is still running
    (done,) = c.device.pending
    done(None, None)
    assert c.transport.closed and not c.transport.aborted
    assert simple_replies(c.transport.data) == [(1, 0)]  # sent before the close


async def test_device_errors_become_nbd_error_replies(c: Connected) -> None:
    c.device.fail_with = OSError(errno.ENOSPC, "full")
    c.client.data_received(request(WRITE, 1, 0, 4, b"abcd"))
    c.device.fail_with = NoMedium("no disc")
    c.client.data_received(request(FLUSH, 2))
    c.device.fail_with = None
    c.client.data_received(request(FLUSH, 3))
    (done,) = c.device.pending
    done(None, OSError(errno.EDQUOT, "quota"))
    await asyncio.sleep(0)
    assert simple_replies(c.transport.data) == [(1, NBD_ENOSPC), (2, NBD_EIO), (3, NBD_ENOSPC)]
    assert c.client.in_flight == 0
    assert not c.transport.closed


async def test_writes_on_the_ring_route_are_counted_and_answered(c: Connected) -> None:
    c.device.ring = True
    c.client.data_received(request(WRITE, 1, 0, 4, b"abcd") + request(WRITE, 2, 8, 2, b"ef")
                           + request(WRITE, 3, 16, 3, b"ghi"))
    assert (c.client.in_flight, c.client.in_flight_bytes) == (3, 9)
    assert c.transport.data == b""  # nothing is answered before the device completes
    first, second, third = c.device.pending
    second(None, None)
    assert (c.client.in_flight, c.client.in_flight_bytes) == (2, 7)
    first(None, OSError(errno.ENOSPC, "full"))
    third(None, None)
    await asyncio.sleep(0)  # the flush that the completions scheduled
    assert simple_replies(c.transport.data) == [(2, 0), (1, NBD_ENOSPC), (3, 0)]
    assert (c.client.in_flight, c.client.in_flight_bytes) == (0, 0)
    c.client.data_received(request(WRITE, 4, 0, 1, b"j") + request(DISC, 5))
    assert not c.transport.closed  # the write on the ring is still running
    c.device.pending[-1](None, None)
    assert c.transport.closed and not c.transport.aborted


async def test_reading_pauses_at_the_in_flight_limit(c: Connected) -> None:
    c.client.data_received(b"".join(request(FLUSH, i) for i in range(MAX_IN_FLIGHT + 3)))
    assert c.client.in_flight == MAX_IN_FLIGHT  # the other 3 wait unparsed
    assert not c.transport.reading
    assert c.server.hits == {"nbd-backpressure": 1}
    for _ in range(3):  # each completion lets one waiting request in
        c.device.pending.pop(0)(None, None)
        assert c.client.in_flight == MAX_IN_FLIGHT and not c.transport.reading
    c.device.pending.pop(0)(None, None)  # nothing waits any more: read again
    assert c.client.in_flight == MAX_IN_FLIGHT - 1 and c.transport.reading


async def test_a_client_over_the_connection_limit_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = Connected(max_connections=0)
    assert conn.transport.closed  # (0 means no limit in the real server; the fake refuses)
    assert conn.transport.data == b""  # not even the greeting
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "refusing a client" in record.getMessage()


@pytest.mark.parametrize(("host", "resolved", "loopback"), [
    ("localhost", ["127.0.0.1", "::1"], True),
    ("127.0.0.1.nip.io", ["127.0.0.1"], True),  # resolves to loopback: binds loopback
    ("127.0.0.1.evil.example", ["203.0.113.7"], False),  # spelt like loopback, is not
    ("dual.example", ["127.0.0.1", "10.0.0.1"], False),  # one address is enough to leak
    ("fe80.example", ["fe80::1%eth0"], False),
    ("", [], False),  # every interface
])
async def test_loopback_is_decided_on_the_resolved_address(
    host: str, resolved: list[str], loopback: bool
) -> None:
    """The hardening issue's finding 9: the check was a string prefix."""
    import socket

    from blockd.aio.addresses import resolves_to_loopback

    class Resolver:
        async def getaddrinfo(self, host: str, port: object, **kw: object) -> list[object]:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6,
                     "", (a, 10809)) for a in resolved]

    resolver = Resolver()
    assert await resolves_to_loopback(host, 10809, loop=resolver) is loopback  # type: ignore[arg-type]


async def test_an_unresolvable_name_is_not_loopback() -> None:
    from blockd.aio.addresses import resolves_to_loopback

    assert await resolves_to_loopback("127.0.0.1.name.invalid", 10809) is False
