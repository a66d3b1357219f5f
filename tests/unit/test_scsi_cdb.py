"""SCSI command descriptor blocks checked byte by byte against SPC-4, SBC-3 and MMC-6."""

from __future__ import annotations

from collections.abc import Callable

import pytest

# Imported as a module: ``cdb.test_unit_ready`` must not be collected as a test.
from blockd.devices.scsi import cdb

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


def be(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


# -- operation codes and names ----------------------------------------------------------


@pytest.mark.parametrize(
    ("opcode", "value"),
    [
        (cdb.TEST_UNIT_READY, 0x00), (cdb.REQUEST_SENSE, 0x03), (cdb.INQUIRY, 0x12),
        (cdb.START_STOP_UNIT, 0x1B), (cdb.PREVENT_ALLOW_MEDIUM_REMOVAL, 0x1E),
        (cdb.READ_CAPACITY_10, 0x25), (cdb.READ_10, 0x28), (cdb.WRITE_10, 0x2A),
        (cdb.SYNCHRONIZE_CACHE_10, 0x35), (cdb.READ_TOC, 0x43), (cdb.GET_CONFIGURATION, 0x46),
        (cdb.GET_EVENT_STATUS_NOTIFICATION, 0x4A), (cdb.MODE_SENSE_10, 0x5A),
        (cdb.READ_16, 0x88), (cdb.WRITE_16, 0x8A), (cdb.SYNCHRONIZE_CACHE_16, 0x91),
        (cdb.SERVICE_ACTION_IN_16, 0x9E), (cdb.REPORT_LUNS, 0xA0),
    ],
)
def test_opcode_values(opcode: int, value: int) -> None:
    assert opcode == value


@pytest.mark.parametrize(
    ("opcode", "name"),
    [
        (0x00, "TEST UNIT READY"), (0x12, "INQUIRY"), (0x25, "READ CAPACITY(10)"),
        (0x28, "READ(10)"), (0x2A, "WRITE(10)"), (0x35, "SYNCHRONIZE CACHE(10)"),
        (0x43, "READ TOC/PMA/ATIP"), (0x4A, "GET EVENT STATUS NOTIFICATION"),
        (0x4C, "LOG SELECT"), (0x4D, "LOG SENSE"), (0x5A, "MODE SENSE(10)"),
        (0x88, "READ(16)"), (0x8A, "WRITE(16)"), (0x91, "SYNCHRONIZE CACHE(16)"),
        (0x9E, "SERVICE ACTION IN(16)"), (0xA0, "REPORT LUNS"), (0xBE, "READ CD"),
        (0x02, "opcode 0x02"), (0xFF, "opcode 0xff"),
    ],
)
def test_opcode_name(opcode: int, name: str) -> None:
    assert cdb.opcode_name(opcode) == name


# -- fixed commands ---------------------------------------------------------------------


def test_fixed_six_and_ten_byte_commands() -> None:
    assert cdb.test_unit_ready() == bytes(6)
    assert cdb.read_capacity_10() == bytes.fromhex("25000000000000000000")
    assert cdb.request_sense() == bytes.fromhex("03000000fc00")  # 252 by default
    assert cdb.request_sense(0xFF) == bytes.fromhex("03000000ff00")


@pytest.mark.parametrize(
    ("start", "load_eject", "immediate", "expected"),
    [
        (False, True, False, "1b0000000200"),  # eject: LOEJ (bit 1), START 0
        (True, True, False, "1b0000000300"),  # load
        (True, False, False, "1b0000000100"),  # spin up
        (False, False, True, "1b0100000000"),  # IMMED is bit 0 of byte 1
    ],
)
def test_start_stop_unit(start: bool, load_eject: bool, immediate: bool, expected: str) -> None:
    got = cdb.start_stop_unit(start=start, load_eject=load_eject, immediate=immediate)
    assert got == bytes.fromhex(expected)


def test_prevent_allow_medium_removal() -> None:
    assert cdb.prevent_allow_medium_removal(True) == bytes.fromhex("1e0000000100")
    assert cdb.prevent_allow_medium_removal(False) == bytes.fromhex("1e0000000000")


# -- INQUIRY ----------------------------------------------------------------------------


def test_inquiry_standard_and_evpd() -> None:
    # byte 1 bit 0 EVPD, byte 2 page code, bytes 3-4 allocation length (SPC-4).
    assert cdb.inquiry() == bytes.fromhex("120000006000")
    assert cdb.inquiry(0x1234) == bytes.fromhex("120000123400")
    assert cdb.inquiry(252, vpd_page=0x83) == bytes.fromhex("12018300fc00")
    assert cdb.inquiry(0xFFFF, vpd_page=0x00) == bytes.fromhex("120100ffff00")
    assert cdb.inquiry(64, vpd_page=0xB0) == bytes.fromhex("1201b0004000")


# -- READ / WRITE -----------------------------------------------------------------------


def read10(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((opcode, flags)) + be(lba, 4) + b"\x00" + be(blocks, 2) + b"\x00"


def read16(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((opcode, flags)) + be(lba, 8) + be(blocks, 4) + b"\x00\x00"


def test_read_10_layout() -> None:
    got = cdb.read_write(False, 0x01020304, 0x0506)
    assert got == bytes.fromhex("28000102030400050600")
    assert len(got) == 10


def test_write_10_fua() -> None:
    got = cdb.read_write(True, 8, 1, fua=True)
    assert got == bytes.fromhex("2a080000000800000100")
    assert got[1] & 0x08  # FUA: byte 1 bit 3


def test_read_16_layout() -> None:
    got = cdb.read_write(False, 0x0102030405060708, 0x090A0B0C)
    assert got == bytes.fromhex("88000102030405060708090a0b0c0000")
    assert len(got) == 16


def test_write_16_fua() -> None:
    got = cdb.read_write(True, 1 << 40, 0x10000, fua=True)
    assert got == bytes.fromhex("8a080000010000000000000100000000")


@pytest.mark.parametrize(
    ("lba", "blocks", "ten"),
    [
        (0, 0, True),
        (0, 0xFFFF, True),  # largest 16-bit transfer length
        (0, 0x10000, False),  # length needs 32 bits
        (U32 - 0xFFFF, 0xFFFF, True),  # LBA + length == 2**32 - 1
        (U32 - 0xFFFF, 0x10000, False),
        (U32, 0, True),
        (U32, 1, False),  # LBA + length overflows 32 bits
        (1 << 32, 1, False),
        (U64, 0, False),
        (0, U32, False),
    ],
)
@pytest.mark.parametrize("write", [False, True])
def test_read_write_form_choice(lba: int, blocks: int, ten: bool, write: bool) -> None:
    got = cdb.read_write(write, lba, blocks)
    if ten:
        opcode = cdb.WRITE_10 if write else cdb.READ_10
        assert got == read10(opcode, lba, blocks)
    else:
        opcode = cdb.WRITE_16 if write else cdb.READ_16
        assert got == read16(opcode, lba, blocks)


@pytest.mark.parametrize(
    ("lba", "blocks"), [(-1, 1), (1 << 64, 1), (0, -1), (0, 1 << 32)]
)
def test_read_write_range_checks(lba: int, blocks: int) -> None:
    with pytest.raises(ValueError):
        cdb.read_write(False, lba, blocks)


# -- READ CAPACITY(16), SYNCHRONIZE CACHE ----------------------------------------------


def test_read_capacity_16() -> None:
    # SERVICE ACTION IN(16), service action 0x10 in byte 1, allocation length bytes 10-13.
    assert cdb.read_capacity_16() == bytes.fromhex("9e100000000000000000000000200000")
    assert cdb.read_capacity_16(0x01020304) == bytes.fromhex("9e100000000000000000010203040000")
    assert cdb.read_capacity_16(U32)[10:14] == b"\xff\xff\xff\xff"


def test_synchronize_cache_10() -> None:
    assert cdb.synchronize_cache() == bytes.fromhex("35000000000000000000")
    assert cdb.synchronize_cache(0x01020304, 0x0506) == bytes.fromhex("35000102030400050600")
    assert cdb.synchronize_cache(U32, 0xFFFF) == bytes.fromhex("3500ffffffff00ffff00")


def test_synchronize_cache_16() -> None:
    assert cdb.synchronize_cache(sixteen=True) == bytes.fromhex("91" + "00" * 15)
    got = cdb.synchronize_cache(0x0102030405060708, 0x090A0B0C, sixteen=True)
    assert got == bytes.fromhex("91000102030405060708090a0b0c0000")
    assert cdb.synchronize_cache(U64, U32, sixteen=True)[2:14] == b"\xff" * 12


@pytest.mark.parametrize(
    ("lba", "blocks", "sixteen"),
    [
        (1 << 32, 0, False), (0, 0x10000, False), (-1, 0, False), (0, -1, False),
        (1 << 64, 0, True), (0, 1 << 32, True), (-1, 0, True),
    ],
)
def test_synchronize_cache_range_checks(lba: int, blocks: int, sixteen: bool) -> None:
    with pytest.raises(ValueError):
        cdb.synchronize_cache(lba, blocks, sixteen=sixteen)


# -- MMC and SPC commands with allocation lengths ---------------------------------------


def test_get_event_status_notification() -> None:
    # Polled (byte 1 bit 0), class request byte 4 = 0x10 (media), alloc length bytes 7-8.
    assert cdb.get_event_status_notification() == bytes.fromhex("4a010000100000000800")
    assert cdb.get_event_status_notification(0x1234) == bytes.fromhex("4a010000100000123400")


def test_mode_sense_10() -> None:
    # DBD byte 1 bit 3, PC 0 + page code byte 2, subpage byte 3, alloc length bytes 7-8.
    assert cdb.mode_sense_10() == bytes.fromhex("5a083f00000000020000")
    assert cdb.mode_sense_10(0x2A, 0x01, 0x00FC, dbd=False) == bytes.fromhex(
        "5a002a0100000000fc00"
    )
    assert cdb.mode_sense_10(0x08, 0xFF, 0xFFFF) == bytes.fromhex("5a0808ff000000ffff00")


def test_read_toc() -> None:
    # MSF byte 1 bit 1, format 0 in byte 2, track byte 6, alloc length bytes 7-8.
    assert cdb.read_toc() == bytes.fromhex("43000000000000032400")
    assert cdb.read_toc(12, msf=True, track=0xAA) == bytes.fromhex("430200000000aa000c00")


def test_get_configuration() -> None:
    # RT byte 1 bits 0-1, starting feature bytes 2-3, alloc length bytes 7-8.
    assert cdb.get_configuration() == bytes.fromhex("46000000000000000800")
    assert cdb.get_configuration(0x1234, feature=0x0107, rt=2) == bytes.fromhex(
        "46020107000000123400"
    )
    assert cdb.get_configuration(feature=0xFFFF, rt=1)[1:4] == b"\x01\xff\xff"


def test_report_luns() -> None:
    # SELECT REPORT byte 2, allocation length bytes 6-9, 12 bytes in all.
    assert cdb.report_luns() == bytes.fromhex("a00000000000000010000000")
    assert cdb.report_luns(16, select_report=2) == bytes.fromhex("a00002000000000000100000")
    assert cdb.report_luns(U32)[6:10] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize(
    "build",
    [
        lambda: cdb.request_sense(0x100),
        lambda: cdb.request_sense(-1),
        lambda: cdb.inquiry(0x10000),
        lambda: cdb.inquiry(-1),
        lambda: cdb.inquiry(96, vpd_page=0x100),
        lambda: cdb.inquiry(96, vpd_page=-1),
        lambda: cdb.read_capacity_16(1 << 32),
        lambda: cdb.read_capacity_16(-1),
        lambda: cdb.get_event_status_notification(0x10000),
        lambda: cdb.get_event_status_notification(-1),
        lambda: cdb.mode_sense_10(0x40),
        lambda: cdb.mode_sense_10(-1),
        lambda: cdb.mode_sense_10(0x3F, 0x100),
        lambda: cdb.mode_sense_10(0x3F, 0, 0x10000),
        lambda: cdb.read_toc(0x10000),
        lambda: cdb.read_toc(track=0x100),
        lambda: cdb.read_toc(track=-1),
        lambda: cdb.get_configuration(rt=3),
        lambda: cdb.get_configuration(rt=-1),
        lambda: cdb.get_configuration(feature=0x10000),
        lambda: cdb.get_configuration(0x10000),
        lambda: cdb.report_luns(15),
        lambda: cdb.report_luns(1 << 32),
        lambda: cdb.report_luns(16, select_report=0x100),
    ],
)
def test_range_checks(build: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: cdb.request_sense(0),
        lambda: cdb.inquiry(0, vpd_page=0xFF),
        lambda: cdb.mode_sense_10(0, 0, 0),
        lambda: cdb.get_event_status_notification(0xFFFF),
        lambda: cdb.read_toc(0xFFFF, track=0xFF),
        lambda: cdb.get_configuration(0xFFFF, feature=0xFFFF, rt=2),
        lambda: cdb.report_luns(16, select_report=0xFF),
    ],
)
def test_range_limits_accepted(build: Callable[[], bytes]) -> None:
    assert len(build()) in (6, 10, 12)
