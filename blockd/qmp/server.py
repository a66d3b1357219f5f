"""QMP over sockets: listeners, one thin adapter per connection, event fan-out.

Each connection gets a sans-IO :class:`~blockd.qmp.protocol.QmpSession`, a
reader task and a writer task.  The reader feeds bytes to the session and runs
the commands it yields one after the other (QMP without OOB answers in request
order); the writer drains a bounded queue of outgoing messages, so events can
be interleaved between replies while a slow command runs.  A slow command in
one session never delays another session.  Any failure of a connection ends
in one place, :meth:`_Connection.run`, as a clean disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import ssl
import time
from collections.abc import Mapping

from blockd.aio.outq import unsent_bytes
from blockd.aio.unix import claim_socket_path
from blockd.events import Event, EventBus
from blockd.qmp.dispatch import CommandError, Dispatcher
from blockd.qmp.events import to_qmp
from blockd.qmp.protocol import Execute, Phase, QmpSession, Send

__all__ = ["QmpServer"]

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
MAX_QUEUED_MESSAGES = 10_000
# Replies and events queued for one client, in bytes.  Above the soft limit the
# session runs no further command until the client has read; above the hard
# limit (events pile up for a client that never reads) it is disconnected.
SOFT_QUEUED_BYTES = 1 << 20
MAX_QUEUED_BYTES = 64 << 20
DEFAULT_MAX_SESSIONS = 64
HANDSHAKE_TIMEOUT = 10.0  # seconds from connecting to qmp_capabilities
MESSAGE_TIMEOUT = 10.0  # seconds a message may take from its first byte to its last
STALL_TIMEOUT = 60.0  # seconds replies may wait while the client reads none of them
MAX_PARTIAL_BYTES = 128 << 20  # unfinished messages of every session together
# A negotiated session with no message under way may stay idle for ever: qmp-shell and
# management tools sit connected for hours.


class _Connection:
    """One client: a session, a reader loop and a writer task."""

    def __init__(
        self,
        server: QmpServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.session = QmpSession(
            version=server.version,
            is_command=server.dispatcher.is_command,
            capabilities=(),
        )
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_QUEUED_MESSAGES)
        self.queued_bytes = 0  # in the queue and in the transport, not yet sent
        self.partial_bytes = 0  # of the unfinished message, counted in the server's total
        self._connected_at = time.monotonic()
        self._message_since: float | None = None  # when the unfinished message began
        self._drained = asyncio.Event()  # queued_bytes fell under the soft limit
        self._drained.set()
        self.closing = False

    def send(self, data: bytes) -> None:
        """Queue ``data``; a client that stops reading is disconnected, not buffered forever."""
        if self.closing:
            return
        if self.queued_bytes + len(data) > self.server.max_queued_bytes:
            self.server.limit_hit("qmp-unread-replies")
            log.warning("QMP client is not reading its messages (%d bytes queued); "
                        "disconnecting it", self.queued_bytes)
            self.close()
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            log.warning("QMP client is not reading its messages; disconnecting it")
            self.close()
            return
        self.queued_bytes += len(data)
        if self.queued_bytes > SOFT_QUEUED_BYTES:
            self._drained.clear()

    def close(self) -> None:
        """Ask the writer to flush what is queued and end the connection."""
        if not self.closing:
            self.closing = True
            self._drained.set()  # a reader waiting for the client to read must see this
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)
            if self.queue.full():
                # The client stopped reading: drop it without flushing.
                self.writer.transport.abort()

    async def run(self) -> None:
        writer_task = asyncio.create_task(self._write_loop())
        try:
            self.send(self.session.greeting())
            await self._read_loop()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("QMP connection failed")
        finally:
            self._hold_partial(0)
            self.close()
            with contextlib.suppress(Exception):
                await writer_task
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    def _read_timeout(self) -> float | None:
        """How long the next read may wait: None for an idle, negotiated session."""
        now = time.monotonic()
        if self.session.phase is Phase.NEGOTIATION:
            return max(0.0, self._connected_at + self.server.handshake_timeout - now)
        if not self.session.mid_message:
            self._message_since = None
            return None
        if self._message_since is None:
            self._message_since = now
        return max(0.0, self._message_since + self.server.message_timeout - now)

    async def _read_loop(self) -> None:
        while not self.closing:
            timeout = self._read_timeout()
            try:
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
            except TimeoutError:
                negotiating = self.session.phase is Phase.NEGOTIATION
                self.server.limit_hit(
                    "qmp-handshake-timeout" if negotiating else "qmp-message-timeout")
                what = "did not negotiate" if negotiating else "left a message unfinished"
                log.warning("QMP client %s within %g s; disconnecting it", what,
                            self.server.handshake_timeout if negotiating
                            else self.server.message_timeout)
                return
            if not data:
                return
            actions = self.session.receive_data(data)
            if not self._hold_partial(self.session.partial_bytes):
                return
            for action in actions:
                if isinstance(action, Send):
                    self.send(action.data)
                elif isinstance(action, Execute):
                    # A client that does not read its replies waits for them, alone.
                    await self._drained.wait()
                    if self.closing:
                        return
                    await self._execute(action)
                    # Between two commands of one client, everyone else gets a turn.
                    await asyncio.sleep(0)
                if self.closing:
                    return

    def _hold_partial(self, size: int) -> bool:
        """Account this session's unfinished message in the server's total; False (cut
        off) when holding it would take every session's together past the limit."""
        server = self.server
        server.partial_bytes += size - self.partial_bytes
        self.partial_bytes = size
        if server.partial_bytes <= server.max_partial_bytes:
            return True
        server.limit_hit("qmp-partial-bytes")
        log.warning("QMP sessions hold %d bytes of unfinished messages (limit %d); "
                    "disconnecting the one that sent the last %d", server.partial_bytes,
                    server.max_partial_bytes, size)
        return False

    async def _execute(self, request: Execute) -> None:
        try:
            result = await self.server.dispatcher.execute(request.name, request.arguments)
        except CommandError as err:
            self.send(self.session.error(request, err.error_class, err.desc))
            return
        self.send(self.session.reply(request, result))

    async def _write_loop(self) -> None:
        written = 0  # handed to the transport since the last drain
        while True:
            data = await self.queue.get()
            if data is None:
                break
            self.writer.write(data)
            written += len(data)
            if self.queue.empty():
                if not await self._drain():
                    return
                self.queued_bytes -= written  # that much reached the kernel
                written = 0
                if self.queued_bytes <= SOFT_QUEUED_BYTES:
                    self._drained.set()
        with contextlib.suppress(Exception):
            await self.writer.drain()
        # Closing the transport also ends a reader blocked in read().
        self.writer.close()

    async def _drain(self) -> bool:
        """Wait until the transport takes what is queued; False (and the client is cut
        off) once it has read nothing for ``stall_timeout`` seconds."""
        transport = self.writer.transport
        drained = asyncio.ensure_future(self.writer.drain())
        left = unsent_bytes(transport)
        while True:
            done, _ = await asyncio.wait({drained}, timeout=self.server.stall_timeout)
            if done:
                drained.result()  # ConnectionError: the peer is gone (run() handles it)
                return True
            now_left = unsent_bytes(transport)
            if now_left < left:  # it reads, slowly: keep waiting
                left = now_left
                continue
            drained.cancel()
            self.server.limit_hit("qmp-stalled-reader")
            log.warning("QMP client read none of its %d bytes of replies for %g s; "
                        "disconnecting it", now_left, self.server.stall_timeout)
            self.closing = True
            self._drained.set()
            transport.abort()
            return False

    def deliver(self, name: str, data: Mapping[str, object] | None, ts: tuple[int, int]) -> None:
        message = self.session.event(name, data, ts[0], ts[1])
        if message is not None:
            self.send(message)


