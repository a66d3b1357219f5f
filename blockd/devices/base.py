"""The BlockDriver interface: what every kind of backing must offer.

This mirrors QEMU's ``BlockDriver`` (``block_int.h``) in Python form.  A driver
class opens one backing and the resulting object is the driver state of a node
(a BlockDriverState).  Every method is synchronous and may block: the device
layer calls them from an executor thread, never from the event loop.  Drivers
know nothing of asyncio, QMP or NBD; they raise :class:`OSError` (with the
errno the kernel gave) or :class:`~blockd.errors.BlockdError`.

Optional capabilities are separate protocols, checked with ``isinstance``:
:class:`Removable` for drives with a tray and a medium lock, and
:class:`Passthrough` for drivers that can send raw SCSI commands.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, runtime_checkable

__all__ = [
    "EXTENT_HOLE",
    "EXTENT_ZERO",
    "PERM_ALL",
    "PERM_CONSISTENT_READ",
    "PERM_RESIZE",
    "PERM_WRITE",
    "PERM_WRITE_UNCHANGED",
    "AllocationReporter",
    "BlockDriver",
    "DriverClass",
    "DriverInfo",
    "NodeOptions",
    "NowaitReader",
    "Passthrough",
    "PermissionLocks",
    "Removable",
    "ScsiIdentity",
    "ScsiResult",
    "SpliceReader",
    "TrayState",
    "ZeroReader",
]

Buffer = memoryview | bytearray | bytes


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """The options a driver is opened with (QEMU's BlockdevOptions, flattened).

    Only the members that apply to a driver are looked at by it; the QMP layer
    has already rejected members a driver does not declare.
    """

    driver: str
    node_name: str
    filename: str | None = None
    read_only: bool = False
    auto_read_only: bool = False
    cache_direct: bool = False
    cache_no_flush: bool = False
    discard: Literal["ignore", "unmap"] = "ignore"
    detect_zeroes: Literal["off", "on", "unmap"] = "off"
    aio: Literal["threads", "native", "io_uring"] = "threads"
    locking: Literal["auto", "on", "off"] = "auto"
    force_share: bool = False
    # null-co
    size: int = 1 << 30
    read_zeroes: bool = False
    latency_ns: int = 0
    # The QMP members the user gave explicitly (QEMU shows only those in
    # pseudo-filenames such as null-co's ``json:{...}``).
    given: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ScsiIdentity:
    """Who a SCSI unit says it is (INQUIRY and its VPD pages), learnt at open time."""

    peripheral_type: int  # 0 disk, 5 CD/DVD, ... (SPC)
    peripheral_type_name: str
    removable: bool
    vendor: str
    product: str
    revision: str
    serial: str = ""  # VPD 0x80
    wwn: str = ""  # the NAA designator of VPD 0x83, as udev's ID_WWN ("0x...")

    def to_qmp(self) -> dict[str, object]:
        """The ``blockd-scsi`` member of BlockDeviceInfo (a blockd extension)."""
        info: dict[str, object] = {
            "peripheral-type": self.peripheral_type,
            "peripheral-type-name": self.peripheral_type_name,
            "removable": self.removable,
            "vendor": self.vendor,
            "product": self.product,
            "revision": self.revision,
        }
        if self.serial:
            info["serial"] = self.serial
        if self.wwn:
            info["wwn"] = self.wwn
        return info


@dataclass(frozen=True, slots=True)
class DriverInfo:
    """What a driver can tell about its backing (for query-named-block-nodes and NBD).

    ``request_alignment`` is the granularity requests must respect (1 for
    buffered I/O, the logical sector size with O_DIRECT); ``buffer_alignment``
    is the memory alignment O_DIRECT needs for caller buffers.
    """

    filename: str
    logical_block_size: int = 512
    physical_block_size: int = 512
    request_alignment: int = 1
    buffer_alignment: int = 1
    max_transfer: int = 32 * 1024 * 1024
    actual_size: int = 0
    can_discard: bool = False
    can_write_zeroes: bool = True
    read_only_medium: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    scsi: ScsiIdentity | None = None  # for drivers that speak SCSI to the unit (sg)


class TrayState(enum.Enum):
    """The state of a drive as CDROM_DRIVE_STATUS reports it."""

    NO_INFO = "no-info"
    NO_DISC = "no-disc"
    TRAY_OPEN = "tray-open"
    NOT_READY = "not-ready"
    DISC_OK = "disc-ok"


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """The outcome of one raw SCSI command: status, sense, data in, and how long it took."""

    status: int
    sense: bytes
    data: bytes
    residual: int = 0
    duration_ns: int = 0


@runtime_checkable
class BlockDriver(Protocol):
    """An opened backing: QEMU's BlockDriverState as seen by its driver.

    Offsets and lengths are in bytes.  ``preadv``/``pwritev`` move data into or
    out of caller buffers and return the byte count; a short count is only
    allowed at the end of the medium.
    """

    format_name: ClassVar[str]
    options: NodeOptions
    read_only: bool  # true also after an auto-read-only fallback
    # True when no method ever waits for a device (tmpfs without swap, null-co):
    # the device layer then calls the driver on the event loop thread.
    memory_backed: bool

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> int: ...

    def pwritev(self, offset: int, buffers: Sequence[Buffer], fua: bool = False) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None: ...

    def getlength(self) -> int: ...

    def get_info(self) -> DriverInfo: ...

    def close(self) -> None: ...


class DriverClass(Protocol):
    """The class side of a driver: how a node gets opened and probed."""

    format_name: str

    @classmethod
    def open(cls, options: NodeOptions) -> BlockDriver:
        """Open the backing; raise BlockdError with QEMU's text on failure."""
        ...

    @classmethod
    def probe_device(cls, filename: str) -> int:
        """Score (0-100) for how well this driver fits ``filename`` (QEMU's bdrv_probe_device)."""
        ...


@runtime_checkable
class NowaitReader(Protocol):
    """A driver that can try a read without blocking (served from a cache)."""

    def preadv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Like preadv, but raise BlockingIOError instead of waiting for a device."""
        ...

    def loop_read_plan(self) -> tuple[int, int]:
        """``(fd, flags)``: one ``os.preadv(fd, [buf], offset, flags)`` of any buffer and
        offset is a read the loop thread may make itself, a short count or
        BlockingIOError meaning "take the driver's way"; ``(-1, 0)`` if there is none.

        Fixed at open, so the node keeps it and the per-read path asks nothing.
        """
        ...


@runtime_checkable
class ZeroReader(Protocol):
    """A driver whose every read returns zeroes at once (null-co with read-zeroes).

    The NBD server may then answer a read with a hole instead of the zeroes.
    """

    reads_zeroes: bool


@runtime_checkable
class SpliceReader(Protocol):
    """A driver that can move data into a pipe without copying it (splice(2))."""

    @property
    def can_splice(self) -> bool:
        """Whether splicing works for this node (not with O_DIRECT)."""
        ...

    def splice_read(self, offset: int, length: int, pipe_fd: int) -> int:
        """Move up to ``length`` bytes at ``offset`` into the pipe; 0 at the end."""
        ...

    def splice_plain_fd(self) -> int:
        """The descriptor :meth:`splice_read` splices from and does nothing more with
        (io_uring may then splice instead), or -1."""
        ...


@runtime_checkable
class UringTarget(Protocol):
    """A driver whose plain writes and flushes io_uring may run (a descriptor underneath)."""

    def uring_write(
        self, buffers: Sequence[Buffer], fua: bool
    ) -> tuple[int, Sequence[Buffer], int] | None:
        """``(fd, buffers, rw_flags)`` for an io_uring write, or None for :meth:`pwritev`."""
        ...

    def uring_flush(self) -> int | None:
        """The fd to fdatasync through io_uring, or None when there is nothing to flush."""
        ...

    def uring_plain_fd(self) -> int:
        """The descriptor of :meth:`uring_write`'s plan for a plain write, or -1 if none."""
        ...


# Extent flags for block status, as NBD's base:allocation context defines them.
EXTENT_HOLE = 1  # not allocated: reads as zeroes and takes no space
EXTENT_ZERO = 2  # reads as zeroes


@runtime_checkable
class AllocationReporter(Protocol):
    """A driver that can tell allocated ranges from holes (SEEK_DATA/SEEK_HOLE)."""

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents ``(length, flags)`` covering at least the start of the range, in order."""
        ...


# QEMU's block permissions (BLK_PERM_*), as the image locks and PermissionLocks use them.
PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_ALL = 0x0F


@runtime_checkable
class PermissionLocks(Protocol):
    """A driver that takes QEMU's image locks (file-posix's lock bytes).

    ``perm`` and ``shared`` are QEMU's permission bits (consistent read 0x1,
    write 0x2, write unchanged 0x4, resize 0x8).  Raises Locked with QEMU's text
    ("Failed to get \"write\" lock") when another user of the image conflicts.
    """

    def set_permissions(self, perm: int, shared: int) -> None: ...


@runtime_checkable
class Removable(Protocol):
    """A drive with removable media: a tray, a medium lock, media-change detection.

    The node stays open while discs come and go.  Its ``getlength()`` reads
    the medium afresh (0 with no disc); the node caches the size, so after
    ``media_changed()`` returns True or the tray closes, the device layer
    calls ``getlength()`` and stores the result in ``Node.size``.
    """

    @property
    def medium_present(self) -> bool:
        """Whether a disc was in at the last size read (cached: no I/O, loop-safe)."""
        ...

    def is_inserted(self) -> bool: ...

    def tray_state(self) -> TrayState: ...

    def media_changed(self) -> bool: ...

    def eject(self, eject_flag: bool) -> None:
        """Open the tray (``True``) or close it (``False``)."""
        ...

    def lock_medium(self, locked: bool) -> None: ...


@runtime_checkable
class Passthrough(Protocol):
    """A driver that can send raw SCSI commands (SG_IO)."""

    def scsi_command(
        self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0, timeout_ms: int = 30000
    ) -> ScsiResult: ...
