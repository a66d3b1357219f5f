"""Samples: immutable copies of the daemon's numbers, taken on the event loop thread.

Nothing in blockd keeps a second set of counters for the metrics.  At scrape
time :class:`MetricsSource` copies what the daemon already counts (each device's
:class:`~blockd.block.stats.BlockAcctStats`, the registry, the QMP and NBD
servers, :class:`~blockd.monitoring.daemon_stats.DaemonStats`) into frozen
samples, at most :data:`CHUNK` devices per turn of the loop so that thousands
of devices never hold it for long.  A sample never touches a device: no ioctl,
no fstat, no disk access (sizes are the ones cached at open time).
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from blockd import __version__
from blockd.block.stats import StatsSnapshot
from blockd.monitoring.daemon_stats import DaemonStats

if TYPE_CHECKING:
    from blockd.block.device import Device
    from blockd.block.registry import Registry



class QmpCounters(Protocol):
    """What the metrics read of the QMP server."""

    @property
    def session_count(self) -> int: ...
    @property
    def sessions_accepted(self) -> int: ...


class NbdCounters(Protocol):
    """What the metrics read of the NBD server."""

    @property
    def connection_count(self) -> int: ...
    @property
    def connections_accepted(self) -> int: ...
    @property
    def poll_hits(self) -> int: ...
    @property
    def poll_ns_total(self) -> int: ...
    @property
    def poll_paused(self) -> int: ...


class HotplugCounters(Protocol):
    """What the metrics read of hotplug (``blockd.hotplug.manager.Hotplug``)."""

    @property
    def enabled(self) -> bool: ...

    def metrics(self) -> tuple[bool, int, tuple[tuple[str, int, int, int], ...]]:
        """(udevd answers, events lost, per rule (label, matched, attached, failed))."""
        ...


__all__ = ["CHUNK", "IO_STATUSES", "DaemonSample", "DeviceSample", "HotplugCounters",
           "MetricsSource", "NbdCounters", "QmpCounters", "sample_device"]

CHUNK = 200
"""Devices copied per turn of the event loop during one scrape."""
IO_STATUSES = ("ok", "failed", "nospace")
"""The values of a device's I/O status (QEMU's BlockDeviceIoStatus)."""



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
    revision: str
    wwn: str
    removable: bool
    has_tray: bool
    tray_open: bool
    locked: bool
    size: int | None
    """The medium's size in bytes (cached at open time), None without a medium."""
    wr_highest_offset: int
    iostatus: str
    stats: StatsSnapshot
    scsi_commands: tuple[tuple[str, int], ...] = ()
    """blockd-scsi-command's commands by operation code name."""
    scsi_check_conditions: tuple[tuple[str, int], ...] = ()
    """Their CHECK CONDITIONs by sense key name."""

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
    nbd_poll_paused: int
    nbd_exports: int
    exports: tuple[tuple[str, str, str, str, bool], ...]
    """(export id, NBD name, device id, node-name, writable) for every export."""
    hotplug_events: tuple[tuple[str, int], ...]
    devices: tuple[DeviceSample, ...]
    hotplug_enabled: bool = False
    hotplug_udevd: bool = False
    hotplug_lost: int = 0
    hotplug_rules: tuple[tuple[str, int, int, int], ...] = ()
    """Per rule: (label, devices matched, attached, failed to attach)."""
    limit_hits: tuple[tuple[str, int], ...] = ()
    """Times each of the daemon's limits was hit (blockd-query-limits)."""


def _extra(extra: dict[str, object], key: str) -> str:
    value = extra.get(key)
    return value if isinstance(value, str) else ""


def sample_device(device: Device) -> DeviceSample:
    """Copy one device's numbers (event loop thread only; touches no device)."""
    node = device.node
    revision = wwn = ""
    if node is None:
        name = driver = filename = serial = vendor = product = ""
        size: int | None = None
        highest = 0
    else:
        extra = node.info.extra
        name, driver, filename = node.name, node.drv, node.filename()
        serial, vendor, product = (_extra(extra, k) for k in ("serial", "vendor", "product"))
        scsi = node.info.scsi
        if scsi is not None:
            serial, vendor, product = scsi.serial, scsi.vendor, scsi.product
            revision, wwn = scsi.revision, scsi.wwn
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
        revision=revision,
        wwn=wwn,
        removable=device.removable,
        has_tray=device.has_tray,
        tray_open=device.tray_open,
        locked=device.locked,
        size=size,
        wr_highest_offset=highest,
        iostatus=device.iostatus,
        stats=device.stats.snapshot(timed=False),
        scsi_commands=tuple(sorted(device.scsi_commands.items())),
        scsi_check_conditions=tuple(sorted(device.scsi_check_conditions.items())),
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
        nbd: NbdCounters | None = None,
        qmp: QmpCounters | None = None,
        hotplug: HotplugCounters | None = None,
        version: str = __version__,
        qemu_version: str = "",
    ) -> None:
        self.registry = registry
        self.daemon_stats = daemon_stats
        self.nbd = nbd
        self.qmp = qmp
        self.hotplug = hotplug
        # The daemon's limits hit so far, by name (set by the composition root).
        self.limit_hits: Callable[[], dict[str, int]] = dict
        self.version = version
        self.qemu_version = qemu_version
        self.python_version = platform.python_version()

    def _daemon_sample(self, devices: Sequence[DeviceSample]) -> DaemonSample:
        stats = self.daemon_stats
        qmp, nbd, hotplug = self.qmp, self.nbd, self.hotplug
        enabled = hotplug is not None and hotplug.enabled
        udevd, lost, rules = hotplug.metrics() if hotplug is not None and enabled \
            else (False, 0, ())
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
            nbd_poll_paused=nbd.poll_paused if nbd is not None else 0,
            nbd_exports=len(self.registry.exports),
            exports=tuple(
                (e.id, e.name, e.device.id, e.node_name, e.writable)
                for e in self.registry.exports.values()
            ),
            hotplug_events=tuple(stats.hotplug_events.items()),
            devices=tuple(devices),
            hotplug_enabled=enabled,
            hotplug_udevd=udevd,
            hotplug_lost=lost,
            hotplug_rules=rules,
            limit_hits=tuple(sorted(self.limit_hits().items())),
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