class QmpServer:
    """All QMP listeners and connections of a daemon."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        bus: EventBus,
        version: Mapping[str, object],
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        message_timeout: float = MESSAGE_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
        max_partial_bytes: int = MAX_PARTIAL_BYTES,
    ) -> None:
        self.dispatcher = dispatcher
        self.version = version
        self.max_sessions = max_sessions
        self.max_queued_bytes = max_queued_bytes
        self.handshake_timeout = handshake_timeout
        self.message_timeout = message_timeout
        self.stall_timeout = stall_timeout
        self.max_partial_bytes = max_partial_bytes
        self.partial_bytes = 0  # unfinished messages of every session together
        self._servers: list[asyncio.Server] = []
        self._paths: list[str] = []
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.sessions_accepted = 0  # for the metrics: blockd_qmp_sessions_total
        # Times a limit was hit, by name (blockd-query-limits, blockd_limit_hits_total).
        self.limit_hits: dict[str, int] = {}
        self._unsubscribe = bus.subscribe(self._on_event)

    @property
    def session_count(self) -> int:
        return len(self._connections)

    async def listen_unix(self, path: str, mode: int = 0o600, group: str | None = None,
                          tls: ssl.SSLContext | None = None) -> None:
        """Listen on a UNIX socket created with ``mode`` (and ``group``), replacing a stale one.

        Raises SocketInUse when a running program listens on ``path``.  With ``tls``,
        TLS starts with the first byte, as on a QEMU chardev with ``tls-creds``.
        """
        claim_socket_path(path)
        old_umask = os.umask(0o777 & ~mode)
        try:
            server = await asyncio.start_unix_server(
                self._accept, path=path, ssl=tls,
                ssl_handshake_timeout=self.handshake_timeout if tls is not None else None)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        self._servers.append(server)
        self._paths.append(path)

    async def listen_tcp(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen on TCP (TLS from the first byte with ``tls``); returns the bound port."""
        server = await asyncio.start_server(
            self._accept, host=host, port=port, ssl=tls,
            ssl_handshake_timeout=self.handshake_timeout if tls is not None else None)
        self._servers.append(server)
        sock = server.sockets[0]
        return int(sock.getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_sessions:
            self.limit_hit("qmp-sessions")
            log.warning("refusing QMP connection: %d sessions open", len(self._connections))
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        self.sessions_accepted += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            if task is not None:
                self._tasks.discard(task)

    def limit_hit(self, name: str) -> None:
        self.limit_hits[name] = self.limit_hits.get(name, 0) + 1

    def _on_event(self, event: Event) -> None:
        name, data = to_qmp(event)
        now = time.time()
        ts = (int(now), int((now % 1) * 1_000_000))
        for conn in list(self._connections):
            conn.deliver(name, data, ts)

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, flush and close every session, remove socket files.

        Sessions get ``grace`` seconds to finish; then those left (a client that
        never reads, a command waiting on storage that does not answer) are cut off.
        """
        self._unsubscribe()
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), grace)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        if self._connections:
            log.warning("cutting off %d QMP sessions that did not end within %g s",
                        len(self._connections), grace)
            for conn in list(self._connections):
                conn.writer.transport.abort()
            for task in list(self._tasks):
                task.cancel()
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._servers.clear()
        self._paths.clear()

