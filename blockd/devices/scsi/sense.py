"""SCSI status and sense data: names, decoding, and the errors they become.

* :func:`status_name` names a status byte; host (``DID_*``) and driver
  (``DRIVER_*``) results of SG_IO say whether the command completed at all.
* :func:`decode_sense` understands fixed (0x70/0x71) and descriptor
  (0x72/0x73) sense data, current and deferred, with the INFORMATION field;
  :meth:`Sense.describe` turns it into text such as ``NOT READY: medium not
  present - tray open`` from SPC's ASC/ASCQ assignments.
* :func:`check_transport` and :func:`check_status` raise
  :class:`ScsiCommandError` (an :class:`OSError` whose errno is picked from the
  sense data) for callers that want "it worked or it raised".

Facts come from SPC-4 (status codes, sense formats, ASC/ASCQ names) and the
kernel header ``scsi/scsi_status.h``.  Sans-IO.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "ABORTED_COMMAND",
    "CHECK_CONDITION",
    "CONDITION_MET",
    "DATA_PROTECT",
    "GOOD",
    "HARDWARE_ERROR",
    "ILLEGAL_REQUEST",
    "MEDIUM_ERROR",
    "NOT_READY",
    "NO_SENSE",
    "RECOVERED_ERROR",
    "UNIT_ATTENTION",
    "CommandOutcome",
    "ScsiCommandError",
    "Sense",
    "TransportOutcome",
    "check_status",
    "check_transport",
    "decode_sense",
    "sense_key_name",
    "status_name",
]


class CommandOutcome(Protocol):
    """What :func:`check_status` needs of a result: the status byte and the sense bytes."""

    @property
    def status(self) -> int: ...

    @property
    def sense(self) -> bytes: ...


class TransportOutcome(Protocol):
    """What :func:`check_transport` needs: the adapter's and the mid layer's results."""

    @property
    def host_status(self) -> int: ...

    @property
    def driver_status(self) -> int: ...


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
    (0x00, 0x01): "filemark detected",
    (0x00, 0x02): "end-of-partition/medium detected",
    (0x00, 0x04): "beginning-of-partition/medium detected",
    (0x00, 0x05): "end-of-data detected",
    (0x00, 0x11): "audio play operation in progress",
    (0x00, 0x16): "operation in progress",
    (0x00, 0x1D): "ATA pass through information available",
    (0x01, 0x00): "no index/sector signal",
    (0x03, 0x00): "peripheral device write fault",
    (0x04, 0x09): "logical unit not ready, self-test in progress",
    (0x04, 0x0A): "logical unit not accessible, asymmetric access state transition",
    (0x04, 0x0B): "logical unit not accessible, target port in standby state",
    (0x04, 0x0C): "logical unit not accessible, target port in unavailable state",
    (0x04, 0x11): "logical unit not ready, notify (enable spinup) required",
    (0x04, 0x1B): "logical unit not ready, sanitize in progress",
    (0x04, 0x22): "logical unit not ready, power cycle required",
    (0x0B, 0x00): "warning",
    (0x0B, 0x01): "warning - specified temperature exceeded",
    (0x0C, 0x02): "write error - auto reallocation failed",
    (0x0C, 0x03): "write error - recommend reassignment",
    (0x0C, 0x07): "write error - recovery needed",
    (0x0C, 0x09): "write error - loss of streaming",
    (0x10, 0x00): "ID CRC or ECC error",
    (0x10, 0x01): "logical block guard check failed",
    (0x10, 0x02): "logical block application tag check failed",
    (0x10, 0x03): "logical block reference tag check failed",
    (0x11, 0x01): "read retries exhausted",
    (0x11, 0x02): "error too long to correct",
    (0x11, 0x04): "unrecovered read error - auto reallocate failed",
    (0x11, 0x0F): "error reading UPC/EAN number",
    (0x11, 0x10): "error reading ISRC number",
    (0x11, 0x14): "read error - LBA marked bad by application client",
    (0x12, 0x00): "address mark not found for ID field",
    (0x13, 0x00): "address mark not found for data field",
    (0x14, 0x00): "recorded entity not found",
    (0x14, 0x01): "record not found",
    (0x16, 0x00): "data synchronization mark error",
    (0x17, 0x00): "recovered data with no error correction applied",
    (0x17, 0x01): "recovered data with retries",
    (0x18, 0x00): "recovered data with error correction applied",
    (0x18, 0x01): "recovered data with error correction and retries applied",
    (0x19, 0x00): "defect list error",
    (0x1D, 0x00): "miscompare during verify operation",
    (0x20, 0x01): "access denied - initiator pending-enrolled",
    (0x21, 0x01): "invalid element address",
    (0x21, 0x02): "invalid address for write",
    (0x24, 0x01): "CDB decryption error",
    (0x26, 0x01): "parameter not supported",
    (0x26, 0x02): "parameter value invalid",
    (0x27, 0x01): "hardware write protected",
    (0x27, 0x02): "logical unit software write protected",
    (0x27, 0x07): "space allocation failed write protect",
    (0x28, 0x01): "import or export element accessed",
    (0x29, 0x01): "power on occurred",
    (0x29, 0x02): "SCSI bus reset occurred",
    (0x29, 0x03): "bus device reset function occurred",
    (0x29, 0x04): "device internal reset",
    (0x29, 0x07): "I_T nexus loss occurred",
    (0x2A, 0x00): "parameters changed",
    (0x2A, 0x02): "log parameters changed",
    (0x2A, 0x03): "reservations preempted",
    (0x2A, 0x09): "capacity data has changed",
    (0x2C, 0x00): "command sequence error",
    (0x2E, 0x00): "insufficient time for operation",
    (0x2F, 0x00): "commands cleared by another initiator",
    (0x30, 0x03): "cleaning cartridge installed",
    (0x30, 0x04): "cannot write medium - unknown format",
    (0x30, 0x05): "cannot write medium - incompatible format",
    (0x30, 0x06): "cannot format medium - incompatible medium",
    (0x30, 0x07): "cleaning failure",
    (0x31, 0x00): "medium format corrupted",
    (0x31, 0x01): "format command failed",
    (0x32, 0x00): "no defect spare location available",
    (0x34, 0x00): "enclosure failure",
    (0x35, 0x00): "enclosure services failure",
    (0x37, 0x00): "rounded parameter",
    (0x38, 0x07): "thin provisioning soft threshold reached",
    (0x39, 0x00): "saving parameters not supported",
    (0x3B, 0x0D): "medium destination element full",
    (0x3B, 0x0E): "medium source element empty",
    (0x3D, 0x00): "invalid bits in IDENTIFY message",
    (0x3E, 0x01): "logical unit failure",
    (0x3E, 0x02): "timeout on logical unit",
    (0x3F, 0x00): "target operating conditions have changed",
    (0x3F, 0x01): "microcode has been changed",
    (0x3F, 0x03): "inquiry data has changed",
    (0x3F, 0x0E): "reported luns data has changed",
    (0x40, 0x00): "RAM failure",
    (0x43, 0x00): "message error",
    (0x45, 0x00): "select or reselect failure",
    (0x47, 0x00): "SCSI parity error",
    (0x48, 0x00): "initiator detected error message received",
    (0x49, 0x00): "invalid message error",
    (0x4A, 0x00): "command phase error",
    (0x4B, 0x00): "data phase error",
    (0x4C, 0x00): "logical unit failed self-configuration",
    (0x4E, 0x00): "overlapped commands attempted",
    (0x51, 0x00): "erase failure",
    (0x53, 0x01): "unload tape failure",
    (0x55, 0x00): "system resource failure",
    (0x55, 0x03): "insufficient resources",
    (0x5A, 0x00): "operator request or state change input",
    (0x5A, 0x02): "operator selected write protect",
    (0x5A, 0x03): "operator selected write permit",
    (0x5B, 0x00): "log exception",
    (0x5C, 0x00): "RPL status change",
    (0x5D, 0x00): "failure prediction threshold exceeded",
    (0x5D, 0xFF): "failure prediction threshold exceeded (false)",
    (0x5E, 0x00): "low power condition on",
    (0x5E, 0x01): "idle condition activated by timer",
    (0x5E, 0x03): "standby condition activated by timer",
    (0x65, 0x00): "voltage fault",
    (0x72, 0x00): "session fixation error",
    (0x72, 0x03): "session fixation error - incomplete track in session",
    (0x73, 0x00): "CD control error",
    (0x73, 0x01): "power calibration area almost full",
    (0x73, 0x02): "power calibration area is full",
    (0x73, 0x03): "power calibration area error",
    (0x73, 0x04): "program memory area update failure",
    (0x73, 0x05): "program memory area is full",
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


def sense_key_name(key: int) -> str:
    """SPC's name of a sense key (``ILLEGAL REQUEST`` for 5)."""
    return _SENSE_KEYS[key & 0x0F]


