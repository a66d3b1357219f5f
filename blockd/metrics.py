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

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)

from . import __version__
from .daemon_stats import DaemonStats
from .stats import (
    DEFAULT_LATENCY_BOUNDARIES_NS,
    IoKind,
    KindStats,
    LatencyHistogram,
    StatsSnapshot,
)

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
SCRAPE_TIMEOUT = 5.0
"""Seconds the HTTP thread waits for the event loop to hand over a sample."""
IO_STATUSES = ("ok", "failed", "nospace")

_NS = 1e9
_DEVICE_LABELS = ("device", "node")
_OPERATION_LABELS = ("device", "node", "operation")
# The operation label of each kind of request.
_OPERATIONS = (
    ("read", IoKind.READ), ("write", IoKind.WRITE), ("flush", IoKind.FLUSH),
    ("discard", IoKind.UNMAP),
)


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
    nbd_exports: int
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
        stats=device.stats.snapshot(),
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
            nbd_exports=len(self.registry.exports),
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


def _le(ns: int) -> str:
    """A bucket bound in seconds, formatted as prometheus_client formats its own."""
    return repr(ns / _NS)


_DEFAULT_LE = tuple(_le(b) for b in DEFAULT_LATENCY_BOUNDARIES_NS)


def _buckets(hist: LatencyHistogram, les: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from per-bin counts; the +Inf bucket is the total."""
    if les is None:
        les = [_le(b) for b in hist.boundaries]
    out: list[tuple[str, float]] = []
    total = 0
    for le, count in zip(les, hist.bins, strict=False):
        total += count
        out.append((le, total))
    total += hist.bins[-1]
    out.append(("+Inf", total))
    return out


def _latency_buckets(kind: KindStats) -> list[tuple[str, float]]:
    """The QMP-set histogram's buckets if there is one, else the default histogram's."""
    if kind.histogram is not None:
        return _buckets(kind.histogram)
    default = kind.default_histogram
    if default is None:  # a snapshot from elsewhere: an empty default histogram
        default = LatencyHistogram(
            DEFAULT_LATENCY_BOUNDARIES_NS, (0,) * (len(DEFAULT_LATENCY_BOUNDARIES_NS) + 1)
        )
    return _buckets(default, _DEFAULT_LE)


def render(sample: DaemonSample) -> list[Metric]:
    """The metric families for one sample (pure: safe in any thread)."""
    return [*_device_families(sample.devices), *_daemon_families(sample)]


def _device_families(devices: Sequence[DeviceSample]) -> Iterator[Metric]:
    def counter(name: str, doc: str, unit: str = "",
                labels: Sequence[str] = _DEVICE_LABELS) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=labels, unit=unit)

    def gauge(name: str, doc: str, unit: str = "") -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=_DEVICE_LABELS, unit=unit)

    def histogram(name: str, doc: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, doc, labels=_DEVICE_LABELS, unit="seconds")

    read_bytes = counter("blockd_device_read_bytes_total",
                         "Bytes read by successful requests (rd_bytes).", "bytes")
    written_bytes = counter("blockd_device_written_bytes_total",
                            "Bytes written by successful requests (wr_bytes).", "bytes")
    discarded_bytes = counter("blockd_device_discarded_bytes_total",
                              "Bytes discarded by successful requests (unmap_bytes).", "bytes")
    reads = counter("blockd_device_reads_completed_total",
                    "Read requests completed successfully (rd_operations).")
    writes = counter("blockd_device_writes_completed_total",
                     "Write requests completed successfully (wr_operations).")
    flushes = counter("blockd_device_flush_requests_total",
                      "Flush requests completed successfully (flush_operations).")
    discards = counter("blockd_device_discards_completed_total",
                       "Discard requests completed successfully (unmap_operations).")
    failed = counter("blockd_device_failed_operations_total",
                     "Requests that completed with an error (failed_*_operations).",
                     labels=_OPERATION_LABELS)
    invalid = counter("blockd_device_invalid_operations_total",
                      "Requests rejected before submission (invalid_*_operations).",
                      labels=_OPERATION_LABELS)
    read_time = counter("blockd_device_read_time_seconds_total",
                        "Total latency of read requests (rd_total_time_ns).", "seconds")
    write_time = counter("blockd_device_write_time_seconds_total",
                         "Total latency of write requests (wr_total_time_ns).", "seconds")
    flush_time = counter("blockd_device_flush_time_seconds_total",
                         "Total latency of flush requests (flush_total_time_ns).", "seconds")
    discard_time = counter("blockd_device_discard_time_seconds_total",
                           "Total latency of discard requests (unmap_total_time_ns).", "seconds")
    read_latency = histogram("blockd_device_read_latency_seconds",
                             "Latency of completed read requests.")
    write_latency = histogram("blockd_device_write_latency_seconds",
                              "Latency of completed write requests.")
    flush_latency = histogram("blockd_device_flush_latency_seconds",
                              "Latency of completed flush requests.")
    io_now = gauge("blockd_device_io_now", "Requests in flight.")
    highest = gauge("blockd_device_write_highest_offset_bytes",
                    "End of the highest write on the medium (wr_highest_offset).", "bytes")
    idle = gauge("blockd_device_idle_seconds",
                 "Time since the last accounted request (idle_time_ns).", "seconds")
    tray_open = gauge("blockd_device_tray_open", "Whether the tray is open (devices with a tray).")
    locked = gauge("blockd_device_locked", "Whether the medium is locked in.")
    inserted = gauge("blockd_device_medium_inserted", "Whether a medium is inserted.")
    removable = gauge("blockd_device_removable", "Whether the device has removable media.")
    size = gauge("blockd_device_size_bytes", "Size of the inserted medium.", "bytes")
    io_status = StateSetMetricFamily("blockd_device_io_status",
                                     "I/O status (set by the stop and enospc error policies).",
                                     labels=_DEVICE_LABELS)
    info = InfoMetricFamily("blockd_device", "The device and its medium.", labels=_DEVICE_LABELS)

    for d in devices:
        labels = [d.id, d.node]
        s = d.stats
        rd, wr, fl, un = s.read, s.write, s.flush, s.unmap
        read_bytes.add_metric(labels, rd.nbytes)
        written_bytes.add_metric(labels, wr.nbytes)
        discarded_bytes.add_metric(labels, un.nbytes)
        reads.add_metric(labels, rd.operations)
        writes.add_metric(labels, wr.operations)
        flushes.add_metric(labels, fl.operations)
        discards.add_metric(labels, un.operations)
        for operation, io_kind in _OPERATIONS:
            kind = s.kind(io_kind)
            failed.add_metric([*labels, operation], kind.failed)
            invalid.add_metric([*labels, operation], kind.invalid)
        read_time.add_metric(labels, rd.total_time_ns / _NS)
        write_time.add_metric(labels, wr.total_time_ns / _NS)
        flush_time.add_metric(labels, fl.total_time_ns / _NS)
        discard_time.add_metric(labels, un.total_time_ns / _NS)
        read_latency.add_metric(labels, _latency_buckets(rd), rd.total_time_ns / _NS)
        write_latency.add_metric(labels, _latency_buckets(wr), wr.total_time_ns / _NS)
        flush_latency.add_metric(labels, _latency_buckets(fl), fl.total_time_ns / _NS)
        io_now.add_metric(labels, s.in_flight)
        highest.add_metric(labels, d.wr_highest_offset)
        if s.idle_ns is not None:
            idle.add_metric(labels, s.idle_ns / _NS)
        if d.has_tray:
            tray_open.add_metric(labels, int(d.tray_open))
        locked.add_metric(labels, int(d.locked))
        inserted.add_metric(labels, int(d.medium_inserted))
        removable.add_metric(labels, int(d.removable))
        if d.size is not None:
            size.add_metric(labels, d.size)
        io_status.add_metric(labels, {state: d.iostatus == state for state in IO_STATUSES})
        info.add_metric(labels, {
            "driver": d.driver,
            "filename": d.filename,
            "serial": d.serial,
            "vendor": d.vendor,
            "product": d.product,
        })
    yield from (
        read_bytes, written_bytes, discarded_bytes, reads, writes, flushes, discards,
        failed, invalid, read_time, write_time, flush_time, discard_time,
        read_latency, write_latency, flush_latency,
        io_now, highest, idle, tray_open, locked, inserted, removable, size, io_status, info,
    )


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
    yield CounterMetricFamily("blockd_qmp_sessions_total", "QMP sessions accepted.",
                              s.qmp_sessions_total)
    commands = CounterMetricFamily(
        "blockd_qmp_commands_total",
        'QMP commands executed, by result ("success" or the QMP error class).',
        labels=("command", "result"))
    for command, result, count in s.qmp_commands:
        commands.add_metric([command, result], count)
    yield commands
    yield GaugeMetricFamily("blockd_nbd_connections", "Connected NBD clients.", s.nbd_connections)
    yield CounterMetricFamily("blockd_nbd_connections_total", "NBD connections accepted.",
                              s.nbd_connections_total)
    yield GaugeMetricFamily("blockd_nbd_exports", "NBD exports.", s.nbd_exports)
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
        return render(self.take_sample())


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

    prometheus_client's WSGI application does the content negotiation (text
    format 0.0.4 by default, OpenMetrics when the ``Accept`` header asks for
    it) and the gzip encoding (when ``Accept-Encoding`` allows it).  ``/``
    shows a link to ``/metrics``; every other path is 404.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._metrics_app = make_wsgi_app(registry)
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

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
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
