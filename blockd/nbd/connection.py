"""One NBD client connection: the thin asyncio adapter between a socket and a device.

``data_received`` feeds the sans-IO :class:`~blockd.nbd.protocol.NbdServerConnection`
and hands each request it yields to the export's :class:`~blockd.block.device.Device`.
No coroutine or task is created per request: what the device can serve at once is
answered before ``data_received`` returns, the rest when the device calls back.
Replies may go out in any order (NBD allows it); :mod:`blockd.nbd.replies` writes them,
:mod:`blockd.nbd.poller` waits on the CPU for what comes next.

Every way a connection ends goes through :meth:`NbdClient.disconnect`.  Requests still
in flight then complete (acknowledged writes are never lost); their replies are dropped.
Back-pressure: a request is taken from what the client sent only while fewer than
``MAX_IN_FLIGHT`` requests, moving fewer than ``MAX_IN_FLIGHT_BYTES`` bytes, run and
the client has not left too many replies unread (:meth:`ReplyWriter.backlogged`).
Otherwise the rest stays unparsed in the protocol's buffer and the socket is not read
until a request completes or the replies drain: a client that sends thousands of
requests in one burst and never reads a reply holds a bounded amount of memory.

With TLS (the server has credentials), the protocol asks for the upgrade with a
``StartTls`` event once the ``NBD_OPT_STARTTLS`` ACK is queued: reading stops, the
ACK goes out, and ``loop.start_tls`` wraps the socket; negotiation then goes on over
TLS.  Such a connection never touches its socket directly (no polling reads, no
splicing), since every byte must pass through the TLS layer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol, cast

from blockd.aio.buffers import MIN_POOLED, BufferPool
from blockd.aio.outq import unsent_bytes
from blockd.aio.pipes import Pipe, PipePool
from blockd.block.device import Device, WriteDone
from blockd.block.exports import Export
from blockd.errors import BlockdError, InvalidArgument
from blockd.nbd.constants import CommandFlag
from blockd.nbd.errors import NbdProtocolError, errno_to_nbd
from blockd.nbd.poller import Poller, PollHost
from blockd.nbd.protocol import (
    NEED_DATA,
    BlockStatus,
    Closed,
    Disconnect,
    ExportCatalog,
    Flush,
    NbdServerConnection,
    Read,
    Ready,
    Rejected,
    Send,
    StartTls,
    Trim,
    Write,
    WriteZeroes,
)
from blockd.nbd.replies import MAX_UNSENT, ReplyWriter

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_IN_FLIGHT", "MAX_IN_FLIGHT_BYTES", "NbdClient", "NbdLimits"]

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 128
MAX_IN_FLIGHT_BYTES = 64 << 20  # payload of the reads and writes running for one client
HANDSHAKE_TIMEOUT = 10.0  # seconds to finish option haggling, as qemu-nbd allows
MESSAGE_TIMEOUT = 10.0  # seconds a half-sent message may go without a new byte
STALL_TIMEOUT = 60.0  # seconds replies may wait unread without the client reading any


@dataclass(frozen=True, slots=True)
class NbdLimits:
    """A client's bounds (the ``[limits]`` table can change them; see the module doc)."""

    in_flight: int = MAX_IN_FLIGHT
    in_flight_bytes: int = MAX_IN_FLIGHT_BYTES
    unsent: int = MAX_UNSENT  # reply bytes queued unsent before the client is backlogged
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    message_timeout: float = MESSAGE_TIMEOUT
    stall_timeout: float = STALL_TIMEOUT


_DEFAULT_LIMITS = NbdLimits()
SEND_BUFFER = 4 << 20  # socket send buffer per client
TLS_WRITE_HIGH = 64 << 10  # encrypted bytes a TLS transport holds before pause_writing
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
# Plain ints: IntFlag arithmetic costs microseconds on the hot path.
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_MAX_EXTENT = (1 << 32) - 4096

_monotonic_ns = time.monotonic_ns


def _not_negotiated(*args: object) -> NoReturn:
    raise AssertionError("a request before the transmission phase")


