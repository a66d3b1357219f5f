"""SCSI commands through Linux SG_IO: command blocks, ``sg_io_hdr``, sense data.

Everything here is sans-IO except :func:`sg_io`, which performs one SG_IO
ioctl (``scsi/sg.h``, version 3 interface) on a descriptor of a SCSI block
device (``/dev/sr0``) or a SCSI generic node (``/dev/sg0``).  The ``host_cdrom``
driver uses it for the tray and lock commands the cdrom layer refuses, and the
``sg`` driver builds on the same pieces.

* CDB builders return ``bytes`` ready to send (:func:`start_stop_unit`,
  :func:`prevent_allow_medium_removal`, ...).
* :func:`sg_io` fills a private ctypes ``sg_io_hdr``, runs the ioctl and returns
  an :class:`SgIoResult`.  It raises :class:`OSError` only when the kernel
  refuses the request itself (EPERM for a command the caller may not send,
  EINVAL, ENOTTY on a non-SCSI descriptor, ...); a command the device answers
  with CHECK CONDITION is a result, not an exception.
* :func:`decode_sense` understands fixed (0x70/0x71) and descriptor
  (0x72/0x73) sense data; :meth:`Sense.describe` turns it into text such as
  ``NOT READY: medium not present - tray open``.
* :func:`check_transport` and :func:`check_status` raise
  :class:`ScsiCommandError` (an :class:`OSError` with an errno picked from the
  sense data) for callers that want "it worked or it raised".

Facts come from SPC (status codes, sense formats, ASC/ASCQ names), MMC (START
STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL fields) and the kernel headers
``scsi/sg.h`` and ``scsi/scsi_status.h``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockd.devices._ioctl import SG_IO
from blockd.devices.base import ScsiResult

__all__ = [
    "CHECK_CONDITION",
    "GOOD",
    "INQUIRY",
    "PREVENT_ALLOW_MEDIUM_REMOVAL",
    "READ_CAPACITY_10",
    "REQUEST_SENSE",
    "SENSE_BUFFER_LEN",
    "START_STOP_UNIT",
    "TEST_UNIT_READY",
    "ScsiCommandError",
    "Sense",
    "SgIoResult",
    "check_request",
    "check_status",
    "check_transport",
    "decode_sense",
    "inquiry",
    "opcode_name",
    "prevent_allow_medium_removal",
    "read_capacity_10",
    "request_sense",
    "sg_io",
    "start_stop_unit",
    "status_name",
    "test_unit_ready",
]

# -- operation codes (SPC / SBC / MMC) ------------------------------------------------

TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
INQUIRY = 0x12
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY_10 = 0x25

_OPCODE_NAMES = {
    TEST_UNIT_READY: "TEST UNIT READY",
    REQUEST_SENSE: "REQUEST SENSE",
    INQUIRY: "INQUIRY",
    START_STOP_UNIT: "START STOP UNIT",
    PREVENT_ALLOW_MEDIUM_REMOVAL: "PREVENT ALLOW MEDIUM REMOVAL",
    READ_CAPACITY_10: "READ CAPACITY(10)",
    0x28: "READ(10)",
    0x2A: "WRITE(10)",
    0x35: "SYNCHRONIZE CACHE(10)",
    0x46: "GET CONFIGURATION",
    0x4A: "GET EVENT STATUS NOTIFICATION",
    0x5A: "MODE SENSE(10)",
    0x88: "READ(16)",
    0x8A: "WRITE(16)",
    0x9E: "SERVICE ACTION IN(16)",
}


def opcode_name(opcode: int) -> str:
    """A readable name for an operation code (``opcode 0xNN`` when unknown)."""
    return _OPCODE_NAMES.get(opcode, f"opcode 0x{opcode:02x}")


# -- command descriptor blocks -------------------------------------------------------


def test_unit_ready() -> bytes:
    """TEST UNIT READY: GOOD when a medium is in and the unit is ready."""
    return bytes(6)


def request_sense(allocation_length: int = 252) -> bytes:
    """REQUEST SENSE(6) asking for up to ``allocation_length`` bytes of sense data."""
    _check_range("allocation length", allocation_length, 0xFF)
    return bytes((REQUEST_SENSE, 0, 0, 0, allocation_length, 0))


def inquiry(allocation_length: int = 96, vpd_page: int | None = None) -> bytes:
    """INQUIRY: standard data, or the vital product data page ``vpd_page`` (EVPD=1)."""
    _check_range("allocation length", allocation_length, 0xFFFF)
    evpd, page = (0, 0) if vpd_page is None else (1, vpd_page)
    _check_range("VPD page", page, 0xFF)
    return bytes((INQUIRY, evpd, page, allocation_length >> 8, allocation_length & 0xFF, 0))


def start_stop_unit(*, start: bool, load_eject: bool, immediate: bool = False) -> bytes:
    """START STOP UNIT.

    With ``load_eject`` the medium moves: ``start=False`` ejects (opens the
    tray), ``start=True`` loads (closes the tray).  ``immediate`` makes the
    device answer before the operation has finished.
    """
    byte4 = (0x02 if load_eject else 0) | (0x01 if start else 0)
    return bytes((START_STOP_UNIT, 0x01 if immediate else 0, 0, 0, byte4, 0))


def prevent_allow_medium_removal(prevent: bool) -> bytes:
    """PREVENT ALLOW MEDIUM REMOVAL: lock (``True``) or unlock the medium."""
    return bytes((PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0x01 if prevent else 0x00, 0))


def read_capacity_10() -> bytes:
    """READ CAPACITY(10): last logical block address and block length (8 bytes back)."""
    return bytes((READ_CAPACITY_10,) + (0,) * 9)


def _check_range(what: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} is outside 0..{limit}")


# -- status ----------------------------------------------------------------------------

GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04

_STATUS_NAMES = {
    GOOD: "GOOD",
    CHECK_CONDITION: "CHECK CONDITION",
    CONDITION_MET: "CONDITION MET",
    0x08: "BUSY",
    0x18: "RESERVATION CONFLICT",
    0x28: "TASK SET FULL",
    0x30: "ACA ACTIVE",
    0x40: "TASK ABORTED",
}


def status_name(status: int) -> str:
    """The SAM name of a SCSI status byte."""
    return _STATUS_NAMES.get(status, f"status 0x{status:02x}")


# Host adapter results (scsi/scsi_status.h, DID_*): the command did not complete.
_HOST_STATUS_NAMES = {
    0x01: "DID_NO_CONNECT",
    0x02: "DID_BUS_BUSY",
    0x03: "DID_TIME_OUT",
    0x04: "DID_BAD_TARGET",
    0x05: "DID_ABORT",
    0x06: "DID_PARITY",
    0x07: "DID_ERROR",
    0x08: "DID_RESET",
    0x09: "DID_BAD_INTR",
    0x0A: "DID_PASSTHROUGH",
    0x0B: "DID_SOFT_ERROR",
    0x0C: "DID_IMM_RETRY",
    0x0D: "DID_REQUEUE",
    0x0E: "DID_TRANSPORT_DISRUPTED",
    0x0F: "DID_TRANSPORT_FAILFAST",
}
_DID_TIME_OUT = 0x03
_DID_NO_CONNECT = 0x01

# Driver results (low nibble of driver_status).  DRIVER_SENSE only says that
# sense data came back; the others mean the mid layer gave up on the command.
_DRIVER_SENSE = 0x08
_DRIVER_TIMEOUT = 0x06
_DRIVER_STATUS_NAMES = {
    0x01: "DRIVER_BUSY",
    0x02: "DRIVER_SOFT",
    0x03: "DRIVER_MEDIA",
    0x04: "DRIVER_ERROR",
    0x05: "DRIVER_INVALID",
    _DRIVER_TIMEOUT: "DRIVER_TIMEOUT",
    0x07: "DRIVER_HARD",
}

# -- sense data ------------------------------------------------------------------------

SENSE_BUFFER_LEN = 64  # more than the 18 bytes of fixed sense and 252 is never needed here

_SENSE_KEYS = (
    "NO SENSE",
    "RECOVERED ERROR",
    "NOT READY",
    "MEDIUM ERROR",
    "HARDWARE ERROR",
    "ILLEGAL REQUEST",
    "UNIT ATTENTION",
    "DATA PROTECT",
    "BLANK CHECK",
    "VENDOR SPECIFIC",
    "COPY ABORTED",
    "ABORTED COMMAND",
    "EQUAL",
    "VOLUME OVERFLOW",
    "MISCOMPARE",
    "COMPLETED",
)
NO_SENSE, RECOVERED_ERROR, NOT_READY, MEDIUM_ERROR, HARDWARE_ERROR = range(5)
ILLEGAL_REQUEST, UNIT_ATTENTION, DATA_PROTECT = 5, 6, 7
ABORTED_COMMAND = 0x0B

# The additional sense codes a CD/DVD drive and a removable medium commonly
# report (SPC's ASC/ASCQ assignments), in SPC's words, lower-cased.
_ASC_ASCQ: dict[tuple[int, int], str] = {
    (0x00, 0x00): "no additional sense information",
    (0x00, 0x06): "I/O process terminated",
    (0x02, 0x00): "no seek complete",
    (0x04, 0x00): "logical unit not ready, cause not reportable",
    (0x04, 0x01): "logical unit is in process of becoming ready",
    (0x04, 0x02): "logical unit not ready, initializing command required",
    (0x04, 0x03): "logical unit not ready, manual intervention required",
    (0x04, 0x04): "logical unit not ready, format in progress",
    (0x04, 0x07): "logical unit not ready, operation in progress",
    (0x04, 0x08): "logical unit not ready, long write in progress",
    (0x05, 0x00): "logical unit does not respond to selection",
    (0x06, 0x00): "no reference position found",
    (0x08, 0x00): "logical unit communication failure",
    (0x08, 0x01): "logical unit communication time-out",
    (0x09, 0x00): "track following error",
    (0x0C, 0x00): "write error",
    (0x11, 0x00): "unrecovered read error",
    (0x11, 0x05): "L-EC uncorrectable error",
    (0x11, 0x06): "CIRC unrecovered error",
    (0x15, 0x00): "random positioning error",
    (0x1A, 0x00): "parameter list length error",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x27, 0x00): "write protected",
    (0x28, 0x00): "not ready to ready change, medium may have changed",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x2A, 0x01): "mode parameters changed",
    (0x30, 0x00): "incompatible medium installed",
    (0x30, 0x01): "cannot read medium - unknown format",
    (0x30, 0x02): "cannot read medium - incompatible format",
    (0x3A, 0x00): "medium not present",
    (0x3A, 0x01): "medium not present - tray closed",
    (0x3A, 0x02): "medium not present - tray open",
    (0x3A, 0x03): "medium not present - loadable",
    (0x3E, 0x00): "logical unit has not self-configured yet",
    (0x44, 0x00): "internal target failure",
    (0x53, 0x00): "media load or eject failed",
    (0x53, 0x02): "medium removal prevented",
    (0x57, 0x00): "unable to recover table-of-contents",
    (0x5A, 0x01): "operator medium removal request",
    (0x63, 0x00): "end of user area encountered on this track",
    (0x64, 0x00): "illegal mode for this track",
    (0x6F, 0x00): "copy protection key exchange failure - authentication failure",
    (0x6F, 0x01): "copy protection key exchange failure - key not present",
    (0x6F, 0x02): "copy protection key exchange failure - key not established",
    (0x6F, 0x03): "read of scrambled sector without authentication",
}
# What an ASC means when its ASCQ is not in the table above.
_ASC_ONLY = {
    0x04: "logical unit not ready",
    0x11: "unrecovered read error",
    0x28: "not ready to ready change",
    0x29: "reset occurred",
    0x30: "incompatible medium",
    0x3A: "medium not present",
    0x53: "media load, eject or removal problem",
}

_FIXED_CURRENT, _FIXED_DEFERRED = 0x70, 0x71
_DESC_CURRENT, _DESC_DEFERRED = 0x72, 0x73
_INFORMATION_DESCRIPTOR = 0x00


@dataclass(frozen=True, slots=True)
class Sense:
    """Decoded sense data: what the device says went wrong."""

    response_code: int
    sense_key: int
    asc: int
    ascq: int
    information: int | None = None  # the INFORMATION field, when the device marked it valid

    @property
    def descriptor_format(self) -> bool:
        return self.response_code in (_DESC_CURRENT, _DESC_DEFERRED)

    @property
    def deferred(self) -> bool:
        """True when the error belongs to an earlier command (response code 0x71/0x73)."""
        return self.response_code in (_FIXED_DEFERRED, _DESC_DEFERRED)

    @property
    def key_name(self) -> str:
        return _SENSE_KEYS[self.sense_key & 0x0F]

    @property
    def reason(self) -> str:
        """The additional sense code in words."""
        known = _ASC_ASCQ.get((self.asc, self.ascq))
        if known is not None:
            return known
        codes = f"ASC 0x{self.asc:02x} ASCQ 0x{self.ascq:02x}"
        if self.asc >= 0x80 or self.ascq >= 0x80:
            return f"vendor specific {codes}"
        general = _ASC_ONLY.get(self.asc)
        return f"{general} ({codes})" if general else codes

    def describe(self) -> str:
        """One line for people, e.g. ``ILLEGAL REQUEST: medium removal prevented``."""
        text = self.key_name
        if (self.asc, self.ascq) != (0, 0):
            text = f"{text}: {self.reason}"
        return f"deferred error: {text}" if self.deferred else text

    def to_errno(self) -> int:
        """The errno that best says what happened, for callers that map errors to errnos."""
        key = self.sense_key
        if self.asc == 0x3A:
            return errno.ENOMEDIUM
        if (self.asc, self.ascq) == (0x53, 0x02):
            return errno.EBUSY
        if key == NOT_READY:
            return errno.EAGAIN
        if key == ILLEGAL_REQUEST:
            return errno.EOPNOTSUPP if (self.asc, self.ascq) == (0x20, 0x00) else errno.EINVAL
        if key == DATA_PROTECT:
            return errno.EROFS
        if key == UNIT_ATTENTION:
            return errno.EAGAIN
        return errno.EIO


def decode_sense(data: bytes) -> Sense | None:
    """Decode fixed or descriptor sense data; None for empty or unknown formats.

    Short buffers are accepted: fields the device did not send read as zero.
    """
    if len(data) < 2:
        return None
    code = data[0] & 0x7F
    if code in (_FIXED_CURRENT, _FIXED_DEFERRED):
        if len(data) < 3:
            return None
        # Byte 7 says how many bytes follow it; never read beyond what was sent.
        end = min(len(data), 8 + data[7]) if len(data) > 7 else len(data)
        asc = data[12] if end > 12 else 0
        ascq = data[13] if end > 13 else 0
        information = None
        if data[0] & 0x80 and len(data) >= 7:
            information = int.from_bytes(data[3:7], "big")
        return Sense(code, data[2] & 0x0F, asc, ascq, information)
    if code in (_DESC_CURRENT, _DESC_DEFERRED):
        key = data[1] & 0x0F
        asc = data[2] if len(data) > 2 else 0
        ascq = data[3] if len(data) > 3 else 0
        return Sense(code, key, asc, ascq, _information_descriptor(data))
    return None


def _information_descriptor(data: bytes) -> int | None:
    """The INFORMATION descriptor's value in descriptor-format sense, if valid."""
    if len(data) < 8:
        return None
    end = min(len(data), 8 + data[7])
    pos = 8
    while pos + 2 <= end:
        kind, length = data[pos], data[pos + 1]
        body = data[pos + 2 : pos + 2 + length]
        if kind == _INFORMATION_DESCRIPTOR and len(body) >= 10 and body[0] & 0x80:
            return int.from_bytes(body[2:10], "big")
        pos += 2 + length
    return None


