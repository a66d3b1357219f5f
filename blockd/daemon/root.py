"""The composition root: builds every part of the daemon and runs it until told to stop.

Start-up applies the configuration in order (nodes, then devices), opens the
QMP listeners and the metrics endpoint, writes the pid file and tells systemd
it is ready.  Shutdown (SIGTERM, SIGINT or QMP ``quit``) runs in the reverse
order: stop serving metrics, stop accepting, close sessions, let in-flight I/O
finish, close devices and nodes, remove sockets and the pid file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import resource
import signal
import ssl
from collections.abc import Awaitable

from blockd import __version__
from blockd.aio.addresses import resolves_to_loopback
from blockd.aio.pipes import PipePool, pool_limit
from blockd.aio.tls import TlsError
from blockd.aio.uring import UringIo
from blockd.aio.workers import ControlExecutor, IoWorkers
from blockd.block.opens import DEFAULT_OPEN_THREADS, OpenRunner
from blockd.block.registry import Registry
from blockd.block.stats import NoAccounting
from blockd.daemon import sdnotify
from blockd.daemon.config import DaemonConfig, OptionSpec
from blockd.daemon.tuning import Tuning
from blockd.errors import BlockdError
from blockd.events import EventBus
from blockd.hotplug.manager import Hotplug
from blockd.hotplug.media_watch import MediaWatcher
from blockd.monitoring.collector import BlockdCollector
from blockd.monitoring.daemon_stats import DaemonStats
from blockd.monitoring.http import REQUEST_TIMEOUT, MetricsServer
from blockd.monitoring.samples import MetricsSource
from blockd.nbd.connection import NbdLimits
from blockd.nbd.server import NbdServer
from blockd.qmp.commands import CommandContext, build_table
from blockd.qmp.commands.exports import NbdServerOptions, start_server
from blockd.qmp.dispatch import Dispatcher
from blockd.qmp.paths import PathPolicy
from blockd.qmp.schema import SchemaError, validate
from blockd.qmp.server import DEFAULT_MAX_SESSIONS, QmpServer

__all__ = ["QEMU_VERSION", "Daemon", "StartupError", "version_info"]

log = logging.getLogger(__name__)

# The QEMU release whose QMP blockd speaks (clients check this).
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
EXECUTOR_THREADS = 8  # control operations (open, close, tray)
IO_THREADS = 4  # data requests that may block


class StartupError(Exception):
    """The configuration could not be applied; the message is one line for the user."""


def version_info() -> dict[str, object]:
    """QEMU's VersionInfo as blockd reports it (greeting and query-version)."""
    return {"qemu": dict(QEMU_VERSION), "package": f"blockd {__version__}"}


