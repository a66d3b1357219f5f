"""The hardening issue's findings against a running blockd, each reproduced as an attacker
or a careless operator would (the ones about NBD and QMP bounds live with their wires:
test_nbd_bad_input.py, test_qmp_raw.py, test_metrics.py)."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from daemons import ROOT, BlockdFactory, blockd_argv, start_daemon
from qemu.qmp import ExecuteError


async def test_a_fifo_is_refused_at_once_and_never_holds_a_thread(
    blockd_factory: BlockdFactory, tmp_path: Path
) -> None:
    """Finding 6: a read-only blockdev-add of a FIFO blocked a control thread (8 of them
    blocked every later blockdev-add) and SIGTERM then hung."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = blockd_factory()
    qmp = await d.client()
    for n, driver in enumerate(["file", "host_device"] * 6):
        with pytest.raises(ExecuteError) as caught:
            await asyncio.wait_for(qmp.execute("blockdev-add", {
                "driver": driver, "node-name": f"f{n}", "filename": str(fifo),
                "read-only": True}), 5)
        assert "requires" in str(caught.value) and str(fifo) in str(caught.value)
    image = tmp_path / "ok.img"
    image.write_bytes(bytes(4096))
    await asyncio.wait_for(qmp.execute("blockdev-add", {
        "driver": "file", "node-name": "ok", "filename": str(image)}), 5)
    await qmp.disconnect()
    t0 = time.monotonic()
    assert d.stop() == 0, d.stderr()
    assert time.monotonic() - t0 < 10