@dataclass(frozen=True, slots=True)
class Sense:
    """Decoded sense data: what the device says went wrong."""

    response_code: int
    sense_key: int
    asc: int
    ascq: int
    information: int | None = None  # the INFORMATION field, when the device marked it valid
    raw: bytes = field(default=b"", compare=False, repr=False)  # the sense bytes as sent

    @property
    def descriptor_format(self) -> bool:
        return self.response_code in (_DESC_CURRENT, _DESC_DEFERRED)

    @property
    def deferred(self) -> bool:
        """True when the error belongs to an earlier command (response code 0x71/0x73)."""
        return self.response_code in (_FIXED_DEFERRED, _DESC_DEFERRED)

    @property
    def key_name(self) -> str:
        return sense_key_name(self.sense_key)

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
        return Sense(code, data[2] & 0x0F, asc, ascq, information, bytes(data))
    if code in (_DESC_CURRENT, _DESC_DEFERRED):
        key = data[1] & 0x0F
        asc = data[2] if len(data) > 2 else 0
        ascq = data[3] if len(data) > 3 else 0
        return Sense(code, key, asc, ascq, _information_descriptor(data), bytes(data))
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


def check_status(result: CommandOutcome, what: str) -> None:
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


def check_transport(result: TransportOutcome, what: str) -> None:
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