# -- errors ----------------------------------------------------------------------------


class ScsiCommandError(OSError):
    """A SCSI command that failed: the device's status and decoded sense come along.

    ``errno`` is picked from the sense data (ENOMEDIUM for "medium not
    present", EBUSY for "medium removal prevented", ...), EIO otherwise;
    ``strerror`` is the full message, e.g. ``ejecting /dev/sr0: ILLEGAL
    REQUEST: medium removal prevented``.
    """

    def __init__(
        self, err: int, message: str, *, status: int = GOOD, sense: Sense | None = None
    ) -> None:
        super().__init__(err, message)
        self.status = status
        self.sense = sense

    def __str__(self) -> str:
        return str(self.strerror)


def check_status(result: ScsiResult | SgIoResult, what: str) -> None:
    """Raise ScsiCommandError unless the device answered GOOD (or CONDITION MET)."""
    if result.status in (GOOD, CONDITION_MET):
        return
    sense = decode_sense(result.sense)
    if sense is not None:
        reason = sense.describe()
        err = sense.to_errno()
    else:
        reason = f"SCSI {status_name(result.status)}"
        err = errno.EBUSY if result.status in (0x08, 0x18, 0x28) else errno.EIO
    raise ScsiCommandError(err, f"{what}: {reason}", status=result.status, sense=sense)


