"""The hardening issue's findings against a running blockd, each reproduced as an attacker
or a careless operator would (the ones about NBD and QMP bounds live with their wires:
test_nbd_bad_input.py, test_qmp_raw.py, test_metrics.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

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
