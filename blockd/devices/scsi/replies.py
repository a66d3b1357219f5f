"""Parsers for the data SCSI devices send back.

Each parser takes the bytes a command returned (possibly fewer than asked
for: devices stop at what they have) and returns a frozen dataclass, raising
ValueError when the reply is too short to hold its fixed part.  Layouts are
SPC-4 (standard INQUIRY, VPD pages 0x00/0x80/0x83, MODE SENSE(10) header,
REPORT LUNS), SBC-3 (READ CAPACITY(10)/(16), VPD 0xB0 Block Limits) and MMC-6
(GET EVENT STATUS NOTIFICATION media class, READ TOC format 0, GET
CONFIGURATION header).  Sans-IO.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "PERIPHERAL_TYPES",
    "BlockLimits",
    "Capacity",
    "ConfigurationHeader",
    "DeviceIdentifier",
    "MediaEvent",
    "ModeSenseHeader",
    "StandardInquiry",
    "Toc",
    "TocTrack",
    "capacity_10_overflowed",
    "lun_number",
    "naa_wwn",
    "parse_block_limits",
    "parse_capacity_10",
    "parse_capacity_16",
    "parse_configuration_header",
    "parse_device_identification",
    "parse_media_event",
    "parse_mode_sense_10",
    "parse_report_luns",
    "parse_standard_inquiry",
    "parse_supported_vpd_pages",
    "parse_toc",
    "parse_unit_serial",
    "peripheral_type_name",
]

PERIPHERAL_TYPES = {
    0x00: "disk",
    0x01: "tape",
    0x02: "printer",
    0x03: "processor",
    0x04: "write-once",
    0x05: "cd/dvd",
    0x07: "optical memory",
    0x08: "medium changer",
    0x0C: "storage array",
    0x0D: "enclosure",
    0x0E: "simplified direct-access",
    0x11: "object storage",
    0x14: "zoned block",
    0x1F: "unknown",
}


def peripheral_type_name(kind: int) -> str:
    """SPC's name of a peripheral device type (``disk`` for 0, ``cd/dvd`` for 5)."""
    return PERIPHERAL_TYPES.get(kind, f"type 0x{kind:02x}")


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise ValueError(f"{what} is {len(data)} bytes, shorter than its {size}-byte header")


def _text(raw: bytes) -> str:
    """An ASCII INQUIRY field without its padding (NULs and spaces)."""
    return raw.decode("ascii", "replace").replace("\x00", " ").strip()


@dataclass(frozen=True, slots=True)
class StandardInquiry:
    """Standard INQUIRY data: who the device is and what kind of unit."""

    peripheral_qualifier: int
    peripheral_type: int
    removable: bool
    version: int
    vendor: str
    product: str
    revision: str

    @property
    def type_name(self) -> str:
        return peripheral_type_name(self.peripheral_type)

    @property
    def connected(self) -> bool:
        """False when the target says no unit is behind this LUN (qualifier 1 or 3)."""
        return self.peripheral_qualifier == 0


def parse_standard_inquiry(data: bytes) -> StandardInquiry:
    """Standard INQUIRY data (at least the 36 bytes every device sends)."""
    _need(data, 36, "standard INQUIRY data")
    return StandardInquiry(
        peripheral_qualifier=data[0] >> 5,
        peripheral_type=data[0] & 0x1F,
        removable=bool(data[1] & 0x80),
        version=data[2],
        vendor=_text(data[8:16]),
        product=_text(data[16:32]),
        revision=_text(data[32:36]),
    )


def _vpd_body(data: bytes, page: int) -> bytes:
    _need(data, 4, f"VPD page 0x{page:02x}")
    if data[1] != page:
        raise ValueError(f"asked for VPD page 0x{page:02x}, got 0x{data[1]:02x}")
    length = struct.unpack_from(">H", data, 2)[0]
    return data[4 : 4 + length]


def parse_supported_vpd_pages(data: bytes) -> tuple[int, ...]:
    """VPD page 0x00: the page codes the device supports."""
    return tuple(_vpd_body(data, 0x00))