def check_transport(result: SgIoResult, what: str) -> None:
    """Raise OSError when the command never completed (adapter or mid-layer failure).

    A device's own answer, even CHECK CONDITION, is not a transport failure.
    """
    if result.host_status:
        name = _HOST_STATUS_NAMES.get(result.host_status, f"host status 0x{result.host_status:x}")
        if result.host_status == _DID_TIME_OUT:
            err = errno.ETIMEDOUT
        elif result.host_status == _DID_NO_CONNECT:
            err = errno.ENODEV
        else:
            err = errno.EIO
        raise OSError(err, f"{what}: the command did not complete ({name})")
    driver = result.driver_status & 0x0F
    if driver and driver != _DRIVER_SENSE:
        name = _DRIVER_STATUS_NAMES.get(driver, f"driver status 0x{driver:x}")
        err = errno.ETIMEDOUT if driver == _DRIVER_TIMEOUT else errno.EIO
        raise OSError(err, f"{what}: the command did not complete ({name})")


# -- SG_IO -----------------------------------------------------------------------------

SG_DXFER_NONE = -1
SG_DXFER_TO_DEV = -2
SG_DXFER_FROM_DEV = -3
SG_INTERFACE_ID = ord("S")
MAX_CDB_LEN = 255  # cmd_len is one byte; the kernel caps it lower (32 today)


