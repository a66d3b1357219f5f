"""The stream of device events: pyudev's netlink monitor, read on the event loop.

With udevd running, events come from udev (source ``udev``): after its rules
ran, with the properties they added (ID_SERIAL, ID_CDROM, ...).  Without
udevd, nothing would ever arrive on that source, so blockd says so and listens
to the kernel's own uevents instead (source ``kernel``: the same actions, only
the kernel's properties), reading the rest from sysfs.  Whether udevd runs is
asked of its control socket (``/run/udev/control``): a stale socket file
refuses the connection.

The monitor's descriptor is watched with ``add_reader`` and drained without
blocking, at most :data:`BATCH` events per wake-up so that a storm of events
never holds the loop.  When the kernel drops events because the socket's
receive buffer overflowed (ENOBUFS), :attr:`UdevSource.lost` counts it and the
``on_lost`` callback asks for a full rescan.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["BATCH", "SUBSYSTEMS", "UDEV_CONTROL", "UdevSource", "udevd_running"]

log = logging.getLogger(__name__)

SUBSYSTEMS = ("block", "scsi_generic")
UDEV_CONTROL = "/run/udev/control"
BATCH = 64  # events handled per wake-up of the loop


def udevd_running(control: str = UDEV_CONTROL) -> bool:
    """Whether a udevd answers on its control socket (connect only; nothing is sent)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.setblocking(False)
        sock.connect(control)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _pending_error(fd: int) -> int:
    """The socket's pending error (SO_ERROR), cleared by reading it; 0 for none."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    finally:
        sock.close()


class UdevSource:
    """Device events of some subsystems, handed to ``on_event`` on the loop thread."""

    def __init__(
        self,
        on_event: Callable[[Any], None],
        on_lost: Callable[[], None],
        *,
        subsystems: Iterable[str] = SUBSYSTEMS,
        control: str = UDEV_CONTROL,
        receive_buffer: int | None = None,
    ) -> None:
        self._on_event = on_event
        self._on_lost = on_lost
        self.subsystems = tuple(subsystems)
        self.control = control
        self.receive_buffer = receive_buffer
        self.source = "off"  # "udev", "kernel" or "off"
        self.udevd = False
        self.seen = 0
        self.lost = 0
        self.error: str | None = None
        self._monitor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def context(self) -> Any:
        """The pyudev Context the monitor uses (for enumerating devices)."""
        return None if self._monitor is None else self._monitor.context

    def start(self) -> None:
        """Open the monitor on the running loop; the source follows udevd's presence."""
        self._loop = asyncio.get_running_loop()
        self.udevd = udevd_running(self.control)
        source = "udev" if self.udevd else "kernel"
        if not self.udevd:
            log.warning("hotplug: no udevd answers on %s; following the kernel's uevents "
                        "and sysfs instead (no udev properties such as ID_SERIAL)",
                        self.control)
        try:
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
            for subsystem in self.subsystems:
                monitor.filter_by(subsystem)
            if self.receive_buffer is not None:
                monitor.set_receive_buffer_size(self.receive_buffer)
            monitor.start()
        except (ImportError, OSError) as exc:
            self.error = str(exc)
            log.error("hotplug: cannot listen to device events: %s", exc)
            return
        self._monitor = monitor
        self.source = source
        self._loop.add_reader(monitor.fileno(), self._readable)

    def close(self) -> None:
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
        self._monitor = None
        self.source = "off"

    def restart(self) -> None:
        """Open the monitor again (udevd may have started or stopped since)."""
        self.close()
        self.start()

    def _readable(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        for _ in range(BATCH):
            try:
                device = monitor.poll(timeout=0)
            except OSError as exc:
                # pyudev reports a pending socket error as "Error while polling fd"
                # without an errno; the socket says which (and reading it clears it).
                err = exc.errno or _pending_error(monitor.fileno())
                if err == errno.ENOBUFS:
                    self.lost += 1
                    log.warning("hotplug: the kernel dropped device events (receive buffer "
                                "full); rescanning")
                    self._on_lost()
                    continue
                if err == 0:
                    continue
                log.warning("hotplug: reading device events failed: %s", exc)
                return
            if device is None:
                return
            self.seen += 1
            try:
                self._on_event(device)
            except Exception:
                log.exception("hotplug: handling %s failed", getattr(device, "sys_path", "?"))
