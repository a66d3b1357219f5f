"""SCSI command descriptor blocks: operation codes, their names, and builders.

Every builder returns the ``bytes`` to hand to SG_IO and checks its fields'
ranges (ValueError).  Field layouts are SPC-4 (TEST UNIT READY, REQUEST SENSE,
INQUIRY, MODE SENSE, REPORT LUNS), SBC-3 (READ/WRITE, READ CAPACITY,
SYNCHRONIZE CACHE, START STOP UNIT) and MMC-6 (GET EVENT STATUS NOTIFICATION,
READ TOC, GET CONFIGURATION).  Sans-IO: nothing here touches a descriptor.
"""

from __future__ import annotations

import struct

__all__ = [
    "GET_CONFIGURATION",
    "GET_EVENT_STATUS_NOTIFICATION",
    "INQUIRY",
    "MODE_SENSE_10",
    "PREVENT_ALLOW_MEDIUM_REMOVAL",
    "READ_10",
    "READ_16",
    "READ_CAPACITY_10",
    "READ_TOC",
    "REPORT_LUNS",
    "REQUEST_SENSE",
    "SERVICE_ACTION_IN_16",
    "START_STOP_UNIT",
    "SYNCHRONIZE_CACHE_10",
    "SYNCHRONIZE_CACHE_16",
    "TEST_UNIT_READY",
    "WRITE_10",
    "WRITE_16",
    "get_configuration",
    "get_event_status_notification",
    "inquiry",
    "mode_sense_10",
    "opcode_name",
    "prevent_allow_medium_removal",
    "read_capacity_10",
    "read_capacity_16",
    "read_toc",
    "read_write",
    "report_luns",
    "request_sense",
    "start_stop_unit",
    "synchronize_cache",
    "test_unit_ready",
]

TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
SYNCHRONIZE_CACHE_10 = 0x35
READ_TOC = 0x43
GET_CONFIGURATION = 0x46
GET_EVENT_STATUS_NOTIFICATION = 0x4A
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
_READ_CAPACITY_16_ACTION = 0x10

_OPCODE_NAMES = {
    TEST_UNIT_READY: "TEST UNIT READY",
    0x01: "REZERO UNIT",
    REQUEST_SENSE: "REQUEST SENSE",
    0x04: "FORMAT UNIT",
    0x07: "REASSIGN BLOCKS",
    0x08: "READ(6)",
    0x0A: "WRITE(6)",
    0x0B: "SEEK(6)",
    INQUIRY: "INQUIRY",
    MODE_SELECT_6: "MODE SELECT(6)",
    0x16: "RESERVE(6)",
    0x17: "RELEASE(6)",
    MODE_SENSE_6: "MODE SENSE(6)",
    START_STOP_UNIT: "START STOP UNIT",
    0x1C: "RECEIVE DIAGNOSTIC RESULTS",
    0x1D: "SEND DIAGNOSTIC",
    PREVENT_ALLOW_MEDIUM_REMOVAL: "PREVENT ALLOW MEDIUM REMOVAL",
    0x23: "READ FORMAT CAPACITIES",
    READ_CAPACITY_10: "READ CAPACITY(10)",
    READ_10: "READ(10)",
    WRITE_10: "WRITE(10)",
    0x2B: "SEEK(10)",
    0x2E: "WRITE AND VERIFY(10)",
    0x2F: "VERIFY(10)",
    SYNCHRONIZE_CACHE_10: "SYNCHRONIZE CACHE(10)",
    0x37: "READ DEFECT DATA(10)",
    0x3B: "WRITE BUFFER",
    0x3C: "READ BUFFER",
    0x41: "WRITE SAME(10)",
    0x42: "UNMAP",
    READ_TOC: "READ TOC/PMA/ATIP",
    GET_CONFIGURATION: "GET CONFIGURATION",
    GET_EVENT_STATUS_NOTIFICATION: "GET EVENT STATUS NOTIFICATION",
    0x4D: "LOG SENSE",
    0x4C: "LOG SELECT",
    0x51: "READ DISC INFORMATION",
    0x52: "READ TRACK INFORMATION",
    0x55: "MODE SELECT(10)",
    0x56: "RESERVE(10)",
    0x57: "RELEASE(10)",
    MODE_SENSE_10: "MODE SENSE(10)",
    0x5E: "PERSISTENT RESERVE IN",
    0x5F: "PERSISTENT RESERVE OUT",
    0x7F: "VARIABLE LENGTH",
    0x83: "EXTENDED COPY",
    0x84: "RECEIVE COPY RESULTS",
    0x85: "ATA PASS-THROUGH(16)",
    READ_16: "READ(16)",
    0x89: "COMPARE AND WRITE",
    WRITE_16: "WRITE(16)",
    0x8F: "VERIFY(16)",
    SYNCHRONIZE_CACHE_16: "SYNCHRONIZE CACHE(16)",
    0x93: "WRITE SAME(16)",
    SERVICE_ACTION_IN_16: "SERVICE ACTION IN(16)",
    REPORT_LUNS: "REPORT LUNS",
    0xA1: "ATA PASS-THROUGH(12)",
    0xA3: "MAINTENANCE IN",
    0xA4: "MAINTENANCE OUT",
    0xA5: "MOVE MEDIUM",
    0xA8: "READ(12)",
    0xAA: "WRITE(12)",
    0xAC: "GET PERFORMANCE",
    0xAD: "READ DVD STRUCTURE",
    0xB6: "SET STREAMING",
    0xB8: "READ ELEMENT STATUS",
    0xBB: "SET CD SPEED",
    0xBD: "MECHANISM STATUS",
    0xBE: "READ CD",
}