def parse_unit_serial(data: bytes) -> str:
    """VPD page 0x80: the unit serial number."""
    return _text(_vpd_body(data, 0x80))


@dataclass(frozen=True, slots=True)
class DeviceIdentifier:
    """One designation descriptor of VPD page 0x83."""

    code_set: int  # 1 binary, 2 ASCII, 3 UTF-8
    association: int  # 0 the logical unit, 1 the target port, 2 the target device
    designator_type: int  # 1 T10 vendor id, 2 EUI-64, 3 NAA, 8 SCSI name string, ...
    value: bytes

    @property
    def text(self) -> str:
        """The designator as text: hex for binary ones, the string for ASCII/UTF-8."""
        if self.code_set in (2, 3):
            return self.value.decode("utf-8", "replace").rstrip("\x00 ")
        return self.value.hex()


def parse_device_identification(data: bytes) -> tuple[DeviceIdentifier, ...]:
    """VPD page 0x83: every designation descriptor (truncated ones are dropped)."""
    body = _vpd_body(data, 0x83)
    found = []
    pos = 0
    while pos + 4 <= len(body):
        length = body[pos + 3]
        value = body[pos + 4 : pos + 4 + length]
        if len(value) < length:
            break
        found.append(DeviceIdentifier(
            code_set=body[pos] & 0x0F,
            association=(body[pos + 1] >> 4) & 0x03,
            designator_type=body[pos + 1] & 0x0F,
            value=bytes(value),
        ))
        pos += 4 + length
    return tuple(found)


_NAA = 3


def naa_wwn(identifiers: tuple[DeviceIdentifier, ...]) -> str | None:
    """The logical unit's NAA name as ``0x`` and hex (what udev calls ID_WWN), if it has one."""
    for ident in identifiers:
        if ident.designator_type == _NAA and ident.association == 0 and ident.code_set == 1:
            return "0x" + ident.value.hex()
    return None


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """VPD page 0xB0: transfer limits in logical blocks (0: the device sets none)."""

    max_transfer_blocks: int
    optimal_transfer_blocks: int
    optimal_granularity_blocks: int
    max_unmap_blocks: int


def parse_block_limits(data: bytes) -> BlockLimits:
    """VPD page 0xB0 (SBC); fields the device left out read as 0."""
    body = _vpd_body(data, 0xB0).ljust(0x3C - 4, b"\x00")
    return BlockLimits(
        optimal_granularity_blocks=struct.unpack_from(">H", body, 2)[0],
        max_transfer_blocks=struct.unpack_from(">I", body, 4)[0],
        optimal_transfer_blocks=struct.unpack_from(">I", body, 8)[0],
        max_unmap_blocks=struct.unpack_from(">I", body, 16)[0],
    )


@dataclass(frozen=True, slots=True)
class Capacity:
    """READ CAPACITY: the number of logical blocks and their length."""

    blocks: int
    block_length: int
    protection: bool = False
    logical_per_physical_exponent: int = 0
    thin_provisioned: bool = False

    @property
    def size(self) -> int:
        return self.blocks * self.block_length


_CAPACITY_10_OVERFLOW = 0xFFFFFFFF


def parse_capacity_10(data: bytes) -> Capacity:
    """READ CAPACITY(10).  A last LBA of 0xFFFFFFFF means "ask READ CAPACITY(16)":
    the result then has ``blocks == 2**32`` and the caller should ask again."""
    _need(data, 8, "READ CAPACITY(10) data")
    last, length = struct.unpack_from(">II", data, 0)
    return Capacity(blocks=last + 1, block_length=length)


def parse_capacity_16(data: bytes) -> Capacity:
    """READ CAPACITY(16): 64-bit block count, protection and provisioning bits."""
    _need(data, 12, "READ CAPACITY(16) data")
    last, length = struct.unpack_from(">QI", data, 0)
    flags = data[12] if len(data) > 12 else 0
    exponent = data[13] & 0x0F if len(data) > 13 else 0
    thin = bool(data[14] & 0x80) if len(data) > 14 else False
    return Capacity(last + 1, length, bool(flags & 0x01), exponent, thin)


