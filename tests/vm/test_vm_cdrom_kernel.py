"""The VM tier proven on the guest kernel's own drivers (no blockd yet).

One guest (one boot) with an ATAPI drive holding disc "a", an empty ATAPI drive, a
virtio-scsi CD and a virtio-scsi disk.  The guest drives the hardware with the kernel's
CD-ROM ioctls and the emulator confirms through the witness; the witness plays the user
(the eject button, a disc swap) and the guest's kernel sees it.  Tests that change a
drive put it back (unlocked, disc "a", tray closed) when they end.

udev takes part: after every media change its cdrom_id opens the drive and locks the
tray (60-cdrom_id.rules, ``--lock-media``, so that the button sends eject requests), and
the drive reports the change once as a SCSI unit attention.  The tests wait for udev to
settle and for the drive to report its disc before acting.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import guest
import pytest
from guest import (
    CDS_DISC_OK,
    CDS_NO_DISC,
    CDS_TRAY_OPEN,
    CDSL_CURRENT,
    SECTOR,
    VM,
    GuestDevice,
    Witness,
    disc_sector,
    udev_settle,
)

import blockd
from blockd.devices._ioctl import (
    CDROM_DRIVE_STATUS,
    CDROM_LOCKDOOR,
    CDROMCLOSETRAY,
    CDROMEJECT,
    SG_GET_VERSION_NUM,
    ioctl_int,
    ioctl_value,
)

VM_HARDWARE = ["atapi-cd", "atapi-cd-empty", "scsi-cd", "scsi-hd"]

T = TypeVar("T")


def eventually(probe: Callable[[], T], want: Callable[[T], bool], timeout: float = 15,
               what: str = "") -> T:
    """Poll ``probe`` until ``want`` holds for its value (the kernel notices media
    changes asynchronously); fail with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if want(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what or probe.__name__}: still {value!r} after {timeout} s")
        time.sleep(0.2)


def open_drive(dev: GuestDevice) -> int:
    return os.open(dev.node, os.O_RDONLY | os.O_NONBLOCK)


def drive_status(dev: GuestDevice) -> int:
    fd = open_drive(dev)
    try:
        return ioctl_value(fd, CDROM_DRIVE_STATUS, CDSL_CURRENT)
    finally:
        os.close(fd)


def try_read_sector(dev: GuestDevice, n: int) -> bytes | str:
    """The sector, or the error reading it gave (while the kernel catches up)."""
    try:
        return read_sector(dev, n)
    except OSError as e:
        return f"OSError: {e}"


def read_sector(dev: GuestDevice, n: int) -> bytes:
    fd = open_drive(dev)
    try:
        return os.pread(fd, SECTOR, n * SECTOR)
    finally:
        os.close(fd)


def eject(fd: int) -> list[str]:
    """CDROMEJECT until it succeeds; returns what the failed attempts gave.

    The kernel refuses with EBUSY while another opener (udev's cdrom_id) has the drive
    open.  It unlocks the door first, but a unit attention still pending from a media
    change swallows that unlock (the SCSI layer counts it as success), and the START
    STOP UNIT that follows then fails with CHECK CONDITION: a positive return of 2, no
    errno.  The next attempt works.
    """
    failures: list[str] = []
    deadline = time.monotonic() + 10
    while True:
        try:
            ret = ioctl_value(fd, CDROMEJECT)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            ret = -errno.EBUSY
        if ret == 0:
            return failures
        failures.append(f"returned {ret}" if ret > 0 else "EBUSY")
        if time.monotonic() > deadline:
            dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
            pytest.fail(f"CDROMEJECT kept failing: {failures}\n"
                        + "\n".join(dmesg.splitlines()[-30:]))
        time.sleep(0.2)


def drive_ready(dev: GuestDevice) -> None:
    """udev done with the drive, and the drive reporting its disc."""
    udev_settle()
    eventually(lambda: drive_status(dev), lambda s: s == CDS_DISC_OK, what="drive status")


@pytest.fixture
def cdrom0(vm: VM, witness: Witness) -> Iterator[GuestDevice]:
    """The ATAPI drive with disc "a", restored to that state after the test."""
    dev = vm.device("cdrom0")
    drive_ready(dev)
    yield dev
    fd = open_drive(dev)
    try:
        ioctl_value(fd, CDROM_LOCKDOOR, 0)
    finally:
        os.close(fd)
    witness.change_medium("cdrom0", vm.disc("a"))
    drive_ready(dev)


def test_the_guest_runs_this_tree() -> None:
    """The guest imports the blockd of the tree under test (the runner's cwd comes first
    on sys.path), not the one the venv's editable install points to, if that differs."""
    assert Path(blockd.__file__).resolve().is_relative_to(guest.ROOT), blockd.__file__
    assert Path(__file__).resolve().is_relative_to(guest.ROOT)


