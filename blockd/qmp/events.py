"""Internal events as QMP event messages (names and members as QEMU's schema)."""

from __future__ import annotations

from blockd.events import (
    BlockdDeviceAdded,
    BlockExportDeleted,
    BlockIoError,
    DeviceDeleted,
    DeviceTrayMoved,
    Event,
    Resume,
    Stop,
)

__all__ = ["to_qmp"]


def to_qmp(event: Event) -> tuple[str, dict[str, object] | None]:
    """The QMP event name and ``data`` member (``None``: no data member)."""
    match event:
        case DeviceTrayMoved():
            return "DEVICE_TRAY_MOVED", {
                "device": event.device, "id": event.id, "tray-open": event.tray_open,
            }
        case DeviceDeleted():
            return "DEVICE_DELETED", {"device": event.device, "path": event.path}
        case BlockIoError():
            data: dict[str, object] = {
                "device": event.device,
                "operation": event.operation,
                "action": event.action,
                "reason": event.reason,
            }
            if event.node_name is not None:
                data["node-name"] = event.node_name
            if event.nospace is not None:
                data["nospace"] = event.nospace
            return "BLOCK_IO_ERROR", data
        case BlockExportDeleted():
            return "BLOCK_EXPORT_DELETED", {"id": event.id}
        case BlockdDeviceAdded():
            return "BLOCKD_DEVICE_ADDED", {
                "id": event.id, "node-name": event.node_name, "devname": event.devname,
                "driver": event.driver, "properties": dict(event.properties),
            }
        case Stop():
            return "STOP", None
        case Resume():
            return "RESUME", None
    raise TypeError(f"no QMP form for {event!r}")
