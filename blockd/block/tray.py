"""Removable media: trays, medium locks and medium changes on ``cd`` devices.

Two kinds of ``cd`` device behave differently, as the QMP rules in
docs/qmp.md describe:

* A device whose medium is a file (an ISO, any node) has a **virtual tray**,
  exactly like QEMU's emulated drives: opening the tray makes the medium
  unreachable, ``eject`` also removes it, and a medium can be inserted while
  the tray is open.
* A device holding a **host drive** (a node whose driver is
  :class:`~blockd.devices.base.Removable`, such as ``host_cdrom``) moves the
  real tray and the real medium lock.  The node stays attached through eject
  and close: it is the drive, and whether a disc is in it comes from the
  hardware.  ``blockdev-remove-medium`` detaches the drive node itself.

Drive calls may sleep (the drive spins up, the tray motor runs), so they run
in the registry's executor, and one tray operation at a time runs per device.
Every real tray movement publishes DEVICE_TRAY_MOVED.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import weakref
from collections.abc import Callable
from typing import Literal, TypeVar

from blockd.block.device import Device
from blockd.block.node import Node
from blockd.block.registry import Registry
from blockd.devices import DRIVERS
from blockd.devices.base import NodeOptions, Removable, TrayState
from blockd.errors import BlockdError, InUse, InvalidArgument, NotFound
from blockd.events import DeviceTrayMoved

__all__ = [
    "ReadOnlyMode",
    "adopt",
    "change_medium",
    "close_tray",
    "drive_of",
    "eject",
    "insert_medium",
    "lock_medium",
    "open_tray",
    "remove_medium",
    "sync_drive",
]

log = logging.getLogger(__name__)

ReadOnlyMode = Literal["retain", "read-only", "read-write"]
T = TypeVar("T")

_busy: weakref.WeakKeyDictionary[Device, asyncio.Lock] = weakref.WeakKeyDictionary()
_generated = 0


def _tray_lock(device: Device) -> asyncio.Lock:
    """The lock that keeps tray operations on one device from overlapping."""
    lock = _busy.get(device)
    if lock is None:
        lock = _busy[device] = asyncio.Lock()
    return lock


def drive_of(device: Device) -> Removable | None:
    """The host drive a device holds, or None for a virtual tray."""
    node = device.node
    if node is not None and isinstance(node.driver, Removable):
        return node.driver
    return None


async def _call(registry: Registry, fn: Callable[..., T], *args: object) -> T:
    """Run a drive call in the executor; OSError becomes a BlockdError with the errno."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(registry.executor, fn, *args)
    except OSError as err:
        code = err.errno or errno.EIO
        raise BlockdError(f"{err.strerror or os.strerror(code)}", code) from err


def _check_removable(device: Device, name: str) -> None:
    if not device.removable:
        raise InvalidArgument(f"Device '{name}' is not removable")


def _locked_error(name: str) -> BlockdError:
    return BlockdError(
        f"Device '{name}' is locked and force was not specified, "
        "wait for tray to open and try again",
        errno.EBUSY,
    )


def _moved(registry: Registry, device: Device, tray_open: bool) -> None:
    """Record a tray movement and announce it."""
    device.tray_open = tray_open
    registry.bus.publish(DeviceTrayMoved(device=device.id, id=device.id, tray_open=tray_open))


async def _open_tray(registry: Registry, device: Device, force: bool) -> bool:
    """Open the tray honouring the lock; False when the lock kept it closed."""
    drive = drive_of(device)
    if device.locked:
        if not force:
            return False
        if drive is not None:
            await _call(registry, drive.lock_medium, False)
        device.locked = False
    if device.tray_open or not device.has_tray:
        return True
    if drive is not None:
        await _call(registry, drive.eject, True)
    _moved(registry, device, True)
    return True


async def _close_tray(registry: Registry, device: Device) -> None:
    if not device.tray_open or not device.has_tray:
        return
    drive = drive_of(device)
    if drive is not None:
        await _call(registry, drive.eject, False)
        await _refresh(registry, device)
    _moved(registry, device, False)


async def _refresh(registry: Registry, device: Device) -> None:
    """Re-read a host drive's medium size (after a close or a disc change)."""
    node = device.node
    if node is None or drive_of(device) is None:
        return
    try:
        node.size = await _call(registry, node.driver.getlength)
    except BlockdError as err:
        if err.errno != errno.ENOMEDIUM:
            raise
        node.size = 0
    node.note_medium()


async def _detach(registry: Registry, device: Device) -> None:
    """Take the medium out; a node blockd opened for the medium is closed with it."""
    node = device.node
    if node is None:
        return
    device.node = None
    node.user = None
    if not node.monitor_owned and registry.nodes.get(node.name) is node:
        await registry.del_node(node.name, implicit=True)


# -- QMP operations -----------------------------------------------------------------


async def eject(registry: Registry, device: Device, name: str, force: bool) -> None:
    """QMP ``eject``: open the tray (honouring the lock), then remove a virtual medium."""
    _check_removable(device, name)
    async with _tray_lock(device):
        if not await _open_tray(registry, device, force):
            raise _locked_error(name)
        if drive_of(device) is None:
            await _detach(registry, device)


async def open_tray(registry: Registry, device: Device, name: str, force: bool) -> None:
    """QMP ``blockdev-open-tray``: a locked tray without force stays shut, silently (QEMU)."""
    _check_removable(device, name)
    async with _tray_lock(device):
        await _open_tray(registry, device, force)


