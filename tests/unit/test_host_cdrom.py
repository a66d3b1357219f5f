"""The host_cdrom driver against a model of a CD drive and the kernel's cdrom layer.

``FakeDrive`` replaces the driver's kernel interface (:class:`CdromIoctls`). It
models what drivers/cdrom/cdrom.c and sr do: the tray, the disc, the drive's
own lock (PREVENT ALLOW MEDIUM REMOVAL), the cdrom layer's ``keeplocked`` flag,
other openers (EBUSY), a positive SCSI result leaking out of CDROMEJECT, the
capacity the kernel only re-reads on open, and SG_IO with fixed-format sense.
Reads go to /dev/zero, which the fake hands out as the drive's descriptor.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from blockd.devices import DRIVERS, open_driver
from blockd.devices import scsi as _scsi
from blockd.devices._ioctl import (
    CDROM_DRIVE_STATUS,
    CDROM_LOCKDOOR,
    CDROM_MEDIA_CHANGED,
    CDROMCLOSETRAY,
    CDROMEJECT,
)
from blockd.devices.base import NodeOptions, Passthrough, Removable, ScsiResult, TrayState
from blockd.devices.host_cdrom import (
    CDSL_CURRENT,
    CdromIoctls,
    HostCdromDriver,
    _probe_score,
)
from blockd.devices.posix import PosixDriver
from blockd.errors import InvalidArgument, NotFound, ReadOnly

MiB = 1 << 20
STALE_CAPACITY = 0x1FFFFF * 2048  # what sr reports after READ CAPACITY failed
NAMES = {
    CDROM_DRIVE_STATUS: "status",
    CDROM_MEDIA_CHANGED: "changed",
    CDROMEJECT: "eject",
    CDROMCLOSETRAY: "close",
    CDROM_LOCKDOOR: "lockdoor",
}


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    sense = bytearray(18)
    sense[0], sense[2], sense[7], sense[12], sense[13] = 0x70, key, 10, asc, ascq
    return bytes(sense)


def check_condition(key: int, asc: int, ascq: int) -> _scsi.SgIoResult:
    return _scsi.SgIoResult(status=2, sense=fixed_sense(key, asc, ascq), driver_status=0x08)


GOOD = _scsi.SgIoResult(status=0)


class FakeDrive(CdromIoctls):
    """A CD drive as the kernel shows it to one opener (this driver)."""

    def __init__(self, disc: int | None = 4 * MiB) -> None:
        self.disc = disc  # size of the disc in the drive, None: no disc
        self.tray_open = False
        self.prevented = False  # the drive's own medium lock
        self.keeplocked = False  # cdrom.c's flag, set by CDROM_LOCKDOOR
        self.other_openers = 0  # makes CDROMEJECT (and unlocking) fail with EBUSY
        self.cap_sys_rawio = True  # else SG_IO refuses PREVENT ALLOW on a read-only fd
        self.changed = False
        self.is_cdrom = True
        self.not_ready_polls = 0  # CDS_DRIVE_NOT_READY answers before the real state
        self.unlock_result = 0  # positive: scsi_set_medium_removal(ALLOW) leaked a SCSI result
        self.lock_result = 0
        self.status_errno: int | None = None
        self.eject_errno: int | None = None
        self.close_errno: int | None = None
        self.capacity = STALE_CAPACITY  # the kernel's cached size; revalidate() updates it
        self.calls: list[tuple[str, int]] = []
        self.cdbs: list[bytes] = []
        self.opens: list[tuple[str, int]] = []
        self.sleeps: list[float] = []
        self.revalidations = 0

    def _state(self) -> int:
        if self.not_ready_polls:
            self.not_ready_polls -= 1
            return 3
        if self.tray_open:
            return 2
        return 1 if self.disc is None else 4

    def open(self, path: str, flags: int) -> int:
        self.opens.append((path, flags))
        if not flags & os.O_NONBLOCK and (self.disc is None or self.tray_open):
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))  # cdrom_open for data
        if self.disc is not None and not self.tray_open:
            self.capacity = self.disc  # sr_block_open re-reads a changed medium
        return os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC | (flags & os.O_NONBLOCK))

    def revalidate(self, path: str) -> None:
        self.revalidations += 1
        if self.disc is not None and not self.tray_open:
            self.capacity = self.disc

    def ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        self.calls.append((NAMES.get(request, hex(request)), arg))
        if not self.is_cdrom:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        if request == CDROM_DRIVE_STATUS:
            if self.status_errno:
                raise OSError(self.status_errno, os.strerror(self.status_errno))
            if arg != CDSL_CURRENT:
                raise OSError(errno.EINVAL, "sr has no changer slots")
            return self._state()
        if request == CDROM_MEDIA_CHANGED:
            changed, self.changed = self.changed, False
            return int(changed)
        if request == CDROMEJECT:
            if self.eject_errno:
                raise OSError(self.eject_errno, os.strerror(self.eject_errno))
            if self.other_openers or self.keeplocked:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            if self.prevented:  # the cdrom layer unlocks first
                if self.unlock_result:
                    return self.unlock_result
                self.prevented = False
            self.tray_open = True
            return 0
        if request == CDROMCLOSETRAY:
            if self.close_errno:
                raise OSError(self.close_errno, os.strerror(self.close_errno))
            self.tray_open = False
            if self.disc is None:
                raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))
            return 0
        if request == CDROM_LOCKDOOR:
            self.keeplocked = bool(arg)
            if self.other_openers and not arg:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            result = self.lock_result if arg else self.unlock_result
            if result:
                return result
            self.prevented = bool(arg)
            return 0
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def size(self, fd: int) -> int:
        return self.capacity

    def block_size(self, fd: int) -> int:
        return 2048

    def sg_io(
        self, fd: int, cdb: bytes, data_out: bytes, data_in_len: int, timeout_ms: int
    ) -> _scsi.SgIoResult:
        self.cdbs.append(bytes(cdb))
        if cdb[0] == _scsi.PREVENT_ALLOW_MEDIUM_REMOVAL:
            if not self.cap_sys_rawio:
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
            self.prevented = bool(cdb[4] & 1)
            return GOOD
        if cdb[0] == _scsi.START_STOP_UNIT:
            load_eject, start = cdb[4] & 2, cdb[4] & 1
            if load_eject and not start:
                if self.prevented:
                    return check_condition(5, 0x53, 0x02)
                self.tray_open = True
            elif load_eject:
                self.tray_open = False
                if self.disc is None:
                    return check_condition(2, 0x3A, 0x01)
            return GOOD
        if cdb[0] == _scsi.TEST_UNIT_READY:
            if self.disc is None or self.tray_open:
                return check_condition(2, 0x3A, 0x02 if self.tray_open else 0x01)
            return GOOD
        return check_condition(5, 0x20, 0x00)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def options(**kw: Any) -> NodeOptions:
    return NodeOptions(
        driver="host_cdrom", node_name="cd0", filename=kw.pop("filename", "/dev/sr0"), **kw
    )


@pytest.fixture
def drive() -> FakeDrive:
    return FakeDrive()


@pytest.fixture
def opened() -> Iterator[list[HostCdromDriver]]:
    drivers: list[HostCdromDriver] = []
    yield drivers
    for d in drivers:
        d.close()


@pytest.fixture
def cd(drive: FakeDrive, opened: list[HostCdromDriver]) -> HostCdromDriver:
    return open_cd(drive, opened)


def open_cd(drive: FakeDrive, opened: list[HostCdromDriver], **kw: Any) -> HostCdromDriver:
    driver = HostCdromDriver.open(options(read_only=True, **kw), ioctls=drive)
    opened.append(driver)
    drive.calls.clear()
    return driver


def read(cd: HostCdromDriver, length: int = 4096) -> bytes:
    buf = bytearray(b"\xaa" * length)
    count = cd.preadv(0, [memoryview(buf)])
    return bytes(buf[:count])


# -- opening ------------------------------------------------------------------------------


def test_an_empty_drive_opens_nonblocking_and_read_only(opened: list[HostCdromDriver]) -> None:
    drive = FakeDrive(disc=None)
    cd = open_cd(drive, opened)
    path, flags = drive.opens[0]
    assert path == "/dev/sr0"
    assert flags & os.O_ACCMODE == os.O_RDONLY
    assert flags & os.O_NONBLOCK and flags & os.O_CLOEXEC and not flags & os.O_DIRECT
    # The flag was for open(2): reads on the descriptor may wait again.
    assert not fcntl.fcntl(cd.fd, fcntl.F_GETFL) & os.O_NONBLOCK
    assert not cd.medium_present and cd.medium_size == 0
    assert cd.getlength() == 0  # not the kernel's stale 4 GiB
    assert drive.revalidations == 0  # nothing to revalidate without a disc
    assert cd.read_only and cd.get_info().read_only_medium


def test_a_drive_with_a_disc_reports_its_size(drive: FakeDrive, cd: HostCdromDriver) -> None:
    assert cd.medium_present and cd.medium_size == 4 * MiB
    assert drive.revalidations == 0  # opening the node was the revalidation
    assert cd.getlength() == 4 * MiB
    assert drive.calls[0] == ("status", CDSL_CURRENT)
    assert drive.revalidations == 1
    info = cd.get_info()
    assert info.logical_block_size == 2048 and not info.can_write_zeroes
    # Its reads splice, but never on io_uring: a disc's reads need the medium check.
    assert cd.can_splice and cd.splice_plain_fd() == -1


def test_cache_direct_adds_o_direct(drive: FakeDrive, opened: list[HostCdromDriver]) -> None:
    open_cd(drive, opened, cache_direct=True)
    assert drive.opens[0][1] & os.O_DIRECT


def test_read_write_request_still_gives_a_read_only_node(
    drive: FakeDrive, opened: list[HostCdromDriver]
) -> None:
    cd = HostCdromDriver.open(options(read_only=False), ioctls=drive)
    opened.append(cd)
    assert drive.opens[0][1] & os.O_ACCMODE == os.O_RDONLY
    assert cd.read_only
    with pytest.raises(ReadOnly):
        cd.pwritev(0, [b"x" * 2048])
    with pytest.raises(ReadOnly):
        cd.write_zeroes(0, 2048)
    with pytest.raises(ReadOnly):
        cd.discard(0, 2048)
    cd.flush()  # nothing to flush, and no fdatasync on the drive
    assert cd.uring_flush() is None and cd.uring_write([b"x"], False) is None


def test_open_errors_use_qemus_texts(tmp_path: Path) -> None:
    iso = tmp_path / "cd.iso"
    iso.write_bytes(bytes(4096))
    with pytest.raises(
        InvalidArgument,
        match=(rf"^'host_cdrom' driver requires '{iso}' to be either a character or block device$"),
    ):
        HostCdromDriver.open(options(filename=str(iso), read_only=True))
    with pytest.raises(NotFound, match=r"^Could not open '/nonexistent/sr9': No such file"):
        HostCdromDriver.open(options(filename="/nonexistent/sr9", read_only=True))
    with pytest.raises(InvalidArgument, match="aio=native"):
        HostCdromDriver.open(options(aio="native", read_only=True))


def test_registered_and_works_on_a_device_that_is_no_drive() -> None:
    # The real kernel interface on /dev/null: every cdrom ioctl says ENOTTY.
    assert cast(object, DRIVERS["host_cdrom"]) is HostCdromDriver
    cd = open_driver(options(filename="/dev/null", read_only=True))
    try:
        assert isinstance(cd, HostCdromDriver)
        assert isinstance(cd, Removable) and isinstance(cd, Passthrough)
        assert cd.getlength() == 0
        assert cd.tray_state() is TrayState.NO_INFO and not cd.is_inserted()
        assert cd.media_changed() is False
        with pytest.raises(OSError) as caught:
            read(cd)
        assert caught.value.errno == errno.ENOMEDIUM
        with pytest.raises(OSError) as caught:
            cd.eject(True)
        assert caught.value.errno == errno.ENOTTY and "ejecting /dev/null" in str(caught.value)
        with pytest.raises(OSError) as caught:
            cd.scsi_command(_scsi.test_unit_ready())
        assert caught.value.errno == errno.ENOTTY
    finally:
        cd.close()


# -- status and media change ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "state"),
    [
        (0, TrayState.NO_INFO),
        (1, TrayState.NO_DISC),
        (2, TrayState.TRAY_OPEN),
        (3, TrayState.NOT_READY),
        (4, TrayState.DISC_OK),
        (100, TrayState.NO_INFO),  # CDS_AUDIO belongs to CDROM_DISC_STATUS, not here
    ],
)
def test_drive_status_mapping(
    drive: FakeDrive,
    cd: HostCdromDriver,
    monkeypatch: pytest.MonkeyPatch,
    answer: int,
    state: TrayState,
) -> None:
    monkeypatch.setattr(drive, "_state", lambda: answer)
    assert cd.tray_state() is state
    assert cd.is_inserted() is (state is TrayState.DISC_OK)
    assert drive.calls == [("status", CDSL_CURRENT)] * 2


def test_status_errors(drive: FakeDrive, cd: HostCdromDriver) -> None:
    drive.status_errno = errno.ENOSYS  # no CDC_DRIVE_STATUS
    assert cd.tray_state() is TrayState.NO_INFO
    drive.status_errno = errno.EIO
    with pytest.raises(OSError, match="reading the drive status of /dev/sr0") as caught:
        cd.tray_state()
    assert caught.value.errno == errno.EIO


def test_media_changed_is_read_once(drive: FakeDrive, cd: HostCdromDriver) -> None:
    assert cd.media_changed() is False
    drive.changed = True
    assert cd.media_changed() is True
    assert cd.media_changed() is False
    assert drive.calls == [("changed", CDSL_CURRENT)] * 3
    drive.is_cdrom = False
    assert cd.media_changed() is False


def test_a_changed_disc_is_reread(drive: FakeDrive, cd: HostCdromDriver) -> None:
    drive.disc, drive.changed = 8 * MiB, True  # swapped while the tray stayed shut
    assert cd.media_changed()
    before = drive.revalidations
    assert cd.refresh_medium() == 8 * MiB
    assert drive.revalidations == before + 1  # the node was opened again first
    assert cd.medium_size == 8 * MiB and cd.medium_present


def test_refresh_waits_for_a_drive_becoming_ready(drive: FakeDrive, cd: HostCdromDriver) -> None:
    drive.not_ready_polls = 3
    assert cd.refresh_medium() == 4 * MiB
    assert drive.sleeps == [HostCdromDriver.ready_poll_s] * 3


def test_refresh_gives_up_on_a_drive_that_stays_not_ready(
    drive: FakeDrive, cd: HostCdromDriver
) -> None:
    drive.not_ready_polls = 10_000
    assert cd.refresh_medium() == 0 and not cd.medium_present
    polls = int(HostCdromDriver.ready_timeout_s / HostCdromDriver.ready_poll_s)
    assert len(drive.sleeps) == polls


# -- tray and lock ----------------------------------------------------------------------------


def test_eject_and_close(drive: FakeDrive, cd: HostCdromDriver) -> None:
    cd.eject(True)
    assert drive.tray_open and drive.calls == [("eject", 0)]
    assert not cd.medium_present and cd.medium_size == 0
    assert cd.tray_state() is TrayState.TRAY_OPEN
    with pytest.raises(OSError) as caught:
        read(cd)
    assert caught.value.errno == errno.ENOMEDIUM
    drive.calls.clear()
    cd.eject(False)
    assert not drive.tray_open and drive.calls == [("close", 0)]
    assert cd.refresh_medium() == 4 * MiB
    assert read(cd, 2048) == bytes(2048)
    assert drive.cdbs == []  # the cdrom ioctls sufficed


def test_closing_an_empty_drive(opened: list[HostCdromDriver]) -> None:
    drive = FakeDrive(disc=None)
    cd = open_cd(drive, opened)
    drive.tray_open = True
    cd.eject(False)  # sr says ENOMEDIUM, but the tray did close
    assert drive.calls == [("close", 0), ("status", CDSL_CURRENT)]
    assert cd.refresh_medium() == 0


def test_close_failure_is_reported(drive: FakeDrive, cd: HostCdromDriver) -> None:
    drive.close_errno = errno.EIO
    with pytest.raises(OSError) as caught:
        cd.eject(False)
    assert caught.value.errno == errno.EIO
    assert caught.value.strerror == "closing the tray of /dev/sr0: Input/output error"
    drive.close_errno = errno.ENOSYS
    with pytest.raises(OSError, match="cannot close its tray"):
        cd.eject(False)


def test_eject_enomedium_with_the_tray_open_is_done(
    drive: FakeDrive, cd: HostCdromDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = drive.ioctl

    def eject_says_no_medium(fd: int, request: int, arg: int = 0) -> int:
        answer = real(fd, request, arg)
        if request == CDROMEJECT:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))
        return answer

    monkeypatch.setattr(drive, "ioctl", eject_says_no_medium)
    cd.eject(True)
    assert drive.tray_open and not cd.medium_present
    drive.tray_open = False
    drive.prevented, drive.unlock_result = True, 2  # now the tray really stays shut
    with pytest.raises(OSError) as caught:
        cd.eject(True)
    assert caught.value.errno == errno.ENOMEDIUM
    assert caught.value.strerror == "ejecting /dev/sr0: No medium found"


def test_a_drive_without_a_tray_motor(drive: FakeDrive, cd: HostCdromDriver) -> None:
    drive.eject_errno = errno.ENOSYS
    with pytest.raises(OSError) as caught:
        cd.eject(True)
    assert caught.value.errno == errno.ENOSYS
    assert caught.value.strerror == "ejecting /dev/sr0: the drive cannot open its tray"
    assert drive.cdbs == []


def test_lock_and_unlock(drive: FakeDrive, cd: HostCdromDriver) -> None:
    cd.lock_medium(True)
    assert drive.keeplocked and drive.prevented and drive.calls == [("lockdoor", 1)]
    drive.calls.clear()
    with pytest.raises(OSError, match="drive is locked") as caught:
        cd.eject(True)  # our own lock: refused without touching the drive
    assert caught.value.errno == errno.EBUSY
    assert drive.calls == [] and drive.cdbs == [] and not drive.tray_open
    cd.lock_medium(False)
    assert not drive.keeplocked and not drive.prevented
    cd.eject(True)
    assert drive.tray_open


def test_a_foreign_lock_that_survives_cdromeject_is_lifted(
    drive: FakeDrive, cd: HostCdromDriver
) -> None:
    # Locked behind the cdrom layer's back (udev's cdrom_id); unlocking inside
    # CDROMEJECT fails and the kernel hands back the SCSI result 2 instead of an
    # errno (seen in the VM tier).  blockd holds no lock, so it lifts the foreign
    # one: CDROM_LOCKDOOR(0), CDROMEJECT again, and SCSI when the kernel still refuses.
    drive.prevented, drive.unlock_result = True, 2
    cd.eject(True)
    assert drive.calls[:4] == [("eject", 0), ("status", CDSL_CURRENT), ("lockdoor", 0),
                               ("eject", 0)]
    assert [cdb[0] for cdb in drive.cdbs] == [0x1E, 0x1B]  # ALLOW REMOVAL, START STOP
    assert drive.tray_open and not drive.prevented and not cd.medium_present


def test_blockds_own_lock_is_never_lifted_by_eject(drive: FakeDrive, cd: HostCdromDriver) -> None:
    cd.lock_medium(True)
    drive.calls.clear()
    with pytest.raises(OSError, match="drive is locked") as caught:
        cd.eject(True)
    assert caught.value.errno == errno.EBUSY
    assert drive.calls == [] and drive.cdbs == [] and not drive.tray_open
    assert cd.medium_present and read(cd, 512) == bytes(512)


def test_positive_return_with_the_tray_open_counts_as_done(
    drive: FakeDrive, cd: HostCdromDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = drive.ioctl

    def odd_eject(fd: int, request: int, arg: int = 0) -> int:
        answer = real(fd, request, arg)
        return 2 if request == CDROMEJECT else answer

    monkeypatch.setattr(drive, "ioctl", odd_eject)
    cd.eject(True)
    assert drive.tray_open and not cd.medium_present


def test_a_foreign_lock_held_by_another_opener_is_lifted_through_sg_io(
    drive: FakeDrive, cd: HostCdromDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Linux >= 5.18: CDROMEJECT ignores other openers but cannot lift a foreign lock
    # (it returns the SCSI result 2), and without CAP_SYS_ADMIN CDROM_LOCKDOOR(0)
    # refuses with EBUSY while another program holds the drive: SCSI it is.
    real = drive.ioctl

    def modern_eject(fd: int, request: int, arg: int = 0) -> int:
        if request == CDROMEJECT and drive.prevented:
            drive.calls.append(("eject", arg))
            return 2
        return real(fd, request, arg)

    monkeypatch.setattr(drive, "ioctl", modern_eject)
    drive.prevented, drive.other_openers = True, 1
    cd.eject(True)
    assert drive.calls[:3] == [("eject", 0), ("status", CDSL_CURRENT), ("lockdoor", 0)]
    assert drive.cdbs == [bytes.fromhex("1e0000000000"), bytes.fromhex("1b0000000200")]
    assert drive.tray_open and not drive.prevented and not cd.medium_present


def test_ebusy_eject_falls_back_to_sg_io(drive: FakeDrive, cd: HostCdromDriver) -> None:
    drive.other_openers = 1  # udev's cdrom_id, a prober, a mount
    cd.eject(True)
    assert drive.calls == [("eject", 0)]
    assert drive.cdbs == [bytes.fromhex("1e0000000000"), bytes.fromhex("1b0000000200")]
    assert drive.tray_open and not cd.medium_present


def test_ebusy_eject_overrides_a_lock_someone_else_set(
    drive: FakeDrive, cd: HostCdromDriver
) -> None:
    drive.keeplocked = drive.prevented = True  # udev's cdrom_id --lock-media
    cd.eject(True)
    assert drive.cdbs == [bytes.fromhex("1e0000000000"), bytes.fromhex("1b0000000200")]
    assert drive.tray_open and not drive.prevented


def test_fallback_eject_reports_the_drives_reason(drive: FakeDrive, cd: HostCdromDriver) -> None:
    drive.other_openers, drive.prevented, drive.cap_sys_rawio = 1, True, False
    with pytest.raises(_scsi.ScsiCommandError) as caught:
        cd.eject(True)
    err = caught.value
    assert err.errno == errno.EBUSY
    assert str(err).startswith("ejecting /dev/sr0: ILLEGAL REQUEST: medium removal prevented")
    assert "CAP_SYS_RAWIO" in str(err)  # why unlocking first did not help
    assert err.sense is not None and (err.sense.asc, err.sense.ascq) == (0x53, 0x02)
    assert drive.cdbs == [bytes.fromhex("1e0000000000"), bytes.fromhex("1b0000000200")]
    assert not drive.tray_open and cd.medium_present


def test_unlock_refused_by_the_cdrom_layer_goes_through_sg_io(
    drive: FakeDrive, cd: HostCdromDriver
) -> None:
    cd.lock_medium(True)
    drive.other_openers = 1  # unlocking with other openers needs CAP_SYS_ADMIN
    cd.lock_medium(False)
    assert drive.cdbs == [bytes.fromhex("1e0000000000")]
    assert not drive.prevented and not drive.keeplocked
    drive.other_openers = 0
    cd.eject(True)  # blockd no longer holds the lock
    assert drive.tray_open


def test_unlock_sg_io_refused(drive: FakeDrive, cd: HostCdromDriver) -> None:
    cd.lock_medium(True)
    drive.other_openers, drive.cap_sys_rawio = 1, False
    with pytest.raises(OSError, match="CAP_SYS_RAWIO") as caught:
        cd.lock_medium(False)
    assert caught.value.errno == errno.EPERM
    with pytest.raises(OSError, match="drive is locked"):
        cd.eject(True)  # the failed unlock left blockd's lock in place


def test_lock_with_a_leaked_scsi_result_retries_through_sg_io(
    drive: FakeDrive, cd: HostCdromDriver
) -> None:
    drive.lock_result = 2
    cd.lock_medium(True)
    assert drive.calls == [("lockdoor", 1)]
    assert drive.cdbs == [bytes.fromhex("1e0000000100")]
    assert drive.prevented


def test_a_drive_without_a_lock(
    drive: FakeDrive, cd: HostCdromDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_lock(fd: int, request: int, arg: int = 0) -> int:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))  # EDRIVE_CANT_DO_THIS

    monkeypatch.setattr(drive, "ioctl", no_lock)
    with pytest.raises(OSError, match="the drive has no medium lock") as caught:
        cd.lock_medium(True)
    assert caught.value.errno == errno.EOPNOTSUPP


def test_close_tray_ebusy_falls_back_and_tolerates_no_medium(
    opened: list[HostCdromDriver],
) -> None:
    drive = FakeDrive(disc=None)
    cd = open_cd(drive, opened)
    drive.tray_open, drive.close_errno = True, errno.EBUSY
    cd.eject(False)
    assert drive.cdbs == [bytes.fromhex("1b0000000300")]  # LoEj=1 Start=1
    assert not drive.tray_open


def test_close_releases_blockds_lock(drive: FakeDrive, cd: HostCdromDriver) -> None:
    cd.lock_medium(True)
    drive.calls.clear()
    cd.close()
    assert drive.calls == [("lockdoor", 0)] and not drive.keeplocked
    assert cd.fd == -1
    cd.close()  # twice is fine
    assert drive.calls == [("lockdoor", 0)]


def test_close_without_a_lock_leaves_the_drive_alone(drive: FakeDrive, cd: HostCdromDriver) -> None:
    drive.keeplocked = True  # someone else's
    cd.close()
    assert drive.calls == [] and drive.keeplocked


# -- passthrough ------------------------------------------------------------------------------


def test_scsi_command_passthrough(drive: FakeDrive, cd: HostCdromDriver) -> None:
    assert cd.scsi_command(_scsi.test_unit_ready()) == ScsiResult(0, b"", b"")
    drive.tray_open = True
    result = cd.scsi_command(_scsi.test_unit_ready())
    assert result.status == 2  # the drive's answer is returned, not raised
    sense = _scsi.decode_sense(result.sense)
    assert sense is not None and sense.describe() == "NOT READY: medium not present - tray open"
    with pytest.raises(ValueError):
        cd.scsi_command(b"\x00\x00")
    assert drive.cdbs == [bytes(6), bytes(6)]


def test_scsi_command_transport_failure(
    drive: FakeDrive, cd: HostCdromDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drive, "sg_io", lambda *a: _scsi.SgIoResult(status=0, host_status=3))
    with pytest.raises(OSError, match="TEST UNIT READY on /dev/sr0") as caught:
        cd.scsi_command(_scsi.test_unit_ready())
    assert caught.value.errno == errno.ETIMEDOUT


# -- reads ------------------------------------------------------------------------------------


def test_reads_need_a_disc(opened: list[HostCdromDriver]) -> None:
    drive = FakeDrive(disc=None)
    cd = open_cd(drive, opened)
    buf = memoryview(bytearray(2048))
    for call in (cd.preadv, cd.preadv_nowait):
        with pytest.raises(OSError) as caught:
            call(0, [buf])
        assert caught.value.errno == errno.ENOMEDIUM
        assert "reading /dev/sr0" in str(caught.value)
    assert drive.calls == []  # decided without asking the drive


def test_reads_of_a_disc(cd: HostCdromDriver) -> None:
    assert read(cd, 4096) == bytes(4096)


def test_a_read_error_on_an_emptied_drive_is_enomedium(
    drive: FakeDrive, cd: HostCdromDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(self: PosixDriver, offset: int, buffers: Any) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(PosixDriver, "preadv", failing)
    with pytest.raises(OSError) as caught:
        read(cd)
    assert caught.value.errno == errno.EIO  # the disc is still there: a real read error
    drive.disc = None  # pulled out behind blockd's back
    with pytest.raises(OSError) as caught:
        read(cd)
    assert caught.value.errno == errno.ENOMEDIUM


# -- concurrency ------------------------------------------------------------------------------


class SlowDrive(FakeDrive):
    """Counts how many kernel calls overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.most = 0
        self.guard = threading.Lock()

    def ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        with self.guard:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.002)
            return super().ioctl(fd, request, arg)
        finally:
            with self.guard:
                self.active -= 1


