"""Prometheus metrics: a collector over the daemon's live state and the HTTP endpoint.

Nothing here keeps a second set of counters.  At scrape time the collector
copies what the daemon already counts (each device's
:class:`~blockd.stats.BlockAcctStats`, the registry, the QMP and NBD servers,
:class:`~blockd.daemon_stats.DaemonStats`) into immutable samples and turns
those into metric families (DESIGN.md section 5, docs/metrics.md).

Threads.  The HTTP server runs in its own thread (one more per request), but
the registry, the devices and their statistics belong to the event loop
thread.  So the HTTP thread never reads them: it asks the loop, with
``asyncio.run_coroutine_threadsafe``, to run :meth:`MetricsSource.sample`,
which copies plain in-memory numbers, at most :data:`CHUNK` devices per turn of
the loop so that thousands of devices never hold it for long, and waits for
the result with a timeout.  Rendering, text formatting and gzip then happen in
the HTTP thread, on immutable data.  A scrape never touches a device: no
ioctl, no fstat, no disk access (sizes are the ones cached at open time).

The metrics live in the daemon's own :class:`~prometheus_client.CollectorRegistry`
(with prometheus_client's ``process_*`` collector), not in the library's
global one, so several daemons in one process (tests) never mix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import logging
import platform
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from socketserver import TCPServer, ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from . import __version__, device_metrics
from .daemon_stats import DaemonStats
from .stats import StatsSnapshot

if TYPE_CHECKING:
    from .block import Device
    from .nbd.server import NbdServer
    from .qmp.server import QmpServer
    from .registry import Registry

__all__ = [
    "CHUNK",
    "DEFAULT_METRICS_PORT",
    "IO_STATUSES",
    "SCRAPE_TIMEOUT",
    "BlockdCollector",
    "DaemonSample",
    "DeviceSample",
    "MetricsServer",
    "MetricsSource",
    "ScrapeError",
    "make_registry",
    "render",
]

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9580
CHUNK = 200
"""Devices copied per turn of the event loop during one scrape."""
GZIP_LEVEL = 1
"""Fastest; still about 20 times smaller for this text (level 9 costs several times more)."""
SCRAPE_TIMEOUT = 5.0
"""Seconds the HTTP thread waits for the event loop to hand over a sample."""
IO_STATUSES = device_metrics.IO_STATUSES

# --------------------------------------------------------------------------------------
# Samples: immutable copies taken on the event loop thread


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """Everything the metrics show about one device, copied at scrape time."""

    id: str
    node: str
    """The inserted node's node-name, "" when the device has no medium."""
    driver: str
    filename: str
    serial: str
    vendor: str
    product: str
    removable: bool
    has_tray: bool
    tray_open: bool
    locked: bool
    size: int | None
    """The medium's size in bytes (cached at open time), None without a medium."""
    wr_highest_offset: int
    iostatus: str
    stats: StatsSnapshot

    @property
    def medium_inserted(self) -> bool:
        return self.size is not None


@dataclass(frozen=True, slots=True)
class DaemonSample:
    """One scrape's worth of numbers: the daemon's and every device's."""

    version: str
    qemu_version: str
    python_version: str
    start_time: float
    uptime: float
    qmp_sessions: int
    qmp_sessions_total: int
    qmp_commands: tuple[tuple[str, str, int], ...]
    nbd_connections: int
    nbd_connections_total: int
    nbd_poll_hits: int
    nbd_poll_seconds: float
    nbd_exports: int
    exports: tuple[tuple[str, str, str, str, bool], ...]
    """(export id, NBD name, device id, node-name, writable) for every export."""
    hotplug_events: tuple[tuple[str, int], ...]
    devices: tuple[DeviceSample, ...]


def _extra(extra: dict[str, object], key: str) -> str:
    value = extra.get(key)
    return value if isinstance(value, str) else ""


def sample_device(device: Device) -> DeviceSample:
    """Copy one device's numbers (event loop thread only; touches no device)."""
    node = device.node
    if node is None:
        name = driver = filename = serial = vendor = product = ""
        size: int | None = None
        highest = 0
    else:
        extra = node.info.extra
        name, driver, filename = node.name, node.drv, node.filename()
        serial, vendor, product = (_extra(extra, k) for k in ("serial", "vendor", "product"))
        size = node.size
        highest = node.wr_highest_offset
    return DeviceSample(
        id=device.id,
        node=name,
        driver=driver,
        filename=filename,
        serial=serial,
        vendor=vendor,
        product=product,
        removable=device.removable,
        has_tray=device.has_tray,
        tray_open=device.tray_open,
        locked=device.locked,
        size=size,
        wr_highest_offset=highest,
        iostatus=device.iostatus,
        stats=device.stats.snapshot(timed=False),
    )


