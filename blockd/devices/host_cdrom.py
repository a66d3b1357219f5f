"""The ``host_cdrom`` driver: a host CD/DVD drive (QEMU's file-posix ``host_cdrom``).

Theory of operation
-------------------
A node of this driver *is the drive*, not a disc: it opens whether or not a
disc is in, stays open while the tray moves, and learns the medium from the
hardware.

* **Opening.** The node is opened ``O_RDONLY | O_NONBLOCK``.  For the kernel's
  uniform CD-ROM layer ``O_NONBLOCK`` means "open for ioctls": the open
  skips the disc checks (which fail with ENOMEDIUM on an empty drive) and does
  not lock the door.  The flag is cleared on the descriptor right after
  open(2); it only mattered for the open, and io_uring would treat reads on a
  non-blocking file as "never wait" and fail them with EAGAIN.  A host_cdrom
  node is always read-only: ``read-only=false`` is accepted, as QEMU accepts
  it, but the descriptor is read-only and the node reports ``ro: true``.
  ``cache.direct`` adds ``O_DIRECT`` (2048-byte alignment on CD drives);
  ``aio`` and ``locking`` are accepted like the other file drivers do.
* **The medium.** :meth:`~HostCdromDriver.refresh_medium` asks the drive
  (CDROM_DRIVE_STATUS), waits a bounded time for a drive that is still
  spinning up, and re-reads the size (BLKGETSIZE64) when a disc is in; the
  size is 0 without one.  The kernel's capacity cannot be trusted on an empty
  drive (sr keeps the last disc's size, or a 4 GiB guess), and it is only
  re-read when the device node is opened after a media change, so refreshing
  opens and closes the node once (which also drops the old disc's page
  cache).  The node caches its size: whoever calls ``refresh_medium()`` (or
  ``getlength()``, which is the same) stores the result in ``Node.size``.
* **Tray and lock.** :meth:`~HostCdromDriver.eject` is CDROMEJECT or
  CDROMCLOSETRAY, :meth:`~HostCdromDriver.lock_medium` CDROM_LOCKDOOR.  Any
  non-zero return is a failure: the SCSI midlayer can leak a positive SCSI
  result (2, CHECK CONDITION) through these ioctls instead of an errno, so
  the driver then asks CDROM_DRIVE_STATUS what really happened.  When the
  cdrom layer refuses with EBUSY (another process has the drive open, or a
  lock someone else set with CDROM_LOCKDOOR), the same commands go to the
  drive as SCSI through SG_IO on the same descriptor: PREVENT ALLOW MEDIUM
  REMOVAL and START STOP UNIT.  The drive's sense data then says why a
  command failed ("ILLEGAL REQUEST: medium removal prevented").  A lock this
  driver holds itself is never overridden: ejecting while it is held fails
  with EBUSY.
* **Reads** of an empty drive (or one whose tray this driver opened) fail
  with ENOMEDIUM without touching the device; an I/O error while the drive
  reports no disc is reported as ENOMEDIUM as well.  Writes, discards and
  write-zeroes fail with ReadOnly; flushes do nothing (nothing is written).

Every method may block for seconds (tray motors, spin-up, SCSI timeouts): the
device layer calls them from an executor.  Tray, lock, status and SCSI
sequences hold one lock per drive, so they never interleave; reads do not
take it.  The kernel interface is a :class:`CdromIoctls` object, which unit
tests replace with a model of a drive.

Kernel facts this relies on (torvalds/linux): ``drivers/cdrom/cdrom.c``
(``cdrom_open`` with O_NONBLOCK, ``cdrom_ioctl_eject``'s ``use_count != 1 ||
keeplocked`` EBUSY, ``cdrom_ioctl_lock_door``'s EBUSY when unlocking with
other openers and no CAP_SYS_ADMIN, ``cdrom_release`` unlocking at last close
unless ``keeplocked``, ``media_changed``), ``drivers/scsi/sr.c``
(``sr_block_open`` revalidating after a media change, ``get_sectorsize``),
``drivers/scsi/sr_ioctl.c`` (``sr_drive_status``), ``drivers/scsi/scsi_ioctl.c``
(``scsi_set_medium_removal`` returning a positive SCSI result,
``scsi_cmd_allowed``: START STOP UNIT is allowed on a read-only descriptor,
PREVENT ALLOW MEDIUM REMOVAL needs write access or CAP_SYS_RAWIO) and
Documentation/userspace-api/ioctl/cdrom.rst.

Errors: what :class:`~blockd.devices.host_device.HostDeviceDriver` raises when
opening (``'host_cdrom' driver requires 'X' to be either a character or
block device``, ``Could not open 'X': ...``); :class:`OSError` with the errno
and a message saying what was attempted (``ejecting /dev/sr0: drive is
locked ...``) from tray, lock and status calls; and
:class:`~blockd.devices.scsi.ScsiCommandError` (an OSError) when the drive
rejects a SCSI command.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import ClassVar, Self

from blockd.devices import scsi
from blockd.devices._aligned_io import Alignment
from blockd.devices._ioctl import (
    BLKGETSIZE64,
    BLKSSZGET,
    CDROM_DRIVE_STATUS,
    CDROM_LOCKDOOR,
    CDROM_MEDIA_CHANGED,
    CDROMCLOSETRAY,
    CDROMEJECT,
    ioctl_int,
    ioctl_u64,
    ioctl_value,
)
from blockd.devices.base import DriverInfo, NodeOptions, ScsiResult, TrayState
from blockd.devices.host_device import HostDeviceDriver
from blockd.devices.posix import check_common_options, open_flags

__all__ = ["CDSL_CURRENT", "CdromIoctls", "HostCdromDriver"]

log = logging.getLogger(__name__)

# linux/cdrom.h: the "current slot" argument (INT_MAX) and the CDROM_DRIVE_STATUS answers.
CDSL_CURRENT = 0x7FFFFFFF
CDS_NO_INFO = 0
CDS_NO_DISC = 1
CDS_TRAY_OPEN = 2
CDS_DRIVE_NOT_READY = 3
CDS_DISC_OK = 4

_TRAY_STATES = {
    CDS_NO_INFO: TrayState.NO_INFO,
    CDS_NO_DISC: TrayState.NO_DISC,
    CDS_TRAY_OPEN: TrayState.TRAY_OPEN,
    CDS_DRIVE_NOT_READY: TrayState.NOT_READY,
    CDS_DISC_OK: TrayState.DISC_OK,
}

# Errnos meaning "not a CD-ROM drive" (a loop device, a disk) or "the drive
# cannot do this" (ENOSYS from the cdrom layer, EOPNOTSUPP = EDRIVE_CANT_DO_THIS).
_UNSUPPORTED = frozenset({errno.ENOTTY, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})

# How long the drive may take for SCSI commands sent through SG_IO (the
# kernel's own timeouts for these commands are 60 s and 10 s).
START_STOP_TIMEOUT_MS = 60_000
PREVENT_ALLOW_TIMEOUT_MS = 10_000

_EPERM_HINT = "PREVENT ALLOW MEDIUM REMOVAL needs CAP_SYS_RAWIO on a read-only descriptor"


def _why(exc: OSError) -> str:
    return exc.strerror or os.strerror(exc.errno or errno.EIO)


class CdromIoctls:
    """The kernel calls the driver makes: open, the CD-ROM and block ioctls, SG_IO.

    One object per driver; unit tests pass a subclass that models a drive.
    Every method raises OSError with the kernel's errno.
    """

    def open(self, path: str, flags: int) -> int:
        """open(2)."""
        return os.open(path, flags)

    def revalidate(self, path: str) -> None:
        """Open and close the device node so the kernel re-reads a changed medium.

        sr revalidates (capacity, block size, page cache) only in its open
        routine, and only after it has seen a media change.
        """
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))

    def ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        """An ioctl with an integer argument; returns the ioctl's return value."""
        return ioctl_value(fd, request, arg)

    def size(self, fd: int) -> int:
        """The kernel's idea of the medium size in bytes (BLKGETSIZE64; seek for char devices)."""
        try:
            return ioctl_u64(fd, BLKGETSIZE64)
        except OSError as exc:
            if exc.errno != errno.ENOTTY:
                raise
        return os.lseek(fd, 0, os.SEEK_END)

    def block_size(self, fd: int) -> int:
        """The logical block size (BLKSSZGET)."""
        return ioctl_int(fd, BLKSSZGET)

    def sg_io(
        self, fd: int, cdb: bytes, data_out: bytes, data_in_len: int, timeout_ms: int
    ) -> scsi.SgIoResult:
        """One SCSI command through SG_IO (see :func:`blockd.devices.scsi.sg_io`)."""
        return scsi.sg_io(fd, cdb, data_out, data_in_len, timeout_ms)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _looks_like_cdrom(path: str) -> bool:
    """Names udev and the kernel give CD drives: /dev/cdrom*, /dev/srN."""
    return path.startswith("/dev/cdrom") or re.fullmatch(r"/dev/sr[0-9]+", path) is not None