def test_guest_has_the_declared_hardware(vm: VM) -> None:
    for module in ("sr_mod", "sg", "virtio_scsi"):
        assert Path("/sys/module", module).is_dir(), f"kernel module {module} not loaded"
    kinds = {}
    for dev_id, dev in vm.devices.items():
        assert stat.S_ISBLK(os.stat(dev.node).st_mode), dev
        assert dev.sg is not None and stat.S_ISCHR(os.stat(dev.sg).st_mode), dev
        kinds[dev_id] = Path(dev.node).name[:2]
    assert kinds == {"cdrom0": "sr", "cdrom1": "sr", "scsicd0": "sr", "scsihd0": "sd"}
    fd = os.open(vm.device("cdrom0").sg or "", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert ioctl_int(fd, SG_GET_VERSION_NUM) >= 30000
    finally:
        os.close(fd)


def udev_properties(dev: GuestDevice) -> str:
    majmin = Path("/sys/class/block", Path(dev.node).name, "dev").read_text().strip()
    return Path(f"/run/udev/data/b{majmin}").read_text()


def test_udev_knows_the_cd_drives(vm: VM) -> None:
    for dev_id in ("cdrom0", "cdrom1", "scsicd0"):
        assert "E:ID_CDROM=1\n" in udev_properties(vm.device(dev_id)), dev_id
    assert "E:ID_CDROM_MEDIA=1\n" in udev_properties(vm.device("cdrom0"))
    assert "E:ID_CDROM_MEDIA=1\n" not in udev_properties(vm.device("cdrom1"))


@pytest.mark.parametrize("dev_id", ["cdrom0", "scsicd0", "scsihd0"])
def test_guest_reads_the_image(vm: VM, dev_id: str) -> None:
    dev = vm.device(dev_id)
    label = dev.disc if dev.hardware.is_cd else dev_id
    assert label is not None
    size = os.path.getsize(dev.image or "")
    for n in (0, 1, size // SECTOR - 1):
        assert read_sector(dev, n) == disc_sector(label, n)


def test_lockdoor_is_seen_by_the_emulator(cdrom0: GuestDevice, witness: Witness) -> None:
    fd = open_drive(cdrom0)
    try:
        assert ioctl_value(fd, CDROM_LOCKDOOR, 1) == 0
        assert witness.device("cdrom0")["locked"] is True
        assert ioctl_value(fd, CDROM_LOCKDOOR, 0) == 0
        assert witness.device("cdrom0")["locked"] is False
    finally:
        os.close(fd)


def test_eject_and_close_tray_are_seen_by_the_emulator(cdrom0: GuestDevice,
                                                       witness: Witness) -> None:
    fd = open_drive(cdrom0)
    try:
        # udev locked the tray (cdrom_id --lock-media); unlock it as a program would.
        assert ioctl_value(fd, CDROM_LOCKDOOR, 0) == 0
        assert witness.device("cdrom0")["locked"] is False
        failures = eject(fd)
        print("CDROMEJECT attempts that failed first:", failures)
        ev = witness.wait_event("DEVICE_TRAY_MOVED", match={"id": "cdrom0"})
        assert ev["data"]["tray-open"] is True
        assert witness.device("cdrom0")["tray_open"] is True
        assert ioctl_value(fd, CDROMCLOSETRAY) == 0
        ev = witness.wait_event("DEVICE_TRAY_MOVED", match={"id": "cdrom0"})
        assert ev["data"]["tray-open"] is False
        assert witness.device("cdrom0")["tray_open"] is False
    finally:
        os.close(fd)
    drive_ready(cdrom0)


def test_button_press_is_seen_by_the_guest(cdrom0: GuestDevice, witness: Witness) -> None:
    assert drive_status(cdrom0) == CDS_DISC_OK
    witness.press_button("cdrom0")
    witness.wait_event("DEVICE_TRAY_MOVED", match={"id": "cdrom0", "tray-open": True})
    eventually(lambda: drive_status(cdrom0), lambda s: s == CDS_TRAY_OPEN, what="status")


def test_disc_swap_is_seen_by_the_guest(vm: VM, cdrom0: GuestDevice,
                                        witness: Witness) -> None:
    assert read_sector(cdrom0, 0) == disc_sector("a", 0)
    witness.change_medium("cdrom0", vm.disc("b"))
    assert witness.device("cdrom0")["inserted"]["file"] == str(vm.disc("b"))
    eventually(lambda: try_read_sector(cdrom0, 0), lambda d: d == disc_sector("b", 0),
               what="first sector")
    assert read_sector(cdrom0, 7) == disc_sector("b", 7)


def test_empty_drive(vm: VM, witness: Witness) -> None:
    dev = vm.device("cdrom1")
    info = witness.device("cdrom1")
    assert "inserted" not in info and info["tray_open"] is False
    assert drive_status(dev) == CDS_NO_DISC
    # Opening for data (without O_NONBLOCK) is where the kernel says "no medium" ...
    with pytest.raises(OSError) as failed:
        os.close(os.open(dev.node, os.O_RDONLY))
    assert failed.value.errno == errno.ENOMEDIUM
    # ... a read through an O_NONBLOCK descriptor fails as plain I/O error.
    with pytest.raises(OSError) as failed:
        read_sector(dev, 0)
    assert failed.value.errno == errno.EIO


def test_witness_sessions_start_fresh(vm: VM) -> None:
    """Each open of the witness port is its own QMP session with its own events (the
    port has one opener at a time, so this test opens its own, one after the other)."""
    first = Witness()
    try:
        first.press_button("cdrom1")  # an empty drive: only its tray moves
        first.wait_event("DEVICE_TRAY_MOVED", match={"id": "cdrom1", "tray-open": True})
    finally:
        first.close()
    second = Witness()
    try:
        assert second.events == []
        assert second.device("cdrom1")["tray_open"] is True
        second.execute("blockdev-close-tray", {"id": "cdrom1"})
        second.wait_event("DEVICE_TRAY_MOVED", match={"id": "cdrom1", "tray-open": False})
    finally:
        second.close()
