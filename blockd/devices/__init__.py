"""Block drivers: the code that talks to a node's backing (files, host devices, CD drives,
SCSI generic units, null).

:data:`DRIVERS` maps QEMU's driver names to driver classes and
:func:`open_driver` opens a node with the right one; ``host_device`` on a SCSI
generic node (``/dev/sgN``) opens the sg driver under that name, as QEMU
treats such a path as SCSI generic.  Nothing in this package
imports asyncio, the QMP layer or the NBD layer; every call may block.

Raises InvalidArgument (``Parameter 'driver' does not accept value 'X'``) for
an unknown driver, and whatever the driver's ``open`` raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from blockd.devices.base import BlockDriver, DriverClass, NodeOptions
from blockd.devices.file import FileDriver
from blockd.devices.host_cdrom import HostCdromDriver
from blockd.devices.host_device import HostDeviceDriver
from blockd.devices.null import NullDriver
from blockd.devices.sg import HostDeviceSgDriver, SgDriver, is_scsi_generic
from blockd.errors import InvalidArgument

__all__ = [
    "DRIVERS",
    "FileDriver",
    "HostCdromDriver",
    "HostDeviceDriver",
    "NullDriver",
    "SgDriver",
    "open_driver",
]

DRIVERS: Mapping[str, DriverClass] = MappingProxyType(
    {
        FileDriver.format_name: FileDriver,
        # Before host_device: on a probe tie (/dev/sr0 scores 100 for both) the
        # first driver wins, as host_cdrom does in QEMU.
        HostCdromDriver.format_name: HostCdromDriver,
        HostDeviceDriver.format_name: HostDeviceDriver,
        NullDriver.format_name: NullDriver,
        SgDriver.format_name: SgDriver,
    }
)


def open_driver(options: NodeOptions) -> BlockDriver:
    """Open ``options.driver`` on the backing the options name."""
    try:
        driver_class = DRIVERS[options.driver]
    except KeyError:
        raise InvalidArgument(
            f"Parameter 'driver' does not accept value '{options.driver}'"
        ) from None
    if driver_class is HostDeviceDriver and is_scsi_generic(options.filename or ""):
        return HostDeviceSgDriver.open(options)
    return driver_class.open(options)