def _probe_score(filename: str, mode: int, drive_answers: Callable[[], bool]) -> int:
    """The probe decision, apart from the system calls that feed it."""
    if not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
        return 0
    if _looks_like_cdrom(filename) or _looks_like_cdrom(os.path.realpath(filename)):
        return 100
    if stat.S_ISBLK(mode) and drive_answers():
        return 100
    return 0


class HostCdromDriver(HostDeviceDriver):
    """A node backed by a host CD/DVD drive, with a tray, a medium lock and SG_IO.

    Implements :class:`~blockd.devices.base.Removable` and
    :class:`~blockd.devices.base.Passthrough`.
    """

    image_locking = False

    format_name = "host_cdrom"

    #: How long refresh_medium() waits while the drive reports "becoming ready".
    ready_timeout_s: ClassVar[float] = 10.0
    ready_poll_s: ClassVar[float] = 0.25

    def __init__(
        self,
        options: NodeOptions,
        fd: int,
        *,
        read_only: bool,
        medium_read_only: bool,
        alignment: Alignment,
        ioctls: CdromIoctls | None = None,
    ) -> None:
        self._ioctls = ioctls if ioctls is not None else CdromIoctls()
        self._tray = threading.Lock()
        self._medium_locked = False  # CDROM_LOCKDOOR(1) by this driver is in force
        self._inserted = False
        self._medium_size = 0
        super().__init__(
            options,
            fd,
            read_only=read_only,
            medium_read_only=medium_read_only,
            alignment=alignment,
        )

    def _setup(self, fd: int) -> None:
        self.is_block = stat.S_ISBLK(os.fstat(fd).st_mode)
        size = 2048  # what CD media use; sr reports it through BLKSSZGET
        if self.is_block:
            with contextlib.suppress(OSError):
                size = self._ioctls.block_size(fd)
        self.logical_block_size = self.physical_block_size = size

    # -- opening and probing ----------------------------------------------------

    @classmethod
    def open(cls, options: NodeOptions, *, ioctls: CdromIoctls | None = None) -> Self:
        """Open the drive for ioctls and reads, with or without a disc in it.

        Raises InvalidArgument/NotFound/BlockdError with QEMU's texts, like
        the other file drivers.
        """
        check_common_options(options)
        ioctls = ioctls if ioctls is not None else CdromIoctls()
        filename = options.filename or ""
        direct = options.cache_direct
        fd = cls._open_fd(ioctls, filename, direct)
        try:
            st = os.fstat(fd)
            cls._check_type(filename, st)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
            alignment = cls._alignment(fd, st, direct)
            driver = cls(
                options,
                fd,
                read_only=True,
                medium_read_only=True,
                alignment=alignment,
                ioctls=ioctls,
            )
        except BaseException:
            os.close(fd)
            raise
        try:
            # Our own open just revalidated a changed medium: no second open needed.
            driver._refresh(revalidate=False)
        except OSError as exc:
            log.warning("%s: cannot read the drive status: %s", filename, _why(exc))
        return driver

    @classmethod
    def _open_fd(cls, ioctls: CdromIoctls, filename: str, direct: bool) -> int:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        return open_flags(filename, flags | os.O_DIRECT if direct else flags, ioctls.open)

    @classmethod
    def probe_device(cls, filename: str, *, ioctls: CdromIoctls | None = None) -> int:
        """100 for /dev/cdrom*, /dev/srN and block devices that answer CDROM_DRIVE_STATUS."""
        try:
            mode = os.stat(filename).st_mode
        except OSError:
            return 0
        kernel = ioctls if ioctls is not None else CdromIoctls()

        def drive_answers() -> bool:
            try:
                fd = kernel.open(filename, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return False
            try:
                kernel.ioctl(fd, CDROM_DRIVE_STATUS, CDSL_CURRENT)
            except OSError:
                return False
            finally:
                os.close(fd)
            return True

        return _probe_score(filename, mode, drive_answers)

    # -- the medium -------------------------------------------------------------

    @property
    def medium_present(self) -> bool:
        """Whether a disc was in at the last refresh (no I/O)."""
        return self._inserted

    @property
    def medium_size(self) -> int:
        """The medium size learnt at the last refresh, 0 without a disc (no I/O)."""
        return self._medium_size

    def refresh_medium(self) -> int:
        """Ask the drive whether a disc is in and return its size in bytes (0: none).

        Call it after :meth:`media_changed` returned True, after closing the
        tray, or when udev reports a media change; the caller stores the
        result in ``Node.size``.  Waits up to ``ready_timeout_s`` for a drive
        that is still becoming ready.  Raises OSError if the drive status
        cannot be read.
        """
        with self._tray:
            return self._refresh(revalidate=True)

    def getlength(self) -> int:
        """The medium size, read fresh from the drive: same as :meth:`refresh_medium`."""
        return self.refresh_medium()

    def _refresh(self, *, revalidate: bool) -> int:
        state = self._status()
        waited = 0.0
        while state is TrayState.NOT_READY and waited < self.ready_timeout_s:
            self._ioctls.sleep(self.ready_poll_s)
            waited += self.ready_poll_s
            state = self._status()
        size = 0
        if state is TrayState.DISC_OK:
            if revalidate:
                try:
                    self._ioctls.revalidate(self.filename)
                except OSError as exc:
                    log.debug("%s: reopening to revalidate failed: %s", self.filename, _why(exc))
            size = self._ioctls.size(self.fd)
            if self.is_block:
                try:
                    self.logical_block_size = self._ioctls.block_size(self.fd)
                    self.physical_block_size = self.logical_block_size
                except OSError:
                    pass
        self._inserted = state is TrayState.DISC_OK
        self._medium_size = size
        return size

    def _status(self) -> TrayState:
        """CDROM_DRIVE_STATUS; NO_INFO for devices that are not CD drives."""
        try:
            answer = self._ioctls.ioctl(self.fd, CDROM_DRIVE_STATUS, CDSL_CURRENT)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return TrayState.NO_INFO
            err = exc.errno or errno.EIO
            raise OSError(err, f"reading the drive status of {self.filename}: {_why(exc)}") from exc
        return _TRAY_STATES.get(answer, TrayState.NO_INFO)

    # -- Removable --------------------------------------------------------------

    def is_inserted(self) -> bool:
        """Whether the drive reports a disc that is ready (CDS_DISC_OK), as QEMU decides."""
        return self.tray_state() is TrayState.DISC_OK

    def tray_state(self) -> TrayState:
        """The drive's status now (CDROM_DRIVE_STATUS); NO_INFO when it cannot tell."""
        with self._tray:
            return self._status()

    def media_changed(self) -> bool:
        """Whether the medium changed since the last call (CDROM_MEDIA_CHANGED).

        The kernel keeps one flag per drive for every caller of this ioctl, and
        reading it clears it.  False for devices that cannot tell.
        """
        with self._tray:
            try:
                answer = self._ioctls.ioctl(self.fd, CDROM_MEDIA_CHANGED, CDSL_CURRENT)
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:
                    return False
                err = exc.errno or errno.EIO
                raise OSError(
                    err, f"asking {self.filename} for a media change: {_why(exc)}"
                ) from exc
            return answer > 0

    def eject(self, eject_flag: bool) -> None:
        """Open the tray (``True``, CDROMEJECT) or close it (``False``, CDROMCLOSETRAY).

        Opening forgets the medium (reads fail with ENOMEDIUM); closing does
        not learn the new one: call :meth:`refresh_medium` afterwards.
        Raises OSError (EBUSY when the drive is locked) or ScsiCommandError.
        """
        with self._tray:
            if eject_flag:
                self._open_tray()
            else:
                self._close_tray()

    def _open_tray(self) -> None:
        what = f"ejecting {self.filename}"
        if self._medium_locked:
            raise OSError(errno.EBUSY, f"{what}: drive is locked (unlock the medium first)")
        try:
            answer = self._ioctls.ioctl(self.fd, CDROMEJECT, 0)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                # Another opener, or a lock someone else set: ask the drive directly.
                log.info("%s: CDROMEJECT refused (%s), using SG_IO", self.filename, _why(exc))
                self._scsi_eject(what)
            elif exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(exc.errno, f"{what}: the drive cannot open its tray") from exc
            elif exc.errno == errno.ENOMEDIUM and self._status() is TrayState.TRAY_OPEN:
                pass  # sr maps the drive's "no medium" sense to ENOMEDIUM; the tray did open
            else:
                raise OSError(exc.errno or errno.EIO, f"{what}: {_why(exc)}") from exc
        else:
            if answer != 0 and self._status() is not TrayState.TRAY_OPEN:
                # The drive refused: a lock someone else set (udev's cdrom_id locks
                # drives after every media change; CDROMEJECT's own unlock does not
                # reach the drive, seen in the VM tier).  Our lock is off (checked
                # above): lift theirs and ask again, then through SG_IO.
                log.info("%s: CDROMEJECT returned %d; unlocking and trying again",
                         self.filename, answer)
                try:
                    self._ioctls.ioctl(self.fd, CDROM_LOCKDOOR, 0)
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise OSError(exc.errno or errno.EIO, f"{what}: {_why(exc)}") from exc
                    # Another opener, and no CAP_SYS_ADMIN to unlock past it.
                    log.info("%s: CDROM_LOCKDOOR refused (%s), using SG_IO",
                             self.filename, _why(exc))
                    self._scsi_eject(what)
                else:
                    answer = self._ioctls.ioctl(self.fd, CDROMEJECT, 0)
                    if answer != 0 and self._status() is not TrayState.TRAY_OPEN:
                        self._scsi_eject(what)
        self._inserted = False
        self._medium_size = 0

    def _scsi_eject(self, what: str) -> None:
        """ALLOW MEDIUM REMOVAL, then START STOP UNIT with LoEj=1 Start=0."""
        unlock_error: OSError | None = None
        try:
            self._send(scsi.prevent_allow_medium_removal(False), what, PREVENT_ALLOW_TIMEOUT_MS)
        except OSError as exc:  # no lock on this drive, or no permission: try anyway
            unlock_error = exc
        try:
            self._send(
                scsi.start_stop_unit(start=False, load_eject=True), what, START_STOP_TIMEOUT_MS
            )
        except OSError as exc:
            if unlock_error is None:
                raise
            message = f"{_why(exc)} (unlocking first failed: {_why(unlock_error)})"
            if isinstance(exc, scsi.ScsiCommandError):
                raise scsi.ScsiCommandError(
                    exc.errno or errno.EIO, message, status=exc.status, sense=exc.sense
                ) from exc
            raise OSError(exc.errno or errno.EIO, message) from exc

    def _close_tray(self) -> None:
        what = f"closing the tray of {self.filename}"
        try:
            answer = self._ioctls.ioctl(self.fd, CDROMCLOSETRAY, 0)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                self._send(
                    scsi.start_stop_unit(start=True, load_eject=True),
                    what,
                    START_STOP_TIMEOUT_MS,
                    tolerate=lambda sense: sense.asc == 0x3A,  # closed, but empty
                )
                return
            if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(exc.errno, f"{what}: the drive cannot close its tray") from exc
            # sr reports "no medium" when an empty drive loads: the tray did close.
            if exc.errno == errno.ENOMEDIUM and self._status() is not TrayState.TRAY_OPEN:
                return
            raise OSError(exc.errno or errno.EIO, f"{what}: {_why(exc)}") from exc
        if answer != 0:
            state = self._status()
            if state is TrayState.TRAY_OPEN:
                raise OSError(
                    errno.EIO, f"{what}: the tray did not close (CDROMCLOSETRAY returned {answer})"
                )

    def lock_medium(self, locked: bool) -> None:
        """Lock or unlock the tray (CDROM_LOCKDOOR; SG_IO when the cdrom layer refuses).

        A lock set here outlives the descriptor in the kernel, so
        :meth:`close` releases it.  Raises OSError or ScsiCommandError.
        """
        what = f"{'locking' if locked else 'unlocking'} the medium of {self.filename}"
        with self._tray:
            try:
                answer = self._ioctls.ioctl(self.fd, CDROM_LOCKDOOR, 1 if locked else 0)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    # Unlocking while others have the drive open needs CAP_SYS_ADMIN.
                    log.info("%s: CDROM_LOCKDOOR refused (%s), using SG_IO",
                             self.filename, _why(exc))
                    self._send(
                        scsi.prevent_allow_medium_removal(locked), what, PREVENT_ALLOW_TIMEOUT_MS
                    )
                elif exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                    raise OSError(exc.errno, f"{what}: the drive has no medium lock") from exc
                else:
                    raise OSError(exc.errno or errno.EIO, f"{what}: {_why(exc)}") from exc
            else:
                if answer != 0:
                    # The kernel leaked a SCSI result instead of an errno: send the
                    # command ourselves to get the drive's sense data (or succeed).
                    log.info("%s: CDROM_LOCKDOOR returned %d, using SG_IO", self.filename, answer)
                    self._send(
                        scsi.prevent_allow_medium_removal(locked), what, PREVENT_ALLOW_TIMEOUT_MS
                    )
            self._medium_locked = locked

    # -- SCSI -------------------------------------------------------------------

    def _send(
        self,
        cdb: bytes,
        what: str,
        timeout_ms: int,
        *,
        tolerate: Callable[[scsi.Sense], bool] | None = None,
    ) -> None:
        """Run one CDB without data; raise unless GOOD (or the sense is tolerated)."""
        try:
            result = self._ioctls.sg_io(self.fd, cdb, b"", 0, timeout_ms)
        except OSError as exc:
            err = exc.errno or errno.EIO
            name = scsi.opcode_name(cdb[0])
            if err == errno.EPERM:
                raise OSError(
                    err, f"{what}: the kernel refused {name} through SG_IO ({_EPERM_HINT})"
                ) from exc
            raise OSError(err, f"{what}: {name} through SG_IO failed: {_why(exc)}") from exc
        scsi.check_transport(result, what)
        if tolerate is not None and result.status == scsi.CHECK_CONDITION:
            sense = scsi.decode_sense(result.sense)
            if sense is not None and tolerate(sense):
                return
        scsi.check_status(result, what)

    def scsi_command(
        self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0, timeout_ms: int = 30000
    ) -> ScsiResult:
        """Send a raw SCSI command to the drive through SG_IO (Passthrough protocol).

        The drive's answer comes back as it is, CHECK CONDITION included.
        Raises ValueError for a malformed request and OSError when the kernel
        refuses it (EPERM: not allowed on a read-only descriptor without
        CAP_SYS_RAWIO) or the command does not complete (timeout, reset).
        """
        cdb, data_out = bytes(cdb), bytes(data_out)
        scsi.check_request(cdb, data_out, data_in_len, timeout_ms)
        what = f"{scsi.opcode_name(cdb[0])} on {self.filename}"
        with self._tray:
            try:
                result = self._ioctls.sg_io(self.fd, cdb, data_out, data_in_len, timeout_ms)
            except OSError as exc:
                raise OSError(exc.errno or errno.EIO, f"{what}: {_why(exc)}") from exc
        scsi.check_transport(result, what)
        return result.to_scsi_result()

    # -- data -------------------------------------------------------------------

    def _check_medium(self) -> None:
        if not self._inserted:
            raise OSError(
                errno.ENOMEDIUM, f"reading {self.filename}: {os.strerror(errno.ENOMEDIUM)}"
            )

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Read from the disc; ENOMEDIUM when there is none."""
        return self._from_disc(super().preadv, offset, buffers)

    def splice_read(self, offset: int, length: int, pipe_fd: int) -> int:
        """Like :meth:`preadv`, into a pipe."""
        return self._from_disc(super().splice_read, offset, length, pipe_fd)

    def splice_plain_fd(self) -> int:
        """-1: a disc's splices need the medium check and the ENOMEDIUM translation."""
        return -1

    def _from_disc(self, read: Callable[..., int], *args: object) -> int:
        """Run a read of the disc; a failure because the disc is gone becomes ENOMEDIUM."""
        self._check_medium()
        try:
            return read(*args)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.ENXIO) or not self._disc_gone():
                raise
            raise OSError(
                errno.ENOMEDIUM, f"reading {self.filename}: {os.strerror(errno.ENOMEDIUM)}"
            ) from exc

    def preadv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Like PosixDriver's, after the same medium check as :meth:`preadv` (no I/O)."""
        self._check_medium()
        return super().preadv_nowait(offset, buffers)

    def loop_read_plan(self) -> tuple[int, int]:
        """None: a disc's reads go through the medium check of :meth:`preadv_nowait`."""
        return -1, 0

    def _disc_gone(self) -> bool:
        """After a failed read: does the drive say there is no disc?"""
        try:
            state = self._status()
        except OSError:
            return False
        return state in (TrayState.NO_DISC, TrayState.TRAY_OPEN)

    def flush(self) -> None:
        """Nothing to flush: the node is read-only (QEMU skips flushes of read-only nodes)."""

    def uring_flush(self) -> int | None:
        return None

    def get_info(self) -> DriverInfo:
        info = super().get_info()
        return replace(info, can_discard=False, can_write_zeroes=False)

    def close(self) -> None:
        """Release a lock this driver set (the kernel would keep it), then close."""
        with self._tray:
            if self._medium_locked and self.fd >= 0:
                try:
                    self._ioctls.ioctl(self.fd, CDROM_LOCKDOOR, 0)
                except OSError as exc:
                    log.warning("%s: unlocking on close failed: %s", self.filename, _why(exc))
                self._medium_locked = False
            super().close()
