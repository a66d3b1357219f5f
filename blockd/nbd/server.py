"""The NBD server: listeners, one asyncio protocol per client, export lifecycle.

Each client connection is an :class:`asyncio.Protocol` around a sans-IO
:class:`~blockd.nbd.protocol.NbdServerConnection`.  No coroutine or task is
created per request: ``data_received`` parses what arrived and hands each
request to the export's device with a completion callback, which writes the
reply.  Replies may go out in any order (NBD allows it).  Requests a device can
serve without blocking complete before ``data_received`` returns; the rest
complete when the I/O workers are done.

Back-pressure: a client may have at most ``MAX_IN_FLIGHT`` requests in flight;
beyond that, and while the transport's write buffer is full, the server stops
reading from it.  A client that breaks the protocol is disconnected; requests
it left in flight still complete (acknowledged writes are never lost), their
replies dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Sequence
from typing import cast

from blockd.aio.buffers import MIN_POOLED, BufferPool
from blockd.aio.pipes import Pipe, PipePool
from blockd.aio.polling import AdaptivePoll, max_ns_from_env
from blockd.block.device import Device
from blockd.block.exports import Export, NbdAddress
from blockd.block.registry import Registry
from blockd.errors import BlockdError, InUse, InvalidArgument, NotFound
from blockd.nbd.constants import CommandFlag, ErrorCode
from blockd.nbd.errors import NbdProtocolError, errno_to_nbd
from blockd.nbd.protocol import (
    NEED_DATA,
    BlockStatus,
    Closed,
    Disconnect,
    ExportInfo,
    Flush,
    NbdServerConnection,
    Read,
    Ready,
    Rejected,
    Send,
    Trim,
    Write,
    WriteZeroes,
)

__all__ = ["NbdServer"]

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 128
MAX_UNSENT = 8 << 20  # stop reading requests while this much reply data waits
SEND_BUFFER = 4 << 20  # socket send buffer per client
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
# Plain ints: IntFlag arithmetic costs microseconds on the hot path.
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_MAX_EXTENT = (1 << 32) - 4096
MAX_BLOCK = 32 << 20
POLL_BUFFER = 256 * 1024  # what one poll reads from the socket at most
POLL_SLICE_NS = 1_000_000  # polling serves one client at most this long before the loop runs
PREFERRED_BLOCK = 4096


class _Catalog:
    """What the sans-IO connection may see: the registry's exports, described for NBD."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server

    def lookup(self, name: str) -> ExportInfo | None:
        export = self._server.registry.export_by_name(name)
        if export is None:
            return None
        try:
            return self._server.describe(export)
        except BlockdError:  # no medium right now: the export cannot be opened
            return None

    def names(self) -> Sequence[tuple[str, str]]:
        return [
            (e.name, e.description)
            for e in self._server.registry.exports.values()
            if not e.shutting_down
        ]


