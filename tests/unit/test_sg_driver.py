"""The sg driver against a SCSI unit model: identification, I/O commands, errors, trays.

The model (tests/scsi_target.py) stands in for the kernel only here; the VM
tier runs the same driver on the kernel's sg driver and QEMU's SCSI disks.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import replace

import pytest
from scsi_target import ScsiUnit, fixed_sense

from blockd.devices import scsi
from blockd.devices.base import NodeOptions, Passthrough, Removable, TrayState
from blockd.devices.sg import (
    HostDeviceRemovableSgDriver,
    HostDeviceSgDriver,
    RemovableSgDriver,
    SgDriver,
)
from blockd.errors import BlockdError, InvalidArgument, ReadOnly

OPTIONS = NodeOptions(driver="sg", node_name="sg0", filename="/dev/sg9")


def open_unit(unit: ScsiUnit, **changes: object) -> SgDriver:
    return SgDriver.open(replace(OPTIONS, **changes), kernel=unit)  # type: ignore[arg-type]


def lba_and_count(cdb: bytes) -> tuple[int, int]:
    if cdb[0] in (scsi.READ_10, scsi.WRITE_10):
        return struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
    lba, count = struct.unpack_from(">QI", cdb, 2)
    return lba, count


# -- opening -------------------------------------------------------------------------


def test_open_identifies_the_unit_and_reads_its_capacity() -> None:
    unit = ScsiUnit(blocks=4096, block_length=4096)
    drv = open_unit(unit)
    assert type(drv) is SgDriver and drv.format_name == "sg"
    assert drv.getlength() == 4096 * 4096
    info = drv.get_info()
    assert info.logical_block_size == 4096 and info.request_alignment == 4096
    assert info.scsi is not None
    assert (info.scsi.vendor, info.scsi.product, info.scsi.revision) == (
        "BLOCKD", "MODEL-T", "0.1")
    assert info.scsi.serial == "SER123"
    assert info.scsi.wwn == "0x6001405abcdef012"
    assert info.scsi.peripheral_type_name == "disk" and not info.scsi.removable
    assert not isinstance(drv, Removable)
    assert isinstance(drv, Passthrough)
    # READ CAPACITY(16) first; (10) was not needed.
    assert scsi.SERVICE_ACTION_IN_16 in unit.opcodes()
    assert scsi.READ_CAPACITY_10 not in unit.opcodes()
    drv.close()
    assert not unit.fds


def test_read_capacity_10_when_the_unit_lacks_16() -> None:
    unit = ScsiUnit(knows_read_capacity_16=False, has_vpd=False)
    drv = open_unit(unit)
    assert drv.getlength() == 2048 * 512
    assert drv.get_info().scsi.serial == ""  # type: ignore[union-attr]
    assert scsi.READ_CAPACITY_10 in unit.opcodes()
    drv.close()


def test_open_clears_queued_unit_attentions() -> None:
    unit = ScsiUnit(unit_attentions=[(0x29, 0x00), (0x2A, 0x09)])
    drv = open_unit(unit)
    assert drv.unit_attentions == 2
    assert drv.getlength() == 2048 * 512
    drv.close()


def test_open_refuses_what_is_not_scsi() -> None:
    unit = ScsiUnit()

    def not_scsi(fd: int) -> int:
        raise OSError(errno.ENOTTY, "no")

    unit.version = not_scsi  # type: ignore[method-assign]
    with pytest.raises(InvalidArgument, match="is not a SCSI device"):
        open_unit(unit)
    assert not unit.fds
    with pytest.raises(InvalidArgument, match="aio=io_uring is not supported"):
        open_unit(ScsiUnit(), aio="io_uring")
    with pytest.raises(InvalidArgument, match="'filename' is missing"):
        open_unit(ScsiUnit(), filename=None)


def test_open_error_names_the_path() -> None:
    with pytest.raises(BlockdError, match="Could not open '/nonexistent/sg': No such file"):
        SgDriver.open(replace(OPTIONS, filename="/nonexistent/sg"))


def test_write_protected_unit() -> None:
    with pytest.raises(ReadOnly, match="not writable"):
        open_unit(ScsiUnit(write_protected=True))
    drv = open_unit(ScsiUnit(write_protected=True), auto_read_only=True)
    assert drv.read_only
    drv.close()


def test_host_device_name_on_sg() -> None:
    drv = HostDeviceSgDriver.open(OPTIONS, kernel=ScsiUnit())  # type: ignore[arg-type]
    assert type(drv) is HostDeviceSgDriver and drv.format_name == "host_device"
    drv.close()
    cd = HostDeviceSgDriver.open(OPTIONS, kernel=ScsiUnit(peripheral_type=5,  # type: ignore[arg-type]
                                                          block_length=2048))
    assert type(cd) is HostDeviceRemovableSgDriver and isinstance(cd, Removable)
    cd.close()


# -- data path -------------------------------------------------------------------------


def test_reads_and_writes_move_the_right_blocks() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    unit.sent.clear()
    payload = os.urandom(4096)
    assert drv.pwritev(8192, [memoryview(payload)]) == 4096
    assert unit.data[8192 : 8192 + 4096] == payload
    write = unit.sent[-1].cdb
    assert write[0] == scsi.WRITE_10 and lba_and_count(write) == (16, 8)
    assert not write[1] & 0x08  # no FUA
    buf = bytearray(4096)
    assert drv.preadv(8192, [memoryview(buf)]) == 4096
    assert buf == payload
    assert unit.sent[-1].cdb[0] == scsi.READ_10


def test_fua_sets_the_bit_and_cache_no_flush_drops_it() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    drv.pwritev(0, [memoryview(b"x" * 512)], fua=True)
    assert unit.sent[-1].cdb[1] & 0x08
    drv.close()
    unit = ScsiUnit()
    drv = open_unit(unit, cache_no_flush=True)
    drv.pwritev(0, [memoryview(b"x" * 512)], fua=True)
    assert not unit.sent[-1].cdb[1] & 0x08
    drv.flush()
    assert scsi.SYNCHRONIZE_CACHE_10 not in unit.opcodes()


def test_large_requests_split_at_the_smallest_limit() -> None:
    unit = ScsiUnit(blocks=8192, max_transfer_blocks=64, kernel_max_bytes=1 << 20)
    drv = open_unit(unit)
    assert drv.get_info().max_transfer == 64 * 512
    unit.sent.clear()
    buf = bytearray(100 * 512)
    drv.preadv(0, [memoryview(buf)])
    assert [lba_and_count(s.cdb) for s in unit.sent] == [(0, 64), (64, 36)]
    unit2 = ScsiUnit(blocks=8192, kernel_max_bytes=16 * 512)
    drv2 = open_unit(unit2)
    assert drv2.get_info().max_transfer == 16 * 512


def test_lba_past_32_bits_uses_16_byte_commands() -> None:
    assert scsi.read_write(False, 1 << 32, 8)[0] == scsi.READ_16
    unit = ScsiUnit(blocks=8)
    drv = open_unit(unit)
    unit.blocks = 1 << 33  # pretend the unit is huge: the driver picks (16) for high LBAs
    drv.blocks = unit.blocks
    with pytest.raises(OSError):
        drv.preadv((1 << 32) * 512, [memoryview(bytearray(512))])
    assert unit.sent[-1].cdb[0] == scsi.READ_16


def test_unaligned_write_is_read_modify_write() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    unit.data[0:1024] = b"a" * 1024
    drv.pwritev(100, [memoryview(b"B" * 10)])
    assert unit.data[0:100] == b"a" * 100
    assert unit.data[100:110] == b"B" * 10
    assert unit.data[110:1024] == b"a" * 914
    buf = bytearray(7)
    assert drv.preadv(98, [memoryview(buf)]) == 7
    assert buf == b"aaBBBBB"


def test_read_at_the_end_is_short() -> None:
    unit = ScsiUnit(blocks=4)
    drv = open_unit(unit)
    buf = bytearray(4096)
    assert drv.preadv(1024, [memoryview(buf)]) == 1024


def test_flush_is_synchronize_cache_or_nothing() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    drv.flush()
    assert unit.sent[-1].cdb[0] == scsi.SYNCHRONIZE_CACHE_10
    unit2 = ScsiUnit(knows_sync_cache=False)
    drv2 = open_unit(unit2)
    drv2.flush()
    drv2.flush()
    assert unit2.opcodes().count(scsi.SYNCHRONIZE_CACHE_10) == 1


def test_check_condition_becomes_an_errno_with_the_sense_in_words() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    unit.failures[scsi.READ_10] = fixed_sense(3, 0x11, 0x00)
    with pytest.raises(scsi.ScsiCommandError) as caught:
        drv.preadv(0, [memoryview(bytearray(512))])
    assert caught.value.errno == errno.EIO
    assert "READ(10) on /dev/sg9: MEDIUM ERROR: unrecovered read error" in str(caught.value)
    unit.failures[scsi.WRITE_10] = fixed_sense(7, 0x27, 0x00)
    with pytest.raises(OSError) as caught2:
        drv.pwritev(0, [memoryview(b"x" * 512)])
    assert caught2.value.errno == errno.EROFS


def test_recovered_error_is_success() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    unit.failures[scsi.WRITE_10] = fixed_sense(1, 0x17, 0x01)
    assert drv.pwritev(0, [memoryview(b"x" * 512)]) == 512


def test_unit_attention_is_retried_once() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    unit.data[0:512] = b"z" * 512
    unit.unit_attentions.append((0x29, 0x00))
    buf = bytearray(512)
    assert drv.preadv(0, [memoryview(buf)]) == 512 and buf == b"z" * 512
    assert drv.unit_attentions == 1
    unit.unit_attentions.extend([(0x29, 0x00), (0x29, 0x00)])
    with pytest.raises(OSError, match="UNIT ATTENTION: power on, reset"):
        drv.preadv(0, [memoryview(buf)])


def test_read_only_node_refuses_writes() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit, read_only=True)
    with pytest.raises(ReadOnly):
        drv.pwritev(0, [memoryview(b"x" * 512)])
    assert scsi.WRITE_10 not in unit.opcodes()


def test_write_zeroes_writes_zeroes() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    unit.data[:] = b"\xff" * len(unit.data)
    drv.write_zeroes(512, 3 * 512)
    assert unit.data[512 : 4 * 512] == bytes(3 * 512)
    assert unit.data[:512] == b"\xff" * 512


def test_passthrough_returns_check_condition_as_a_result() -> None:
    unit = ScsiUnit()
    drv = open_unit(unit)
    result = drv.scsi_command(scsi.inquiry(96), data_in_len=96)
    assert result.status == 0 and result.data[8:14] == b"BLOCKD"
    result = drv.scsi_command(scsi.read_write(False, 1 << 20, 1), data_in_len=512)
    assert result.status == 2
    sense = scsi.decode_sense(result.sense)
    assert sense is not None and (sense.sense_key, sense.asc) == (5, 0x21)
    with pytest.raises(ValueError, match="6 to 16 bytes"):
        drv.scsi_command(b"\x00" * 4)


# -- removable units ---------------------------------------------------------------------


def open_cd(unit: ScsiUnit | None = None) -> tuple[ScsiUnit, RemovableSgDriver]:
    unit = unit or ScsiUnit(peripheral_type=5, block_length=2048, blocks=512)
    drv = open_unit(unit, read_only=True)
    assert isinstance(drv, RemovableSgDriver)
    return unit, drv


def test_cd_is_removable_and_read_only() -> None:
    _unit, cd = open_cd()
    assert isinstance(cd, Removable)
    assert cd.get_info().read_only_medium and cd.medium_present
    assert cd.getlength() == 512 * 2048
    assert cd.tray_state() is TrayState.DISC_OK


def test_tray_and_lock_commands() -> None:
    unit, cd = open_cd()
    cd.lock_medium(True)
    assert unit.prevent
    cd.eject(True)  # allows removal first, as for host_cdrom
    assert unit.tray_open and not unit.prevent
    assert cd.tray_state() is TrayState.TRAY_OPEN
    assert cd.getlength() == 0 and not cd.medium_present
    with pytest.raises(OSError) as caught:
        cd.preadv(0, [memoryview(bytearray(2048))])
    assert caught.value.errno == errno.ENOMEDIUM
    cd.eject(False)
    assert not unit.tray_open
    assert cd.getlength() == 512 * 2048 and cd.medium_present


def test_media_change_seen_by_event_and_by_unit_attention() -> None:
    unit, cd = open_cd()
    assert not cd.media_changed()
    unit.media_event = 4  # media changed
    cd.tray_state()
    assert cd.media_changed()
    assert not cd.media_changed()
    unit.unit_attentions.append((0x28, 0x00))  # not ready to ready: medium may have changed
    cd.tray_state()
    assert cd.media_changed()
    assert not cd.media_changed()


def test_tray_state_without_gesn_reads_test_unit_ready() -> None:
    unit, cd = open_cd(ScsiUnit(peripheral_type=5, block_length=2048, knows_gesn=False))
    assert cd.tray_state() is TrayState.DISC_OK
    unit.tray_open = True
    assert cd.tray_state() is TrayState.TRAY_OPEN
    unit.tray_open, unit.medium = False, False
    assert cd.tray_state() is TrayState.NO_DISC


def test_empty_drive_opens_with_size_zero() -> None:
    _unit, cd = open_cd(ScsiUnit(peripheral_type=5, block_length=2048, medium=False))
    assert cd.getlength() == 0 and not cd.medium_present
    assert cd.get_info().logical_block_size == 2048


def test_close_releases_the_lock() -> None:
    unit, cd = open_cd()
    cd.lock_medium(True)
    cd.close()
    assert not unit.prevent and not unit.fds


@pytest.mark.parametrize(("limit", "offset", "length"), [
    (7, 3 * 512 + 100, 20 * 512),     # odd limit, unaligned start and end
    (5, 0, 5 * 512),                  # exactly one transfer
    (5, 512, 5 * 512 + 1),            # one byte more than a transfer
    (3, 1023, 2),                     # two bytes across a block boundary
])
def test_split_transfers_at_odd_boundaries(limit: int, offset: int, length: int) -> None:
    unit = ScsiUnit(blocks=64, max_transfer_blocks=limit)
    drv = open_unit(unit)
    original = os.urandom(len(unit.data))
    unit.data[:] = original
    payload = os.urandom(length)
    unit.sent.clear()
    assert drv.pwritev(offset, [memoryview(payload)]) == length
    expected = bytearray(original)
    expected[offset : offset + length] = payload
    assert unit.data == expected
    for sent in unit.sent:
        assert lba_and_count(sent.cdb)[1] <= limit
    buf = bytearray(length)
    assert drv.preadv(offset, [memoryview(buf)]) == length and buf == payload
    reads = [lba_and_count(s.cdb) for s in unit.sent if s.cdb[0] == scsi.READ_10]
    assert all(count <= limit for _, count in reads)