class _SgIoHdr(ctypes.Structure):
    """``struct sg_io_hdr`` of scsi/sg.h (88 bytes on 64-bit Linux, 64 on i386)."""

    _fields_ = (
        ("interface_id", ctypes.c_int),  # 'S'
        ("dxfer_direction", ctypes.c_int),  # SG_DXFER_*
        ("cmd_len", ctypes.c_ubyte),
        ("mx_sb_len", ctypes.c_ubyte),  # room at sbp
        ("iovec_count", ctypes.c_ushort),  # 0: dxferp is a plain buffer
        ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p),
        ("cmdp", ctypes.c_void_p),
        ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint),  # milliseconds
        ("flags", ctypes.c_uint),
        ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p),
        ("status", ctypes.c_ubyte),  # out: SCSI status byte
        ("masked_status", ctypes.c_ubyte),
        ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte),  # out: sense bytes written
        ("host_status", ctypes.c_ushort),  # out: DID_*
        ("driver_status", ctypes.c_ushort),  # out: DRIVER_*
        ("resid", ctypes.c_int),  # out: dxfer_len minus bytes transferred
        ("duration", ctypes.c_uint),  # out: milliseconds
        ("info", ctypes.c_uint),  # out: SG_INFO_*
    )


@dataclass(frozen=True, slots=True)
class SgIoResult:
    """What one SG_IO call returned: the device's answer plus the transport's."""

    status: int
    sense: bytes = b""
    data: bytes = b""
    residual: int = 0
    host_status: int = 0
    driver_status: int = 0
    duration_ms: int = 0

    def to_scsi_result(self) -> ScsiResult:
        """The driver-neutral result the Passthrough protocol returns."""
        return ScsiResult(
            status=self.status, sense=self.sense, data=self.data, residual=self.residual
        )