def opcode_name(opcode: int) -> str:
    """A readable name for an operation code (``opcode 0xNN`` when unknown)."""
    return _OPCODE_NAMES.get(opcode, f"opcode 0x{opcode:02x}")


def _check_range(what: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} is outside 0..{limit}")


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
    return struct.pack(">BBBHB", INQUIRY, evpd, page, allocation_length, 0)


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


def read_capacity_16(allocation_length: int = 32) -> bytes:
    """READ CAPACITY(16) (SERVICE ACTION IN(16)): for devices past 2^32 blocks."""
    _check_range("allocation length", allocation_length, 0xFFFFFFFF)
    return struct.pack(
        ">BBQIBB", SERVICE_ACTION_IN_16, _READ_CAPACITY_16_ACTION, 0, allocation_length, 0, 0
    )


_FUA = 0x08


def read_write(write: bool, lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """READ or WRITE: the 10-byte form when LBA and length fit it, else the 16-byte form.

    ``blocks`` may be 0 (the command then moves nothing).  FUA asks the device
    to put written data on the medium before answering.
    """
    _check_range("logical block address", lba, (1 << 64) - 1)
    _check_range("transfer length", blocks, 0xFFFFFFFF)
    flags = _FUA if fua else 0
    if lba + blocks <= 0xFFFFFFFF and blocks <= 0xFFFF:
        opcode = WRITE_10 if write else READ_10
        return struct.pack(">BBIBHB", opcode, flags, lba, 0, blocks, 0)
    opcode = WRITE_16 if write else READ_16
    return struct.pack(">BBQIBB", opcode, flags, lba, blocks, 0, 0)


def synchronize_cache(lba: int = 0, blocks: int = 0, *, sixteen: bool = False) -> bytes:
    """SYNCHRONIZE CACHE(10) or (16); ``blocks`` 0 means from ``lba`` to the end."""
    if sixteen:
        _check_range("logical block address", lba, (1 << 64) - 1)
        _check_range("number of blocks", blocks, 0xFFFFFFFF)
        return struct.pack(">BBQIBB", SYNCHRONIZE_CACHE_16, 0, lba, blocks, 0, 0)
    _check_range("logical block address", lba, 0xFFFFFFFF)
    _check_range("number of blocks", blocks, 0xFFFF)
    return struct.pack(">BBIBHB", SYNCHRONIZE_CACHE_10, 0, lba, 0, blocks, 0)


_MEDIA_CLASS = 0x10  # notification class request bit 4: media events


def get_event_status_notification(allocation_length: int = 8) -> bytes:
    """GET EVENT STATUS NOTIFICATION, polled, for the media class (MMC)."""
    _check_range("allocation length", allocation_length, 0xFFFF)
    return struct.pack(
        ">BBBBBBBHB", GET_EVENT_STATUS_NOTIFICATION, 0x01, 0, 0, _MEDIA_CLASS, 0, 0,
        allocation_length, 0,
    )


def mode_sense_10(page: int = 0x3F, subpage: int = 0, allocation_length: int = 0x200,
                  *, dbd: bool = True) -> bytes:
    """MODE SENSE(10) of ``page`` (0x3F: all pages), current values, block descriptors off."""
    _check_range("page code", page, 0x3F)
    _check_range("subpage code", subpage, 0xFF)
    _check_range("allocation length", allocation_length, 0xFFFF)
    return struct.pack(
        ">BBBBBBBHB", MODE_SENSE_10, 0x08 if dbd else 0, page, subpage, 0, 0, 0,
        allocation_length, 0,
    )


def read_toc(allocation_length: int = 0x324, *, msf: bool = False, track: int = 0) -> bytes:
    """READ TOC/PMA/ATIP in format 0 (the table of contents), from ``track`` on."""
    _check_range("track", track, 0xFF)
    _check_range("allocation length", allocation_length, 0xFFFF)
    return struct.pack(
        ">BBBBBBBHB", READ_TOC, 0x02 if msf else 0, 0, 0, 0, 0, track, allocation_length, 0
    )


def get_configuration(allocation_length: int = 8, *, feature: int = 0, rt: int = 0) -> bytes:
    """GET CONFIGURATION: the feature header (current profile) and features from ``feature``."""
    _check_range("request type", rt, 2)
    _check_range("starting feature", feature, 0xFFFF)
    _check_range("allocation length", allocation_length, 0xFFFF)
    return struct.pack(">BBHBBBHB", GET_CONFIGURATION, rt, feature, 0, 0, 0,
                       allocation_length, 0)


def report_luns(allocation_length: int = 4096, select_report: int = 0) -> bytes:
    """REPORT LUNS: the logical units of the target (16 bytes at least, per SPC)."""
    _check_range("select report", select_report, 0xFF)
    if not 16 <= allocation_length <= 0xFFFFFFFF:
        raise ValueError(f"allocation length {allocation_length} is outside 16..{0xFFFFFFFF}")
    return struct.pack(">BBBBBBIBB", REPORT_LUNS, 0, select_report, 0, 0, 0,
                       allocation_length, 0, 0)