class _Client(asyncio.Protocol):
    """One NBD client connection."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.conn = NbdServerConnection(server.catalog)
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.device: Device | None = None  # the export's, once negotiated
        self.in_flight = 0
        self.closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._disconnecting = False
        self._writethrough = False
        # Structured replies to a node that reads zeroes: reads may go as holes.  Known
        # at negotiation; a medium changed later only loses (or declines) the shortcut.
        self._holes = False
        self._out: list[bytes | bytearray | memoryview] = []
        self._lent: list[bytearray] = []  # pooled buffers in the next flush
        self._unsent: list[bytearray] = []  # pooled buffers the transport may still hold
        self._spliced: list[tuple[bytes, Pipe]] = []  # read replies whose data is in a pipe
        self._sock_fd = -1  # for splicing pipes into the socket, and for polling
        self._poll = AdaptivePoll(server.poll_max_ns)  # for the client's next request
        self._io_poll = AdaptivePoll(server.poll_max_ns)  # for a single request's completion
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but behave like one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=0, low=0)
        sock = self.transport.get_extra_info("socket")
        _enlarge_send_buffer(sock)
        if sock is not None:
            self._sock_fd = sock.fileno()
        self.server.clients.add(self)
        if 0 < self.server.max_connections < len(self.server.clients):
            log.warning("NBD: refusing a client: %d connections", len(self.server.clients) - 1)
            self.close()
            return
        self.server.connections_accepted += 1
        self.transport.write(self.conn.initial_data())

    def data_received(self, data: bytes) -> None:
        if self._poll.max_ns:
            self._poll.busy(time.monotonic_ns())
        self.conn.receive_data(data)
        self._process()
        if self._poll.max_ns:
            self._poll_for_requests()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"")
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._sock_fd = -1
        spliced, self._spliced = self._spliced, []
        for _, pipe in spliced:
            self.server.pipes.put(pipe)
        self.server.clients.discard(self)
        if self.export is not None:
            self.export.clients.discard(self)
            self.server.client_gone(self.export)

    # The transport's limits are set to zero, so these say "something is
    # buffered" and "everything has gone to the kernel"; reading pauses on our
    # own, larger threshold (see _update_reading).

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._recycle()
        self._send_spliced()
        self._update_reading()

    # -- requests --------------------------------------------------------------------------

    def _process(self) -> None:
        conn = self.conn
        # Replies produced while handling this input are sent once, at the end,
        # without a trip through call_soon (that matters at queue depth 1).
        self._flush_scheduled = True
        try:
            while not self.closed and not self._disconnecting:
                try:
                    event = conn.next_event()
                except NbdProtocolError as exc:
                    log.info("NBD client broke the protocol: %s", exc)
                    self.close()
                    return
                if event is NEED_DATA:
                    break
                self._handle(event)
        finally:
            self._flush()
        self._update_reading()

    def _poll_for_requests(self) -> None:
        """Wait for what comes next on the CPU instead of in epoll (see polling.py).

        With nothing in flight that is the client's next request; with one
        request in flight, its completion.  Each has its own adaptive window,
        and one client is served this way for at most ``POLL_SLICE_NS``.
        """
        transport = self.transport
        if self._sock_fd < 0 or transport is None:
            return
        now = time.monotonic_ns()
        stop = now + POLL_SLICE_NS
        while (
            not transport.is_closing() and not self._disconnecting
            and not self._reading_paused and now < stop
        ):
            caught = self._poll_completion(now) if self.in_flight else self._poll_socket(now)
            if not caught:
                return
            now = time.monotonic_ns()

    def _poll_completion(self, now: int) -> bool:
        """Spin on io_uring for the client's single request; True if it completed.

        It is submitted at once and the ring reaped in a loop, so a QD1 write
        is answered without the loop sleeping twice.  A device slower than
        the window (or a request not on the ring) stops being polled after a
        few requests: the wait is measured either way.
        """
        uring = self.server.registry.workers.uring
        if self.in_flight > 1 or uring is None:
            return False  # a deeper queue keeps the loop busy anyway: serve it normally
        poll = self._io_poll
        poll.idle(now)
        if not poll.window_ns:
            return False
        deadline = now + poll.window_ns
        began = now
        uring.submit_now()
        while self.in_flight and now < deadline:
            uring.poll()
            now = time.monotonic_ns()
        self.server.poll_ns_total += now - began
        if self.in_flight:
            return False  # the completion will wake the loop
        self.server.poll_hits += 1
        self._flush()  # the reply, now rather than at the end of the turn
        return True

    def _poll_socket(self, now: int) -> bool:
        """Read the client's socket in a loop for its next request; True if it came.

        Data read here is what ``data_received`` would have got, and is
        handled the same way; an end of file or an error is left in the socket
        for the transport to find.
        """
        poll = self._poll
        if not poll.window_ns:
            return False
        buf = self.server.poll_buffer()
        deadline = now + poll.window_ns
        began = now
        while True:
            try:
                count = os.readv(self._sock_fd, [buf])
            except BlockingIOError:
                now = time.monotonic_ns()
                if now < deadline:
                    continue
                self.server.poll_ns_total += now - began
                return False  # the client is slower than the window: sleep in epoll
            except OSError:
                return False
            break
        now = time.monotonic_ns()
        self.server.poll_ns_total += now - began
        if not count:
            return False
        self.server.poll_hits += 1
        poll.busy(now)
        self.conn.receive_data(bytes(buf[:count]))
        self._process()
        return True

    def _handle(self, event: object) -> None:
        match event:
            case Read():
                if self._holes and self._device().try_read_hole(event.offset, event.length):
                    self._out.append(
                        self.conn.reply_read_hole(event.cookie, event.offset, event.length))
                    self._schedule_flush()
                elif event.length >= MIN_POOLED or not self._read_now(event):
                    self._start()
                    self._submit_read(event)
            case Write():
                # writethrough: every write is durable before it is acknowledged.
                fua = bool(event.flags & _FUA) or self._writethrough
                if not self._write_now(event, fua):
                    self._start()
                    self._submit(event.cookie, self._device().submit_write, event.offset,
                                 event.data, fua)
            case Flush():
                self._start()
                self._submit(event.cookie, self._device().submit_flush)
            case Trim():
                self._start()
                self._submit(event.cookie, self._device().submit_discard, event.offset,
                             event.length, fua=bool(event.flags & _FUA))
            case WriteZeroes():
                self._start()
                self._submit(event.cookie, self._device().submit_write_zeroes, event.offset,
                             event.length, not event.flags & _NO_HOLE,
                             fua=bool(event.flags & _FUA))
            case BlockStatus():
                self._start()
                self._block_status(event)
            case Rejected():
                self._write(self.conn.reply_error(event.cookie, event.error, event.reason))
            case Send():
                self._write(event.data)
            case Ready():
                export = event.export.handle
                assert isinstance(export, Export)
                self.export = export
                self.device = export.device
                self._writethrough = export.writethrough
                node = export.device.node
                self._holes = event.structured_replies and node is not None and node.reads_zeroes
                export.clients.add(self)
            case Disconnect() | Closed():
                # Finish what is in flight, then close (the spec's NBD_CMD_DISC).
                self._disconnecting = True
                self._close_when_idle()
            case _:
                log.error("NBD: unexpected event %r", event)
                self.close()

    def _device(self) -> Device:
        assert self.device is not None
        return self.device

    # Reads and writes the device can serve on the spot (memory-backed drivers,
    # page-cache hits) skip the callbacks: their replies are queued at once.

    def _read_now(self, event: Read) -> bool:
        """Serve a small read now if the device can; False: submit it instead."""
        buf = bytearray(event.length)
        if self._device().try_read(event.offset, buf) is None:
            return False
        self._out += (self.conn.reply_read_header(event.cookie, event.offset, event.length), buf)
        self._schedule_flush()
        return True

    def _write_now(self, event: Write, fua: bool) -> bool:
        """Serve a write now if the device can; False: submit it instead."""
        if not self._device().try_write(event.offset, event.data, fua):
            return False
        self._out.append(self.conn.reply_ok(event.cookie))
        self._schedule_flush()
        return True

    def _close_when_idle(self) -> None:
        if self._disconnecting and self.in_flight == 0:
            self.close()

    def _start(self) -> None:
        self.in_flight += 1

    def _finish(self, data: bytes | None) -> None:
        """A request is done: queue its reply (if any) and see what its slot frees."""
        self.in_flight -= 1
        if data is not None:
            self._write(data)
        if self._reading_paused:
            self._update_reading()
        if self._disconnecting:
            self._close_when_idle()

    def _submit(
        self, cookie: int, submit: Callable[..., None], *args: object, fua: bool = False
    ) -> None:
        """Start one request; its reply is written when the device calls back.

        ``fua`` on commands without their own FUA (trim, write-zeroes) is honoured
        with a flush after the command.
        """
        conn = self.conn
        device = self._device()

        def done(result: object, exc: BaseException | None) -> None:
            if exc is not None:
                self._finish(conn.reply_error(cookie, _nbd_error(exc)))
            elif fua:
                self._submit(cookie, device.submit_flush)  # keeps this request's slot
            else:
                self._finish(conn.reply_ok(cookie))

        try:
            submit(*args, done)
        except (BlockdError, OSError) as exc:
            self._finish(conn.reply_error(cookie, _nbd_error(exc)))

    def _submit_read(self, event: Read) -> None:
        conn = self.conn
        cookie, offset, length = event.cookie, event.offset, event.length

        def done(buf: bytearray | Pipe | None, exc: BaseException | None) -> None:
            if isinstance(buf, Pipe):
                self._write_pipe(conn.reply_read_header(cookie, offset, length), buf)
            elif exc is None and buf is not None:
                self._write_data(conn.reply_read_header(cookie, offset, length), buf, length)
            else:
                self._write(conn.reply_error(cookie, _nbd_error(exc)))
            self._finish(None)

        assert self.export is not None
        try:
            self.export.device.submit_read(
                offset, length, done, self.server.buffers,
                self.server.pipes if self._sock_fd >= 0 else None,
            )
        except (BlockdError, OSError) as exc:
            self._finish(conn.reply_error(cookie, _nbd_error(exc)))

    def _block_status(self, event: BlockStatus) -> None:
        """Answer from the device's allocation map (Device.submit_block_status)."""

        def looked_up(extents: object, exc: BaseException | None) -> None:
            found = cast(list[tuple[int, int]], extents) if exc is None else []
            self._block_status_done(event, found, exc)

        try:
            self._device().submit_block_status(event.offset, event.length, looked_up)
        except (BlockdError, OSError) as exc:
            self._finish(self.conn.reply_error(event.cookie, _nbd_error(exc)))

    def _block_status_done(
        self, event: BlockStatus, extents: list[tuple[int, int]], exc: BaseException | None
    ) -> None:
        if exc is not None:
            self._finish(self.conn.reply_error(event.cookie, _nbd_error(exc)))
            return
        if event.flags & _REQ_ONE:
            extents = [(min(extents[0][0], event.length), extents[0][1])] if extents else []
        # Extent lengths are 32-bit on the wire; a longer one is cut (the client asks again).
        extents = [(min(length, _MAX_EXTENT), flags) for length, flags in extents]
        if not extents:
            self._finish(self.conn.reply_error(event.cookie, ErrorCode.EINVAL))
            return
        self._finish(self.conn.reply_block_status(event.cookie, extents))

    # -- output and flow control ---------------------------------------------------------

    # Replies are gathered and written once per turn of the event loop: with many
    # requests in flight that is one system call (and one wake-up of the client)
    # for a whole batch of replies instead of one per reply.

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        self._out.append(data)
        self._schedule_flush()

    def _write_data(self, header: bytes, buf: bytearray, length: int) -> None:
        if self.closed:
            return
        self._out.append(header)
        if length < MIN_POOLED:
            self._write(buf)
        else:  # a pooled buffer, maybe longer than the data
            self._lent.append(buf)
            self._write(buf if len(buf) == length else memoryview(buf)[:length])

    def _write_pipe(self, header: bytes, pipe: Pipe) -> None:
        if self.closed:
            self.server.pipes.put(pipe)
            return
        self._spliced.append((header, pipe))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        lent, self._lent = self._lent, []
        transport = self.transport
        if transport is None or transport.is_closing() or not (out or self._spliced):
            return
        if self._spliced:
            self._send_spliced(out)
        elif len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)
        # Pooled buffers go back once the transport holds nothing more to send
        # (it may keep references to them until then): now, or in resume_writing.
        self._unsent.extend(lent)
        if transport.get_write_buffer_size() == 0:
            self._recycle()
        if not self.in_flight and self._poll.max_ns:
            now = time.monotonic_ns()
            self._io_poll.busy(now)  # a completion that came through the loop: learn its latency
            self._poll.idle(now)  # the client's turn
        self._update_reading()

    def _send_spliced(self, out: list[bytes | bytearray | memoryview] | None = None) -> None:
        """Send the replies whose data waits in pipes, each header followed by its data.

        The data goes from the pipe straight into the socket, which is only
        safe while the transport has nothing buffered (else the bytes would
        overtake it).  Whatever the socket does not take at once is copied out
        of the pipe and left to the transport; the remaining replies wait until
        the transport has drained (resume_writing).  ``out``: other replies to
        write first, in the same system call as the first header.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pipes = self.server.pipes
        spliced = self._spliced
        while spliced and not transport.get_write_buffer_size():
            header, pipe = spliced.pop(0)
            if out:
                out.append(header)
                transport.writelines(out)
                out = None
            else:
                transport.write(header)
            if not transport.get_write_buffer_size():
                try:
                    pipe.send(self._sock_fd)
                except OSError as exc:  # the peer is gone: the transport finds out too
                    log.debug("NBD: splicing a reply failed: %s", exc)
                    pipes.put(pipe)
                    self.close(hard=True)
                    return
            if pipe.held:  # the socket is full: the transport sends the rest
                transport.write(pipe.take())
            pipes.put(pipe)
        if out:
            transport.writelines(out)

    def _recycle(self) -> None:
        unsent, self._unsent = self._unsent, []
        for buf in unsent:
            self.server.buffers.put(buf)

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        want_pause = self.in_flight >= MAX_IN_FLIGHT or (
            self._writing_paused and self.transport.get_write_buffer_size() > MAX_UNSENT
        )
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self, hard: bool = False) -> None:
        """End the connection (``hard``: drop unsent replies too)."""
        if self.transport is None or self.transport.is_closing():
            return
        if hard:
            self.transport.abort()
        else:
            self._flush()
            self.transport.close()


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


def _nbd_error(exc: BaseException | None) -> int:
    err = getattr(exc, "errno", None)
    return errno_to_nbd(err if isinstance(err, int) else errno.EIO)


class NbdServer:
    """The daemon's NBD server: at most one set of listeners, many exports."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.catalog = _Catalog(self)
        self.clients: set[_Client] = set()
        self.connections_accepted = 0  # for the metrics: blockd_nbd_connections_total
        self.buffers = BufferPool()
        self.pipes = PipePool()
        self.poll_max_ns = max_ns_from_env()
        self.poll_hits = 0  # for the metrics: requests that polling caught
        self._poll_buf: bytearray | None = None
        self.poll_ns_total = 0  # for the metrics: time the loop spent polling
        self.max_connections = 100
        self.address: NbdAddress | None = None
        self._server: asyncio.AbstractServer | None = None

    def poll_buffer(self) -> bytearray:
        """Where polling reads a socket into; shared, since what it reads is copied at once."""
        if self._poll_buf is None:
            self._poll_buf = bytearray(POLL_BUFFER)
        return self._poll_buf

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def connection_count(self) -> int:
        """Clients connected now (a refused one is gone as soon as its close completes)."""
        return len(self.clients)

    def describe(self, export: Export) -> ExportInfo:
        """The export as NBD negotiation shows it, from its device's current medium."""
        device = export.device
        node = device.node
        if node is None or not device.is_available():
            raise BlockdError("No medium found", errno.ENOMEDIUM)
        info = node.info
        writable = export.writable and not node.read_only
        minimum = max(1, info.request_alignment)
        return ExportInfo(
            name=export.name,
            description=export.description,
            size=node.size,
            read_only=not writable,
            can_flush=True,
            can_fua=writable,
            can_trim=writable,
            can_write_zeroes=writable,
            can_fast_zero=False,
            can_multi_conn=self.max_connections != 1,
            can_allocation=node.block_status is not None,
            min_block=minimum,
            preferred_block=max(PREFERRED_BLOCK, minimum),
            max_block=MAX_BLOCK,
            handle=export,
        )

    async def start(self, address: NbdAddress, max_connections: int) -> None:
        """nbd-server-start; raise BlockdError with QEMU's texts."""
        if self._server is not None:
            raise InUse("NBD server already running")
        if not address.is_loopback:
            raise InvalidArgument(
                f"NBD on non-loopback address {address.host} needs TLS, which blockd does not "
                "support yet; listen on a UNIX socket or a loopback address"
            )
        loop = asyncio.get_running_loop()
        try:
            if address.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.stat(address.path).st_mode):
                        os.unlink(address.path)
                old_umask = os.umask(0o177)
                try:
                    self._server = await loop.create_unix_server(
                        lambda: _Client(self), address.path
                    )
                finally:
                    os.umask(old_umask)
            else:
                assert address.port is not None
                self._server = await loop.create_server(
                    lambda: _Client(self), address.host, address.port
                )
        except OSError as exc:
            raise BlockdError(f"Failed to bind socket: {exc.strerror}", exc.errno) from None
        self.address = address
        self.max_connections = max_connections

    def export_added(self, export: Export) -> None:
        """Check that a new export can be served now (QEMU checks the length at once)."""
        try:
            self.describe(export)
        except BlockdError as exc:
            raise BlockdError(
                f"Failed to determine the NBD export's length: {os.strerror(exc.errno)}",
                exc.errno,
            ) from None

    async def delete_export(self, export: Export, *, hard: bool) -> None:
        """block-export-del: refuse in safe mode while clients are connected."""
        if export.shutting_down:
            raise InUse(f"Export '{export.id}' is already shutting down")
        if export.clients and not hard:
            raise InUse(f"export '{export.id}' still in use")
        export.shutting_down = True
        if not export.clients:
            self.registry.remove_export(export)
            return
        for client in list(export.clients):
            assert isinstance(client, _Client)
            client.close(hard=True)

    def client_gone(self, export: Export) -> None:
        """A client of ``export`` disconnected: finish a pending deletion."""
        if export.shutting_down and not export.clients:
            self.registry.remove_export(export)

    async def stop(self, *, missing_ok: bool = False) -> None:
        """nbd-server-stop: close the listener and remove every NBD export (hard)."""
        if self._server is None:
            if missing_ok:
                return
            raise NotFound("NBD server not running")
        server, self._server = self._server, None
        server.close()
        for export in list(self.registry.exports.values()):
            if not export.shutting_down:
                await self.delete_export(export, hard=True)
        for client in list(self.clients):
            client.close(hard=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        if self.address is not None and self.address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.path)
        self.address = None