def capacity_10_overflowed(capacity: Capacity) -> bool:
    """True when READ CAPACITY(10) said the device is too big for it."""
    return capacity.blocks == _CAPACITY_10_OVERFLOW + 1


@dataclass(frozen=True, slots=True)
class MediaEvent:
    """GET EVENT STATUS NOTIFICATION, media class: the last event and the slot's state."""

    event: int  # 0 none, 1 eject request, 2 new media, 3 media removal, 4 media changed
    door_open: bool
    media_present: bool

    EVENT_NAMES = ("no-change", "eject-request", "new-media", "media-removal",
                   "media-changed", "bg-format-completed", "bg-format-restarted")

    @property
    def event_name(self) -> str:
        names = self.EVENT_NAMES
        return names[self.event] if self.event < len(names) else f"event {self.event}"


_MEDIA_CLASS = 4
_NEA = 0x80


def parse_media_event(data: bytes) -> MediaEvent | None:
    """The media-class event, or None when the device has no event of that class to give."""
    _need(data, 4, "event status header")
    if data[2] & _NEA or (data[2] & 0x07) != _MEDIA_CLASS or len(data) < 8:
        return None
    return MediaEvent(
        event=data[4] & 0x0F, door_open=bool(data[5] & 0x01), media_present=bool(data[5] & 0x02)
    )


@dataclass(frozen=True, slots=True)
class ModeSenseHeader:
    """The MODE SENSE(10) parameter header: medium type, write protection, descriptor size."""

    data_length: int
    medium_type: int
    write_protected: bool
    block_descriptor_length: int


def parse_mode_sense_10(data: bytes) -> ModeSenseHeader:
    _need(data, 8, "MODE SENSE(10) data")
    length, medium, specific, _, _, descriptors = struct.unpack_from(">HBBBBH", data, 0)
    return ModeSenseHeader(length, medium, bool(specific & 0x80), descriptors)


@dataclass(frozen=True, slots=True)
class TocTrack:
    number: int
    control: int  # bit 2: a data track
    lba: int

    @property
    def data(self) -> bool:
        return bool(self.control & 0x04)


@dataclass(frozen=True, slots=True)
class Toc:
    """READ TOC format 0: the first and last track and each track's start (0xAA: lead-out)."""

    first_track: int
    last_track: int
    tracks: tuple[TocTrack, ...]


def parse_toc(data: bytes) -> Toc:
    _need(data, 4, "TOC")
    length = struct.unpack_from(">H", data, 0)[0]
    end = min(len(data), 2 + length)
    tracks = []
    for pos in range(4, end - 7, 8):
        control = data[pos + 1] & 0x0F
        number = data[pos + 2]
        lba = struct.unpack_from(">I", data, pos + 4)[0]
        tracks.append(TocTrack(number, control, lba))
    return Toc(data[2], data[3], tuple(tracks))


@dataclass(frozen=True, slots=True)
class ConfigurationHeader:
    """The GET CONFIGURATION feature header: the drive's current profile (0: no medium)."""

    data_length: int
    current_profile: int


def parse_configuration_header(data: bytes) -> ConfigurationHeader:
    _need(data, 8, "feature header")
    length, _, profile = struct.unpack_from(">IHH", data, 0)
    return ConfigurationHeader(length, profile)


def parse_report_luns(data: bytes) -> tuple[bytes, ...]:
    """REPORT LUNS: the 8-byte LUN entries (as many as were sent)."""
    _need(data, 8, "REPORT LUNS data")
    length = struct.unpack_from(">I", data, 0)[0]
    end = min(len(data), 8 + length)
    return tuple(bytes(data[pos : pos + 8]) for pos in range(8, end - 7, 8))


def lun_number(entry: bytes) -> int:
    """SAM's LUN of a peripheral or flat-space addressed entry.

    For peripheral addressing this is the L of Linux's H:C:T:L; for flat space
    Linux keeps the address-method bits in its number, this does not.
    """
    method = entry[0] >> 6
    if method in (0, 1):
        return ((entry[0] & 0x3F) << 8) | entry[1]
    raise ValueError(f"LUN address method {method} is not a single-level address")
