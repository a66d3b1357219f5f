"""The ``sg`` driver: a SCSI unit driven only by SCSI commands through SG_IO.

For units the kernel reaches through a SCSI generic node (``/dev/sgN``) and
that no block driver serves: disks behind HBAs, optical drives without the sr
driver, anything an operator would otherwise drive with sg3_utils.  A block
node that accepts SG_IO (``/dev/sda``) works too.  ``host_device`` on a
``/dev/sg*`` path opens the same driver (:class:`HostDeviceSgDriver`), as QEMU
treats such a path as SCSI generic.

On open the driver clears pending unit attentions with TEST UNIT READY, then
learns who the unit is (standard INQUIRY; VPD 0x80 serial, 0x83 WWN, 0xB0
block limits), its size (READ CAPACITY(16), falling back to (10)) and whether
the medium is write-protected (MODE SENSE(10)).

Data moves with READ/WRITE(10) or (16), as the LBA and the length need, split
at the smallest of the unit's maximum transfer length, the kernel's (BLKSECTGET)
and 1 MiB; requests that are not whole logical blocks are bounced and written
by read-modify-write like the O_DIRECT path (:mod:`blockd.devices._aligned_io`).
FUA sets the FUA bit; flush is SYNCHRONIZE CACHE(10) (a unit that does not know
it has no cache to flush).  Errors: CHECK CONDITION becomes
:class:`~blockd.devices.scsi.ScsiCommandError`, an OSError whose errno comes
from the sense data (ENOMEDIUM for "medium not present", EROFS for a
write-protected unit, EIO for medium and hardware errors) and whose text is
the decoded sense; RECOVERED ERROR is success; UNIT ATTENTION (medium changed,
reset) is noted and the command sent once more.

Removable units (peripheral type 5, or the RMB bit) get
:class:`RemovableSgDriver`: tray and lock through START STOP UNIT and PREVENT
ALLOW MEDIUM REMOVAL, media detection through GET EVENT STATUS NOTIFICATION and
TEST UNIT READY.  Every method blocks; the device layer calls them off the loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Sequence
from typing import ClassVar

from blockd.devices import scsi
from blockd.devices._aligned_io import AlignedIO, Alignment
from blockd.devices._ioctl import BLKSECTGET, SG_GET_VERSION_NUM, ioctl_int
from blockd.devices.base import (
    Buffer,
    DriverInfo,
    NodeOptions,
    ScsiIdentity,
    ScsiResult,
    TrayState,
)
from blockd.devices.posix import open_error
from blockd.errors import BlockdError, InvalidArgument, ReadOnly

__all__ = [
    "HostDeviceRemovableSgDriver",
    "HostDeviceSgDriver",
    "RemovableSgDriver",
    "SgDriver",
    "SgKernel",
    "is_scsi_generic",
]

SCSI_GENERIC_MAJOR = 21
_MIN_SG_VERSION = 30000  # the sg_io_hdr (v3) interface
MAX_TRANSFER = 1 << 20  # never more per command, whatever the unit allows
IO_TIMEOUT_MS = 60_000  # READ, WRITE, SYNCHRONIZE CACHE
QUERY_TIMEOUT_MS = 10_000  # INQUIRY, READ CAPACITY, TEST UNIT READY, ...
MOTION_TIMEOUT_MS = 30_000  # START STOP UNIT: a tray or a spindle moves
_READY_TRIES = 5  # TEST UNIT READYs at open to clear a queue of unit attentions


def is_scsi_generic(filename: str) -> bool:
    """Whether ``filename`` is a SCSI generic character node (major 21)."""
    try:
        st = os.stat(filename)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == SCSI_GENERIC_MAJOR


class SgKernel:
    """The system calls the driver makes; unit tests replace it with a model of a unit."""

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def version(self, fd: int) -> int:
        """SG_GET_VERSION_NUM: raises OSError (ENOTTY) on a descriptor that is not SCSI."""
        return ioctl_int(fd, SG_GET_VERSION_NUM)

    def max_transfer(self, fd: int) -> int:
        """The kernel's limit per command in bytes (0 if it gives none).

        BLKSECTGET answers in bytes on a SCSI generic node but in 512-byte
        sectors on a block node.
        """
        try:
            value = ioctl_int(fd, BLKSECTGET)
        except OSError:
            return 0
        return value if not stat.S_ISBLK(os.fstat(fd).st_mode) else value * 512

    def sg_io(
        self,
        fd: int,
        cdb: bytes,
        data_out: Buffer = b"",
        data_in_len: int = 0,
        timeout_ms: int = QUERY_TIMEOUT_MS,
        data_in: memoryview | None = None,
    ) -> scsi.SgIoResult:
        return scsi.sg_io(fd, cdb, data_out, data_in_len, timeout_ms, data_in=data_in)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class SgDriver:
    """A node whose backing is a SCSI unit spoken to with SCSI commands."""

    format_name: ClassVar[str] = "sg"
    memory_backed = False

    def __init__(
        self,
        options: NodeOptions,
        fd: int,
        kernel: SgKernel,
        *,
        read_only: bool,
        identity: ScsiIdentity,
        max_transfer: int,
    ) -> None:
        self.options = options
        self.filename = options.filename or ""
        self.read_only = read_only
        self.identity = identity
        self._fd = fd
        self._kernel = kernel
        self._max_transfer = max_transfer
        self.block_length = 512
        self.blocks = 0
        self.physical_exponent = 0
        self.write_protected = False
        self.unit_attentions = 0  # seen and retried (tests and logs)
        self._no_sync_cache = False
        self._state_lock = threading.Lock()
        self._io = AlignedIO(
            fd, Alignment(), read_at=self._read_blocks, write_at=self._write_blocks
        )

    # -- opening --------------------------------------------------------------

    @classmethod
    def open(cls, options: NodeOptions, *, kernel: SgKernel | None = None) -> SgDriver:
        """Open the unit, identify it and read its capacity; the subclass fits its type."""
        kernel = kernel or SgKernel()
        filename = options.filename or ""
        if not filename:
            raise InvalidArgument("Parameter 'filename' is missing")
        if options.force_share and not options.read_only:
            raise InvalidArgument("force-share=on can only be used with read-only images")
        if options.aio != "threads":
            raise InvalidArgument(
                f"aio={options.aio} is not supported on a SCSI generic node "
                "(SG_IO commands always run in threads)"
            )
        writable = not options.read_only
        fd = cls._open_fd(kernel, filename, writable, options.auto_read_only)
        if fd < 0:
            fd, writable = -fd - 1, False
        try:
            cls._check_sg(kernel, fd, filename)
            identity = cls._identify(kernel, fd, filename)
            driver_class = cls._class_for(identity)
            limit = _transfer_limit(kernel.max_transfer(fd), 0)
            driver = driver_class(
                options, fd, kernel, read_only=not writable, identity=identity,
                max_transfer=limit,
            )
            driver._learn_unit()
        except BaseException:
            kernel.close(fd)
            raise
        # A write-protected disk refuses a writable open, as host_device does; a
        # removable unit takes whatever medium comes and marks the node instead.
        if writable and driver.medium_read_only and not isinstance(driver, RemovableSgDriver):
            if not options.auto_read_only:
                driver.close()
                raise ReadOnly(
                    f"The device is not writable: {os.strerror(errno.EACCES)}", errno.EACCES
                )
            driver.read_only = True
        return driver

    @classmethod
    def _class_for(cls, identity: ScsiIdentity) -> type[SgDriver]:
        """The class that fits the unit: removable units get the tray."""
        return RemovableSgDriver if _is_removable(identity) else SgDriver

    @classmethod
    def probe_device(cls, filename: str) -> int:
        """0: the sg driver is only ever asked for by name (host_device leads to it)."""
        return 0

    @classmethod
    def _open_fd(cls, kernel: SgKernel, filename: str, writable: bool, auto_ro: bool) -> int:
        """The descriptor, or ``-fd - 1`` when it had to fall back to read-only."""
        # O_NONBLOCK: never wait for another opener's O_EXCL on the sg node.
        base = os.O_NONBLOCK | os.O_CLOEXEC
        try:
            return kernel.open(filename, base | (os.O_RDWR if writable else os.O_RDONLY))
        except OSError as exc:
            err = exc.errno or errno.EIO
            if not (writable and auto_ro and err in (errno.EACCES, errno.EROFS, errno.EPERM)):
                raise open_error(filename, err) from None
        try:
            return -kernel.open(filename, base | os.O_RDONLY) - 1
        except OSError as exc:
            raise open_error(filename, exc.errno or errno.EIO) from None

    @classmethod
    def _check_sg(cls, kernel: SgKernel, fd: int, filename: str) -> None:
        st = kernel.fstat(fd)
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidArgument(
                f"'{cls.format_name}' driver requires '{filename}' to be a SCSI generic "
                "device (/dev/sgN) or a SCSI block device"
            )
        try:
            version = kernel.version(fd)
        except OSError as exc:
            raise InvalidArgument(
                f"'{filename}' is not a SCSI device (SG_GET_VERSION_NUM: "
                f"{os.strerror(exc.errno or errno.ENOTTY)})"
            ) from None
        if version < _MIN_SG_VERSION:
            raise InvalidArgument(f"'{filename}': sg driver version {version} is too old")

    @classmethod
    def _identify(cls, kernel: SgKernel, fd: int, filename: str) -> ScsiIdentity:
        """Standard INQUIRY plus the unit serial and WWN where the unit has the pages."""
        def ask(cdb: bytes, length: int) -> bytes:
            result = kernel.sg_io(fd, cdb, data_in_len=length, timeout_ms=QUERY_TIMEOUT_MS)
            what = f"{scsi.opcode_name(cdb[0])} on {filename}"
            scsi.check_transport(result, what)
            scsi.check_status(result, what)
            return result.data

        try:
            standard = scsi.parse_standard_inquiry(ask(scsi.inquiry(96), 96))
        except ValueError as exc:
            raise BlockdError(f"'{filename}': bad INQUIRY data: {exc}", errno.EIO) from None
        if not standard.connected:
            raise BlockdError(f"'{filename}': no logical unit is connected", errno.ENODEV)
        serial = wwn = ""
        try:
            pages = scsi.parse_supported_vpd_pages(ask(scsi.inquiry(255, vpd_page=0x00), 255))
            if 0x80 in pages:
                serial = scsi.parse_unit_serial(ask(scsi.inquiry(255, vpd_page=0x80), 255))
            if 0x83 in pages:
                ids = scsi.parse_device_identification(
                    ask(scsi.inquiry(1024, vpd_page=0x83), 1024))
                wwn = scsi.naa_wwn(ids) or ""
        except (OSError, ValueError):
            pass  # VPD pages are optional (SPC-2 and older units, many optical drives)
        return ScsiIdentity(
            peripheral_type=standard.peripheral_type,
            peripheral_type_name=standard.type_name,
            removable=standard.removable,
            vendor=standard.vendor,
            product=standard.product,
            revision=standard.revision,
            serial=serial,
            wwn=wwn,
        )

    def _learn_unit(self) -> None:
        """Clear unit attentions, then read the block limits, capacity and write protection."""
        self._wait_ready()
        try:
            pages_data = self._query(scsi.inquiry(255, vpd_page=0x00), 255)
            if 0xB0 in scsi.parse_supported_vpd_pages(pages_data):
                limits = scsi.parse_block_limits(
                    self._query(scsi.inquiry(0x40, vpd_page=0xB0), 0x40))
                self._unit_limit_blocks = limits.max_transfer_blocks
        except (OSError, ValueError):
            pass
        self._read_capacity()
        self._max_transfer = _transfer_limit(
            self._max_transfer, self._unit_limit_blocks * self.block_length, self.block_length)
        self._io.alignment = Alignment(request=self.block_length)
        self.write_protected = self._mode_sense_write_protected()

    _unit_limit_blocks = 0

    def _wait_ready(self) -> None:
        """TEST UNIT READY until no unit attention is left (a fresh unit queues several)."""
        for _ in range(_READY_TRIES):
            result = self._kernel.sg_io(self._fd, scsi.test_unit_ready(),
                                        timeout_ms=QUERY_TIMEOUT_MS)
            scsi.check_transport(result, self._what(scsi.TEST_UNIT_READY))
            sense = scsi.decode_sense(result.sense) if result.status else None
            if sense is None or sense.sense_key != scsi.UNIT_ATTENTION:
                return
            self._note_unit_attention(sense)

    def _read_capacity(self) -> None:
        try:
            data = self._query(scsi.read_capacity_16(32), 32)
            capacity = scsi.parse_capacity_16(data)
        except (OSError, ValueError) as exc:
            if getattr(exc, "errno", None) == errno.ENOMEDIUM:
                raise
            capacity = scsi.parse_capacity_10(self._query(scsi.read_capacity_10(), 8))
        if capacity.block_length <= 0 or capacity.block_length & (capacity.block_length - 1):
            raise BlockdError(
                f"'{self.filename}': unsupported logical block length "
                f"{capacity.block_length}", errno.EIO)
        with self._state_lock:
            self.block_length = capacity.block_length
            self.blocks = capacity.blocks
            self.physical_exponent = capacity.logical_per_physical_exponent

    def _mode_sense_write_protected(self) -> bool:
        try:
            data = self._query(scsi.mode_sense_10(0x3F, allocation_length=0xFC), 0xFC)
            return scsi.parse_mode_sense_10(data).write_protected
        except (OSError, ValueError):
            return False

    # -- commands -------------------------------------------------------------

    def _what(self, opcode: int) -> str:
        return f"{scsi.opcode_name(opcode)} on {self.filename}"

    def _command(
        self,
        cdb: bytes,
        *,
        data_out: Buffer = b"",
        data_in_len: int = 0,
        data_in: memoryview | None = None,
        timeout_ms: int = QUERY_TIMEOUT_MS,
    ) -> scsi.SgIoResult:
        """Send ``cdb``; GOOD or RECOVERED ERROR returns, anything else raises.

        A UNIT ATTENTION is noted and the command sent once more.
        """
        what = self._what(cdb[0])
        for attempt in (1, 2):
            result = self._kernel.sg_io(
                self._fd, cdb, data_out, data_in_len, timeout_ms, data_in=data_in
            )
            scsi.check_transport(result, what)
            if result.status in (scsi.GOOD, scsi.CONDITION_MET):
                return result
            sense = scsi.decode_sense(result.sense)
            if sense is not None and sense.sense_key == scsi.RECOVERED_ERROR:
                return result
            if sense is not None and sense.sense_key == scsi.UNIT_ATTENTION and attempt == 1:
                self._note_unit_attention(sense)
                continue
            scsi.check_status(result, what)
        raise AssertionError("unreachable")  # pragma: no cover

    def _query(self, cdb: bytes, length: int) -> bytes:
        return self._command(cdb, data_in_len=length).data

    def _note_unit_attention(self, sense: scsi.Sense) -> None:
        """The unit reset or its medium changed; subclasses re-read their medium."""
        self.unit_attentions += 1

    # -- data path ------------------------------------------------------------

    def _split(self, offset: int, views: Sequence[memoryview]) -> list[tuple[int, memoryview]]:
        """(lba, view) per command: whole blocks, at most the maximum transfer each."""
        block = self.block_length
        chunk = self._max_transfer
        pieces = []
        pos = offset
        for view in views:
            for start in range(0, view.nbytes, chunk):
                part = view[start : start + chunk]
                pieces.append((pos // block, part))
                pos += part.nbytes
        return pieces

    def _read_blocks(self, offset: int, views: Sequence[memoryview]) -> int:
        """Aligned read with READ(10)/(16) into ``views`` in place; short only at the end."""
        end_of_medium = self.blocks * self.block_length
        total = 0
        for lba, view in self._split(offset, views):
            start = lba * self.block_length
            if start >= end_of_medium:
                break
            view = view[: end_of_medium - start]
            blocks = view.nbytes // self.block_length
            result = self._command(
                scsi.read_write(False, lba, blocks), data_in=view, timeout_ms=IO_TIMEOUT_MS
            )
            if result.transferred != view.nbytes:
                raise OSError(errno.EIO, f"{self._what(scsi.READ_10)}: short transfer "
                              f"({result.transferred} of {view.nbytes} bytes)")
            total += view.nbytes
        return total

    def _write_blocks(self, offset: int, views: Sequence[memoryview], flags: int) -> int:
        """Aligned write with WRITE(10)/(16); ``flags`` non-zero means FUA."""
        total = 0
        for lba, view in self._split(offset, views):
            blocks = view.nbytes // self.block_length
            self._command(
                scsi.read_write(True, lba, blocks, fua=bool(flags)), data_out=view,
                timeout_ms=IO_TIMEOUT_MS,
            )
            total += view.nbytes
        return total

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnly(f"{what} '{self.filename}': node is read-only", errno.EROFS)

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        return self._io.read(offset, buffers)

    def pwritev(self, offset: int, buffers: Sequence[Buffer], fua: bool = False) -> int:
        self._check_writable("Cannot write to")
        fua = fua and not self.options.cache_no_flush
        return self._io.write(offset, buffers, 1 if fua else 0)

    def flush(self) -> None:
        """SYNCHRONIZE CACHE(10) over the whole unit."""
        if self.read_only or self.options.cache_no_flush or self._no_sync_cache:
            return
        try:
            self._command(scsi.synchronize_cache(), timeout_ms=IO_TIMEOUT_MS)
        except scsi.ScsiCommandError as exc:
            sense = exc.sense
            if sense is not None and (sense.sense_key, sense.asc) == (scsi.ILLEGAL_REQUEST, 0x20):
                self._no_sync_cache = True  # no such command: the unit has no cache to flush
                return
            raise

    def discard(self, offset: int, length: int) -> None:
        """A no-op: ``discard`` is advisory and the driver sends no UNMAP."""
        self._check_writable("Cannot discard on")

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Written as zeroes (WRITE SAME is not sent), a maximum transfer at a time."""
        self._check_writable("Cannot write zeroes to")
        zeroes = memoryview(bytes(min(length, self._max_transfer)))
        pos = offset
        while pos < offset + length:
            n = min(zeroes.nbytes, offset + length - pos)
            self._io.write(pos, [zeroes[:n]])
            pos += n

    def getlength(self) -> int:
        return self.blocks * self.block_length

    @property
    def medium_read_only(self) -> bool:
        return self.write_protected

    def get_info(self) -> DriverInfo:
        return DriverInfo(
            filename=self.filename,
            logical_block_size=self.block_length,
            physical_block_size=self.block_length << self.physical_exponent,
            request_alignment=self.block_length,
            max_transfer=self._max_transfer,
            can_write_zeroes=True,
            read_only_medium=self.medium_read_only,
            scsi=self.identity,
            extra={
                "serial": self.identity.serial,
                "vendor": self.identity.vendor,
                "product": self.identity.product,
            },
        )

    def scsi_command(
        self,
        cdb: bytes,
        data_out: bytes = b"",
        data_in_len: int = 0,
        timeout_ms: int = 30000,
    ) -> ScsiResult:
        """One raw command (Passthrough): the unit's answer, CHECK CONDITION included.

        Raises OSError only when the command did not complete (timeout, the
        unit gone).  A UNIT ATTENTION in the answer is noted, not retried.
        """
        scsi.check_request(cdb, data_out, data_in_len, timeout_ms)
        result = self._kernel.sg_io(self._fd, cdb, data_out, data_in_len, timeout_ms)
        scsi.check_transport(result, self._what(cdb[0]))
        if result.status == scsi.CHECK_CONDITION:
            sense = scsi.decode_sense(result.sense)
            if sense is not None and sense.sense_key == scsi.UNIT_ATTENTION:
                self._note_unit_attention(sense)
        return result.to_scsi_result()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._kernel.close(fd)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.filename!r} fd={self._fd}>"


