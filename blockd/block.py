"""Devices: the named front ends that carry a medium (QEMU's BlockBackend + device).

A :class:`Device` is what users name in commands, events and metrics.  It holds
at most one :class:`~blockd.node.Node` as its medium and carries the state that
belongs to the front end rather than the backing: the tray and the medium lock
(``cd`` devices), the I/O status, the error policy (``rerror``/``werror``) and
the I/O accounting.

Every data request goes through a device.  The device checks it (medium
present, tray closed, in range, writable), accounts it, runs the driver call in
the executor so the event loop never blocks on disk, and applies the error
policy to failures.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Literal, TypeVar

from .errors import InvalidArgument, NoMedium, ReadOnly
from .events import BlockIoError, EventBus
from .node import Node
from .stats import BlockAcctStats, IoKind

__all__ = ["ERROR_ACTIONS", "Device", "DeviceKind", "ErrorAction"]

DeviceKind = Literal["cd", "hd"]
ErrorAction = Literal["report", "ignore", "stop", "enospc", "auto"]
ERROR_ACTIONS = ("auto", "report", "ignore", "enospc", "stop")

T = TypeVar("T")


class Device:
    """A named device: medium, tray, lock, I/O status, error policy and statistics."""

    def __init__(
        self,
        id: str,
        kind: DeviceKind,
        node: Node | None,
        *,
        executor: Executor | None,
        bus: EventBus,
        rerror: ErrorAction = "auto",
        werror: ErrorAction = "auto",
        stats: BlockAcctStats | None = None,
    ) -> None:
        self.id = id
        self.kind: DeviceKind = kind
        self.node = node
        self.rerror: ErrorAction = "report" if rerror == "auto" else rerror
        self.werror: ErrorAction = "enospc" if werror == "auto" else werror
        self.tray_open = False
        self.locked = False
        self.iostatus: Literal["ok", "failed", "nospace"] = "ok"
        self.stats = stats if stats is not None else BlockAcctStats()
        self._executor = executor
        self._bus = bus

    # -- identity -----------------------------------------------------------

    @property
    def removable(self) -> bool:
        return self.kind == "cd"

    @property
    def has_tray(self) -> bool:
        return self.kind == "cd"

    @property
    def qom_path(self) -> str:
        return f"/machine/peripheral/{self.id}"

    @property
    def iostatus_enabled(self) -> bool:
        """QEMU shows io-status only when the policy can stop the device."""
        return self.werror in ("stop", "enospc") or self.rerror == "stop"

    def is_available(self) -> bool:
        """Whether a medium is present and reachable (tray closed)."""
        return self.node is not None and not self.tray_open

    # -- QMP views ------------------------------------------------------------

    def block_info(self) -> dict[str, object]:
        """QEMU's BlockInfo for query-block."""
        info: dict[str, object] = {
            "device": self.id,
            "qdev": self.id,
            "type": "unknown",
            "removable": self.removable,
            "locked": self.locked,
        }
        if self.has_tray:
            info["tray_open"] = self.tray_open
        if self.iostatus_enabled:
            info["io-status"] = self.iostatus
        if self.node is not None:
            info["inserted"] = self.node.device_info()
        return info

    def block_stats(self) -> dict[str, object]:
        """QEMU's BlockStats for query-blockstats in device mode."""
        entry: dict[str, object] = {"device": self.id, "qdev": self.id}
        highest = 0
        if self.node is not None:
            entry["node-name"] = self.node.name
            highest = self.node.wr_highest_offset
        entry["stats"] = self.stats.to_qmp(wr_highest_offset=highest)
        if self.node is not None:
            specific = self.node.driver_specific_stats()
            if specific is not None:
                entry["driver-specific"] = specific
        return entry

    # -- data path --------------------------------------------------------------

    def _medium(self, kind: IoKind) -> Node:
        node = self.node
        if node is None or self.tray_open:
            cookie = self.stats.start(kind, 0)
            self.stats.failed(cookie)
            raise NoMedium(f"{self.id}: No medium found")
        return node

    def _check_range(self, node: Node, kind: IoKind, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > node.size:
            self.stats.invalid(kind)
            raise InvalidArgument(
                f"{self.id}: request at {offset}+{length} is beyond the end ({node.size})"
            )

    def _check_writable(self, node: Node, kind: IoKind) -> None:
        if node.read_only:
            self.stats.invalid(kind)
            raise ReadOnly(f"{self.id}: device is read-only", errno.EPERM)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _accounted(
        self, kind: IoKind, nbytes: int, fn: Callable[..., T], *args: object
    ) -> T | None:
        """Run one driver call with accounting and the error policy applied."""
        cookie = self.stats.start(kind, nbytes)
        try:
            result = await self._call(fn, *args)
        except OSError as err:
            self.stats.failed(cookie)
            if self._on_error(kind, err) == "ignore":
                return None
            raise
        self.stats.done(cookie)
        return result

    def _on_error(self, kind: IoKind, err: OSError) -> str:
        """Apply rerror/werror to a failed request; publish BLOCK_IO_ERROR.

        ``report`` and ``ignore`` are handled here; pausing the device on
        ``stop``/``enospc`` belongs to the data-path work and reports for now.
        """
        policy = self.rerror if kind is IoKind.READ else self.werror
        code = err.errno or errno.EIO
        action = policy
        if policy == "enospc":
            action = "stop" if code == errno.ENOSPC else "report"
        if action == "stop":
            action = "report"
        self._bus.publish(
            BlockIoError(
                device=self.id,
                node_name=self.node.name if self.node is not None else None,
                operation="read" if kind is IoKind.READ else "write",
                action=action,
                nospace=(code == errno.ENOSPC) if self.iostatus_enabled else None,
                reason=os.strerror(code),
            )
        )
        return action

    async def pread(self, offset: int, length: int) -> bytearray:
        """Read ``length`` bytes at ``offset``."""
        node = self._medium(IoKind.READ)
        self._check_range(node, IoKind.READ, offset, length)
        buf = bytearray(length)
        await self._accounted(IoKind.READ, length, node.driver.preadv, offset, [memoryview(buf)])
        return buf

    async def pwrite(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> None:
        """Write ``data`` at ``offset`` (``fua``: on stable storage before returning)."""
        node = self._medium(IoKind.WRITE)
        length = len(data)
        self._check_range(node, IoKind.WRITE, offset, length)
        self._check_writable(node, IoKind.WRITE)
        view = memoryview(data)
        await self._accounted(IoKind.WRITE, length, node.driver.pwritev, offset, [view], fua)
        node.note_write(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Zero a range (accounted as a write, like QEMU)."""
        node = self._medium(IoKind.WRITE)
        self._check_range(node, IoKind.WRITE, offset, length)
        self._check_writable(node, IoKind.WRITE)
        await self._accounted(
            IoKind.WRITE, length, node.driver.write_zeroes, offset, length, may_unmap
        )
        node.note_write(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        """Discard a range (a hint: drivers may ignore it)."""
        node = self._medium(IoKind.UNMAP)
        self._check_range(node, IoKind.UNMAP, offset, length)
        self._check_writable(node, IoKind.UNMAP)
        try:
            await self._accounted(IoKind.UNMAP, length, node.driver.discard, offset, length)
        except OSError:
            node.note_discard(length, ok=False)
            raise
        node.note_discard(length, ok=True)

    async def flush(self) -> None:
        """Make completed writes durable."""
        node = self._medium(IoKind.FLUSH)
        await self._accounted(IoKind.FLUSH, 0, node.driver.flush)