class Daemon:
    """One blockd instance."""

    def __init__(self, config: DaemonConfig, tuning: Tuning | None = None) -> None:
        self.config = config
        self.tuning = tuning if tuning is not None else Tuning()
        limits = config.limits
        # Daemon threads throughout: one stuck in the kernel never holds the exit up.
        self.executor = ControlExecutor(EXECUTOR_THREADS)
        self.workers = IoWorkers(IO_THREADS)
        self.bus = EventBus()
        self.registry = Registry(
            executor=self.executor, bus=self.bus, workers=self.workers,
            opens=OpenRunner(limits.open_timeout, DEFAULT_OPEN_THREADS),
            device_max_in_flight=limits.device_in_flight)
        if not self.tuning.accounting:
            log.warning("BLOCKD_NO_ACCOUNTING=1: I/O statistics are off (benchmarking only)")
            self.registry.stats_class = NoAccounting
        self.table = build_table()
        self.daemon_stats = DaemonStats()
        self.nbd = NbdServer(self.registry, poll_max_ns=self.tuning.poll_max_ns,
                             splice=self.tuning.splice, limits=NbdLimits(
                                 in_flight=limits.nbd_in_flight_requests,
                                 in_flight_bytes=limits.nbd_in_flight_bytes,
                                 unsent=limits.nbd_unsent_reply_bytes,
                                 handshake_timeout=limits.handshake_timeout,
                                 message_timeout=limits.message_timeout,
                                 stall_timeout=limits.stall_timeout))
        self.context = CommandContext(
            registry=self.registry,
            nbd=self.nbd,
            version=version_info(),
            request_quit=self.request_stop,
            command_names=self.table.names,
            scsi_allowed_opcodes=config.scsi_allowed_opcodes,
        )
        shared = (config.socket_group is not None or bool(config.socket_mode & 0o077)
                  or any(listener.path is None for listener in config.qmp))
        self.context.path_policy = PathPolicy.for_listeners(config.allowed_paths, shared)
        self.nbd.insecure_network = config.insecure_network
        if config.insecure_network:
            log.warning("insecure-network: QMP and NBD may listen beyond loopback without TLS")
        self.context.objects_in_use = self._objects_in_use
        if self.context.path_policy is not None and config.allowed_paths is None:
            log.warning("QMP is reachable by others (socket group or mode, or TCP): QMP "
                        "clients may open only %s; set allowed-paths to choose",
                        self.context.path_policy.describe())
        self.fd_limit = _raise_fd_limit()
        # Descriptors for clients: each NBD client a socket (and pipes while splicing),
        # each QMP session one; the rest for devices, listeners and the executor.
        self.nbd.connection_budget = max(8, (self.fd_limit - 64) // 3)
        self.nbd.pipes = PipePool(limit=pool_limit(self.fd_limit))
        self.qmp_max_sessions = min(DEFAULT_MAX_SESSIONS, max(4, self.fd_limit // 16))
        self.context.limits = self._limits
        self.dispatcher = Dispatcher(self.table, self.context)
        self.dispatcher.on_command = self.daemon_stats.command_done
        self.qmp: QmpServer | None = None
        self.listening: list[str] = []
        self.metrics_source = MetricsSource(
            self.registry, self.daemon_stats, nbd=self.nbd,
            qemu_version="{major}.{minor}.{micro}".format(**QEMU_VERSION),
        )
        self.metrics: MetricsServer | None = None
        self.metrics_url: str | None = None
        self.media_watcher = MediaWatcher(self.registry, config.media_poll)
        self.hotplug = Hotplug(self.registry, self.nbd, config.hotplug_rules,
                               count_action=self.daemon_stats.hotplug_event)
        self.context.hotplug = self.hotplug
        self.metrics_source.hotplug = self.hotplug
        self.metrics_source.limit_hits = self._limit_hits
        self._stop: asyncio.Event | None = None
        self._pidfile_fd: int | None = None  # holds the pid file's lock once written

    async def start(self) -> None:
        """Apply the configuration and open the listeners; raise StartupError on failure."""
        if self.config.pidfile:
            _check_pidfile(self.config.pidfile)  # before anything is taken over
        self._stop = asyncio.Event()
        self.workers.uring = UringIo.create() if self.tuning.io_uring else None
        limits = self.config.limits
        self.qmp = QmpServer(self.dispatcher, self.bus, version_info(),
                             max_sessions=self.qmp_max_sessions,
                             max_queued_bytes=limits.qmp_queued_reply_bytes,
                             handshake_timeout=limits.handshake_timeout,
                             message_timeout=limits.message_timeout,
                             stall_timeout=limits.stall_timeout,
                             max_partial_bytes=limits.qmp_partial_bytes)
        self.metrics_source.qmp = self.qmp
        for spec in self.config.objects:
            await self._apply("object-add", "--object", spec)
        for spec in self.config.blockdevs:
            await self._apply("blockdev-add", "--blockdev", spec)
        for spec in self.config.devices:
            await self._apply("device_add", "--device", spec)
        if self.config.nbd_server is not None:
            await self._start_nbd(self.config.nbd_server)
        for spec in self.config.exports:
            await self._apply("block-export-add", "--export", spec)
        # Coldplug: devices present now go through the rules before anyone connects.
        await self.hotplug.start()
        for listener in self.config.qmp:
            where = listener.path or f"{listener.host}:{listener.port}"
            tls = self._qmp_tls(listener.tls_creds, where)
            if (listener.path is None and tls is None and not self.config.insecure_network
                    and not await resolves_to_loopback(listener.host, listener.port)):
                raise StartupError(
                    f"QMP on the non-loopback address {where} needs TLS: give its chardev "
                    "tls-creds, or allow plaintext with --insecure-network")
            try:
                if listener.path is not None:
                    directory = os.path.dirname(listener.path)
                    if directory:
                        os.makedirs(directory, exist_ok=True)
                    await self.qmp.listen_unix(
                        listener.path, self.config.socket_mode, self.config.socket_group, tls
                    )
                    self.listening.append(listener.path)
                else:
                    assert listener.host is not None and listener.port is not None
                    port = await self.qmp.listen_tcp(listener.host, listener.port, tls)
                    scheme = "tls" if tls is not None else "tcp"
                    self.listening.append(f"{scheme}:{listener.host}:{port}")
            except (OSError, KeyError) as err:
                where = listener.path or f"{listener.host}:{listener.port}"
                reason = err.strerror if isinstance(err, OSError) and err.strerror else err
                raise StartupError(f"cannot listen for QMP on {where}: {reason}") from None
        self._start_metrics()
        listen = self.config.metrics
        if listen is not None and not await resolves_to_loopback(listen.host, listen.port):
            log.warning("metrics on %s:%d are readable beyond this machine (device names, "
                        "serial numbers, file names, counters)", listen.host, listen.port)
        await self.media_watcher.start()
        if self.config.pidfile:
            self._pidfile_fd = _write_pidfile(self.config.pidfile)

    def _qmp_tls(self, creds_id: str | None, where: str) -> ssl.SSLContext | None:
        """The server context of a QMP listener's ``tls-creds``, if it has one."""
        if creds_id is None:
            return None
        creds = self.context.objects.get(creds_id)
        if creds is None:
            raise StartupError(f"QMP on {where}: No TLS credentials with id '{creds_id}'")
        try:
            return creds.server_context()
        except TlsError as err:
            raise StartupError(f"QMP on {where}: {err}") from None

    def _objects_in_use(self) -> set[str]:
        """Objects object-del must keep: those of the NBD server and the QMP listeners."""
        used = {q.tls_creds for q in self.config.qmp if q.tls_creds is not None}
        if self.nbd.tls_creds is not None:
            used.add(self.nbd.tls_creds.id)
        return used

    async def _apply(self, command: str, option: str, spec: OptionSpec) -> None:
        cmd = self.table.get(command)
        assert cmd is not None
        try:
            args = cmd.check_args(dict(spec.args), keyval=spec.from_keyval)
            # The operator's command line and configuration file are trusted: no path policy.
            await cmd.handler(dataclasses.replace(self.context, path_policy=None), args)
        except (SchemaError, BlockdError) as err:
            raise StartupError(f"{option}: {err}") from None

    async def _start_nbd(self, spec: OptionSpec) -> None:
        """--nbd-server: qemu-storage-daemon's flat socket address form."""
        try:
            args = validate(NbdServerOptions, spec.args, keyval=spec.from_keyval)
            await start_server(self.context, args)
        except (SchemaError, BlockdError) as err:
            raise StartupError(f"--nbd-server: {err}") from None

    def _start_metrics(self) -> None:
        """Serve /metrics in its own thread (``--metrics``; off with ``none``)."""
        listen = self.config.metrics
        if listen is None:
            return
        collector = BlockdCollector(self.metrics_source, asyncio.get_running_loop())
        server = MetricsServer(collector, self.config.limits.metrics_connections)
        try:
            server.start(listen.host, listen.port)
        except OSError as err:
            host = f"[{listen.host}]" if ":" in listen.host else listen.host
            raise StartupError(
                f"cannot serve metrics on {host}:{listen.port}: {err.strerror or err} "
                "(choose another address with --metrics HOST:PORT, or --metrics none)"
            ) from None
        self.metrics = server
        self.metrics_url = server.url

    def _limit_hits(self) -> dict[str, int]:
        hits = dict(self.nbd.limit_hits)
        hits.update(self.registry.limit_hits)
        hits.update(self.registry.opens.limit_hits)
        if self.qmp is not None:
            hits.update(self.qmp.limit_hits)
        if self.metrics is not None and self.metrics.refused:
            hits["metrics-connections"] = self.metrics.refused
        return hits

    def _limits(self) -> dict[str, object]:
        """blockd-query-limits: each bound on what a client can make the daemon hold."""
        return {
            "limits": {
                "fd-limit": self.fd_limit,
                "nbd-connections": self.nbd.connection_budget,
                "nbd-in-flight-requests": self.nbd.limits.in_flight,
                "nbd-in-flight-bytes": self.nbd.limits.in_flight_bytes,
                "nbd-unsent-reply-bytes": self.nbd.limits.unsent,
                "nbd-splice-pipes": self.nbd.pipes.limit,
                "nbd-splice-pipe-pages": self.nbd.pipes.page_budget,
                "nbd-handshake-timeout-ms": _ms(self.nbd.limits.handshake_timeout),
                "nbd-message-timeout-ms": _ms(self.nbd.limits.message_timeout),
                "stall-timeout-ms": _ms(self.config.limits.stall_timeout),
                "device-in-flight": self.registry.device_max_in_flight,
                "io-threads": self.workers.max_threads,
                "qmp-sessions": self.qmp_max_sessions,
                "qmp-queued-reply-bytes": self.config.limits.qmp_queued_reply_bytes,
                "qmp-partial-bytes": self.config.limits.qmp_partial_bytes,
                "qmp-handshake-timeout-ms": _ms(self.config.limits.handshake_timeout),
                "qmp-message-timeout-ms": _ms(self.config.limits.message_timeout),
                "open-timeout-ms": _ms(self.registry.opens.timeout),
                "open-threads": self.registry.opens.capacity,
                "shutdown-timeout-ms": _ms(self.config.limits.shutdown_timeout),
                "metrics-connections": self.config.limits.metrics_connections,
                "metrics-request-timeout-ms": _ms(REQUEST_TIMEOUT),
            },
            # Opens still running after their caller gave up (each holds an open slot).
            "opens-stuck": self.registry.opens.stuck,
            "hits": self._limit_hits(),
        }

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def serve(self) -> None:
        """Run until a signal or QMP ``quit``."""
        assert self.qmp is not None and self._stop is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        sdnotify.notify("READY=1")
        # The quit handler's reply is queued before this wakes up, and closing
        # the sessions flushes it.
        await self._stop.wait()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)

    async def shutdown(self) -> None:
        """Close sessions, drain I/O, close devices and nodes, remove files.

        All within the shutdown timeout (``[limits] shutdown-timeout``): each step
        gets a share of what is left, and what is still stuck then (an open or a
        request waiting on storage that does not answer, a client that never reads)
        is left behind, and logged.  Every thread that can get stuck is a daemon
        thread, so nothing keeps the process from exiting.
        """
        sdnotify.notify("STOPPING=1")
        loop = asyncio.get_running_loop()
        bound = self.config.limits.shutdown_timeout
        deadline = loop.time() + bound
        abandoned: list[str] = []

        def left(share: float = 1.0) -> float:
            return max(0.0, deadline - loop.time()) * share

        async def step(what: str, awaitable: Awaitable[object], share: float) -> None:
            try:
                await asyncio.wait_for(awaitable, left(share))
            except TimeoutError:
                abandoned.append(what)

        if self.metrics is not None:
            metrics, self.metrics = self.metrics, None
            await step("the metrics endpoint", asyncio.to_thread(metrics.close), 0.2)
        await step("media watching", self.media_watcher.close(), 0.1)
        await step("hotplug", self.hotplug.close(), 0.2)
        await step("the NBD server", self.nbd.stop(missing_ok=True), 0.3)
        if self.qmp is not None:
            await step("QMP sessions", self.qmp.close(grace=left(0.3)), 0.6)
        busy = await self._drain(left(0.6))
        left_open = await self.registry.close_all(left(0.8))
        if busy:
            abandoned.append(f"I/O still running on {', '.join(busy)}")
        if left_open:
            abandoned.append(f"nodes left open: {', '.join(left_open)}")
        if self.workers.uring is not None:
            if busy:  # closing the ring would wait for what is stuck in it
                self.workers.uring.abandon()
            else:
                self.workers.uring.close()
            self.workers.uring = None
        stuck_threads = self.workers.close(timeout=left())
        if stuck_threads:
            abandoned.append(f"{stuck_threads} I/O threads stuck in a call")
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.executor.busy:
            abandoned.append(f"{self.executor.busy} control threads stuck in a call")
        if self.registry.opens.running:
            abandoned.append(f"{self.registry.opens.running} opens that never returned")
        if abandoned:
            log.warning("shutdown: within the %g s bound, left behind: %s", bound,
                        "; ".join(abandoned))
        if self._pidfile_fd is not None:  # ours: another daemon's is left alone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.pidfile or "")
            os.close(self._pidfile_fd)
            self._pidfile_fd = None

    async def _drain(self, timeout: float) -> list[str]:
        """Wait for the requests still running in drivers, for at most ``timeout``;
        the names of the nodes still busy then."""
        nodes = list(self.registry.nodes.values()) + self.registry.closing
        idle = await asyncio.gather(*(n.wait_idle(timeout) for n in nodes))
        return [node.name for node, done in zip(nodes, idle, strict=True) if not done]


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one (systemd's soft default is 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return int(soft)


def _check_pidfile(path: str) -> None:
    """Refuse to start while another daemon holds ``path``'s lock (as QSD does).

    A pid file nobody holds is stale (its daemon is gone) and is replaced once
    this one is ready.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as err:
        raise StartupError(f"Cannot lock pid file: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(path) as f:
            pid = f.read().strip()
        raise StartupError(
            f"Cannot lock pid file: another blockd (pid {pid or '?'}) runs with {path}"
        ) from None
    finally:
        os.close(fd)


def _write_pidfile(path: str) -> int:
    """Write our pid atomically (the file appears only once we are ready), locked.

    The returned descriptor holds the lock for the daemon's life.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return fd
