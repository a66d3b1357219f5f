"""Typed internal events and the bus that carries them.

Layers below the wire (devices, registry) publish what happened; the QMP
server turns events into QMP event messages and the metrics layer counts them.
Publishing is synchronous and cheap: subscribers must not block (the QMP server
only queues bytes per session).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "BlockExportDeleted",
    "BlockIoError",
    "BlockdDeviceAdded",
    "DeviceDeleted",
    "DeviceTrayMoved",
    "Event",
    "EventBus",
    "Resume",
    "Stop",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceTrayMoved:
    """A device's tray moved (QMP DEVICE_TRAY_MOVED)."""

    device: str
    id: str
    tray_open: bool


@dataclass(frozen=True, slots=True)
class DeviceDeleted:
    """A device was removed (QMP DEVICE_DELETED)."""

    device: str
    path: str


@dataclass(frozen=True, slots=True)
class BlockIoError:
    """An I/O request on a device failed (QMP BLOCK_IO_ERROR)."""

    device: str
    node_name: str | None
    operation: str  # "read" | "write"
    action: str  # "ignore" | "report" | "stop"
    nospace: bool | None
    reason: str


@dataclass(frozen=True, slots=True)
class BlockExportDeleted:
    """An export is gone and its id may be reused (QMP BLOCK_EXPORT_DELETED)."""

    id: str


@dataclass(frozen=True, slots=True)
class BlockdDeviceAdded:
    """Hotplug attached a host device (QMP BLOCKD_DEVICE_ADDED, a blockd extension)."""

    id: str
    node_name: str
    devname: str
    driver: str
    properties: tuple[tuple[str, str], ...]  # a subset of the udev properties


@dataclass(frozen=True, slots=True)
class Stop:
    """Request processing paused (QMP STOP)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Request processing resumed (QMP RESUME)."""


Event = (DeviceTrayMoved | DeviceDeleted | BlockIoError | BlockExportDeleted | BlockdDeviceAdded
         | Stop | Resume)
Subscriber = Callable[[Event], None]


class EventBus:
    """Fan-out of internal events to synchronous subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; returns a function that removes it again."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to every subscriber; one failing subscriber does not stop the rest."""
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber failed on %r", event)
