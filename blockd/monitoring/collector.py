"""The Prometheus collector: samples in, metric families out (DESIGN.md section 5).

The registry, the devices and their statistics belong to the event loop thread,
and the HTTP endpoint serves from other threads.  So :class:`BlockdCollector`
never reads them there: it asks the loop, with ``asyncio.run_coroutine_threadsafe``,
to take a sample (:class:`~blockd.monitoring.samples.MetricsSource`) and waits for
it with a timeout.  Rendering happens in the asking thread, on immutable data.

The metrics live in the daemon's own :class:`~prometheus_client.CollectorRegistry`
(with prometheus_client's ``process_*`` collector), not in the library's global
one, so several daemons in one process (tests) never mix.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from blockd.monitoring import device_families as device_metrics
from blockd.monitoring.samples import DaemonSample, MetricsSource

__all__ = ["SCRAPE_TIMEOUT", "BlockdCollector", "ScrapeError", "make_registry", "render"]

SCRAPE_TIMEOUT = 5.0
"""Seconds the asking thread waits for the event loop to hand over a sample."""



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
    yield CounterMetricFamily(
        "blockd_nbd_poll_paused_total",
        "Times NBD polling paused for 200 ms because tasks waited for a CPU.",
        s.nbd_poll_paused)
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
    hits = CounterMetricFamily(
        "blockd_limit_hits_total",
        "Times a client ran into one of the daemon's limits (blockd-query-limits).",
        labels=("limit",))
    for name, count in s.limit_hits:
        hits.add_metric([name], count)
    yield hits
    if s.hotplug_enabled:
        yield GaugeMetricFamily(
            "blockd_hotplug_udevd_running",
            "Whether udevd answers (0: hotplug follows the kernel's uevents and sysfs).",
            int(s.hotplug_udevd))
        yield CounterMetricFamily(
            "blockd_hotplug_events_lost_total",
            "Times the kernel dropped device events (each answered with a rescan).",
            s.hotplug_lost)
        matched = CounterMetricFamily("blockd_hotplug_rule_matches_total",
                                      "Devices a hotplug rule matched first.", labels=("rule",))
        attached = CounterMetricFamily("blockd_hotplug_rule_attached_total",
                                       "Devices a hotplug rule attached.", labels=("rule",))
        failed = CounterMetricFamily("blockd_hotplug_rule_failures_total",
                                     "Devices a hotplug rule failed to attach.",
                                     labels=("rule",))
        for label, n_matched, n_attached, n_failed in s.hotplug_rules:
            matched.add_metric([label], n_matched)
            attached.add_metric([label], n_attached)
            failed.add_metric([label], n_failed)
        yield from (matched, attached, failed)
    yield GaugeMetricFamily("blockd_devices", "Devices.", len(s.devices))




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