class RemovableSgDriver(SgDriver):
    """A removable SCSI unit (CD/DVD drive, removable disk): tray, lock and medium changes."""

    _medium_present = False  # a medium was in at the last read of it
    _changed = False  # a unit attention or an event said the medium changed
    _locked = False  # blockd holds PREVENT MEDIUM REMOVAL

    @property
    def is_cd(self) -> bool:
        return self.identity.peripheral_type == 5

    @property
    def medium_read_only(self) -> bool:
        return self.is_cd or self.write_protected

    def _learn_unit(self) -> None:
        self._wait_ready()
        self._refresh()
        self._io.alignment = Alignment(request=self.block_length)
        self.write_protected = self._medium_present and self._mode_sense_write_protected()

    def _note_unit_attention(self, sense: scsi.Sense) -> None:
        super()._note_unit_attention(sense)
        if sense.asc in (0x28, 0x29, 0x2A):  # medium may have changed; reset; capacity changed
            self._changed = True

    def _refresh(self) -> int:
        """Read the medium afresh: its size, or 0 when there is none."""
        try:
            self._command(scsi.test_unit_ready())
            self._read_capacity()
        except OSError as exc:
            if exc.errno not in (errno.ENOMEDIUM, errno.EAGAIN):
                raise
            with self._state_lock:
                self.blocks = 0
                if self.block_length == 512 and self.is_cd:
                    self.block_length = 2048
            self._medium_present = False
            return 0
        self._medium_present = self.blocks > 0
        return self.blocks * self.block_length

    @property
    def medium_present(self) -> bool:
        return self._medium_present

    def getlength(self) -> int:
        """Reads the medium afresh (the Removable protocol): 0 with none."""
        return self._refresh()

    def is_inserted(self) -> bool:
        result = self._kernel.sg_io(self._fd, scsi.test_unit_ready(), timeout_ms=QUERY_TIMEOUT_MS)
        scsi.check_transport(result, self._what(scsi.TEST_UNIT_READY))
        return result.status == scsi.GOOD

    def tray_state(self) -> TrayState:
        """From GESN's media status; TEST UNIT READY's sense for units without GESN."""
        event = self._media_event()
        if event is not None:
            if event.door_open:
                return TrayState.TRAY_OPEN
            return TrayState.DISC_OK if event.media_present else TrayState.NO_DISC
        result = self._kernel.sg_io(self._fd, scsi.test_unit_ready(), timeout_ms=QUERY_TIMEOUT_MS)
        scsi.check_transport(result, self._what(scsi.TEST_UNIT_READY))
        if result.status == scsi.GOOD:
            return TrayState.DISC_OK
        sense = scsi.decode_sense(result.sense)
        if sense is None:
            return TrayState.NO_INFO
        if sense.sense_key == scsi.UNIT_ATTENTION:
            self._note_unit_attention(sense)
            return TrayState.NOT_READY
        if (sense.asc, sense.ascq) == (0x3A, 0x02):
            return TrayState.TRAY_OPEN
        if sense.asc == 0x3A:
            return TrayState.NO_DISC
        if sense.asc == 0x04:
            return TrayState.NOT_READY
        return TrayState.NO_INFO

    _gesn_works = True

    def _media_event(self) -> scsi.MediaEvent | None:
        if not self._gesn_works:
            return None
        result = self._kernel.sg_io(
            self._fd, scsi.get_event_status_notification(8), data_in_len=8,
            timeout_ms=QUERY_TIMEOUT_MS,
        )
        scsi.check_transport(result, self._what(scsi.GET_EVENT_STATUS_NOTIFICATION))
        if result.status != scsi.GOOD:
            sense = scsi.decode_sense(result.sense)
            if sense is not None and sense.sense_key == scsi.ILLEGAL_REQUEST:
                self._gesn_works = False
            elif sense is not None and sense.sense_key == scsi.UNIT_ATTENTION:
                self._note_unit_attention(sense)
            return None
        try:
            event = scsi.parse_media_event(result.data)
        except ValueError:
            return None
        if event is not None and event.event in (2, 3, 4):  # new media, removal, changed
            self._changed = True
        return event

    def media_changed(self) -> bool:
        """Whether the medium changed since the last call (events and unit attentions)."""
        changed, self._changed = self._changed, False
        present = self.is_inserted()
        if present != self._medium_present:
            changed = True
        return changed

    def eject(self, eject_flag: bool) -> None:
        """Open (``True``) or close the tray; opening first allows removal (a lock
        another program took would otherwise keep the tray shut)."""
        if eject_flag:
            self._command(scsi.prevent_allow_medium_removal(False))
            self._command(scsi.start_stop_unit(start=False, load_eject=True),
                          timeout_ms=MOTION_TIMEOUT_MS)
            self._medium_present = False
        else:
            self._command(scsi.start_stop_unit(start=True, load_eject=True),
                          timeout_ms=MOTION_TIMEOUT_MS)

    def lock_medium(self, locked: bool) -> None:
        self._command(scsi.prevent_allow_medium_removal(locked))
        self._locked = locked

    def _read_blocks(self, offset: int, views: Sequence[memoryview]) -> int:
        if not self._medium_present:
            raise OSError(errno.ENOMEDIUM, f"{self.filename}: No medium found")
        return super()._read_blocks(offset, views)

    def close(self) -> None:
        """Leave the drive unlocked: a lock must not outlive the node that took it."""
        if self._locked and self._fd >= 0:
            with contextlib.suppress(OSError):
                self._command(scsi.prevent_allow_medium_removal(False))
        super().close()


class HostDeviceSgDriver(SgDriver):
    """``host_device`` on a SCSI generic node: the sg driver under QEMU's driver name."""

    format_name: ClassVar[str] = "host_device"

    @classmethod
    def _class_for(cls, identity: ScsiIdentity) -> type[SgDriver]:
        return HostDeviceRemovableSgDriver if _is_removable(identity) else HostDeviceSgDriver


class HostDeviceRemovableSgDriver(RemovableSgDriver):
    """``host_device`` on the SCSI generic node of a removable unit."""

    format_name: ClassVar[str] = "host_device"


def _is_removable(identity: ScsiIdentity) -> bool:
    return identity.peripheral_type == 5 or identity.removable


def _transfer_limit(kernel_bytes: int, unit_bytes: int, block: int = 512) -> int:
    """The largest transfer per command: all limits that are set, and MAX_TRANSFER."""
    limit = MAX_TRANSFER
    for value in (kernel_bytes, unit_bytes):
        if value > 0:
            limit = min(limit, value)
    return max(block, limit // block * block)

