"""One SCSI command through Linux's SG_IO ioctl (``scsi/sg.h``, interface version 3).

:func:`sg_io` works on a SCSI generic node (``/dev/sg0``) and on the block
nodes whose drivers accept SG_IO (``/dev/sr0``, ``/dev/sda``).  It blocks the
calling thread until the device answers or the timeout fires, so callers run it
off the event loop.  It raises :class:`OSError` only when the kernel refuses
the request itself (EPERM for a command the caller may not send, EINVAL,
ENOTTY on a non-SCSI descriptor, ENODEV once the device is gone); a command
the device answers with CHECK CONDITION is a result, not an exception.

Data moves without extra copies: ``data_out`` is handed to the kernel where it
lies, and a caller's ``data_in`` buffer is filled in place (the sg driver reads
straight into the NBD reply buffer).
"""

from __future__ import annotations

import ctypes
import fcntl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockd.devices._aligned_io import buffer_address
from blockd.devices._ioctl import SG_IO
from blockd.devices.base import Buffer, ScsiResult

__all__ = [
    "MAX_CDB_LEN",
    "MIN_CDB_LEN",
    "SENSE_BUFFER_LEN",
    "SgIoResult",
    "check_request",
    "sg_io",
]

SG_DXFER_NONE = -1
SG_DXFER_TO_DEV = -2
SG_DXFER_FROM_DEV = -3
SG_INTERFACE_ID = ord("S")
MIN_CDB_LEN = 6
MAX_CDB_LEN = 16  # the longest CDB of the command sets blockd speaks (READ(16), ...)
SENSE_BUFFER_LEN = 252  # SPC's largest sense data (8 header + 244 additional bytes)
MAX_TRANSFER = 0xFFFFFFFF  # dxfer_len is an unsigned int


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
    """What one SG_IO call returned: the device's answer plus the transport's.

    ``data`` holds the bytes that came back when SG_IO allocated the buffer;
    with a caller's ``data_in`` buffer it is empty and ``transferred`` counts
    what landed there.
    """

    status: int
    sense: bytes = b""
    data: bytes = b""
    residual: int = 0
    host_status: int = 0
    driver_status: int = 0
    duration_ms: int = 0
    duration_ns: int = 0
    transferred: int = 0

    def to_scsi_result(self) -> ScsiResult:
        """The driver-neutral result the Passthrough protocol returns."""
        return ScsiResult(
            status=self.status, sense=self.sense, data=self.data, residual=self.residual,
            duration_ns=self.duration_ns,
        )


IoctlFunc = Callable[[int, int, Any, bool], Any]


def check_request(cdb: bytes, data_out: Buffer, data_in_len: int, timeout_ms: int) -> None:
    """Raise ValueError for a request SG_IO cannot express."""
    if not MIN_CDB_LEN <= len(cdb) <= MAX_CDB_LEN:
        raise ValueError(f"a CDB has {MIN_CDB_LEN} to {MAX_CDB_LEN} bytes, not {len(cdb)}")
    out_len = memoryview(data_out).nbytes
    if out_len and data_in_len:
        raise ValueError("a command moves data in one direction only")
    if data_in_len < 0 or max(out_len, data_in_len) > MAX_TRANSFER:
        raise ValueError(f"bad transfer length {data_in_len or out_len}")
    if not 0 <= timeout_ms <= 0xFFFFFFFF:
        raise ValueError(f"bad timeout {timeout_ms} ms")


def sg_io(
    fd: int,
    cdb: bytes,
    data_out: Buffer = b"",
    data_in_len: int = 0,
    timeout_ms: int = 30_000,
    *,
    data_in: memoryview | None = None,
    sense_len: int = SENSE_BUFFER_LEN,
    ioctl: IoctlFunc = fcntl.ioctl,
) -> SgIoResult:
    """Send one command with SG_IO and wait for it (the calling thread blocks).

    ``data_out`` goes to the device; or ``data_in_len`` bytes may come back
    (returned in ``data``), or ``data_in`` (a writable contiguous buffer) is
    filled in place.  One direction per command.  Raises ValueError for
    malformed arguments and OSError when the kernel refuses the ioctl.
    ``ioctl`` is replaceable for tests.
    """
    if data_in is not None:
        if data_in_len:
            raise ValueError("give data_in or data_in_len, not both")
        if data_in.readonly or not data_in.contiguous:
            raise ValueError("data_in must be a writable contiguous buffer")
    in_len = data_in.nbytes if data_in is not None else data_in_len
    check_request(cdb, data_out, in_len, timeout_ms)
    if not 0 < sense_len <= 0xFF:
        raise ValueError(f"bad sense buffer length {sense_len}")

    command = ctypes.create_string_buffer(bytes(cdb), len(cdb))
    sense = ctypes.create_string_buffer(sense_len)
    allocated: ctypes.Array[ctypes.c_char] | None = None
    out_len = memoryview(data_out).nbytes
    address: int | None = None
    if out_len:
        direction, length = SG_DXFER_TO_DEV, out_len
        address = buffer_address(data_out)
    elif data_in is not None and in_len:
        direction, length = SG_DXFER_FROM_DEV, in_len
        address = buffer_address(data_in)
    elif in_len:
        direction, length = SG_DXFER_FROM_DEV, in_len
        allocated = ctypes.create_string_buffer(in_len)
        address = ctypes.addressof(allocated)
    else:
        direction, length = SG_DXFER_NONE, 0

    hdr = _SgIoHdr()
    hdr.interface_id = SG_INTERFACE_ID
    hdr.dxfer_direction = direction
    hdr.cmd_len = len(cdb)
    hdr.mx_sb_len = sense_len
    hdr.dxfer_len = length
    hdr.dxferp = address
    hdr.cmdp = ctypes.addressof(command)
    hdr.sbp = ctypes.addressof(sense)
    hdr.timeout = timeout_ms
    # The kernel writes the results into hdr (copied back because mutate is
    # True) and the sense and data straight into the buffers, which the
    # caller's references and the locals keep alive until it returns.
    started = time.monotonic_ns()
    ioctl(fd, SG_IO, hdr, True)
    elapsed = time.monotonic_ns() - started

    residual = max(0, min(hdr.resid, length))
    received = b""
    if allocated is not None:
        received = allocated.raw[: length - residual]
    return SgIoResult(
        status=hdr.status,
        sense=sense.raw[: min(hdr.sb_len_wr, sense_len)],
        data=received,
        residual=residual,
        host_status=hdr.host_status,
        driver_status=hdr.driver_status,
        duration_ms=hdr.duration,
        duration_ns=elapsed,
        transferred=length - residual,
    )