def test_one_tray_operation_at_a_time(opened: list[HostCdromDriver]) -> None:
    drive = SlowDrive()
    cd = open_cd(drive, opened)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                if i % 3 == 0:
                    cd.lock_medium(True)
                    cd.lock_medium(False)
                elif i % 3 == 1:
                    cd.tray_state()
                    cd.media_changed()
                else:
                    cd.refresh_medium()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert drive.most == 1


# -- probing ----------------------------------------------------------------------------------

BLK = stat.S_IFBLK | 0o660
CHR = stat.S_IFCHR | 0o660
REG = stat.S_IFREG | 0o644


def never() -> bool:
    raise AssertionError("the drive must not be asked")


@pytest.mark.parametrize(
    ("name", "mode", "answers", "score"),
    [
        ("/dev/sr0", BLK, never, 100),
        ("/dev/sr12", BLK, never, 100),
        ("/dev/cdrom", BLK, never, 100),
        ("/dev/cdrom1", BLK, never, 100),
        ("/dev/dvd-nowhere", BLK, lambda: False, 0),  # not a CD name, does not answer
        ("/dev/loop0", BLK, lambda: True, 100),  # answers CDROM_DRIVE_STATUS
        ("/dev/loop0", BLK, lambda: False, 0),
        ("/dev/sda", CHR, never, 0),
        ("/dev/sr0", REG, never, 0),
        ("/dev/srx", BLK, lambda: False, 0),
    ],
)
def test_probe_scores(name: str, mode: int, answers: Any, score: int) -> None:
    assert _probe_score(name, mode, answers) == score


def test_probe_follows_links_to_sr_nodes(tmp_path: Path) -> None:
    link = tmp_path / "dvd"
    link.symlink_to("/dev/sr3")
    assert _probe_score(str(link), BLK, never) == 100


def test_probe_device_on_real_paths(tmp_path: Path) -> None:
    iso = tmp_path / "cd.iso"
    iso.write_bytes(b"x")
    assert HostCdromDriver.probe_device(str(iso)) == 0
    assert HostCdromDriver.probe_device(str(tmp_path / "missing")) == 0
    assert HostCdromDriver.probe_device("/dev/null") == 0
