"""The tray and medium lock of one device, with QEMU's rules for them.

Every :class:`~blockd.block.device.Device` owns a :class:`Tray`.  It keeps one
tray operation at a time running per device, moves the real tray and lock of a
host drive (a node whose driver is :class:`~blockd.devices.base.Removable`)
through the control executor, since a tray motor or a spinning-up drive can
sleep for seconds, and follows what the drive did by itself (:meth:`Tray.sync`).
A device without a drive has a virtual tray, as QEMU's emulated drives do.

The tray's state (``Device.tray_open``, ``Device.locked``, the medium's size) is
the device's: the tray changes it only through the device's own methods, which
also announce DEVICE_TRAY_MOVED.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from blockd.block.node import Node
from blockd.devices.base import Removable, TrayState
from blockd.errors import BlockdError

__all__ = ["Runner", "Tray", "TrayOwner"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]
"""Runs ``fn(*args)`` off the event loop and returns its result (the control executor)."""


class TrayOwner(Protocol):
    """What a tray sees of its device (:class:`~blockd.block.device.Device`)."""

    id: str
    node: Node | None
    tray_open: bool
    locked: bool

    @property
    def has_tray(self) -> bool: ...

    def note_tray(self, tray_open: bool) -> None: ...

    def note_lock(self, locked: bool) -> None: ...

    def note_medium(self, node: Node, size: int) -> None: ...


class Tray:
    """One device's tray: open, close, lock, and keeping up with a host drive."""

    def __init__(self, device: TrayOwner, run: Runner) -> None:
        self._device = device
        self._run = run
        self.busy = asyncio.Lock()
        """Held by every tray operation: one at a time per device."""

    @property
    def drive(self) -> Removable | None:
        """The host drive the device holds, or None for a virtual tray."""
        node = self._device.node
        if node is not None and isinstance(node.driver, Removable):
            return node.driver
        return None

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a drive call off the loop; OSError becomes a BlockdError with the errno."""
        try:
            result: T = await self._run(fn, *args)
        except OSError as err:
            code = err.errno or errno.EIO
            raise BlockdError(f"{err.strerror or os.strerror(code)}", code) from err
        return result

    # The operations below expect the caller to hold ``busy``.

    async def open(self, force: bool) -> bool:
        """Open the tray honouring the lock; False when the lock kept it closed."""
        device = self._device
        drive = self.drive
        if device.locked:
            if not force:
                return False
            if drive is not None:
                await self.call(drive.lock_medium, False)
            device.note_lock(False)
        if device.tray_open or not device.has_tray:
            return True
        if drive is not None:
            await self.call(drive.eject, True)
        device.note_tray(True)
        return True

    async def close(self) -> None:
        """Close the tray (closing ignores the lock); re-read a drive's disc."""
        device = self._device
        if not device.tray_open or not device.has_tray:
            return
        drive = self.drive
        if drive is not None:
            await self.call(drive.eject, False)
            await self.refresh()
        device.note_tray(False)

    async def lock(self, locked: bool) -> None:
        """Lock or unlock the medium (the real lock of a host drive)."""
        drive = self.drive
        if drive is not None:
            await self.call(drive.lock_medium, locked)
        self._device.note_lock(locked)

    async def refresh(self) -> None:
        """Re-read a host drive's medium size (after a close or a disc change)."""
        node = self._device.node
        if node is None or self.drive is None:
            return
        try:
            size = await self.call(node.driver.getlength)
        except BlockdError as err:
            if err.errno != errno.ENOMEDIUM:
                raise
            size = 0
        self._device.note_medium(node, size)

    async def sync(self, *, reassert_lock: bool = False) -> None:
        """Bring the device in line with its host drive (takes ``busy`` itself).

        Reads the drive status (and whether the medium changed) off the loop,
        announces DEVICE_TRAY_MOVED when the tray moved behind blockd's back (the
        drive's button, another program's eject, a disc pushed in by hand) and
        re-reads the medium size after a change.  With ``reassert_lock`` the lock
        blockd wants is set again (udev's cdrom rules lock drives on every event).
        """
        drive = self.drive
        if drive is None:
            return
        device = self._device
        async with self.busy:
            if self.drive is not drive:  # the medium changed while we waited
                return
            if reassert_lock:
                try:
                    await self.call(drive.lock_medium, device.locked)
                except BlockdError as err:
                    log.warning("%s: cannot set the medium lock again: %s", device.id, err)
            state = await self.call(drive.tray_state)
            changed = await self.call(drive.media_changed)
            if state is TrayState.NO_INFO:
                return
            tray_open = state is TrayState.TRAY_OPEN
            if changed or tray_open != device.tray_open:
                await self.refresh()
            if tray_open != device.tray_open:
                device.note_tray(tray_open)
