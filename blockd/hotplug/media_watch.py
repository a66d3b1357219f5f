"""Following host drives: tray movements and disc changes that did not come from QMP.

A drive's own button, another program's eject or a disc pushed in by hand
change the hardware without blockd being asked.  Two sources tell blockd:

* **udev** (pyudev's netlink monitor, read on the event loop): the kernel
  sends ``change`` events with ``DISK_MEDIA_CHANGE=1`` when a disc comes or
  goes and ``DISK_EJECT_REQUEST=1`` when the button of a locked drive is
  pressed; udev adds ``ID_CDROM_MEDIA``.  Each event for a drive blockd holds
  makes it read the drive status again (``media.sync_drive``), and set its
  medium lock again, because udev's own cdrom rules lock drives on every event.
* **polling** the drive status every ``interval`` seconds (``--media-poll``,
  default 2, 0 turns it off), for drives and kernels where udev stays silent.

An eject request (the button of a locked drive) opens the tray unless blockd
itself holds the medium lock (``blockd-lock-medium``), as a guest honouring
its own lock would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from blockd.block import media
from blockd.block.device import Device
from blockd.block.registry import Registry
from blockd.errors import BlockdError

__all__ = ["MediaWatcher"]

log = logging.getLogger(__name__)


class MediaWatcher:
    """Watches every ``cd`` device that holds a host drive."""

    def __init__(self, registry: Registry, interval: float = 2.0, *, udev: bool = True) -> None:
        self.registry = registry
        self.interval = interval
        self._want_udev = udev
        self._monitor: Any = None  # pyudev.Monitor
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._paths: dict[str, str] = {}  # node filename -> resolved device path

    async def start(self) -> None:
        if self._want_udev:
            self._start_udev()
        if self.interval > 0:
            self._poller = asyncio.create_task(self._poll_forever())

    def _start_udev(self) -> None:
        try:
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            monitor.filter_by("block")
            monitor.start()
        except (ImportError, OSError) as err:
            log.info("no udev events (%s); drives are followed by polling only", err)
            return
        self._monitor = monitor
        asyncio.get_running_loop().add_reader(monitor.fileno(), self._on_udev)

    async def close(self) -> None:
        if self._monitor is not None:
            asyncio.get_running_loop().remove_reader(self._monitor.fileno())
            self._monitor = None
        tasks = list(self._tasks)
        if self._poller is not None:
            tasks.append(self._poller)
            self._poller = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- sources ------------------------------------------------------------------------

    def drives(self) -> list[Device]:
        """The devices holding a host drive now."""
        return [d for d in self.registry.devices.values() if media.drive_of(d) is not None]

    def _on_udev(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        while True:
            try:
                event = monitor.poll(timeout=0)
            except OSError as err:
                log.warning("reading udev events failed: %s", err)
                return
            if event is None:
                return
            if event.action not in ("change", "add"):
                continue
            path = event.device_node
            if not path:
                continue
            for device in self.drives():
                if self._device_path(device) == path:
                    eject_request = event.properties.get("DISK_EJECT_REQUEST") == "1"
                    self._spawn(self._after_event(device, eject_request))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for device in self.drives():
                await self._sync(device, reassert_lock=False)

    # -- reactions ----------------------------------------------------------------------

    async def _after_event(self, device: Device, eject_request: bool) -> None:
        await self._sync(device, reassert_lock=True)
        if eject_request:
            if device.locked:
                log.info("%s: eject button pressed; the medium is locked, tray stays shut",
                         device.id)
            else:
                try:
                    await media.eject(self.registry, device, device.id, True)
                except BlockdError as err:
                    log.warning("%s: eject request: %s", device.id, err)

    async def _sync(self, device: Device, *, reassert_lock: bool) -> None:
        if self.registry.devices.get(device.id) is not device:
            return  # deleted meanwhile
        try:
            await media.sync_drive(self.registry, device, reassert_lock=reassert_lock)
        except BlockdError as err:
            log.warning("%s: cannot read the drive status: %s", device.id, err)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _device_path(self, device: Device) -> str | None:
        node = device.node
        filename = node.options.filename if node is not None else None
        if filename is None:
            return None
        path = self._paths.get(filename)
        if path is None:
            # /dev/cdrom -> /dev/sr0; /dev is devtmpfs, this never waits for a disk.
            path = self._paths[filename] = os.path.realpath(filename)
        return path
