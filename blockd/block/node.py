"""Nodes: opened backings with a name (QEMU's BlockDriverState).

A :class:`Node` wraps one driver object together with the options it was
opened with, the size learnt at open time and the node-level statistics QEMU
keeps per BlockDriverState (only ``wr_highest_offset`` carries data there).
Nodes are created by ``blockdev-add``, the command line or (later) hotplug
rules, and are attached to at most one user at a time: a device's medium or an
export.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from blockd.devices.base import (
    AllocationReporter,
    BlockDriver,
    Buffer,
    DriverInfo,
    NodeOptions,
    NowaitReader,
    PermissionLocks,
    Removable,
    SpliceReader,
    UringTarget,
    ZeroReader,
)
from blockd.errors import InvalidArgument

__all__ = ["Node", "check_node_name"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
NODE_NAME_MAX = 31
# Drivers for which QEMU reports a (always false) dirty flag in ImageInfo.
_DIRTY_FLAG_DRIVERS = frozenset({"file", "host_device"})
# Drivers that report discard counters as driver-specific stats.
_DISCARD_STATS_DRIVERS = frozenset({"file", "host_device"})


def check_node_name(name: str) -> None:
    """Enforce QEMU's node-name rules; raise InvalidArgument with QEMU's text."""
    if not _NAME.match(name):
        raise InvalidArgument(f"Invalid node-name: '{name}'")
    if len(name) > NODE_NAME_MAX:
        raise InvalidArgument("Node name too long")


@dataclass(eq=False)
class Node:
    """One opened backing with a node-name.

    ``user`` names whoever holds the node (a device id, an export id), or is
    ``None`` while the node is free.  ``size`` and ``info`` are read in the
    executor at open time and on media change, so queries never touch the device.
    """

    name: str
    driver: BlockDriver
    options: NodeOptions
    size: int
    info: DriverInfo
    monitor_owned: bool = True
    user: str | None = None
    wr_highest_offset: int = 0
    discard_nb_ok: int = 0
    discard_nb_failed: int = 0
    discard_bytes_ok: int = 0
    in_flight: int = 0  # requests running in the driver now (it must not close under them)
    # Who waits for in_flight to reach zero (wait_idle); the device wakes them.
    idle_waiters: list[asyncio.Future[None]] = field(default_factory=list, repr=False)
    # One blockd-scsi-command at a time per node (each holds a control thread).
    passthrough_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # The driver's non-blocking read, if it has one (called on the loop thread).
    nowait_read: Callable[[int, Sequence[memoryview]], int] | None = field(init=False)
    # What the device may call on the loop thread (memory-backed drivers; page-cache reads).
    read_now: Callable[[int, Sequence[memoryview]], int] | None = field(init=False)
    # Where the device reads on the loop thread with one os.preadv of its own
    # (NowaitReader.loop_read_plan): the descriptor, or -1 (then read_now), and the
    # flags.  The device sets -1 for good if the kernel refuses the flags.
    read_fd: int = field(init=False)
    read_flags: int = field(init=False)
    write_now: Callable[..., int] | None = field(init=False)
    # The driver's zero-copy read into a pipe, if it has one (see blockd.aio.pipes).
    splice_read: Callable[[int, int, int], int] | None = field(init=False)
    # Where io_uring may run that splice instead (the backing may wait, and the
    # driver's splice_read is a plain splice(2) from it), or -1.  Read-only nodes
    # have one too: a splice only reads.
    splice_fd: int = field(init=False)
    # io_uring's plan for a write or a flush, if the driver has a descriptor for it.
    uring_write: Callable[[Sequence[Buffer], bool], tuple[int, Sequence[Buffer], int] | None] \
        | None = field(init=False)
    uring_flush: Callable[[], int | None] | None = field(init=False)
    # Where a plain write may go through io_uring without asking the driver: its
    # descriptor, or -1 (no ring target, memory-backed, read-only, O_DIRECT rules).
    # A node is closed only once no device holds it (Registry.del_node), so the
    # number cannot be stale while a device writes through it.
    ring_fd: int = field(init=False)
    # The same descriptor where plain writes may go on the loop thread instead (a
    # memory-backed node's: one os.pwritev never waits), or -1.
    write_fd: int = field(init=False)
    # The driver's allocation map (NBD block status), if it has one.
    block_status: Callable[[int, int], list[tuple[int, int]]] | None = field(init=False)
    # The driver's image locks (QEMU's lock bytes), if it takes them.
    set_permissions: Callable[[int, int], None] | None = field(init=False)
    # Every read is zeroes that need no I/O (null-co with read-zeroes): NBD may send holes.
    reads_zeroes: bool = field(init=False)
    # False while a host drive holds no disc (learnt at open and on media change,
    # so the data path can refuse with ENOMEDIUM without asking the drive).
    has_medium: bool = field(init=False)

    def __post_init__(self) -> None:
        driver = self.driver
        self.nowait_read = driver.preadv_nowait if isinstance(driver, NowaitReader) else None
        splicer = driver if isinstance(driver, SpliceReader) and driver.can_splice else None
        self.splice_read = splicer.splice_read if splicer is not None else None
        self.splice_fd = (
            splicer.splice_plain_fd()
            if splicer is not None and not driver.memory_backed else -1)
        self.reads_zeroes = isinstance(driver, ZeroReader) and driver.reads_zeroes
        self.set_permissions = (
            driver.set_permissions if isinstance(driver, PermissionLocks) else None)
        self.uring_write = driver.uring_write if isinstance(driver, UringTarget) else None
        self.uring_flush = driver.uring_flush if isinstance(driver, UringTarget) else None
        plain_fd = (
            driver.uring_plain_fd()
            if isinstance(driver, UringTarget) and not self.read_only else -1)
        self.ring_fd = -1 if driver.memory_backed else plain_fd
        self.write_fd = plain_fd if driver.memory_backed else -1
        self.block_status = (
            driver.block_status if isinstance(driver, AllocationReporter) else None)
        self.read_now = driver.preadv if driver.memory_backed else self.nowait_read
        self.read_fd, self.read_flags = (
            driver.loop_read_plan() if isinstance(driver, NowaitReader) else (-1, 0))
        self.write_now = driver.pwritev if driver.memory_backed else None
        self.note_medium()

    def note_medium(self) -> None:
        """Take the driver's cached word on whether a disc is in (drives only)."""
        driver = self.driver
        self.has_medium = driver.medium_present if isinstance(driver, Removable) else True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request runs in the driver (so it can close); False on timeout."""
        if not self.in_flight:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        finally:
            if waiter in self.idle_waiters:
                self.idle_waiters.remove(waiter)
        return True

    def wake_idle(self) -> None:
        """Wake whoever waits in :meth:`wait_idle` (the device calls it at zero in flight)."""
        waiters, self.idle_waiters = self.idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def read_only(self) -> bool:
        return self.driver.read_only or self.info.read_only_medium

    @property
    def drv(self) -> str:
        return self.driver.format_name

    def note_write(self, offset: int, length: int) -> None:
        """Record a successful write for ``wr_highest_offset``."""
        end = offset + length
        if end > self.wr_highest_offset:
            self.wr_highest_offset = end

    def note_discard(self, length: int, ok: bool) -> None:
        """Count a discard for the driver-specific stats of file and host_device."""
        if ok:
            self.discard_nb_ok += 1
            self.discard_bytes_ok += length
        else:
            self.discard_nb_failed += 1

    def driver_specific_stats(self) -> dict[str, object] | None:
        """QEMU's BlockStatsSpecific, or ``None`` for drivers that have none."""
        if self.drv not in _DISCARD_STATS_DRIVERS:
            return None
        return {
            "driver": self.drv,
            "discard-nb-ok": self.discard_nb_ok,
            "discard-nb-failed": self.discard_nb_failed,
            "discard-bytes-ok": self.discard_bytes_ok,
        }

    def filename(self) -> str:
        """The node's filename; a ``json:{...}`` pseudo-filename for drivers without one."""
        if self.info.filename:
            return self.info.filename
        return "json:" + json.dumps({"driver": self.drv})

    def image_info(self) -> dict[str, object]:
        """QEMU's ImageInfo for this node."""
        info: dict[str, object] = {
            "virtual-size": self.size,
            "filename": self.filename(),
            "format": self.drv,
            "actual-size": self.info.actual_size,
        }
        if self.drv in _DIRTY_FLAG_DRIVERS:
            info["dirty-flag"] = False
        return info

    def device_info(self, writeback: bool = True) -> dict[str, object]:
        """QEMU's BlockDeviceInfo (query-named-block-nodes, query-block ``inserted``).

        A SCSI unit's identification is added as ``blockd-scsi`` (a blockd extension).
        """
        info: dict[str, object] = {
            "file": self.filename(),
            "node-name": self.name,
            "ro": self.read_only,
            "drv": self.drv,
            "backing_file_depth": 0,
            "encrypted": False,
            "detect_zeroes": self.options.detect_zeroes,
            "bps": 0,
            "bps_rd": 0,
            "bps_wr": 0,
            "iops": 0,
            "iops_rd": 0,
            "iops_wr": 0,
            "image": self.image_info(),
            "cache": {
                "writeback": writeback,
                "direct": self.options.cache_direct,
                "no-flush": self.options.cache_no_flush,
            },
            "write_threshold": 0,
        }
        if self.info.scsi is not None:
            info["blockd-scsi"] = self.info.scsi.to_qmp()
        return info
