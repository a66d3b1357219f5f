"""Tray, lock and medium operations (blockd/block/media.py) with QEMU's rules and events.

Virtual trays run on real file nodes.  Host-drive behaviour runs on a fake drive
here (the layer under test is the one above the driver); the real drive is
tested in tests/vm/ on the kernel's CD-ROM drivers.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import devio
import pytest

from blockd.block import media
from blockd.block.device import Device
from blockd.block.node import Node
from blockd.block.registry import Registry
from blockd.devices.base import DriverInfo, NodeOptions, Removable, TrayState
from blockd.errors import BlockdError, DeviceNotFound, InUse, InvalidArgument, NoMedium, NotFound
from blockd.events import DeviceTrayMoved, Event, EventBus


class FakeDrive:
    """A drive model: tray, lock, disc; records every call the media layer makes."""

    format_name = "host_cdrom"
    memory_backed = False

    def __init__(self, disc: int | None = 2048) -> None:
        self.options = NodeOptions(driver="host_cdrom", node_name="drive0",
                                   filename="/dev/sr0", read_only=True)
        self.read_only = True
        self.disc = disc  # size in bytes, None: no disc
        self.tray_is_open = False
        self.is_locked = False
        self.changed = False
        self.calls: list[tuple[str, object]] = []

    # Removable
    @property
    def medium_present(self) -> bool:
        return self.disc is not None and not self.tray_is_open

    def is_inserted(self) -> bool:
        return self.disc is not None and not self.tray_is_open

    def tray_state(self) -> TrayState:
        if self.tray_is_open:
            return TrayState.TRAY_OPEN
        return TrayState.DISC_OK if self.disc is not None else TrayState.NO_DISC

    def media_changed(self) -> bool:
        changed, self.changed = self.changed, False
        return changed

    def eject(self, eject_flag: bool) -> None:
        self.calls.append(("eject", eject_flag))
        if eject_flag and self.is_locked:
            raise OSError(errno.EBUSY, "drive is locked")
        self.tray_is_open = eject_flag

    def lock_medium(self, locked: bool) -> None:
        self.calls.append(("lock", locked))
        self.is_locked = locked

    # BlockDriver (what the media layer touches)
    def getlength(self) -> int:
        if self.disc is None or self.tray_is_open:
            raise OSError(errno.ENOMEDIUM, "No medium found")
        return self.disc

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        raise OSError(errno.ENOMEDIUM, "No medium found")

    def close(self) -> None:
        pass


@pytest.fixture
def registry() -> Registry:
    return Registry(executor=ThreadPoolExecutor(2), bus=EventBus())


@pytest.fixture
def events(registry: Registry) -> list[Event]:
    seen: list[Event] = []
    registry.bus.subscribe(seen.append)
    return seen


def trays(events: list[Event]) -> list[bool]:
    return [e.tray_open for e in events if isinstance(e, DeviceTrayMoved)]


def iso(tmp_path: Path, name: str, size: int = 4096, fill: bytes = b"D") -> Path:
    path = tmp_path / name
    path.write_bytes(fill * size)
    return path


async def cd_with_file(registry: Registry, tmp_path: Path) -> Device:
    await registry.add_node(NodeOptions(driver="file", node_name="iso0",
                                        filename=str(iso(tmp_path, "a.iso")), read_only=True))
    return registry.add_device("cd", "cd0", "iso0")


def cd_with_drive(registry: Registry, drive: FakeDrive) -> Device:
    assert isinstance(drive, Removable)
    node = Node("drive0", drive, drive.options, drive.disc or 0,  # type: ignore[arg-type]
                DriverInfo(filename="/dev/sr0"))
    registry.nodes["drive0"] = node
    return registry.add_device("cd", "cd0", "drive0")


# -- virtual tray ----------------------------------------------------------------------


async def test_eject_opens_the_tray_and_removes_the_medium(
    registry: Registry, events: list[Event], tmp_path: Path
) -> None:
    cd = await cd_with_file(registry, tmp_path)
    await media.eject(registry, cd, "cd0", False)
    assert trays(events) == [True]
    assert cd.tray_open and cd.node is None
    assert registry.nodes["iso0"].user is None  # a monitor-owned node stays, free
    assert "inserted" not in cd.block_info() and cd.block_info()["tray_open"] is True
    await media.eject(registry, cd, "cd0", False)  # already open and empty: a no-op
    assert trays(events) == [True]


async def test_reads_fail_with_no_medium_while_the_tray_is_open(
    registry: Registry, tmp_path: Path
) -> None:
    cd = await cd_with_file(registry, tmp_path)
    assert await devio.pread(cd, 0, 4) == b"DDDD"
    await media.open_tray(registry, cd, "cd0", False)
    assert cd.node is not None  # open tray: still inserted, but unreachable
    with pytest.raises(NoMedium):
        await devio.pread(cd, 0, 4)
    assert cd.block_stats()["stats"]["failed_rd_operations"] == 1  # type: ignore[index]
    await media.close_tray(registry, cd, "cd0")
    assert await devio.pread(cd, 0, 4) == b"DDDD"


async def test_locked_tray(registry: Registry, events: list[Event], tmp_path: Path) -> None:
    cd = await cd_with_file(registry, tmp_path)
    await media.lock_medium(registry, cd, "cd0", True)
    assert cd.block_info()["locked"] is True
    with pytest.raises(BlockdError, match=r"^Device 'cd0' is locked and force was not "
                       r"specified, wait for tray to open and try again$"):
        await media.eject(registry, cd, "cd0", False)
    await media.open_tray(registry, cd, "cd0", False)  # QEMU: success, tray stays shut
    assert not cd.tray_open and cd.node is not None and events == []
    await media.eject(registry, cd, "cd0", True)
    assert trays(events) == [True] and not cd.locked and cd.node is None


async def test_close_and_open_are_no_ops_when_already_there(
    registry: Registry, events: list[Event], tmp_path: Path
) -> None:
    cd = await cd_with_file(registry, tmp_path)
    await media.close_tray(registry, cd, "cd0")
    await media.open_tray(registry, cd, "cd0", False)
    await media.open_tray(registry, cd, "cd0", False)
    await media.close_tray(registry, cd, "cd0")
    assert trays(events) == [True, False]


async def test_remove_and_insert_medium(
    registry: Registry, events: list[Event], tmp_path: Path
) -> None:
    cd = await cd_with_file(registry, tmp_path)
    await registry.add_node(NodeOptions(driver="file", node_name="iso1",
                                        filename=str(iso(tmp_path, "b.iso", fill=b"E"))))
    with pytest.raises(BlockdError, match=r"^Tray of device 'cd0' is not open$"):
        await media.remove_medium(registry, cd, "cd0")
    with pytest.raises(BlockdError, match=r"^Tray of the device is not open$"):
        await media.insert_medium(registry, cd, "iso1")
    await media.open_tray(registry, cd, "cd0", False)
    with pytest.raises(BlockdError, match=r"^There already is a medium in the device$"):
        await media.insert_medium(registry, cd, "iso1")
    await media.remove_medium(registry, cd, "cd0")
    await media.remove_medium(registry, cd, "cd0")  # again: a no-op
    with pytest.raises(NotFound, match=r"^Node 'nope' not found$"):
        await media.insert_medium(registry, cd, "nope")
    await media.insert_medium(registry, cd, "iso1")
    with pytest.raises(InUse, match=r"^Node 'iso1' is already in use$"):
        await media.insert_medium(registry, cd, "iso1")
    await media.close_tray(registry, cd, "cd0")
    assert await devio.pread(cd, 0, 2) == b"EE"
    assert trays(events) == [True, False]  # insert and remove move no tray


async def test_fixed_devices_are_not_removable(registry: Registry, tmp_path: Path) -> None:
    await registry.add_node(NodeOptions(driver="null-co", node_name="n0"))
    await registry.add_node(NodeOptions(driver="null-co", node_name="n1"))
    hd = registry.add_device("hd", "hd0", "n0")
    for op in (media.eject(registry, hd, "hd0", False),
               media.open_tray(registry, hd, "hd0", True),
               media.close_tray(registry, hd, "hd0"),
               media.remove_medium(registry, hd, "hd0"),
               media.lock_medium(registry, hd, "hd0", True)):
        with pytest.raises(InvalidArgument, match=r"^Device 'hd0' is not removable$"):
            await op
    with pytest.raises(InvalidArgument, match=r"^Device is not removable$"):
        await media.insert_medium(registry, hd, "n1")


async def test_change_medium_swaps_in_a_new_image(
    registry: Registry, events: list[Event], tmp_path: Path
) -> None:
    cd = await cd_with_file(registry, tmp_path)
    new = iso(tmp_path, "new.iso", size=8192, fill=b"N")
    await media.change_medium(registry, cd, "cd0", str(new), "raw", "retain", False)
    assert trays(events) == [True, False]
    assert cd.node is not None and cd.node.name.startswith("#block")
    assert cd.node.size == 8192 and cd.node.read_only and not cd.node.monitor_owned
    assert await devio.pread(cd, 0, 1) == b"N"
    assert registry.nodes["iso0"].user is None
    generated = cd.node.name
    await media.eject(registry, cd, "cd0", False)  # a medium blockd opened goes with it
    assert generated not in registry.nodes


async def test_change_medium_failures_leave_the_drive_alone(
    registry: Registry, events: list[Event], tmp_path: Path
) -> None:
    cd = await cd_with_file(registry, tmp_path)
    with pytest.raises(BlockdError, match=r"^Could not open '.*missing.iso': No such file"):
        await media.change_medium(registry, cd, "cd0", str(tmp_path / "missing.iso"), "raw",
                                  "retain", False)
    with pytest.raises(InvalidArgument, match=r"^Unknown driver: 'qcow2'$"):
        await media.change_medium(registry, cd, "cd0", str(tmp_path / "a.iso"), "qcow2",
                                  "retain", False)
    await media.lock_medium(registry, cd, "cd0", True)
    before = set(registry.nodes)
    with pytest.raises(BlockdError, match="is locked and force was not specified"):
        await media.change_medium(registry, cd, "cd0", str(tmp_path / "a.iso"), None,
                                  "read-only", False)
    assert set(registry.nodes) == before  # the image opened first was dropped again
    assert cd.node is not None and cd.node.name == "iso0" and events == []


async def test_lookup_needs_exactly_one_name(registry: Registry, tmp_path: Path) -> None:
    await cd_with_file(registry, tmp_path)
    with pytest.raises(InvalidArgument, match=r"^Need exactly one of 'device' and 'id'$"):
        registry.find_device()
    with pytest.raises(DeviceNotFound, match=r"^Device 'nope' not found$"):
        registry.find_device(id="nope")
    assert registry.find_device(id="/machine/peripheral/cd0").id == "cd0"


# -- host drive ----------------------------------------------------------------------


async def test_host_drive_eject_moves_the_real_tray_and_keeps_the_node(
    registry: Registry, events: list[Event]
) -> None:
    drive = FakeDrive()
    cd = cd_with_drive(registry, drive)
    await media.eject(registry, cd, "cd0", False)
    assert drive.calls == [("eject", True)] and drive.tray_is_open
    assert cd.node is not None and cd.node.name == "drive0"  # the drive stays attached
    drive.disc = 4096  # a new disc while the tray was out
    await media.close_tray(registry, cd, "cd0")
    assert drive.calls[-1] == ("eject", False)
    assert cd.node.size == 4096
    assert trays(events) == [True, False]


async def test_host_drive_lock_and_forced_eject(registry: Registry, events: list[Event]) -> None:
    drive = FakeDrive()
    cd = cd_with_drive(registry, drive)
    await media.lock_medium(registry, cd, "cd0", True)
    assert drive.is_locked and cd.locked
    with pytest.raises(BlockdError, match="is locked and force was not specified"):
        await media.eject(registry, cd, "cd0", False)
    assert drive.calls == [("lock", True)]  # the drive was not touched
    await media.eject(registry, cd, "cd0", True)
    assert drive.calls == [("lock", True), ("lock", False), ("eject", True)]
    assert not cd.locked and trays(events) == [True]


async def test_host_drive_failure_is_reported_and_changes_nothing(
    registry: Registry, events: list[Event]
) -> None:
    drive = FakeDrive()
    cd = cd_with_drive(registry, drive)
    drive.is_locked = True  # locked behind blockd's back
    with pytest.raises(BlockdError, match="drive is locked") as caught:
        await media.eject(registry, cd, "cd0", False)
    assert caught.value.errno == errno.EBUSY
    assert not cd.tray_open and events == []


async def test_empty_host_drive(registry: Registry) -> None:
    drive = FakeDrive(disc=None)
    cd = cd_with_drive(registry, drive)
    assert cd.node is not None and cd.node.size == 0
    await media.sync_drive(registry, cd)
    assert cd.node.size == 0 and not cd.tray_open


async def test_sync_follows_the_hardware(registry: Registry, events: list[Event]) -> None:
    drive = FakeDrive(disc=2048)
    cd = cd_with_drive(registry, drive)
    await media.sync_drive(registry, cd)
    assert events == []  # nothing moved
    drive.tray_is_open = True  # the button
    await media.sync_drive(registry, cd)
    assert trays(events) == [True] and cd.tray_open
    drive.tray_is_open, drive.disc, drive.changed = False, 6144, True  # pushed in by hand
    await media.sync_drive(registry, cd)
    assert trays(events) == [True, False]
    assert cd.node is not None and cd.node.size == 6144
    drive.disc, drive.changed = 8192, True  # swapped without a visible tray movement
    await media.sync_drive(registry, cd)
    assert cd.node.size == 8192 and trays(events) == [True, False]


async def test_sync_sets_the_lock_again(registry: Registry) -> None:
    drive = FakeDrive()
    cd = cd_with_drive(registry, drive)
    drive.is_locked = True  # udev's cdrom_id locked it
    await media.sync_drive(registry, cd, reassert_lock=True)
    assert not drive.is_locked and drive.calls == [("lock", False)]
    assert cd.locked is False


async def test_remove_medium_detaches_the_drive(registry: Registry) -> None:
    drive = FakeDrive()
    cd = cd_with_drive(registry, drive)
    with pytest.raises(BlockdError, match=r"^Tray of device 'cd0' is not open$"):
        await media.remove_medium(registry, cd, "cd0")
    await media.open_tray(registry, cd, "cd0", False)
    await media.remove_medium(registry, cd, "cd0")
    assert cd.node is None and registry.nodes["drive0"].user is None
    await media.sync_drive(registry, cd)  # no drive any more: nothing to follow


# -- the watcher ---------------------------------------------------------------------


async def test_polling_sees_the_button(registry: Registry, events: list[Event]) -> None:
    from blockd.hotplug.media_watch import MediaWatcher

    drive = FakeDrive()
    cd = cd_with_drive(registry, drive)
    watcher = MediaWatcher(registry, 0.01, udev=False)
    await watcher.start()
    try:
        drive.tray_is_open = True
        for _ in range(500):
            if trays(events):
                break
            await asyncio.sleep(0.01)
        assert trays(events) == [True] and cd.tray_open
    finally:
        await watcher.close()


async def test_eject_request_honours_blockds_lock(
    registry: Registry, events: list[Event]
) -> None:
    from blockd.hotplug.media_watch import MediaWatcher

    drive = FakeDrive()
    cd = cd_with_drive(registry, drive)
    watcher = MediaWatcher(registry, 0, udev=False)
    drive.is_locked = True  # as udev's cdrom_id leaves it
    await watcher._after_event(cd, eject_request=True)  # blockd holds no lock: it opens
    assert drive.calls == [("lock", False), ("eject", True)] and trays(events) == [True]
    await media.close_tray(registry, cd, "cd0")
    await media.lock_medium(registry, cd, "cd0", True)
    drive.calls.clear()
    await watcher._after_event(cd, eject_request=True)  # blockd's lock: the tray stays shut
    assert drive.calls == [("lock", True)] and trays(events) == [True, False]


async def test_a_drive_is_adopted_with_blockds_lock_state(registry: Registry) -> None:
    drive = FakeDrive()
    drive.is_locked = True  # udev locked it at boot
    cd = cd_with_drive(registry, drive)
    await media.adopt(registry, cd)
    assert drive.calls == [("lock", False)] and not drive.is_locked
    await media.open_tray(registry, cd, "cd0", False)
    await media.remove_medium(registry, cd, "cd0")
    drive.is_locked = True
    drive.calls.clear()
    await media.insert_medium(registry, cd, "drive0")  # inserting adopts it again
    assert drive.calls == [("lock", False)]
