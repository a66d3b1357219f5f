"""SCSI reply parsers fed hand-built device replies laid out as SPC-4, SBC-3 and MMC-6 say."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from blockd.devices.scsi import replies as r

U32 = 0xFFFFFFFF


def inquiry_data(byte0: int = 0x00, byte1: int = 0x00, version: int = 0x06,
                 vendor: bytes = b"ACME    ", product: bytes = b"Disk            ",
                 revision: bytes = b"1.0 ", extra: bytes = b"") -> bytes:
    # bytes 3-7: response format 2, additional length, flags.
    head = struct.pack(">BBBBB3x", byte0, byte1, version, 0x02, 31 + len(extra))
    return head + vendor + product + revision + extra


def vpd(page: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBH", 0x00, page, len(body) if length is None else length) + body


def designator(code_set: int, association: int, kind: int, value: bytes,
               protocol: int = 0, piv: bool = False) -> bytes:
    byte1 = (0x80 if piv else 0) | (association << 4) | kind  # PIV is bit 7
    return struct.pack(">BBxB", (protocol << 4) | code_set, byte1, len(value)) + value


# -- standard INQUIRY -------------------------------------------------------------------


def test_standard_inquiry_fields() -> None:
    data = inquiry_data(0x05, 0x80, 0x05, b"HL-DT-ST", b"DVDRAM GH24NSD1\x00", b"LG00",
                        extra=bytes(60))
    inq = r.parse_standard_inquiry(data)
    assert inq == r.StandardInquiry(0, 5, True, 5, "HL-DT-ST", "DVDRAM GH24NSD1", "LG00")
    assert inq.type_name == "cd/dvd"
    assert inq.connected


def test_standard_inquiry_padding_and_length() -> None:
    data = inquiry_data(vendor=b"ATA\x00\x00   ", product=b"  QEMU HARDDISK ",
                        revision=b"\x00\x00\x00\x00")
    inq = r.parse_standard_inquiry(data)
    assert (inq.vendor, inq.product, inq.revision) == ("ATA", "QEMU HARDDISK", "")
    assert not inq.removable
    assert inq.type_name == "disk"
    assert r.parse_standard_inquiry(inquiry_data()[:36]).revision == "1.0"  # exactly 36 bytes
    with pytest.raises(ValueError):
        r.parse_standard_inquiry(inquiry_data()[:35])


@pytest.mark.parametrize(
    ("byte0", "qualifier", "kind", "connected"),
    [(0x00, 0, 0, True), (0x25, 1, 5, False), (0x7F, 3, 0x1F, False), (0x14, 0, 0x14, True)],
)
def test_standard_inquiry_qualifier(byte0: int, qualifier: int, kind: int,
                                    connected: bool) -> None:
    inq = r.parse_standard_inquiry(inquiry_data(byte0, 0x7F))  # RMB clear, other bits set
    assert (inq.peripheral_qualifier, inq.peripheral_type) == (qualifier, kind)
    assert inq.connected is connected
    assert inq.removable is False


@pytest.mark.parametrize(
    ("kind", "name"), [(0, "disk"), (1, "tape"), (5, "cd/dvd"), (8, "medium changer"),
                       (0x0E, "simplified direct-access"), (0x14, "zoned block"),
                       (0x1F, "unknown"), (0x06, "type 0x06"), (0x15, "type 0x15")],
)
def test_peripheral_type_name(kind: int, name: str) -> None:
    assert r.peripheral_type_name(kind) == name


# -- VPD pages --------------------------------------------------------------------------


def test_supported_vpd_pages() -> None:
    data = vpd(0x00, bytes((0x00, 0x80, 0x83, 0xB0, 0xB1)))
    assert r.parse_supported_vpd_pages(data) == (0x00, 0x80, 0x83, 0xB0, 0xB1)
    # The page length bounds the list; bytes past it are ignored, a short reply stops early.
    assert r.parse_supported_vpd_pages(vpd(0x00, b"\x00\x80\x83", length=2)) == (0x00, 0x80)
    assert r.parse_supported_vpd_pages(vpd(0x00, b"\x00\x80", length=9)) == (0x00, 0x80)
    assert r.parse_supported_vpd_pages(vpd(0x00, b"")) == ()


def test_unit_serial() -> None:
    assert r.parse_unit_serial(vpd(0x80, b"  WD-WCC4N0123456\x00\x00")) == "WD-WCC4N0123456"
    assert r.parse_unit_serial(vpd(0x80, b"QM00001 ")) == "QM00001"


@pytest.mark.parametrize(
    ("parse", "page"),
    [(r.parse_supported_vpd_pages, 0x80), (r.parse_unit_serial, 0x83),
     (r.parse_device_identification, 0x80), (r.parse_block_limits, 0xB1)],
)
def test_vpd_wrong_page_code(parse: Callable[[bytes], object], page: int) -> None:
    with pytest.raises(ValueError, match="VPD page"):
        parse(vpd(page, b"\x00\x00\x00\x00"))
    with pytest.raises(ValueError, match="shorter"):
        parse(vpd(page, b"")[:3])


def test_device_identification() -> None:
    naa = bytes.fromhex("5000c500a1b2c3d4")
    body = (
        designator(2, 0, 1, b"ATA     ST2000DM008-2FR102  \x00", protocol=0)  # T10 vendor ID
        + designator(1, 1, 3, bytes.fromhex("5000c500ffffffff"), 6, piv=True)  # port NAA
        + designator(1, 0, 3, naa, protocol=6)  # logical unit NAA
        + designator(3, 2, 8, b"iqn.2003-01.org.x\x00\x00\x00")  # SCSI name string
    )
    ids = r.parse_device_identification(vpd(0x83, body))
    assert [(i.code_set, i.association, i.designator_type) for i in ids] == [
        (2, 0, 1), (1, 1, 3), (1, 0, 3), (3, 2, 8)
    ]
    assert ids[0].text == "ATA     ST2000DM008-2FR102"
    assert ids[1].text == "5000c500ffffffff"
    assert ids[2].value == naa and ids[2].text == "5000c500a1b2c3d4"
    assert ids[3].text == "iqn.2003-01.org.x"
    assert r.naa_wwn(ids) == "0x5000c500a1b2c3d4"


def test_device_identification_truncated_descriptor_dropped() -> None:
    first = designator(1, 0, 3, bytes.fromhex("6001405abcdef012"))
    second = designator(1, 0, 2, bytes(8))[:10]  # claims 8 bytes, has 6
    ids = r.parse_device_identification(vpd(0x83, first + second))
    assert len(ids) == 1 and ids[0].designator_type == 3
    # A page length shorter than the descriptors cuts them off the same way.
    assert r.parse_device_identification(vpd(0x83, first, length=11)) == ()
    assert r.parse_device_identification(vpd(0x83, b"")) == ()


@pytest.mark.parametrize(
    "body",
    [
        designator(1, 1, 3, bytes(8)),  # target port, not the logical unit
        designator(1, 2, 3, bytes(8)),  # target device
        designator(2, 0, 3, b"50000000"),  # ASCII code set
        designator(1, 0, 2, bytes(8)),  # EUI-64
        b"",
    ],
)
def test_naa_wwn_absent(body: bytes) -> None:
    assert r.naa_wwn(r.parse_device_identification(vpd(0x83, body))) is None


def test_block_limits() -> None:
    body = struct.pack(">BBHIIIII", 0, 0, 8, 0x800, 0x100, 0xFFFF, 0x400000, 0x7F) + bytes(36)
    data = vpd(0xB0, body)
    assert len(data) == 0x40
    assert r.parse_block_limits(data) == r.BlockLimits(
        max_transfer_blocks=0x800, optimal_transfer_blocks=0x100,
        optimal_granularity_blocks=8, max_unmap_blocks=0x400000,
    )


def test_block_limits_short_page_reads_zero() -> None:
    assert r.parse_block_limits(vpd(0xB0, b"")) == r.BlockLimits(0, 0, 0, 0)
    # SBC-2 era page: only up to the optimal transfer length (page length 0x0C).
    short = vpd(0xB0, struct.pack(">BBHII", 0, 0, 4, 0x200, 0x40))
    assert r.parse_block_limits(short) == r.BlockLimits(0x200, 0x40, 4, 0)


# -- READ CAPACITY ----------------------------------------------------------------------


def test_capacity_10() -> None:
    cap = r.parse_capacity_10(struct.pack(">II", 0x003FFFFF, 512))  # last LBA, block length
    assert cap == r.Capacity(0x400000, 512, False, 0, False)
    assert cap.size == 2 * 1024**3
    assert not r.capacity_10_overflowed(cap)
    assert not r.capacity_10_overflowed(r.parse_capacity_10(struct.pack(">II", U32 - 1, 512)))
    overflow = r.parse_capacity_10(struct.pack(">II", U32, 512))  # "use READ CAPACITY(16)"
    assert overflow.blocks == 1 << 32
    assert r.capacity_10_overflowed(overflow)
    with pytest.raises(ValueError):
        r.parse_capacity_10(bytes(7))


def test_capacity_16() -> None:
    # byte 12 bit 0 PROT_EN, byte 13 bits 0-3 exponent, byte 14 bit 7 LBPME.
    data = struct.pack(">QIBBH", 0x1_0000_0000, 4096, 0x01 | 0x04, 0x50 | 0x03, 0x8000) + bytes(16)
    cap = r.parse_capacity_16(data)
    assert cap == r.Capacity(0x1_0000_0001, 4096, True, 3, True)
    assert cap.size == 0x1_0000_0001 * 4096
    plain = r.parse_capacity_16(struct.pack(">QIBBH", 999, 512, 0x0E, 0xF0, 0x7FFF) + bytes(16))
    assert plain == r.Capacity(1000, 512, False, 0, False)


def test_capacity_16_short_replies() -> None:
    assert r.parse_capacity_16(struct.pack(">QI", 7, 2048)) == r.Capacity(8, 2048)
    assert r.parse_capacity_16(struct.pack(">QIBB", 7, 512, 1, 2)) == r.Capacity(8, 512, True, 2)
    with pytest.raises(ValueError):
        r.parse_capacity_16(bytes(11))


# -- GET EVENT STATUS NOTIFICATION ------------------------------------------------------


def gesn(event: int, status: int, byte2: int = 0x04) -> bytes:
    return struct.pack(">HBBBBBB", 6, byte2, 0x5E, event, status, 0, 0)


@pytest.mark.parametrize(
    ("event", "status", "name", "door", "present"),
    [
        (0, 0x02, "no-change", False, True),
        (1, 0x02, "eject-request", False, True),
        (2, 0x02, "new-media", False, True),
        (3, 0x01, "media-removal", True, False),
        (4, 0x03, "media-changed", True, True),
        (5, 0x00, "bg-format-completed", False, False),
        (6, 0x00, "bg-format-restarted", False, False),
        (0xF7, 0xFC, "event 7", False, False),  # only bits 0-3 are the event code
    ],
)
def test_media_event(event: int, status: int, name: str, door: bool, present: bool) -> None:
    got = r.parse_media_event(gesn(event, status))
    assert got is not None
    assert got.event == event & 0x0F
    assert (got.event_name, got.door_open, got.media_present) == (name, door, present)


@pytest.mark.parametrize(
    "data",
    [
        gesn(2, 0x02, byte2=0x84),  # NEA: no event available
        gesn(2, 0x02, byte2=0x02),  # operational change class
        gesn(2, 0x02, byte2=0x05),  # multi-initiator class
        gesn(2, 0x02)[:7],  # header only, descriptor cut short
        struct.pack(">HBB", 0, 0x84, 0x10),
    ],
)
def test_media_event_none(data: bytes) -> None:
    assert r.parse_media_event(data) is None
    with pytest.raises(ValueError):
        r.parse_media_event(data[:3])  # not even the 4-byte header


# -- MODE SENSE(10), READ TOC, GET CONFIGURATION, REPORT LUNS ---------------------------


def test_mode_sense_10_header() -> None:
    hdr = r.parse_mode_sense_10(struct.pack(">HBBBBH", 0x1234, 0x70, 0x90, 0, 0, 8) + bytes(8))
    assert hdr == r.ModeSenseHeader(0x1234, 0x70, True, 8)
    hdr = r.parse_mode_sense_10(struct.pack(">HBBBBH", 6, 0, 0x7F, 1, 0, 0))
    assert not hdr.write_protected and hdr.block_descriptor_length == 0
    with pytest.raises(ValueError):
        r.parse_mode_sense_10(bytes(7))


def toc_entry(control: int, number: int, lba: int, adr: int = 1) -> bytes:
    return struct.pack(">xBBxI", (adr << 4) | control, number, lba)


def test_read_toc() -> None:
    entries = toc_entry(0x4, 1, 0) + toc_entry(0x0, 2, 0x3000) + toc_entry(0x4, 0xAA, 0x12345)
    toc = r.parse_toc(struct.pack(">HBB", 2 + len(entries), 1, 2) + entries)
    assert (toc.first_track, toc.last_track) == (1, 2)
    assert toc.tracks == (r.TocTrack(1, 4, 0), r.TocTrack(2, 0, 0x3000),
                          r.TocTrack(0xAA, 4, 0x12345))
    assert [t.data for t in toc.tracks] == [True, False, True]


def test_read_toc_truncated() -> None:
    entries = toc_entry(0x4, 1, 0) + toc_entry(0x4, 0xAA, 0x1000)
    full = struct.pack(">HBB", 2 + len(entries), 1, 1) + entries
    assert [t.number for t in r.parse_toc(full[:-1]).tracks] == [1]  # cut short
    short_length = struct.pack(">HBB", 2 + 8, 1, 1) + entries  # length covers one
    assert [t.number for t in r.parse_toc(short_length).tracks] == [1]
    assert r.parse_toc(struct.pack(">HBB", 2, 1, 1)).tracks == ()
    with pytest.raises(ValueError):
        r.parse_toc(b"\x00\x0a\x01")


def test_configuration_header() -> None:
    data = struct.pack(">IHH", 0x1C, 0, 0x0010) + bytes(20)
    assert r.parse_configuration_header(data) == r.ConfigurationHeader(0x1C, 0x0010)
    assert r.parse_configuration_header(struct.pack(">IHH", 4, 0xFFFF, 0)).current_profile == 0
    with pytest.raises(ValueError):
        r.parse_configuration_header(bytes(7))


def test_report_luns() -> None:
    luns = [bytes.fromhex("0000000000000000"), bytes.fromhex("0001000000000000"),
            bytes.fromhex("4105000000000000")]
    data = struct.pack(">I4x", 8 * len(luns)) + b"".join(luns)
    assert r.parse_report_luns(data) == tuple(luns)
    # The list length rules, a reply cut short keeps its whole entries only.
    assert r.parse_report_luns(data + bytes(8)) == tuple(luns)
    assert r.parse_report_luns(data[:-1]) == tuple(luns[:2])
    assert r.parse_report_luns(struct.pack(">I4x", 0)) == ()
    with pytest.raises(ValueError):
        r.parse_report_luns(bytes(7))


@pytest.mark.parametrize(
    ("entry", "lun"),
    [
        ("0000000000000000", 0),
        ("0007000000000000", 7),  # peripheral device addressing
        ("01ff000000000000", 0x1FF),  # peripheral, bus identifier 1
        ("4000000000000000", 0),  # flat space addressing
        ("4123000000000000", 0x123),
        ("7fff000000000000", 0x3FFF),
    ],
)
def test_lun_number(entry: str, lun: int) -> None:
    assert r.lun_number(bytes.fromhex(entry)) == lun


@pytest.mark.parametrize("entry", ["8001000000000000", "c100000000000000", "e200000000000000"])
def test_lun_number_other_methods(entry: str) -> None:
    with pytest.raises(ValueError, match="address method"):
        r.lun_number(bytes.fromhex(entry))
