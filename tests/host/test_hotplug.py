"""Hotplug on the host: a real udevd, real loop devices bound and released with losetup.

The module starts udevd (Debian's systemd-udevd) for its tests and stops it after;
blockd follows it through pyudev's netlink monitor.  Rules match loop devices by their
backing file (``ATTR{loop/backing_file}``), so only the images the tests make are ever
attached, whatever else the machine has.  The kernel defers releasing a loop device that
is open (``losetup -d`` only sets its autoclear flag, with no event until the last
close), and blockd keeps its devices open: blockd notices the flag (see
blockd/hotplug/manager.py) and lets go, and the kernel then finishes the release.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import DaemonProcess, blockd_argv, start_daemon
from nbdclients import libnbd, uri
from qemu.qmp import EventListener, QMPClient

UDEVD = "/lib/systemd/systemd-udevd"
CONTROL = "/run/udev/control"
ATTACH_DEADLINE = 1.0  # seconds from losetup to BLOCKD_DEVICE_ADDED (the bound)


@pytest.fixture(scope="module")
def udevd() -> Iterator[None]:
    """A udevd for the module's tests (none runs on these machines), stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("udevd and loop devices need root")
    if not os.path.exists(UDEVD) or shutil.which("losetup") is None:
        pytest.skip("udev (systemd-udevd) or losetup is not installed")
    already = subprocess.run(["udevadm", "control", "--ping", "-t", "1"],
                             capture_output=True).returncode == 0
    proc = None
    if not already:
        proc = subprocess.Popen([UDEVD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while subprocess.run(["udevadm", "control", "--ping", "-t", "1"],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None, "systemd-udevd exited"
            assert time.monotonic() < deadline, "udevd did not answer"
            time.sleep(0.05)
    try:
        yield
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


class Loops:
    """Loop devices over images in one directory; released at the end whatever happened."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.bound: list[str] = []

    def image(self, name: str, size: int = 8 << 20, fill: bytes = b"") -> Path:
        path = self.directory / name
        with open(path, "wb") as f:
            f.truncate(size)
            if fill:
                f.write(fill)
        return path

    def bind(self, image: Path, *, read_only: bool = False) -> str:
        cmd = ["losetup", "-f", "--show", *(["-r"] if read_only else []), str(image)]
        dev = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        self.bound.append(dev)
        return dev

    def release(self, dev: str) -> None:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)

    def close(self) -> None:
        for dev in self.bound:
            self.release(dev)


@pytest.fixture
def loops(tmp_path: Path, udevd: None) -> Iterator[Loops]:
    found = Loops(tmp_path)
    try:
        yield found
    finally:
        found.close()


def config(tmp: Path, rules: str, extra: str = "") -> Path:
    path = tmp / "blockd.toml"
    path.write_text(extra + rules)
    return path


def loop_rule(tmp: Path, **keys: str) -> str:
    lines = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return ("[[hotplug.rule]]\n"
            f'match = {{ SUBSYSTEM = "block", "ATTR{{loop/backing_file}}" = "{tmp}/hot*" }}\n'
            + lines)


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[DaemonProcess] = []

    def start(conf: Path, *args: str, metrics: str = "none") -> DaemonProcess:
        d = start_daemon(blockd_argv("--config", str(conf), "--qmp",
                                     str(tmp_path / "qmp.sock"), *args, metrics=metrics),
                         tmp_path, f"blockd{len(started)}")
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            assert d.stop() == 0, d.stderr()


async def next_event(listener: EventListener, name: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {name} within {timeout} s"
        event = await asyncio.wait_for(listener.get(), left)
        if event["event"] == name:
            return event


async def blocks(qmp: QMPClient) -> dict[str, Any]:
    return {b["device"]: b for b in await qmp.execute("query-block")}  # type: ignore[union-attr]


async def test_loop_devices_come_and_go_with_their_exports(
    loops: Loops, tmp_path: Path, daemon_factory: Any
) -> None:
    nbd = libnbd()
    nbd_sock = str(tmp_path / "nbd.sock")
    conf = config(tmp_path, loop_rule(tmp_path, **{
        "read-only": "false", "id": '"hot-{kernel}"',
        "export": '{ name = "{kernel}", writable = true }'}),
        extra='[[blockdev]]\ndriver = "null-co"\nnode-name = "other"\nread-zeroes = true\n'
              '[[export]]\ntype = "nbd"\nid = "other"\nnode-name = "other"\n')
    d = daemon_factory(conf, "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                       metrics="127.0.0.1:0")
    qmp = await d.client()
    events = EventListener(("BLOCKD_DEVICE_ADDED", "DEVICE_DELETED", "BLOCK_EXPORT_DELETED"))
    qmp.register_listener(events)
    try:
        data = os.urandom(1 << 20)
        image = loops.image("hot0.img", fill=data)
        t0 = time.monotonic()
        dev = loops.bind(image)
        kernel = os.path.basename(dev)
        added = await next_event(events, "BLOCKD_DEVICE_ADDED")
        elapsed = time.monotonic() - t0
        assert elapsed < ATTACH_DEADLINE, f"attached after {elapsed:.3f} s"
        assert added["data"]["id"] == f"hot-{kernel}"
        assert added["data"]["devname"] == dev and added["data"]["driver"] == "host_device"
        assert added["data"]["properties"]["SUBSYSTEM"] == "block"
        block = (await blocks(qmp))[f"hot-{kernel}"]
        assert block["inserted"]["file"] == dev and block["inserted"]["ro"] is False

        h = nbd.NBD()
        h.connect_uri(uri(nbd_sock, kernel))
        assert h.pread(1 << 20, 0) == data
        fresh = os.urandom(65536)
        h.pwrite(fresh, 4096)
        h.flush()
        with open(image, "rb") as f:
            f.seek(4096)
            assert f.read(65536) == fresh

        # A client reading while the device goes: it gets an error, never a hang.
        outcome: list[str] = []

        def keep_reading() -> None:
            try:
                for _ in range(100_000):
                    h.pread(65536, 0)
                outcome.append("never stopped")
            except nbd.Error as exc:
                outcome.append(f"error: {exc}")

        reader = threading.Thread(target=keep_reading)
        reader.start()
        await asyncio.sleep(0.2)
        loops.release(dev)
        deleted = await next_event(events, "DEVICE_DELETED")
        assert deleted["data"]["device"] == f"hot-{kernel}"
        await asyncio.to_thread(reader.join, 10)
        assert not reader.is_alive() and outcome and outcome[0].startswith("error"), outcome
        assert f"hot-{kernel}" not in await blocks(qmp)
        exports = await qmp.execute("query-block-exports")
        assert [e["id"] for e in exports] == ["other"]  # type: ignore[union-attr]
        # The kernel finished the release once blockd let go.
        for _ in range(100):
            if Path(f"/sys/block/{kernel}/size").read_text().strip() == "0":
                break
            await asyncio.sleep(0.05)
        assert Path(f"/sys/block/{kernel}/size").read_text().strip() == "0"
        # The daemon keeps serving others.
        other = nbd.NBD()
        other.connect_uri(uri(nbd_sock, "other"))
        assert other.pread(4096, 0) == bytes(4096)
        other.shutdown()

        state: Any = await qmp.execute("blockd-query-hotplug")
        assert state["enabled"] and state["monitor"] == "udev" and state["udevd-running"]
        assert state["devices"] == []
        assert state["rules"][0]["attached"] == 1 and state["rules"][0]["failed"] == 0
        assert state["events"]["acted"] == 2
        metrics = await asyncio.to_thread(_get, d.metrics_url)
        assert 'blockd_hotplug_events_total{action="add"} 1.0' in metrics
        assert 'blockd_hotplug_events_total{action="remove"} 1.0' in metrics
        assert "blockd_hotplug_udevd_running 1.0" in metrics
        assert 'blockd_hotplug_rule_attached_total{rule="rule 1"} 1.0' in metrics
    finally:
        await qmp.disconnect()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


async def test_coldplug_read_only_default_and_absent_devices(
    loops: Loops, tmp_path: Path, daemon_factory: Any
) -> None:
    present = loops.bind(loops.image("hot-a.img", fill=b"A" * 4096))
    conf = config(tmp_path, loop_rule(tmp_path))
    d = daemon_factory(conf)
    qmp = await d.client()
    try:
        found = await blocks(qmp)
        kernel = os.path.basename(present)
        assert kernel in found, found  # attached at start, before anyone asked
        assert found[kernel]["inserted"]["ro"] is True  # nothing read-write unless a rule says
        assert found[kernel]["inserted"]["file"] == present
        # Unbound loop devices (size 0) match no backing file and are not attached;
        # neither is anything else on the machine.
        assert set(found) == {kernel}
    finally:
        await qmp.disconnect()


async def test_rules_decide_first_match_wins(
    loops: Loops, tmp_path: Path, daemon_factory: Any
) -> None:
    rules = (
        "[[hotplug.rule]]\n"
        f'match = {{ "ATTR{{loop/backing_file}}" = "{tmp_path}/hot-skip*" }}\n'
        'action = "ignore"\nname = "skip"\n'
        + loop_rule(tmp_path, id='"disk-{kernel}"', name='"loops"')
    )
    d = daemon_factory(config(tmp_path, rules))
    qmp = await d.client()
    events = EventListener("BLOCKD_DEVICE_ADDED")
    qmp.register_listener(events)
    try:
        skipped = loops.bind(loops.image("hot-skip.img"))
        taken = loops.bind(loops.image("hot-take.img"))
        added = await next_event(events, "BLOCKD_DEVICE_ADDED")
        assert added["data"]["devname"] == taken
        await qmp.execute("blockd-hotplug-rescan")
        found = await blocks(qmp)
        assert set(found) == {f"disk-{os.path.basename(taken)}"}
        state: Any = await qmp.execute("blockd-query-hotplug")
        by_name = {r["name"]: r for r in state["rules"]}
        assert by_name["skip"]["matched"] >= 1 and by_name["skip"]["attached"] == 0
        assert by_name["loops"]["attached"] == 1
        assert os.path.basename(skipped) not in {b.removeprefix("disk-") for b in found}
    finally:
        await qmp.disconnect()


async def test_a_catch_all_rule_never_takes_the_root_disk(
    udevd: None, tmp_path: Path, daemon_factory: Any
) -> None:
    root = os.stat("/").st_dev
    if os.major(root) == 0:
        pytest.fail("the root filesystem is not on a block device here; this test needs one")
    d = daemon_factory(config(tmp_path, '[[hotplug.rule]]\nmatch = {}\n'))
    qmp = await d.client()
    try:
        await qmp.execute("blockd-hotplug-rescan")
        files = {b["inserted"]["file"] for b in (await blocks(qmp)).values() if "inserted" in b}
        node = Path(f"/sys/dev/block/{os.major(root)}:{os.minor(root)}").resolve()
        disk = node.parent if (node / "partition").exists() else node
        assert f"/dev/{node.name}" not in files and f"/dev/{disk.name}" not in files, files
        refusals = [line[line.index("hotplug:"):] for line in d.stderr().splitlines()
                    if "never attached" in line]
        assert any(f"/dev/{node.name}" in line for line in refusals), d.stderr()
        assert len(refusals) == len(set(refusals))  # logged once, though scanned twice
    finally:
        await qmp.disconnect()


# -- in-process: the monitor's fallbacks ------------------------------------------------


class NoNbd:
    """The export service of a daemon without an NBD server."""

    running = False

    def export_added(self, export: object) -> None:
        raise AssertionError("no exports without an NBD server")

    async def delete_export(self, export: object, *, hard: bool) -> None:
        raise AssertionError("no exports without an NBD server")


def in_process(tmp: Path, **options: Any) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    from blockd.block.registry import Registry
    from blockd.events import EventBus
    from blockd.hotplug.manager import Hotplug
    from blockd.hotplug.rules import parse_rules

    rules = parse_rules([{"match": {"SUBSYSTEM": "block",
                                    "ATTR{loop/backing_file}": f"{tmp}/hot*"}}])
    registry = Registry(executor=ThreadPoolExecutor(4), bus=EventBus())
    return Hotplug(registry, NoNbd(), rules, **options)  # type: ignore[arg-type]


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_without_udevd_the_kernel_events_still_drive_hotplug(
    loops: Loops, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As if no udevd ran: its control socket is not where blockd looks.
    hot = in_process(tmp_path, udev_control=str(tmp_path / "no-udevd"))
    await hot.start()
    try:
        state = hot.query()
        assert (state["monitor"], state["udevd-running"]) == ("kernel", False)
        assert "no udevd answers" in caplog.text
        dev = loops.bind(loops.image("hot-k.img"))
        await until(lambda: any(a.devname == dev for a in hot.attached.values()))
        assert os.path.basename(dev) in hot.registry.devices
        loops.release(dev)
        await until(lambda: not hot.attached)
        assert os.path.basename(dev) not in hot.registry.devices
    finally:
        await hot.close()
        await hot.registry.close_all()


async def test_lost_events_are_counted_and_answered_with_a_rescan(
    loops: Loops, tmp_path: Path
) -> None:
    # The smallest receive buffer the kernel allows: a burst of events overflows it.
    hot = in_process(tmp_path, receive_buffer=1)
    await hot.start()
    try:
        rescans = hot.rescans
        images = [loops.image(f"hot-{n}.img") for n in range(24)]
        # Bind them all without letting the loop read a single event.
        devs = [loops.bind(image) for image in images]
        await until(lambda: hot.source.lost >= 1, 10)
        await until(lambda: {a.devname for a in hot.attached.values()} == set(devs), 10)
        assert hot.rescans > rescans
        assert hot.query()["events"]["lost"] >= 1
    finally:
        await hot.close()
        await hot.registry.close_all()


async def test_bind_and_release_200_times_leaks_nothing(
    loops: Loops, tmp_path: Path, daemon_factory: Any
) -> None:
    d = daemon_factory(config(tmp_path, loop_rule(tmp_path)))
    qmp = await d.client()
    events = EventListener(("BLOCKD_DEVICE_ADDED", "DEVICE_DELETED"))
    qmp.register_listener(events)
    fds = Path(f"/proc/{d.proc.pid}/fd")
    image = loops.image("hot-cycle.img")
    try:
        dev = loops.bind(image)
        await next_event(events, "BLOCKD_DEVICE_ADDED")
        loops.release(dev)
        await next_event(events, "DEVICE_DELETED")
        before = len(os.listdir(fds))
        t0 = time.monotonic()
        for _ in range(200):
            dev = loops.bind(image)
            await next_event(events, "BLOCKD_DEVICE_ADDED")
            loops.release(dev)
            await next_event(events, "DEVICE_DELETED")
        took = time.monotonic() - t0
        assert await blocks(qmp) == {}
        assert await qmp.execute("query-named-block-nodes") == []
        state: Any = await qmp.execute("blockd-query-hotplug")
        assert state["devices"] == [] and state["rules"][0]["attached"] == 201
        assert len(os.listdir(fds)) <= before, (before, os.listdir(fds))
        print(f"200 bind/release cycles in {took:.1f} s")
    finally:
        await qmp.disconnect()


async def test_a_storm_of_events_is_absorbed_and_qmp_stays_responsive(
    loops: Loops, tmp_path: Path, daemon_factory: Any
) -> None:
    """48 loop devices bound and released back to back (a few hundred uevents, creating
    new loop nodes too): every one is attached and detached in the end, and QMP answers
    throughout."""
    d = daemon_factory(config(tmp_path, loop_rule(tmp_path)))
    qmp = await d.client()
    other = await d.client("prober")
    slowest = 0.0
    stop = asyncio.Event()

    async def probe() -> None:
        nonlocal slowest
        while not stop.is_set():
            t0 = time.monotonic()
            await other.execute("query-version")
            slowest = max(slowest, time.monotonic() - t0)
            await asyncio.sleep(0.01)

    prober = asyncio.create_task(probe())
    try:
        images = [loops.image(f"hot-storm{n}.img", size=1 << 20) for n in range(48)]
        devs = await asyncio.to_thread(lambda: [loops.bind(i) for i in images])

        async def attached() -> set[str]:
            state: Any = await qmp.execute("blockd-query-hotplug")
            return {dev["devname"] for dev in state["devices"]}

        deadline = time.monotonic() + 30
        while await attached() != set(devs):
            assert time.monotonic() < deadline, "not every device was attached"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(lambda: [loops.release(dev) for dev in devs])
        deadline = time.monotonic() + 30
        while await attached():
            assert time.monotonic() < deadline, "not every device was detached"
            await asyncio.sleep(0.1)
        assert await blocks(qmp) == {}
        # Generous: a loop that hotplug blocked would stall for seconds.
        assert slowest < 1.0, f"query-version took {slowest:.3f} s during the storm"
        print(f"slowest query-version during the storm: {slowest * 1000:.1f} ms")
    finally:
        stop.set()
        await prober
        await other.disconnect()
        await qmp.disconnect()
