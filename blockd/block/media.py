"""Removable media: QEMU's tray and medium commands on ``cd`` devices.

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

Each operation holds the device's tray (:class:`~blockd.block.tray.Tray`, which
applies the rules and moves the hardware) and, where a medium comes or goes, the
registry (which opens and closes nodes).  The device changes its own state.
"""

from __future__ import annotations

import errno
import logging
from typing import Literal

from blockd.block.device import Device
from blockd.block.registry import Registry
from blockd.devices import DRIVERS
from blockd.devices.base import NodeOptions, Removable
from blockd.errors import BlockdError, InUse, InvalidArgument, NotFound

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

_generated = 0


def drive_of(device: Device) -> Removable | None:
    """The host drive a device holds, or None for a virtual tray."""
    return device.tray.drive


def _check_removable(device: Device, name: str) -> None:
    if not device.removable:
        raise InvalidArgument(f"Device '{name}' is not removable")


def _locked_error(name: str) -> BlockdError:
    return BlockdError(
        f"Device '{name}' is locked and force was not specified, "
        "wait for tray to open and try again",
        errno.EBUSY,
    )


async def _detach(registry: Registry, device: Device) -> None:
    """Take the medium out; a node blockd opened for the medium is closed with it."""
    node = device.detach()
    if node is None:
        return
    if not node.monitor_owned and registry.nodes.get(node.name) is node:
        await registry.del_node(node.name, implicit=True)


# -- QMP operations -----------------------------------------------------------------


async def eject(registry: Registry, device: Device, name: str, force: bool) -> None:
    """QMP ``eject``: open the tray (honouring the lock), then remove a virtual medium."""
    _check_removable(device, name)
    tray = device.tray
    async with tray.busy:
        if not await tray.open(force):
            raise _locked_error(name)
        if tray.drive is None:
            await _detach(registry, device)


async def open_tray(registry: Registry, device: Device, name: str, force: bool) -> None:
    """QMP ``blockdev-open-tray``: a locked tray without force stays shut, silently (QEMU)."""
    _check_removable(device, name)
    async with device.tray.busy:
        await device.tray.open(force)


async def close_tray(registry: Registry, device: Device, name: str) -> None:
    """QMP ``blockdev-close-tray`` (closing ignores the lock)."""
    _check_removable(device, name)
    async with device.tray.busy:
        await device.tray.close()


async def remove_medium(registry: Registry, device: Device, name: str) -> None:
    """QMP ``blockdev-remove-medium``: needs an open tray; a host drive node is detached."""
    _check_removable(device, name)
    async with device.tray.busy:
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
    async with device.tray.busy:
        if device.has_tray and not device.tray_open:
            raise BlockdError("Tray of the device is not open")
        if device.node is not None:
            raise BlockdError("There already is a medium in the device")
        if node.user is not None:  # taken while we waited for the tray
            raise InUse(f"Node '{node_name}' is already in use")
        device.attach(node)
    await adopt(registry, device)


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
    # Probing stats the file: not on the loop, and under the open timeout.
    driver = await registry.run_open(filename, _driver_for, filename, fmt)
    node = await registry.add_node(
        NodeOptions(driver=driver, node_name=_generated_name(),
                    filename=filename, read_only=read_only),
        monitor_owned=False, generated=True,
    )
    tray = device.tray
    try:
        async with tray.busy:
            if not await tray.open(force):
                raise _locked_error(name)
            await _detach(registry, device)
            device.attach(node)
            await tray.close()
    except BaseException:
        if node.user is None:
            await registry.del_node(node.name, implicit=True)
        raise


async def lock_medium(registry: Registry, device: Device, name: str, locked: bool) -> None:
    """``blockd-lock-medium``: lock or unlock the tray (the real one on a host drive)."""
    _check_removable(device, name)
    async with device.tray.busy:
        await device.tray.lock(locked)


# -- following the hardware ---------------------------------------------------------


async def adopt(registry: Registry, device: Device) -> None:
    """A host drive became ``device``'s medium: from now on blockd's lock is the drive's.

    udev's cdrom rules lock every drive after each media change (and at boot), so
    a drive usually arrives locked by nobody blockd knows of.  Its lock is set to
    blockd's state (unlocked for a new device) and its status read.
    """
    if device.tray.drive is None:
        return
    try:
        await device.tray.sync(reassert_lock=True)
    except BlockdError as err:
        log.warning("%s: cannot read the drive status: %s", device.id, err)


async def sync_drive(registry: Registry, device: Device, *, reassert_lock: bool = False) -> None:
    """Bring a host drive's device in line with the hardware (see Tray.sync)."""
    await device.tray.sync(reassert_lock=reassert_lock)


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
