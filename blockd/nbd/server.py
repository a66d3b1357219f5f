"""The NBD server: listeners, the connected clients, the exports' lifecycle.

One :class:`~blockd.nbd.connection.NbdClient` serves each connection; this module
owns what they share (buffer and pipe pools, the polling counters the metrics read)
and decides what NBD negotiation shows of an export.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

from blockd.aio.addresses import resolves_to_loopback
from blockd.aio.buffers import BufferPool
from blockd.aio.pipes import PipePool
from blockd.aio.polling import DEFAULT_MAX_NS, CpuPressure
from blockd.aio.unix import claim_socket_path
from blockd.block.exports import Export, NbdAddress
from blockd.block.registry import Registry
from blockd.errors import BlockdError, InUse, InvalidArgument, NotFound
from blockd.nbd.connection import NbdClient, NbdLimits
from blockd.nbd.poller import POLL_BUFFER
from blockd.nbd.protocol import ExportInfo

if TYPE_CHECKING:
    from blockd.aio.tls import TlsCredentials
    from blockd.aio.uring import UringIo

__all__ = ["NbdServer"]

MAX_BLOCK = 32 << 20
SWEEP_INTERVAL = 1.0  # seconds between checks for stalled clients
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


class NbdServer:
    """The daemon's NBD server: at most one set of listeners, many exports."""

    def __init__(self, registry: Registry, *, poll_max_ns: int = DEFAULT_MAX_NS,
                 splice: bool = True, limits: NbdLimits | None = None) -> None:
        self.registry = registry
        self.limits = limits if limits is not None else NbdLimits()  # each client's bounds
        self.catalog = _Catalog(self)
        self.clients: set[NbdClient] = set()
        self.connections_accepted = 0  # for the metrics: blockd_nbd_connections_total
        self.buffers = BufferPool()
        self.pipes = PipePool()
        self.poll_max_ns = poll_max_ns  # 0: no polling (see nbd/poller.py)
        self.splice = splice  # large reads spliced through pipes (see aio/pipes.py)
        self.poll_hits = 0  # for the metrics: requests that polling caught
        self._poll_buf: bytearray | None = None
        self.poll_ns_total = 0  # for the metrics: time the loop spent polling
        self.cpu_pressure = CpuPressure()  # no polling while tasks wait for a CPU
        self.max_connections = 100
        # The daemon's own cap, from its descriptor limit (each client holds a socket,
        # and pipes while it splices): applies whatever max-connections says.
        self.connection_budget = 0  # 0: none
        # Times a limit was hit, by name (blockd-query-limits, blockd_limit_hits_total).
        self.limit_hits: dict[str, int] = {}
        self.address: NbdAddress | None = None
        self.tls_creds: TlsCredentials | None = None  # FORCEDTLS while set (nbd-server-start)
        self.tls: ssl.SSLContext | None = None
        # The operator allows NBD on addresses beyond loopback without TLS (insecure-network).
        self.insecure_network = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def _sweep(self) -> None:
        """Once a second, let each client check for a peer that stalled (check_stalls)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            for client in list(self.clients):
                client.check_stalls(now)

    def poll_buffer(self) -> bytearray:
        """Where polling reads a socket into; shared, since what it reads is copied at once."""
        if self._poll_buf is None:
            self._poll_buf = bytearray(POLL_BUFFER)
        return self._poll_buf

    def uring(self) -> UringIo | None:
        """The daemon's io_uring, where polling waits for a single completion."""
        return self.registry.workers.uring

    def cpus_contended(self, now_ns: int) -> bool:
        """Whether tasks wait for a CPU, so that no client is polled."""
        return self.cpu_pressure.check(now_ns)

    @property
    def poll_paused(self) -> int:
        """For the metrics: times polling paused (200 ms each) because tasks waited for a CPU."""
        return self.cpu_pressure.pauses

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

    async def start(self, address: NbdAddress, max_connections: int,
                    tls: TlsCredentials | None = None) -> None:
        """nbd-server-start; raise BlockdError with QEMU's texts.

        Beyond loopback, NBD needs TLS unless the operator set insecure-network.
        """
        if self._server is not None:
            raise InUse("NBD server already running")
        loop = asyncio.get_running_loop()
        context = tls.server_context() if tls is not None else None
        if (address.path is None and context is None and not self.insecure_network
                and not await resolves_to_loopback(address.host, address.port)):
            raise InvalidArgument(
                f"NBD on the non-loopback address {address.host or '(every interface)'} "
                "needs TLS: give tls-creds, listen on a UNIX socket or a loopback address, "
                "or allow plaintext with the insecure-network setting"
            )
        # Before the listener exists: no client may ever see a TLS server without TLS.
        self.tls_creds, self.tls = tls, context
        try:
            if address.path is not None:
                claim_socket_path(address.path)
                old_umask = os.umask(0o177)
                try:
                    self._server = await loop.create_unix_server(
                        lambda: NbdClient(self), address.path
                    )
                finally:
                    os.umask(old_umask)
            else:
                assert address.port is not None
                self._server = await loop.create_server(
                    lambda: NbdClient(self), address.host, address.port
                )
        except OSError as exc:  # SocketInUse too: a live program listens there
            self.tls_creds = self.tls = None
            raise BlockdError(f"Failed to bind socket: {exc.strerror}", exc.errno) from None
        self.address = address
        self.max_connections = max_connections
        self._sweeper = loop.create_task(self._sweep())

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
            assert isinstance(client, NbdClient)
            client.disconnect(logging.DEBUG, "export %r deleted", export.id, hard=True)

    def admit(self, client: NbdClient) -> bool:
        """A new connection: count it; False if it is one too many (then it must go)."""
        self.clients.add(client)
        if 0 < self.max_connections < len(self.clients) or (
                0 < self.connection_budget < len(self.clients)):
            self.limit_hit("nbd-connections")
            return False
        self.connections_accepted += 1
        return True

    def limit_hit(self, name: str) -> None:
        """Count a limit a client ran into (the connection logs the details)."""
        self.limit_hits[name] = self.limit_hits.get(name, 0) + 1

    def client_gone(self, client: NbdClient) -> None:
        """A connection ended: forget it, and finish its export's pending deletion."""
        self.clients.discard(client)
        export = client.export
        if export is None:
            return
        export.clients.discard(client)
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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for export in list(self.registry.exports.values()):
            if not export.shutting_down:
                await self.delete_export(export, hard=True)
        for client in list(self.clients):
            client.disconnect(logging.DEBUG, "the NBD server stops", hard=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        if self.address is not None and self.address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.path)
        self.address = None
        self.tls_creds = self.tls = None