class MetricsSource:
    """Where the numbers come from; its sampling methods run on the event loop thread.

    ``qmp`` is set once the QMP server exists (the daemon creates it in ``start``).
    """

    def __init__(
        self,
        registry: Registry,
        daemon_stats: DaemonStats,
        *,
        nbd: NbdServer | None = None,
        qmp: QmpServer | None = None,
        version: str = __version__,
        qemu_version: str = "",
    ) -> None:
        self.registry = registry
        self.daemon_stats = daemon_stats
        self.nbd = nbd
        self.qmp = qmp
        self.version = version
        self.qemu_version = qemu_version
        self.python_version = platform.python_version()

    def _daemon_sample(self, devices: Sequence[DeviceSample]) -> DaemonSample:
        stats = self.daemon_stats
        qmp, nbd = self.qmp, self.nbd
        return DaemonSample(
            version=self.version,
            qemu_version=self.qemu_version,
            python_version=self.python_version,
            start_time=stats.start_time,
            uptime=stats.uptime(),
            qmp_sessions=qmp.session_count if qmp is not None else 0,
            qmp_sessions_total=qmp.sessions_accepted if qmp is not None else 0,
            qmp_commands=tuple(
                (command, result, count)
                for (command, result), count in sorted(stats.qmp_commands.items())
            ),
            nbd_connections=nbd.connection_count if nbd is not None else 0,
            nbd_connections_total=nbd.connections_accepted if nbd is not None else 0,
            nbd_poll_hits=nbd.poll_hits if nbd is not None else 0,
            nbd_poll_seconds=nbd.poll_ns_total / 1e9 if nbd is not None else 0.0,
            nbd_exports=len(self.registry.exports),
            exports=tuple(
                (e.id, e.name, e.device.id, e.node_name, e.writable)
                for e in self.registry.exports.values()
            ),
            hotplug_events=tuple(stats.hotplug_events.items()),
            devices=tuple(devices),
        )

    def sample_now(self) -> DaemonSample:
        """Copy everything at once (for callers already on the loop thread)."""
        devices = [sample_device(d) for d in self.registry.devices.values()]
        return self._daemon_sample(devices)

    async def sample(self, chunk: int = CHUNK) -> DaemonSample:
        """Copy everything, ``chunk`` devices per turn of the event loop.

        Devices removed while the scrape is under way are left out; devices
        added meanwhile appear in the next scrape.
        """
        live = self.registry.devices
        pending = list(live.values())
        devices: list[DeviceSample] = []
        for start in range(0, len(pending), chunk):
            if start:
                await asyncio.sleep(0)  # let requests and commands run between chunks
            for device in pending[start:start + chunk]:
                if live.get(device.id) is device:
                    devices.append(sample_device(device))
        return self._daemon_sample(devices)


# --------------------------------------------------------------------------------------
# Rendering: immutable samples in, metric families out (any thread)


def render(sample: DaemonSample) -> list[Metric]:
    """The metric families for one sample (pure: safe in any thread)."""
    return [*device_metrics.families(sample.devices), *_daemon_families(sample)]


def _daemon_families(s: DaemonSample) -> Iterator[Metric]:
    yield InfoMetricFamily("blockd_build", "The blockd build.", value={
        "version": s.version,
        "qemu_version": s.qemu_version,
        "python_version": s.python_version,
    })
    yield GaugeMetricFamily("blockd_start_time_seconds",
                            "Start time of the daemon since the Unix epoch.", s.start_time,
                            unit="seconds")
    yield GaugeMetricFamily("blockd_uptime_seconds", "Time since the daemon started.", s.uptime,
                            unit="seconds")
    yield GaugeMetricFamily("blockd_qmp_sessions", "Open QMP sessions.", s.qmp_sessions)
    yield CounterMetricFamily("blockd_qmp_sessions_accepted_total", "QMP sessions accepted.",
                              s.qmp_sessions_total)
    commands = CounterMetricFamily(
        "blockd_qmp_commands_total",
        'QMP commands executed, by result ("success" or the QMP error class).',
        labels=("command", "result"))
    for command, result, count in s.qmp_commands:
        commands.add_metric([command, result], count)
    yield commands
    yield GaugeMetricFamily("blockd_nbd_connections", "Connected NBD clients.", s.nbd_connections)
    yield CounterMetricFamily("blockd_nbd_connections_accepted_total",
                              "NBD connections accepted.", s.nbd_connections_total)
    yield CounterMetricFamily(
        "blockd_nbd_poll_hits_total",
        "Times polling an idle NBD client's socket found its next request.", s.nbd_poll_hits)
    yield CounterMetricFamily(
        "blockd_nbd_poll_seconds_total",
        "Time the event loop spent polling idle NBD clients' sockets.", s.nbd_poll_seconds,
        unit="seconds")
    yield GaugeMetricFamily("blockd_nbd_exports", "NBD exports.", s.nbd_exports)
    exports = InfoMetricFamily(
        "blockd_nbd_export", "An NBD export and the device its requests go through.",
        labels=("export", "name", "device", "node", "writable"))
    for export_id, name, device, node, writable in s.exports:
        exports.add_metric([export_id, name, device, node, "true" if writable else "false"], {})
    yield exports
    hotplug = CounterMetricFamily("blockd_hotplug_events_total", "Hotplug events handled.",
                                  labels=("action",))
    for action, count in s.hotplug_events:
        hotplug.add_metric([action], count)
    yield hotplug
    yield GaugeMetricFamily("blockd_devices", "Devices.", len(s.devices))


