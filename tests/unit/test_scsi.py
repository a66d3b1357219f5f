"""SCSI helpers: CDB bytes, the sg_io_hdr layout, SG_IO round trips and sense decoding."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from typing import Any

import pytest

from blockd.devices import scsi as _scsi
from blockd.devices._ioctl import SG_IO
from blockd.devices.base import ScsiResult
from blockd.devices.scsi import (
    ScsiCommandError,
    Sense,
    SgIoResult,
    check_status,
    check_transport,
    decode_sense,
    sg_io,
    sgio,
)


def fixed_sense(key: int, asc: int, ascq: int, *, info: int | None = None) -> bytes:
    sense = bytearray(18)
    sense[0] = 0x70 | (0x80 if info is not None else 0)
    sense[2] = key
    if info is not None:
        sense[3:7] = info.to_bytes(4, "big")
    sense[7] = 10  # additional sense length: bytes 8..17
    sense[12], sense[13] = asc, ascq
    return bytes(sense)


# -- command blocks -------------------------------------------------------------------


def test_start_stop_unit_bits() -> None:
    assert _scsi.start_stop_unit(start=False, load_eject=True) == bytes.fromhex("1b0000000200")
    assert _scsi.start_stop_unit(start=True, load_eject=True) == bytes.fromhex("1b0000000300")
    assert _scsi.start_stop_unit(start=True, load_eject=False) == bytes.fromhex("1b0000000100")
    assert _scsi.start_stop_unit(start=False, load_eject=True, immediate=True) == bytes.fromhex(
        "1b0100000200"
    )


def test_prevent_allow_medium_removal_bits() -> None:
    assert _scsi.prevent_allow_medium_removal(True) == bytes.fromhex("1e0000000100")
    assert _scsi.prevent_allow_medium_removal(False) == bytes.fromhex("1e0000000000")


def test_other_command_blocks() -> None:
    assert _scsi.test_unit_ready() == bytes(6)
    assert _scsi.request_sense(18) == bytes.fromhex("030000001200")
    assert _scsi.inquiry() == bytes.fromhex("120000006000")
    assert _scsi.inquiry(0x1FC, vpd_page=0x80) == bytes.fromhex("120180 01fc00".replace(" ", ""))
    assert _scsi.read_capacity_10() == bytes.fromhex("25") + bytes(9)
    with pytest.raises(ValueError):
        _scsi.request_sense(256)
    with pytest.raises(ValueError):
        _scsi.inquiry(vpd_page=0x100)


def test_names() -> None:
    assert _scsi.opcode_name(0x1B) == "START STOP UNIT"
    assert _scsi.opcode_name(0xEE) == "opcode 0xee"
    assert _scsi.status_name(2) == "CHECK CONDITION"
    assert _scsi.status_name(0x77) == "status 0x77"


# -- sg_io_hdr --------------------------------------------------------------------------

# struct sg_io_hdr on x86_64 (scsi/sg.h): offsets of every member and the size.
SG_IO_HDR_OFFSETS = {
    "interface_id": 0,
    "dxfer_direction": 4,
    "cmd_len": 8,
    "mx_sb_len": 9,
    "iovec_count": 10,
    "dxfer_len": 12,
    "dxferp": 16,
    "cmdp": 24,
    "sbp": 32,
    "timeout": 40,
    "flags": 44,
    "pack_id": 48,
    "usr_ptr": 56,
    "status": 64,
    "masked_status": 65,
    "msg_status": 66,
    "sb_len_wr": 67,
    "host_status": 68,
    "driver_status": 70,
    "resid": 72,
    "duration": 76,
    "info": 80,
}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="layout pinned for x86_64")
def test_sg_io_hdr_layout_x86_64() -> None:
    hdr = sgio._SgIoHdr
    assert ctypes.sizeof(hdr) == 88
    offsets = {name: getattr(hdr, name).offset for name, _ in hdr._fields_}
    assert offsets == SG_IO_HDR_OFFSETS


class FakeSgIoctl:
    """Stands in for fcntl.ioctl: reads the header at the pinned offsets, answers like sg."""

    def __init__(
        self,
        *,
        status: int = 0,
        sense: bytes = b"",
        data: bytes = b"",
        resid: int = 0,
        host_status: int = 0,
        driver_status: int = 0,
    ) -> None:
        self.reply = (status, sense, data, resid, host_status, driver_status)
        self.seen: dict[str, Any] = {}

    def __call__(self, fd: int, request: int, hdr: Any, mutate: bool) -> int:
        raw = ctypes.string_at(ctypes.addressof(hdr), ctypes.sizeof(hdr))
        interface_id, direction = struct.unpack_from("<ii", raw, 0)
        cmd_len, mx_sb_len, iovec_count, dxfer_len = struct.unpack_from("<BBHI", raw, 8)
        dxferp, cmdp, sbp = struct.unpack_from("<QQQ", raw, 16)
        (timeout,) = struct.unpack_from("<I", raw, 40)
        self.seen = {
            "fd": fd,
            "request": request,
            "mutate": mutate,
            "interface_id": interface_id,
            "direction": direction,
            "mx_sb_len": mx_sb_len,
            "iovec_count": iovec_count,
            "dxfer_len": dxfer_len,
            "timeout": timeout,
            "cdb": ctypes.string_at(cmdp, cmd_len),
        }
        status, sense, data, resid, host_status, driver_status = self.reply
        if direction == sgio.SG_DXFER_TO_DEV:
            self.seen["data_out"] = ctypes.string_at(dxferp, dxfer_len)
        if direction == sgio.SG_DXFER_FROM_DEV and data:
            ctypes.memmove(dxferp, data, min(len(data), dxfer_len))
        ctypes.memmove(sbp, sense, min(len(sense), mx_sb_len))
        out = struct.pack(
            "<BBBBHHiII", status, 0, 0, len(sense), host_status, driver_status, resid, 7, 0
        )
        ctypes.memmove(ctypes.addressof(hdr) + 64, out, len(out))
        return 0


@pytest.mark.skipif(platform.machine() != "x86_64", reason="layout pinned for x86_64")
def test_sg_io_fills_the_header_and_reads_the_answer() -> None:
    sense = fixed_sense(2, 0x3A, 0x02)
    fake = FakeSgIoctl(status=2, sense=sense, data=b"\x11\x22\x33\x44", resid=92)
    result = sg_io(7, _scsi.inquiry(96), data_in_len=96, timeout_ms=1234, ioctl=fake)
    assert fake.seen == {
        "fd": 7,
        "request": SG_IO,
        "mutate": True,
        "interface_id": ord("S"),
        "direction": sgio.SG_DXFER_FROM_DEV,
        "mx_sb_len": _scsi.SENSE_BUFFER_LEN,
        "iovec_count": 0,
        "dxfer_len": 96,
        "timeout": 1234,
        "cdb": bytes.fromhex("120000006000"),
    }
    assert result.duration_ns > 0
    assert result == SgIoResult(
        status=2, sense=sense, data=b"\x11\x22\x33\x44", residual=92, duration_ms=7,
        duration_ns=result.duration_ns, transferred=4,
    )
    assert result.to_scsi_result() == ScsiResult(
        2, sense, b"\x11\x22\x33\x44", 92, result.duration_ns)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="layout pinned for x86_64")
def test_sg_io_fills_a_caller_buffer_in_place() -> None:
    fake = FakeSgIoctl(data=b"\x11\x22\x33\x44", resid=0)
    target = bytearray(b"\xee" * 8)
    view = memoryview(target)[2:6]
    result = sg_io(7, _scsi.read_write(False, 0, 1), data_in=view, ioctl=fake)
    assert target == bytearray(b"\xee\xee\x11\x22\x33\x44\xee\xee")
    assert result.data == b"" and result.transferred == 4
    with pytest.raises(ValueError, match="writable"):
        sg_io(7, _scsi.test_unit_ready(), data_in=memoryview(b"1234"), ioctl=fake)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="layout pinned for x86_64")
def test_sg_io_without_data_and_with_data_out() -> None:
    fake = FakeSgIoctl()
    result = sg_io(3, _scsi.test_unit_ready(), ioctl=fake)
    assert fake.seen["direction"] == sgio.SG_DXFER_NONE and fake.seen["dxfer_len"] == 0
    assert result.status == 0 and result.sense == b"" and result.data == b""

    sg_io(3, bytes.fromhex("2a0000000000000001 00".replace(" ", "")), data_out=b"abc", ioctl=fake)
    assert fake.seen["direction"] == sgio.SG_DXFER_TO_DEV
    assert fake.seen["data_out"] == b"abc" and fake.seen["dxfer_len"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cdb": b"\x00" * 5}, "6 to 16 bytes"),
        ({"cdb": b"\x00" * 17}, "6 to 16 bytes"),
        ({"cdb": bytes(6), "data_out": b"x", "data_in_len": 4}, "one direction"),
        ({"cdb": bytes(6), "data_in_len": -1}, "bad transfer length"),
        ({"cdb": bytes(6), "timeout_ms": -5}, "bad timeout"),
    ],
)
def test_sg_io_rejects_malformed_requests(kwargs: dict[str, Any], message: str) -> None:
    def never(*args: Any) -> int:
        raise AssertionError("the ioctl must not run")

    with pytest.raises(ValueError, match=message):
        sg_io(0, ioctl=never, **kwargs)


def test_sg_io_really_calls_the_kernel() -> None:
    # The real fcntl.ioctl takes the ctypes header; /dev/null is no SCSI device.
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            sg_io(fd, _scsi.test_unit_ready())
        assert caught.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


# -- sense ------------------------------------------------------------------------------


def test_decode_fixed_sense() -> None:
    sense = decode_sense(fixed_sense(2, 0x3A, 0x02, info=0x1234))
    assert sense == Sense(0x70, 2, 0x3A, 0x02, 0x1234)
    assert not sense.descriptor_format and not sense.deferred
    assert sense.describe() == "NOT READY: medium not present - tray open"
    assert sense.to_errno() == errno.ENOMEDIUM


def test_decode_fixed_sense_ignores_bytes_beyond_the_additional_length() -> None:
    raw = bytearray(fixed_sense(5, 0x53, 0x02))
    raw[7] = 4  # only bytes 8..11 are valid: ASC/ASCQ were not sent
    sense = decode_sense(bytes(raw))
    assert sense is not None and (sense.asc, sense.ascq) == (0, 0)
    assert sense.describe() == "ILLEGAL REQUEST"
    short = decode_sense(bytes((0x70, 0, 0x06)))
    assert short == Sense(0x70, 6, 0, 0) and short.describe() == "UNIT ATTENTION"


def test_decode_deferred_fixed_sense() -> None:
    raw = bytearray(fixed_sense(3, 0x11, 0x00))
    raw[0] = 0x71
    sense = decode_sense(bytes(raw))
    assert sense is not None and sense.deferred and sense.information is None
    assert sense.describe() == "deferred error: MEDIUM ERROR: unrecovered read error"


def test_decode_descriptor_sense_with_information() -> None:
    info = bytes((0x00, 0x0A, 0x80, 0x00)) + (0xDEADBEEF).to_bytes(8, "big")
    other = bytes((0x02, 0x06, 0, 0, 0, 0, 0, 0))  # sense key specific: skipped
    raw = bytes((0x72, 0x05, 0x53, 0x02, 0, 0, 0, len(other) + len(info))) + other + info
    sense = decode_sense(raw)
    assert sense == Sense(0x72, 5, 0x53, 0x02, 0xDEADBEEF)
    assert sense.descriptor_format and not sense.deferred
    assert sense.describe() == "ILLEGAL REQUEST: medium removal prevented"
    assert sense.to_errno() == errno.EBUSY


def test_descriptor_sense_without_valid_information() -> None:
    info = bytes((0x00, 0x0A, 0x00, 0x00)) + bytes(8)  # VALID bit clear
    raw = bytes((0x73, 0x02, 0x04, 0x01, 0, 0, 0, len(info))) + info
    sense = decode_sense(raw)
    assert sense == Sense(0x73, 2, 0x04, 0x01, None) and sense.deferred
    assert sense.describe() == (
        "deferred error: NOT READY: logical unit is in process of becoming ready"
    )


@pytest.mark.parametrize("raw", [b"", b"\x70", bytes((0x70, 0)), bytes(18), b"\x7f" + bytes(17)])
def test_undecodable_sense(raw: bytes) -> None:
    assert decode_sense(raw) is None


@pytest.mark.parametrize(
    ("key", "asc", "ascq", "text"),
    [
        (2, 0x3A, 0x00, "NOT READY: medium not present"),
        (2, 0x3A, 0x01, "NOT READY: medium not present - tray closed"),
        (5, 0x24, 0x00, "ILLEGAL REQUEST: invalid field in CDB"),
        (6, 0x28, 0x00, "UNIT ATTENTION: not ready to ready change, medium may have changed"),
        (2, 0x04, 0x0F, "NOT READY: logical unit not ready (ASC 0x04 ASCQ 0x0f)"),
        (4, 0x47, 0x03, "HARDWARE ERROR: ASC 0x47 ASCQ 0x03"),
        (5, 0x80, 0x01, "ILLEGAL REQUEST: vendor specific ASC 0x80 ASCQ 0x01"),
        (0, 0x00, 0x00, "NO SENSE"),
    ],
)
def test_sense_descriptions(key: int, asc: int, ascq: int, text: str) -> None:
    sense = decode_sense(fixed_sense(key, asc, ascq))
    assert sense is not None and sense.describe() == text


@pytest.mark.parametrize(
    ("key", "asc", "ascq", "err"),
    [
        (2, 0x3A, 0x00, errno.ENOMEDIUM),
        (5, 0x53, 0x02, errno.EBUSY),
        (2, 0x53, 0x02, errno.EBUSY),
        (2, 0x04, 0x01, errno.EAGAIN),
        (5, 0x20, 0x00, errno.EOPNOTSUPP),
        (5, 0x24, 0x00, errno.EINVAL),
        (7, 0x27, 0x00, errno.EROFS),
        (6, 0x29, 0x00, errno.EAGAIN),
        (3, 0x11, 0x00, errno.EIO),
        (4, 0x44, 0x00, errno.EIO),
    ],
)
def test_sense_errno(key: int, asc: int, ascq: int, err: int) -> None:
    assert Sense(0x70, key, asc, ascq).to_errno() == err


# -- status and transport checks --------------------------------------------------------


def test_check_status_passes_good_results() -> None:
    check_status(ScsiResult(0, b"", b""), "x")
    check_status(SgIoResult(status=0x04), "x")  # CONDITION MET


def test_check_status_raises_with_the_sense_reason() -> None:
    result = ScsiResult(2, fixed_sense(5, 0x53, 0x02), b"")
    with pytest.raises(ScsiCommandError) as caught:
        check_status(result, "ejecting /dev/sr0")
    err = caught.value
    assert isinstance(err, OSError) and err.errno == errno.EBUSY
    assert err.strerror == "ejecting /dev/sr0: ILLEGAL REQUEST: medium removal prevented"
    assert str(err) == err.strerror
    assert err.status == 2 and err.sense == Sense(0x70, 5, 0x53, 0x02)


@pytest.mark.parametrize(
    ("status", "err"), [(2, errno.EIO), (0x08, errno.EBUSY), (0x18, errno.EBUSY), (0x40, errno.EIO)]
)
def test_check_status_without_sense(status: int, err: int) -> None:
    with pytest.raises(ScsiCommandError) as caught:
        check_status(ScsiResult(status, b"", b""), "TUR")
    assert caught.value.errno == err
    assert caught.value.strerror == f"TUR: SCSI {_scsi.status_name(status)}"


@pytest.mark.parametrize(
    ("host", "driver", "err", "name"),
    [
        (0x03, 0, errno.ETIMEDOUT, "DID_TIME_OUT"),
        (0x01, 0, errno.ENODEV, "DID_NO_CONNECT"),
        (0x07, 0, errno.EIO, "DID_ERROR"),
        (0, 0x06, errno.ETIMEDOUT, "DRIVER_TIMEOUT"),
        (0, 0x04, errno.EIO, "DRIVER_ERROR"),
    ],
)
def test_check_transport_failures(host: int, driver: int, err: int, name: str) -> None:
    with pytest.raises(OSError) as caught:
        check_transport(SgIoResult(status=0, host_status=host, driver_status=driver), "cmd")
    assert caught.value.errno == err and name in str(caught.value.strerror)


def test_check_transport_accepts_a_device_answer() -> None:
    # CHECK CONDITION with DRIVER_SENSE is the device talking, not a transport failure.
    check_transport(SgIoResult(status=2, sense=fixed_sense(2, 0x3A, 0), driver_status=0x08), "cmd")


# Sense data the kernel's sg driver returned from QEMU 7.2's SCSI disks in the VM tier
# (tests/vm/test_vm_sg.py), kept byte for byte: QEMU answers in fixed format.
CAPTURED = [
    # READ(10) past the end of a scsi-hd
    ("700005000000000a00000000210000000000", 5, 0x21, 0x00,
     "ILLEGAL REQUEST: logical block address out of range", errno.EINVAL),
    # TEST UNIT READY on an empty scsi-cd
    ("700002000000000a000000003a0000000000", 2, 0x3A, 0x00,
     "NOT READY: medium not present", errno.ENOMEDIUM),
]


@pytest.mark.parametrize(("raw", "key", "asc", "ascq", "text", "err"), CAPTURED)
def test_captured_sense(raw: str, key: int, asc: int, ascq: int, text: str, err: int) -> None:
    sense = decode_sense(bytes.fromhex(raw))
    assert sense is not None and not sense.descriptor_format and not sense.deferred
    assert (sense.sense_key, sense.asc, sense.ascq) == (key, asc, ascq)
    assert sense.describe() == text and sense.to_errno() == err
    assert sense.raw == bytes.fromhex(raw)