async def close_tray(registry: Registry, device: Device, name: str) -> None:
    """QMP ``blockdev-close-tray`` (closing ignores the lock)."""
    _check_removable(device, name)
    async with _tray_lock(device):
        await _close_tray(registry, device)


async def remove_medium(registry: Registry, device: Device, name: str) -> None:
    """QMP ``blockdev-remove-medium``: needs an open tray; a host drive node is detached."""
    _check_removable(device, name)
    async with _tray_lock(device):
        if device.has_tray and not device.tray_open:
            raise BlockdError(f"Tray of device '{name}' is not open")
        await _detach(registry, device)


async def insert_medium(registry: Registry, device: Device, node_name: str) -> None:
    """QMP ``blockdev-insert-medium``: put a free node into an open, empty tray."""
    node = registry.nodes.get(node_name)
    if node is None:
        raise NotFound(f"Node '{node_name}' not found")
    if node.user is not None:
        raise InUse(f"Node '{node_name}' is already in use")
    if not device.removable:
        raise InvalidArgument("Device is not removable")
    async with _tray_lock(device):
        if device.has_tray and not device.tray_open:
            raise BlockdError("Tray of the device is not open")
        if device.node is not None:
            raise BlockdError("There already is a medium in the device")
        if node.user is not None:  # taken while we waited for the tray
            raise InUse(f"Node '{node_name}' is already in use")
        _insert(device, node)
    await adopt(registry, device)


def _insert(device: Device, node: Node) -> None:
    node.user = device.id
    device.node = node


async def change_medium(
    registry: Registry,
    device: Device,
    name: str,
    filename: str,
    fmt: str | None,
    read_only_mode: ReadOnlyMode,
    force: bool,
) -> None:
    """QMP ``blockdev-change-medium``: open the new image first, then swap it in."""
    _check_removable(device, name)
    if read_only_mode == "retain":
        read_only = device.node.read_only if device.node is not None else True
    else:
        read_only = read_only_mode == "read-only"
    if fmt is not None and fmt != "raw" and fmt not in DRIVERS:
        raise InvalidArgument(f"Unknown driver: '{fmt}'")
    loop = asyncio.get_running_loop()  # probing stats the file: not on the loop
    driver = await loop.run_in_executor(registry.executor, _driver_for, filename, fmt)
    node = await registry.add_node(
        NodeOptions(driver=driver, node_name=_generated_name(),
                    filename=filename, read_only=read_only),
        monitor_owned=False, generated=True,
    )
    try:
        async with _tray_lock(device):
            if not await _open_tray(registry, device, force):
                raise _locked_error(name)
            await _detach(registry, device)
            _insert(device, node)
            await _close_tray(registry, device)
    except BaseException:
        if node.user is None:
            await registry.del_node(node.name, implicit=True)
        raise


async def lock_medium(registry: Registry, device: Device, name: str, locked: bool) -> None:
    """``blockd-lock-medium``: lock or unlock the tray (the real one on a host drive)."""
    _check_removable(device, name)
    async with _tray_lock(device):
        drive = drive_of(device)
        if drive is not None:
            await _call(registry, drive.lock_medium, locked)
        device.locked = locked


# -- following the hardware ---------------------------------------------------------


async def adopt(registry: Registry, device: Device) -> None:
    """A host drive became ``device``'s medium: from now on blockd's lock is the drive's.

    udev's cdrom rules lock every drive after each media change (and at boot), so
    a drive usually arrives locked by nobody blockd knows of.  Its lock is set to
    blockd's state (unlocked for a new device) and its status read.
    """
    if drive_of(device) is None:
        return
    try:
        await sync_drive(registry, device, reassert_lock=True)
    except BlockdError as err:
        log.warning("%s: cannot read the drive status: %s", device.id, err)



async def sync_drive(registry: Registry, device: Device, *, reassert_lock: bool = False) -> None:
    """Bring a host drive's device in line with the hardware.

    Reads the drive status (and whether the medium changed) off the loop,
    publishes DEVICE_TRAY_MOVED when the tray moved behind blockd's back (the
    drive's button, another program's eject, a disc pushed in by hand) and
    re-reads the medium size after a change.  With ``reassert_lock`` the lock
    blockd wants is set again (udev's cdrom rules lock drives on every event).
    """
    drive = drive_of(device)
    if drive is None:
        return
    async with _tray_lock(device):
        if drive_of(device) is not drive:  # the medium changed while we waited
            return
        if reassert_lock:
            try:
                await _call(registry, drive.lock_medium, device.locked)
            except BlockdError as err:
                log.warning("%s: cannot set the medium lock again: %s", device.id, err)
        state = await _call(registry, drive.tray_state)
        changed = await _call(registry, drive.media_changed)
        if state is TrayState.NO_INFO:
            return
        tray_open = state is TrayState.TRAY_OPEN
        if changed or tray_open != device.tray_open:
            await _refresh(registry, device)
        if tray_open != device.tray_open:
            _moved(registry, device, tray_open)


# -- helpers ------------------------------------------------------------------------


def _generated_name() -> str:
    """A node-name no user can choose (QEMU's implicit nodes are ``#blockNNN``)."""
    global _generated
    _generated += 1
    return f"#block{_generated:03d}"


def _driver_for(filename: str, fmt: str | None) -> str:
    """The driver for a new medium: a driver name, or the best probe for ``raw``/none.

    blockd has no format layer, so ``raw`` means the protocol driver itself.
    """
    if fmt is not None and fmt != "raw":
        return fmt
    best, score = "file", 0
    for driver_name, driver_class in DRIVERS.items():
        probe = driver_class.probe_device(filename)
        if probe > score:
            best, score = driver_name, probe
    return best
