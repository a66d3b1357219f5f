"""The NBD poller (blockd.nbd.poller) on a real socket pair and a fake ring.

It reads the client's socket while its window is open, hands what it read to the
connection, counts what it caught and what it cost, and stops for anything that
means the connection should not be read (a pause, an end, a closing transport),
and polls nobody while every CPU is taken.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from blockd.nbd.poller import Poller

MS = 1_000_000


class Host:
    def __init__(self, ring: FakeRing | None = None) -> None:
        self.poll_hits = 0
        self.poll_ns_total = 0
        self.contended = False
        self.ring = ring
        self.buf = bytearray(4096)

    def poll_buffer(self) -> bytearray:
        return self.buf

    def uring(self) -> FakeRing | None:
        return self.ring

    def cpus_contended(self, now_ns: int) -> bool:
        return self.contended


class Client:
    def __init__(self) -> None:
        self.in_flight = 0
        self.batch = 1
        self.stopping = False
        self.reading_paused = False
        self.received: list[bytes] = []
        self.flushes = 0
        self.on_data: Callable[[], None] = lambda: None

    def process(self, data: bytes) -> None:
        self.received.append(data)
        self.on_data()

    def flush(self) -> None:
        self.flushes += 1


class FakeRing:
    """Completes the client's request on the ``after``-th poll."""

    def __init__(self, client: Client, after: int) -> None:
        self.client = client
        self.after = after
        self.polls = 0
        self.submitted = False

    def submit_now(self) -> None:
        self.submitted = True

    def poll(self) -> bool:
        self.polls += 1
        if self.polls == self.after:
            self.client.in_flight -= 1
            return True
        return False


class Transport:
    closing = False

    def is_closing(self) -> bool:
        return self.closing


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        yield a, b


def make(sock: socket.socket, ring_after: int | None = None,
         window_ns: int = 50 * MS) -> tuple[Poller, Host, Client, Transport]:
    client = Client()
    host = Host(FakeRing(client, ring_after) if ring_after is not None else None)
    poller = Poller(host, client, max_ns=window_ns)  # type: ignore[arg-type]
    poller.requests.window_ns = window_ns
    poller.completions.window_ns = window_ns
    transport = Transport()
    poller.attach(transport, sock.fileno())  # type: ignore[arg-type]
    return poller, host, client, transport


def test_disabled_without_a_limit(pair: tuple[socket.socket, socket.socket]) -> None:
    client, host = Client(), Host()
    assert not Poller(host, client, max_ns=0).enabled  # type: ignore[arg-type]


def test_a_request_sent_within_the_window_is_caught(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    poller, host, client, _ = make(a, window_ns=1000 * MS)  # ample on a busy machine
    client.on_data = lambda: setattr(client, "stopping", True)  # then stop polling
    timer = threading.Timer(0.002, b.sendall, (b"request",))
    timer.start()
    poller.run()
    timer.join()
    assert client.received == [b"request"]
    assert host.poll_hits == 1
    assert host.poll_ns_total > 0


def test_a_slow_client_is_not_caught_and_the_wait_is_counted(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    poller, host, client, _ = make(a, window_ns=MS)
    poller.run()
    assert client.received == []
    assert host.poll_hits == 0
    assert host.poll_ns_total >= MS


@pytest.mark.parametrize("stop", ["stopping", "reading_paused", "closing", "closed"])
def test_nothing_is_read_from_a_connection_that_should_not_be(
    pair: tuple[socket.socket, socket.socket], stop: str,
) -> None:
    a, b = pair
    poller, host, client, transport = make(a)
    b.sendall(b"request")
    if stop == "closing":
        transport.closing = True
    elif stop == "closed":
        poller.close()
    else:
        setattr(client, stop, True)
    poller.run()
    assert client.received == [] and host.poll_hits == 0
    assert a.recv(100) == b"request"  # still there for the transport


def test_a_single_request_in_flight_is_reaped_from_the_ring(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    poller, host, client, _ = make(a, ring_after=3)
    client.in_flight = 1
    client.on_data = lambda: setattr(client, "stopping", True)
    poller.completions.window_ns = 50 * MS
    poller.requests.window_ns = 0  # after the completion, do not wait for the next request
    poller.run()
    assert host.ring is not None and host.ring.submitted and host.ring.polls == 3
    assert client.in_flight == 0
    assert client.flushes == 1  # the reply goes out at once
    assert host.poll_hits == 1


def test_a_deeper_queue_is_not_polled(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    poller, host, client, _ = make(a, ring_after=1)
    client.in_flight = 2
    poller.run()
    assert host.ring is not None and host.ring.polls == 0
    assert host.poll_hits == 0


def test_a_client_that_sends_batches_is_not_polled_for_the_next_one(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    poller, host, client, _ = make(a, window_ns=1000 * MS)
    client.batch = 16  # its last input held 16 requests
    b.sendall(b"request")
    poller.run()
    assert client.received == [] and host.poll_hits == 0 and host.poll_ns_total == 0
    assert a.recv(100) == b"request"  # left for the transport


def test_nobody_is_polled_while_every_cpu_is_taken(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    poller, host, client, _ = make(a, window_ns=1000 * MS)
    host.contended = True
    b.sendall(b"request")
    poller.run()
    assert client.received == [] and host.poll_hits == 0 and host.poll_ns_total == 0
    assert a.recv(100) == b"request"  # left for the transport (epoll)