def _second(argv: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(argv, capture_output=True, text=True, cwd=tmp, env=env, timeout=60)


async def test_a_second_daemon_never_takes_over_a_running_one(
    blockd_factory: BlockdFactory, tmp_path: Path
) -> None:
    """Finding 7: a second blockd on the same QMP socket and pid file started, took the
    socket over and deleted both on exit, leaving the first running and unreachable."""
    sock = str(tmp_path / "qmp.sock")
    nbd = str(tmp_path / "nbd.sock")
    first = blockd_factory("--nbd-server", f"addr.type=unix,addr.path={nbd}", qmp=sock)
    pidfile = first.pidfile
    # The same pid file: refused before anything is touched, as QSD refuses.
    same = _second(blockd_argv("--qmp", sock, "--pidfile", pidfile), tmp_path)
    assert same.returncode == 1 and "Cannot lock pid file" in same.stderr, same.stderr
    # Another pid file, the same QMP socket: refused, the socket stays the first's.
    other_pid = str(tmp_path / "other.pid")
    same_sock = _second(blockd_argv("--qmp", sock, "--pidfile", other_pid), tmp_path)
    assert same_sock.returncode == 1, same_sock.stderr
    assert "in use by a running program" in same_sock.stderr, same_sock.stderr
    # The same NBD socket (QMP elsewhere): refused too.
    same_nbd = _second(blockd_argv("--qmp", str(tmp_path / "q2.sock"), "--nbd-server",
                                   f"addr.type=unix,addr.path={nbd}", "--pidfile", other_pid),
                       tmp_path)
    assert same_nbd.returncode == 1 and "in use by a running program" in same_nbd.stderr
    assert not os.path.exists(other_pid)
    # The first is untouched and reachable.
    assert os.path.exists(pidfile) and Path(pidfile).read_text().strip() == str(first.proc.pid)
    qmp = await first.client()
    assert "qemu" in await qmp.execute("query-version")  # type: ignore[operator]
    await qmp.disconnect()
    # Once it is gone (killed: its socket files and pid file stay behind), a new one
    # takes the stale files over.
    first.proc.kill()
    first.proc.wait()
    assert os.path.exists(sock) and os.path.exists(pidfile)
    # start_daemon names the pid file after the daemon: "blockd0" is the first's.
    third = start_daemon(blockd_argv("--qmp", sock, "--nbd-server",
                                     f"addr.type=unix,addr.path={nbd}"), tmp_path, "blockd0")
    try:
        assert third.pidfile == pidfile
        # start_daemon saw the stale pid file at once: wait for this daemon's own.
        deadline = time.monotonic() + 20
        while Path(pidfile).read_text().strip() != str(third.proc.pid):
            assert third.proc.poll() is None, third.stderr()
            assert time.monotonic() < deadline, "the stale pid file was never replaced"
            await asyncio.sleep(0.05)
        qmp = await third.client()
        assert "qemu" in await qmp.execute("query-version")  # type: ignore[operator]
        await qmp.disconnect()
    finally:
        assert third.stop() == 0, third.stderr()
    assert not os.path.exists(pidfile) and not os.path.exists(sock)


QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"


def _lock_bytes(image: Path) -> set[int]:
    """The byte offsets of the OFD locks anyone holds on ``image`` (from /proc/locks)."""
    inode = os.stat(image).st_ino
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "OFDLCK" and fields[5].endswith(f":{inode}"):
            held.update(range(int(fields[6]), int(fields[7]) + 1))
    return held


def _guest(image: Path, tmp: Path) -> subprocess.Popen[bytes]:
    """A paused QEMU guest with ``image`` as its virtio disk: it holds the image as every
    guest does (reads and writes, shares neither writing nor resizing)."""
    proc = subprocess.Popen(
        [QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "pc", "-accel", "tcg",
         "-drive", f"file={image},format=raw,if=none,id=d0",
         "-device", "virtio-blk-pci,drive=d0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while 201 not in _lock_bytes(image):  # QEMU's "write is not shared" byte
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
        assert time.monotonic() < deadline, "the guest took no lock"
        time.sleep(0.05)
    return proc


@pytest.fixture
def qemu_tools() -> None:
    import shutil

    missing = [t for t in (QEMU, QSD) if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install qemu-system-x86 and qemu-utils "
                    "(./dev does)")


async def test_image_locks_keep_a_guest_and_a_writable_export_apart(
    qemu_tools: None, blockd_factory: BlockdFactory, tmp_path: Path
) -> None:
    """Finding 5: blockd took no locks: a guest attached an image blockd exported
    writable, and blockd exported writable an image a guest held."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    nbd = str(tmp_path / "nbd.sock")
    d = blockd_factory("--nbd-server", f"addr.type=unix,addr.path={nbd}")
    qmp = await d.client()
    guest = _guest(image, tmp_path)
    try:
        await qmp.execute("blockdev-add", {"driver": "file", "node-name": "f0",
                                           "filename": str(image)})
        with pytest.raises(ExecuteError) as caught:
            await qmp.execute("block-export-add", {"type": "nbd", "id": "e0",
                                                   "node-name": "f0", "writable": True})
        ours = str(caught.value)
        # qemu-storage-daemon, given the same export, says the same.
        qsd = subprocess.run(
            [QSD, "--blockdev", f"driver=file,node-name=f0,filename={image}",
             "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'qsd.sock'}",
             "--export", "type=nbd,id=e0,node-name=f0,writable=on"],
            capture_output=True, text=True, timeout=30)
        assert qsd.returncode == 1
        assert ours == 'Failed to get "write" lock'
        assert qsd.stderr.strip().endswith(f": {ours}"), qsd.stderr
        # Reading alongside a guest is allowed (it shares consistent reads), as in QSD.
        await qmp.execute("block-export-add", {"type": "nbd", "id": "r0",
                                               "node-name": "f0", "writable": False})
        await qmp.execute("block-export-del", {"id": "r0"})
    finally:
        guest.kill()
        guest.wait()
    # The guest is gone: now the writable export works, and holds the image...
    await qmp.execute("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f0",
                                           "writable": True})
    assert {100, 101} <= _lock_bytes(image)
    late = subprocess.Popen(
        [QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "pc", "-accel", "tcg",
         "-drive", f"file={image},format=raw,if=none,id=d0",
         "-device", "virtio-blk-pci,drive=d0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = late.communicate(timeout=30)
    finally:
        late.kill()
    # ...so a guest started now is refused, as it would be by QSD.
    assert late.returncode != 0
    assert b'Failed to get shared "write" lock' in out, out
    # Another daemon sharing everything (QSD's writable export) shares the image with us,
    # as two qemu-storage-daemons would.
    qsd_proc = subprocess.Popen(
        [QSD, "--blockdev", f"driver=file,node-name=f0,filename={image}",
         "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'qsd2.sock'}",
         "--export", "type=nbd,id=e0,node-name=f0,writable=on",
         "--pidfile", str(tmp_path / "qsd.pid")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "qsd.pid").exists():
            assert qsd_proc.poll() is None, qsd_proc.stdout.read() if qsd_proc.stdout else b""
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        qsd_proc.terminate()
        qsd_proc.wait(10)
    # Removing the export releases the locks.
    await qmp.execute("block-export-del", {"id": "e1"})
    for _ in range(100):
        if not _lock_bytes(image):
            break
        await asyncio.sleep(0.05)
    assert not _lock_bytes(image)
    await qmp.disconnect()


async def test_what_qmp_clients_may_open(
    blockd_factory: BlockdFactory, tmp_path: Path, loop_device: Any
) -> None:
    """Finding 9: blockdev-add filename=/etc/shadow (or a link or ../ path to it) was
    accepted and exportable, to every member of socket-group."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 4096)
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.img").write_bytes(bytes(4096))
    (images / "link.img").symlink_to(secret)
    loop = loop_device(8 << 20)
    by_link = tmp_path / "by-id-disk"
    by_link.symlink_to(loop.path)

    async def add(d: Any, name: str, filename: Path | str, driver: str = "file") -> str:
        qmp = await d.client(name)
        try:
            await qmp.execute("blockdev-add", {"driver": driver, "node-name": name,
                                               "filename": str(filename)})
            nodes = await qmp.execute("query-named-block-nodes")
            return next(n["file"] for n in nodes if n["node-name"] == name)  # type: ignore
        except ExecuteError as exc:
            return f"refused: {exc}"
        finally:
            await qmp.disconnect()

    # Private (0600, no group, no TCP), no list: anything, as qemu-storage-daemon.
    private = blockd_factory()
    assert await add(private, "a", secret) == str(secret)
    # Shared (group may connect), no list: device nodes and /var/lib/blockd only.
    conf = tmp_path / "shared.toml"
    conf.write_text('socket-mode = "0660"\n')
    shared = blockd_factory("--config", str(conf),
                            "--blockdev", f"driver=file,node-name=cli,filename={secret}")
    assert "QMP clients may open only block devices" in shared.stderr()
    refused = await add(shared, "b", secret)
    assert refused.startswith(f"refused: Path {secret} is not allowed"), refused
    assert "allowed-paths" in refused
    assert await add(shared, "c", by_link, "host_device") == loop.path  # resolved, opened
    # An explicit list: directories and globs, checked on the resolved path.
    conf2 = tmp_path / "listed.toml"
    conf2.write_text(f'allowed-paths = ["{images}/", "/dev/loop*"]\n')
    listed = blockd_factory("--config", str(conf2))
    assert await add(listed, "d", images / "ok.img") == str(images / "ok.img")
    escape = f"{images}/../secret"
    assert (await add(listed, "e", escape)).startswith("refused: Path "), escape
    linked = await add(listed, "f", images / "link.img")
    assert linked.startswith(f"refused: Path {images}/link.img (resolved: {secret})"), linked
    assert await add(listed, "g", loop.path, "host_device") == loop.path
    # The command line is the operator's: trusted (the shared daemon opened it above).
    qmp = await shared.client("check")
    nodes = await qmp.execute("query-named-block-nodes")
    assert any(n["node-name"] == "cli" for n in nodes)  # type: ignore[union-attr]
    await qmp.disconnect()


async def test_a_low_descriptor_limit_still_serves_and_caps_clients(tmp_path: Path) -> None:
    """Finding 3 and the bounds of item 1: with a limit of 256 descriptors the daemon
    starts and serves, sizes its client caps from the limit, refuses what is over and
    reports it (blockd-query-limits, blockd_limit_hits_total); a soft limit below the
    hard one is raised at start."""
    from test_nbd_bad_input import RawNbd

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    nbd = str(tmp_path / "nbd.sock")
    argv = ["prlimit", "--nofile=256:256", "--", *blockd_argv(
        "--qmp", str(tmp_path / "qmp.sock"), "--blockdev",
        f"driver=file,node-name=f0,filename={image}", "--nbd-server",
        f"addr.type=unix,addr.path={nbd},max-connections=0",
        "--export", "type=nbd,id=e0,node-name=f0,name=disk", metrics="127.0.0.1:0")]
    d = start_daemon(argv, tmp_path, "low")
    try:
        qmp = await d.client()
        limits: Any = await qmp.execute("blockd-query-limits")
        assert limits["limits"]["fd-limit"] == 256
        # Splice pipes: two descriptors each, an eighth of the limit at most.
        assert limits["limits"]["nbd-splice-pipes"] == 16
        assert limits["limits"]["nbd-splice-pipe-pages"] == 16384
        cap = limits["limits"]["nbd-connections"]
        assert 8 <= cap < 256 // 2
        clients = []
        for _ in range(cap + 10):
            c = await RawNbd.connect(nbd) if len(clients) < cap else None
            if c is None:
                break
            c.send(struct.pack(">I", 3))
            assert await c.go(b"disk") == 1 << 20
            clients.append(c)
        refused = 0
        for _ in range(10):
            try:
                c = await RawNbd.connect(nbd)
            except (asyncio.IncompleteReadError, ConnectionError):
                refused += 1
                continue
            clients.append(c)
        assert refused == 10, f"{refused} of 10 connections over the cap were refused"
        limits = await qmp.execute("blockd-query-limits")
        assert limits["hits"]["nbd-connections"] == 10
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(d.metrics_url, timeout=10).read().decode())
        assert 'blockd_limit_hits_total{limit="nbd-connections"} 10.0' in text
        assert "qemu" in await qmp.execute("query-version")  # type: ignore[operator]
        for c in clients:
            await c.close()
        await qmp.disconnect()
    finally:
        assert d.stop() == 0, d.stderr()
    raised = start_daemon(["prlimit", "--nofile=256:4096", "--", *blockd_argv(
        "--qmp", str(tmp_path / "qmp2.sock"))], tmp_path, "raised")
    try:
        qmp = await raised.client()
        limits = await qmp.execute("blockd-query-limits")
        assert limits["limits"]["fd-limit"] == 4096
        assert limits["limits"]["nbd-splice-pipes"] == 256
        await qmp.disconnect()
    finally:
        assert raised.stop() == 0