IoctlFunc = Callable[[int, int, Any, bool], Any]


def check_request(cdb: bytes, data_out: bytes, data_in_len: int, timeout_ms: int) -> None:
    """Raise ValueError for a request SG_IO cannot express."""
    if not 6 <= len(cdb) <= MAX_CDB_LEN:
        raise ValueError(f"a CDB has 6 to {MAX_CDB_LEN} bytes, not {len(cdb)}")
    if data_out and data_in_len:
        raise ValueError("a command moves data in one direction only")
    if data_in_len < 0 or max(len(data_out), data_in_len) > 0xFFFFFFFF:
        raise ValueError(f"bad transfer length {data_in_len or len(data_out)}")
    if not 0 <= timeout_ms <= 0xFFFFFFFF:
        raise ValueError(f"bad timeout {timeout_ms} ms")


def sg_io(
    fd: int,
    cdb: bytes,
    data_out: bytes = b"",
    data_in_len: int = 0,
    timeout_ms: int = 30_000,
    *,
    sense_len: int = SENSE_BUFFER_LEN,
    ioctl: IoctlFunc = fcntl.ioctl,
) -> SgIoResult:
    """Send one command with SG_IO and wait for it (the calling thread blocks).

    ``data_out`` goes to the device, or ``data_in_len`` bytes may come back;
    not both.  Raises ValueError for malformed arguments and OSError when
    the kernel refuses the ioctl.  ``ioctl`` is replaceable for tests.
    """
    check_request(cdb, data_out, data_in_len, timeout_ms)
    if not 0 < sense_len <= 0xFF:
        raise ValueError(f"bad sense buffer length {sense_len}")

    command = ctypes.create_string_buffer(bytes(cdb), len(cdb))
    sense = ctypes.create_string_buffer(sense_len)
    data: ctypes.Array[ctypes.c_char] | None = None
    if data_out:
        direction, length = SG_DXFER_TO_DEV, len(data_out)
        data = ctypes.create_string_buffer(bytes(data_out), length)
    elif data_in_len:
        direction, length = SG_DXFER_FROM_DEV, data_in_len
        data = ctypes.create_string_buffer(length)
    else:
        direction, length = SG_DXFER_NONE, 0

    hdr = _SgIoHdr()
    hdr.interface_id = SG_INTERFACE_ID
    hdr.dxfer_direction = direction
    hdr.cmd_len = len(cdb)
    hdr.mx_sb_len = sense_len
    hdr.dxfer_len = length
    hdr.dxferp = ctypes.addressof(data) if data is not None else None
    hdr.cmdp = ctypes.addressof(command)
    hdr.sbp = ctypes.addressof(sense)
    hdr.timeout = timeout_ms
    # The kernel writes the results into hdr (copied back because mutate is
    # True) and the sense and data straight into the buffers above, which the
    # locals keep alive until it returns.
    ioctl(fd, SG_IO, hdr, True)

    residual = max(0, min(hdr.resid, length))
    received = b""
    if direction == SG_DXFER_FROM_DEV and data is not None:
        received = data.raw[: length - residual]
    return SgIoResult(
        status=hdr.status,
        sense=sense.raw[: min(hdr.sb_len_wr, sense_len)],
        data=received,
        residual=residual,
        host_status=hdr.host_status,
        driver_status=hdr.driver_status,
        duration_ms=hdr.duration,
    )