# --------------------------------------------------------------------------------------
# The collector: HTTP thread asks, loop thread copies


class ScrapeError(Exception):
    """The event loop could not hand over a sample (stopped, or too busy)."""


class BlockdCollector:
    """A prometheus_client custom collector over a :class:`MetricsSource`.

    ``collect`` may be called from any thread: from another thread it has the
    event loop take the sample (in chunks) and waits at most ``timeout``
    seconds; on the loop thread itself it samples directly.
    """

    def __init__(self, source: MetricsSource, loop: asyncio.AbstractEventLoop,
                 timeout: float = SCRAPE_TIMEOUT) -> None:
        self.source = source
        self.loop = loop
        self.timeout = timeout
        self._serving = threading.local()

    def take_sample(self) -> DaemonSample:
        """A sample taken on the event loop thread; raise ScrapeError if it cannot be had."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return self.source.sample_now()
        coro = self.source.sample()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as err:  # the loop is closed
            coro.close()
            raise ScrapeError(f"the daemon is not running: {err}") from None
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ScrapeError(
                f"the event loop did not hand over the statistics within {self.timeout:g} s"
            ) from None
        except concurrent.futures.CancelledError:
            raise ScrapeError("the daemon is shutting down") from None

    def collect(self) -> Iterable[Metric]:
        sample: DaemonSample | None = getattr(self._serving, "sample", None)
        if sample is not None:  # the endpoint writes the device families itself
            return list(_daemon_families(sample))
        return render(self.take_sample())

    @contextlib.contextmanager
    def serving(self, sample: DaemonSample) -> Iterator[None]:
        """While the endpoint formats ``sample``: collect() gives the daemon families only."""
        self._serving.sample = sample
        try:
            yield
        finally:
            self._serving.sample = None


def make_registry(collector: BlockdCollector) -> CollectorRegistry:
    """The daemon's own registry: blockd's collector and the ``process_*`` metrics."""
    registry = CollectorRegistry(support_collectors_without_names=True)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


# --------------------------------------------------------------------------------------
# The HTTP endpoint

_INDEX = (
    b"<!DOCTYPE html>\n<html><head><title>blockd</title></head><body>"
    b'<h1>blockd</h1><p><a href="/metrics">Metrics</a></p></body></html>\n'
)


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request; threads do not outlive the daemon."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, _QuietHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn): a DNS query
        # at start-up for nothing.  Bind, and take the address as it is.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (Prometheus scrapes every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """``/metrics`` over HTTP, served from a thread of its own.

    Content negotiation follows prometheus_client (text format 0.0.4 by
    default, OpenMetrics when the ``Accept`` header asks for it; gzip when
    ``Accept-Encoding`` allows it).  The daemon's registry gives the daemon
    and ``process_*`` families; the per-device families, nearly all of a large
    scrape, are written directly by :mod:`blockd.device_metrics` from the same
    sample.  ``/`` shows a link to ``/metrics``; every other path is 404.
    """

    def __init__(self, collector: BlockdCollector) -> None:
        self.collector = collector
        self.registry = make_registry(collector)
        self._writer = device_metrics.TextWriter()
        self._writer_lock = threading.Lock()  # scrapes may overlap (a thread each)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> None:
        """Bind ``host``:``port`` (0: any free port) and serve; raise OSError if binding fails."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        server = _Server((str(sockaddr[0]), port), family)
        server.set_app(self._app)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="blockd-metrics",
                                        daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` with the port actually bound."""
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/metrics"

    def close(self) -> None:
        """Stop serving and close the socket (blocks up to half a second: call it off the loop)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _metrics(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                                      ("Content-Type", "text/plain")])
            return [f"blockd: {method} is not allowed; use GET\n".encode()]
        _, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        openmetrics = content_type.startswith("application/openmetrics-text")
        sample = self.collector.take_sample()
        with self.collector.serving(sample):
            head = (openmetrics_latest if openmetrics else generate_latest)(self.registry)
        with self._writer_lock:
            devices = self._writer.write(sample.devices, openmetrics=openmetrics).encode()
        if openmetrics:
            body = b"".join([head.removesuffix(b"# EOF\n"), devices, b"# EOF\n"])
        else:
            body = head + devices
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [b""] if method == "HEAD" else [body]

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                return self._metrics(environ, start_response)
            except ScrapeError as err:
                return _plain(start_response, "503 Service Unavailable", f"blockd: {err}\n")
            except Exception:
                log.exception("metrics: scrape failed")
                return _plain(start_response, "500 Internal Server Error",
                              "blockd: the scrape failed (see the daemon's log)\n")
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [_INDEX]
        return _plain(start_response, "404 Not Found", "Not Found: try /metrics\n")


def _plain(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode()]