class ClientHost(PollHost, Protocol):
    """What a client needs of the server that accepted it (the NbdServer)."""

    @property
    def catalog(self) -> ExportCatalog: ...

    @property
    def buffers(self) -> BufferPool: ...

    @property
    def pipes(self) -> PipePool: ...

    @property
    def poll_max_ns(self) -> int: ...

    @property
    def splice(self) -> bool: ...

    @property
    def tls(self) -> ssl.SSLContext | None: ...

    @property
    def connection_count(self) -> int: ...

    def admit(self, client: NbdClient) -> bool: ...

    def limit_hit(self, name: str) -> None: ...

    def client_gone(self, client: NbdClient) -> None: ...


class NbdClient(asyncio.Protocol):
    """One NBD client connection."""

    def __init__(self, server: ClientHost) -> None:
        self._server = server
        self._tls = server.tls
        self._conn = conn = NbdServerConnection(server.catalog, tls=self._tls is not None)
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.device: Device | None = None  # the export's, once negotiated
        self.in_flight = 0
        self.batch = 0  # requests the last _run took (the poller waits only after lone ones)
        self.in_flight_bytes = 0  # payload bytes of the reads and writes in flight
        self.held = False  # requests wait unparsed until something completes
        self._running = False  # inside _run (completions then only update counts)
        self.closed = False  # the transport is gone
        self.stopping = False  # no more requests will be read: the connection is ending
        self.reading_paused = False
        self._upgrading = False  # between the STARTTLS ACK and the end of the TLS handshake
        # What check_stalls saw last: reads and drains so far, unsent bytes, and since when.
        self.received = 0  # batches of input taken
        self.drains = 0  # times the transport drained everything to the kernel
        self._seen = (0, 0.0)  # (received, since): the half-sent message's progress
        self._seen_out = (0, 0, 0.0)  # (drains, unsent bytes, since): the reader's progress
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._writethrough = False
        self._ring_first = True  # see _ready
        # Structured replies to a node that reads zeroes: reads may go as holes.  Known
        # at negotiation; a medium changed later only loses (or declines) the shortcut.
        self._holes = False
        self._pipes: PipePool | None = None  # while data can be spliced into the socket
        self._replies = replies = ReplyWriter(
            asyncio.get_running_loop(), server.buffers, server.pipes,
            turn_end=self.flush, backpressure=self._update_reading, failed=self._splice_failed,
        )
        # The server's limits (a test double may have none: the defaults then).
        limits: NbdLimits = getattr(server, "limits", _DEFAULT_LIMITS)
        self._limits = limits
        self._max_in_flight = limits.in_flight
        self._max_in_flight_bytes = limits.in_flight_bytes
        replies.max_unsent = limits.unsent
        self._poller = poller = Poller(server, self, server.poll_max_ns)
        # Bound once: the per-request paths pay no lookups for them.
        self._out = replies.out
        self._write = replies.write
        self._send = replies.flush
        self._receive = conn.receive_data
        self._next_event = conn.next_event
        self._next_io = conn.next_io
        self._reply_ok = conn.reply_ok
        self._reply_read_header = conn.reply_read_header
        self._polling = poller.enabled
        self._poll = poller.run
        self._request_came = poller.requests.busy
        self._request_awaited = poller.requests.idle
        self._completion_seen = poller.completions.busy
        self._try_read: Callable[[int, bytearray], int | None] = _not_negotiated
        self._try_write: Callable[[int, memoryview, bool], bool] = _not_negotiated
        self._write_on_ring: Callable[[int, memoryview, bool, WriteDone, int], bool] = \
            _not_negotiated
        self._try_read_hole: Callable[[int, int], bool] = _not_negotiated

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but behave like one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=0, low=0)
        sock = self.transport.get_extra_info("socket")
        _enlarge_send_buffer(sock)
        sock_fd = sock.fileno() if sock is not None else -1
        if self._tls is not None:
            sock_fd = -1  # every byte goes through the TLS layer: no polling, no splicing
            self._polling = False
        self._replies.attach(self.transport, sock_fd)
        self._poller.attach(self.transport, sock_fd)
        if sock_fd >= 0 and self._server.splice:
            self._pipes = self._server.pipes
        if not self._server.admit(self):
            self.disconnect(logging.WARNING, "refusing a client: %d connections",
                            self._server.connection_count - 1)
            return
        # A client that never finishes negotiating must not hold its slot for ever;
        # once negotiated, a connection may stay idle as long as it likes.
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self._limits.handshake_timeout, self._handshake_expired)
        self.transport.write(self._conn.initial_data())

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.export is None:
            self._server.limit_hit("nbd-handshake-timeout")
            self.disconnect(logging.WARNING, "client did not finish the handshake within "
                            "%g s", self._limits.handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self._polling:
            self._request_came(_monotonic_ns())
        self.process(data)
        if self._polling:
            self._poll()

    def eof_received(self) -> bool | None:
        self.process(b"")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Where every end completes, whoever started it (disconnect() or the transport)."""
        if self.closed:  # a failed TLS handshake may end it before the transport does
            return
        if exc is not None:
            log.debug("NBD: connection lost: %s", exc)
        self.closed = True
        self.stopping = True
        self._replies.close()
        self._poller.close()
        self._pipes = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._server.client_gone(self)

    # The transport's limits are zero: these say "something is buffered" and
    # "everything has gone to the kernel" (see replies.py).

    def pause_writing(self) -> None:
        self._replies.pause_writing()

    def resume_writing(self) -> None:
        self.drains += 1
        self._replies.drained()
        self._update_reading()

    def check_stalls(self, now: float) -> None:
        """About once a second (the server's sweep): drop a negotiated client that left
        a message half-sent for ``message_timeout``, or left its replies unread for
        ``stall_timeout``, without progress.  An idle client is never dropped, nor one
        whose requests wait because of our own limits (``held``)."""
        if self.export is None or self.stopping or self.closed:
            return  # negotiating: the handshake timer covers it
        limits = self._limits
        if self.held or not self._conn.mid_message or self.received != self._seen[0]:
            self._seen = (self.received, now)
        elif now - self._seen[1] >= limits.message_timeout:
            self._server.limit_hit("nbd-message-timeout")
            self.disconnect(logging.WARNING, "client left a request half-sent for %g s",
                            limits.message_timeout, hard=True)
            return
        transport = self.transport
        unsent = unsent_bytes(transport) if transport is not None else 0
        drains, before, since = self._seen_out
        if not unsent or unsent < before or drains != self.drains:
            self._seen_out = (self.drains, unsent, now)
        elif now - since >= limits.stall_timeout:
            self._server.limit_hit("nbd-stalled-reader")
            self.disconnect(logging.WARNING, "client read none of its %d bytes of replies "
                            "for %g s", unsent, limits.stall_timeout, hard=True)
        else:
            self._seen_out = (drains, unsent, since)

    # -- the one way out -----------------------------------------------------------------

    def disconnect(
        self, level: int, msg: str, *args: object, hard: bool = False, exc_info: bool = False
    ) -> None:
        """End the connection, saying why (``msg % args``, logged at ``level``).

        Every end the server starts goes through here: after the client's
        NBD_CMD_DISC, a protocol violation, an unexpected event or exception,
        a failed splice, a refused or deleted export; the transport ends by
        itself only when the peer goes.  No more requests are read; those in
        flight still complete, their replies dropped (connection_lost).
        Graceful, the replies queued so far are sent first; ``hard`` drops
        them.  Idempotent: once the transport is closing, it does nothing.
        """
        self.stopping = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.log(level, "NBD: " + msg, *args, exc_info=exc_info)
        if hard:
            transport.abort()
        else:
            self.flush()
            transport.close()

    def _splice_failed(self, exc: OSError) -> None:
        self.disconnect(logging.DEBUG, "splicing a reply failed: %s", exc, hard=True)

    # -- requests ----------------------------------------------------------------------

    def process(self, data: bytes) -> None:
        """Take ``data`` in, then handle what it completes (see :meth:`_run`)."""
        self.received += 1
        try:
            self._receive(data)
        except NbdProtocolError as exc:
            self.disconnect(logging.INFO, "client broke the protocol: %s", exc)
            return
        self._run()

    def _run(self) -> None:
        """Handle the buffered requests while the limits allow; flush the replies once.

        Replies produced meanwhile are appended to the writer's queue and
        sent by that one flush, without a trip through call_soon (that
        matters at queue depth 1).  Read data queued meanwhile is sent every
        ``MAX_UNSENT`` bytes, so that a client not reading it shows as backlogged.
        """
        next_io = self._next_io
        next_event = self._next_event
        replies = self._replies
        replies.scheduled = True
        self._running = True
        taken = 0
        try:
            while not self.stopping:
                if self.in_flight >= self._max_in_flight or (
                    self.in_flight_bytes >= self._max_in_flight_bytes and self.in_flight
                ) or (replies.writing_paused and replies.backlogged()):
                    if not self.held:
                        self._server.limit_hit("nbd-backpressure")
                    self.held = True
                    break
                request = next_io()
                if request is not None:  # a READ or WRITE: no event object (next_io())
                    cookie, offset, length, flags, payload = request
                    if payload is None:
                        queued = self._read(cookie, offset, length)
                    else:
                        queued = self._write_request(cookie, offset, payload, flags)
                else:
                    event = next_event()
                    if event is NEED_DATA:
                        self.held = False
                        break
                    queued = self._handle(event)
                taken += 1
                if queued:
                    replies.queued += queued
                if replies.queued >= replies.max_unsent:
                    # Reads that completed at once queue their data here: send it, so
                    # that a client that does not read shows up as backlogged.
                    self._send()
                    replies.scheduled = True
        except NbdProtocolError as exc:
            self.disconnect(logging.INFO, "client broke the protocol: %s", exc)
            return
        except Exception as exc:
            self.disconnect(logging.ERROR, "disconnecting after an internal error: %r", exc,
                            exc_info=True)
            return
        finally:
            self._running = False
            self.batch = taken
            # flush(), inlined: at queue depth 1 this runs once per request.
            if self._send() and self._polling and not self.in_flight:
                now = _monotonic_ns()
                self._completion_seen(now)
                self._request_awaited(now)
        if self.held or self.reading_paused:
            self._update_reading()

    def _handle(self, event: object) -> int:
        """Start one request; the bytes of a read answered on the spot (else 0)."""
        match event:
            case Read():
                return self._read(event.cookie, event.offset, event.length)
            case Write():
                return self._write_request(event.cookie, event.offset, event.data, event.flags)
            case Flush():
                self.in_flight += 1
                self._submit(event.cookie, self._device().submit_flush)
            case Trim():
                self.in_flight += 1
                self._submit(event.cookie, self._device().submit_discard, event.offset,
                             event.length, fua=bool(event.flags & _FUA))
            case WriteZeroes():
                self.in_flight += 1
                self._submit(event.cookie, self._device().submit_write_zeroes, event.offset,
                             event.length, not event.flags & _NO_HOLE,
                             fua=bool(event.flags & _FUA))
            case BlockStatus():
                self.in_flight += 1
                self._block_status(event)
            case Rejected():
                self._write(self._conn.reply_error(event.cookie, event.error, event.reason))
            case Send():
                self._write(event.data)
            case Ready():
                self._ready(event)
            case StartTls():
                self._start_tls()
            case Disconnect() | Closed():
                # Finish what is in flight, then close (the spec's NBD_CMD_DISC).
                self.stopping = True
                self._close_when_idle()
            case _:
                self.disconnect(logging.ERROR, "unexpected event %r", event)
        return 0

    def _read(self, cookie: int, offset: int, length: int) -> int:
        """Start a READ; the bytes of a reply queued on the spot (else 0)."""
        if self._holes and self._try_read_hole(offset, length):
            self._out.append(self._conn.reply_read_hole(cookie, offset, length))
            return 0
        if length < MIN_POOLED:
            # Served on the spot if the device can (memory-backed, page-cache hit): no
            # callback; the flush at the end of _run() sends it.  (The callables bound
            # at negotiation are called through locals: CPython 3.11 never specializes
            # a method call on an instance attribute, and pays a full lookup each time.)
            buf = bytearray(length)
            try_read = self._try_read
            if try_read(offset, buf) is not None:
                reply_read_header = self._reply_read_header
                self._out += (reply_read_header(cookie, offset, length), buf)
                return length
        self.in_flight += 1
        self.in_flight_bytes += length
        self._submit_read(cookie, offset, length)
        return 0

    def _write_request(self, cookie: int, offset: int, data: memoryview, flags: int) -> int:
        """Start a WRITE (0: nothing is queued on the spot but a reply header)."""
        # writethrough: every write is durable before it is acknowledged.
        fua = flags & _FUA != 0 or self._writethrough
        if self._ring_first:
            write_on_ring = self._write_on_ring  # called through locals, as in _read
            if write_on_ring(offset, data, fua, self._written, cookie):
                self.in_flight += 1  # done() comes later, never from inside the call
                self.in_flight_bytes += len(data)
                return 0
        try_write = self._try_write
        if try_write(offset, data, fua):
            reply_ok = self._reply_ok
            self._out.append(reply_ok(cookie))
            return 0
        self.in_flight += 1
        self.in_flight_bytes += len(data)
        self._submit(cookie, self._device().submit_write, offset, data, fua,
                     nbytes=len(data))
        return 0

    def _ready(self, event: Ready) -> None:
        export = event.export.handle
        assert isinstance(export, Export)
        device = export.device
        self.export = export
        self.device = device
        self._writethrough = export.writethrough
        node = device.node
        self._holes = event.structured_replies and node is not None and node.reads_zeroes
        self._try_read = device.try_read
        self._try_write = device.try_write
        # Whether writes try the ring before the loop thread (the node's kind, known now;
        # after a medium change of another kind either order still ends on the right
        # route: submit_write tries the ring first).
        self._ring_first = node is None or node.ring_fd >= 0
        self._write_on_ring = device.write_on_ring
        self._try_read_hole = device.try_read_hole
        export.clients.add(self)
        now = asyncio.get_running_loop().time()  # check_stalls counts from here
        self._seen = (self.received, now)
        self._seen_out = (self.drains, 0, now)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _device(self) -> Device:
        assert self.device is not None
        return self.device

    def _start_tls(self) -> None:
        """Stop reading; once this turn has sent the ACK, wrap the socket in TLS."""
        assert self.transport is not None
        self._upgrading = True
        self.reading_paused = True
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._upgrade(self.transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        """The TLS handshake (within the negotiation's time limit), then negotiation again."""
        assert self._tls is not None
        loop = asyncio.get_running_loop()
        try:
            wrapped = await loop.start_tls(transport, self, self._tls, server_side=True,
                                           ssl_handshake_timeout=self._limits.handshake_timeout)
        except Exception as exc:  # ssl.SSLError, a timeout, the peer gone
            log.info("NBD: TLS handshake failed: %s", exc)
            self._server.limit_hit("nbd-tls-failures")
            transport.abort()
            if not self.closed:
                self.connection_lost(exc)
            return
        if wrapped is None or self.closed:
            return
        self.transport = wrapped
        # Not (0, 0) as on the plain socket: the TLS transport then calls pause_writing
        # with nothing buffered (size 0 >= high 0) and flaps on every write.  It encrypts
        # (copies) what it is given at once, so pooled buffers are free to go back.
        wrapped.set_write_buffer_limits(high=TLS_WRITE_HIGH, low=0)
        self._replies.attach(wrapped, -1)
        self._poller.attach(wrapped, -1)
        self._conn.tls_started()
        self._upgrading = False
        self.reading_paused = False

    def _close_when_idle(self) -> None:
        if self.in_flight == 0:
            self.disconnect(logging.DEBUG, "the client disconnected")

    def _finish(self, reply: bytes | None, nbytes: int = 0) -> None:
        """A request is done: queue its reply (if any) and see what its slot frees."""
        self.in_flight -= 1
        self.in_flight_bytes -= nbytes
        if reply is not None:
            self._write(reply)
        if self.held or self.reading_paused:
            self._update_reading()
        if self.stopping:
            self._close_when_idle()

    def _written(self, cookie: int, nbytes: int, exc: BaseException | None) -> None:
        """A write through Device.write_on_ring is done: :meth:`_finish` with its reply."""
        if exc is not None:
            self._finish_error(cookie, exc, nbytes)
            return
        self.in_flight -= 1
        self.in_flight_bytes -= nbytes
        self._write(self._reply_ok(cookie))
        if self.held or self.reading_paused:
            self._update_reading()
        if self.stopping:
            self._close_when_idle()

    def _finish_error(self, cookie: int, exc: BaseException | None, nbytes: int = 0) -> None:
        """A request failed: its error reply (the errno mapped to NBD's), then :meth:`_finish`."""
        err = getattr(exc, "errno", None)
        self._finish(self._conn.reply_error(
            cookie, errno_to_nbd(err if isinstance(err, int) else errno.EIO)), nbytes)

    def _submit(
        self, cookie: int, submit: Callable[..., None], *args: object, fua: bool = False,
        nbytes: int = 0,
    ) -> None:
        """Start one request; its reply is written when the device calls back.

        ``fua`` on commands without their own FUA (trim, write-zeroes) is honoured
        with a flush after the command.
        """
        reply_ok = self._reply_ok
        device = self._device()

        def done(result: object, exc: BaseException | None) -> None:
            if exc is not None:
                self._finish_error(cookie, exc, nbytes)
            elif fua:
                self.in_flight_bytes -= nbytes  # the flush keeps the slot, not the bytes
                self._submit(cookie, device.submit_flush)
            else:
                self._finish(reply_ok(cookie), nbytes)

        try:
            submit(*args, done)
        except (BlockdError, OSError) as exc:
            self._finish_error(cookie, exc, nbytes)

    def _submit_read(self, cookie: int, offset: int, length: int) -> None:
        replies = self._replies
        reply_read_header = self._reply_read_header

        def done(buf: bytearray | Pipe | None, exc: BaseException | None) -> None:
            if isinstance(buf, Pipe):
                replies.write_pipe(reply_read_header(cookie, offset, length), buf)
            elif exc is None and buf is not None:
                replies.write_data(reply_read_header(cookie, offset, length), buf, length)
            else:
                self._finish_error(cookie, exc, length)
                return
            self._finish(None, length)

        try:
            self._device().submit_read(offset, length, done, self._server.buffers, self._pipes)
        except (BlockdError, OSError) as exc:
            self._finish_error(cookie, exc, length)

    def _block_status(self, event: BlockStatus) -> None:
        """Answer from the device's allocation map (Device.submit_block_status)."""

        def looked_up(extents: object, exc: BaseException | None) -> None:
            if exc is not None:
                self._finish_error(event.cookie, exc)
                return
            found = cast(list[tuple[int, int]], extents)
            if event.flags & _REQ_ONE:
                found = [(min(found[0][0], event.length), found[0][1])] if found else []
            # Extent lengths are 32-bit on the wire; a longer one is cut (the client asks again).
            found = [(min(length, _MAX_EXTENT), flags) for length, flags in found]
            if not found:
                self._finish_error(event.cookie, InvalidArgument("no extents"))
                return
            self._finish(self._conn.reply_block_status(event.cookie, found))

        try:
            self._device().submit_block_status(event.offset, event.length, looked_up)
        except (BlockdError, OSError) as exc:
            self._finish_error(event.cookie, exc)

    # -- output and flow control ---------------------------------------------------------

    def flush(self) -> None:
        """End of a turn: send the queued replies; with nothing in flight, the client's turn."""
        if self._send() and self._polling and not self.in_flight:
            now = _monotonic_ns()
            self._completion_seen(now)  # one that came through the loop: learn its latency
            self._request_awaited(now)

    def _update_reading(self) -> None:
        """Read from the client only while it is under its limits and nothing waits."""
        transport = self.transport
        if transport is None or self.closed:
            return
        over = (self.in_flight >= self._max_in_flight
                or (self.in_flight_bytes >= self._max_in_flight_bytes and self.in_flight > 0)
                or self._replies.backlogged())
        if self.held and not over and not self._running and not self.stopping:
            self._run()  # take the requests that waited (it calls back here when done)
            return
        want_pause = over or self.held or self._upgrading
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()


def _enlarge_send_buffer(sock: socket.socket | None) -> None:
    """Let the kernel queue a few large replies at once (fewer wake-ups per MiB sent).

    The default (about 208 KiB on Linux) is smaller than one 1 MiB read reply,
    so each such reply would take several trips through the event loop.
    SO_SNDBUFFORCE goes past the system's limit when we may (root); otherwise
    SO_SNDBUF gets what the limit allows.
    """
    if sock is None:
        return
    for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
            return
        except OSError:
            continue
