"""The blockd command and blockd-ctl as a user runs them: options, default, signals, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemons import ROOT, BlockdFactory, DaemonProcess, blockd_argv, start_daemon
from qemu.qmp import QMPClient

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def run_blockd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blockd_argv(*args), capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=30, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "blockd: unrecognized option '--bogus'"),
    (["--monitor", "chardev=nope"], 'blockd: --monitor chardev=nope: chardev "nope" not found'),
    (["--qmp", "x.sock", "--blockdev", "driver=null-co,node-name=1bad"],
     "blockd: --blockdev: Invalid node-name: '1bad'"),
    (["--qmp", "x.sock", "--blockdev", "driver=null-co,node-name=n,size=big"],
     "blockd: --blockdev: Parameter 'size' expects integer"),
    (["--qmp", "x.sock", "--device", "hd,id=hd0,drive=nope"],
     "blockd: --device: Property 'hd.drive' can't find value 'nope'"),
    (["--qmp", "x.sock", "--object", "secret,id=s0,data=x"],
     "blockd: --object: object type 'secret' is not supported by blockd "
     "(it has tls-creds-x509 only)"),
])
def test_bad_options_give_one_line_and_fail(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_blockd(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "x.sock").exists()


def test_help_and_version(tmp_path: Path) -> None:
    result = run_blockd("--version", cwd=tmp_path)
    assert result.returncode == 0 and "blockd" in result.stdout
    result = run_blockd("--help", cwd=tmp_path)
    assert result.returncode == 0 and "--blockdev" in result.stdout


async def test_options_build_nodes_and_devices(blockd_factory: BlockdFactory,
                                               tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"\0" * 65536)
    config = tmp_path / "blockd.toml"
    config.write_text('[[blockdev]]\ndriver = "null-co"\nnode-name = "fromfile"\n'
                      'cache = { direct = false }\n')
    d = blockd_factory(
        "--blockdev", "driver=file,node-name=f0,filename=disk.img,read-only=on",
        "--blockdev", '{"driver": "null-co", "node-name": "n0", "size": 4096}',
        "--device", "hd,id=hd0,drive=f0,werror=stop",
        "--device", "cd,id=cd0",
        "--config", str(config))
    qmp = await d.client()
    nodes = [n["node-name"] for n in await qmp.execute("query-named-block-nodes")]
    assert nodes == ["fromfile", "n0", "f0"]
    blocks = {b["device"]: b for b in await qmp.execute("query-block")}
    assert blocks["hd0"]["inserted"]["ro"] is True
    assert set(blocks) == {"hd0", "cd0"}


async def test_tcp_listener_on_loopback(blockd_factory: BlockdFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = blockd_factory("--qmp", f"tcp:127.0.0.1:{port}")
    qmp = QMPClient("tcp")
    await qmp.connect(("127.0.0.1", port))
    assert await qmp.execute("query-block") == []
    await qmp.disconnect()
    assert d.stop() == 0


async def test_embedded_default(tmp_path: Path) -> None:
    proc = subprocess.Popen(blockd_argv(), stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=ENV)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 20)
        assert line.startswith("blockd: QMP listening on "), line
        path = line.strip().rsplit(" ", 1)[1]
        expected = "/run/blockd/qmp.sock" if os.geteuid() == 0 else str(tmp_path / "blockd.sock")
        assert os.path.realpath(path) == os.path.realpath(expected)
        qmp = QMPClient("default")
        await qmp.connect(path)
        blocks = {b["device"]: b for b in await qmp.execute("query-block")}
        assert blocks["hd0"]["inserted"]["node-name"] == "null0"
        assert blocks["cd0"]["removable"] is True and "inserted" not in blocks["cd0"]
        await qmp.disconnect()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert not os.path.exists(path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sd_notify_ready_and_stopping(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(notify_path)
        sink.settimeout(20)
        env = dict(ENV, NOTIFY_SOCKET=notify_path)
        proc = subprocess.Popen(blockd_argv("--qmp", str(tmp_path / "q.sock")),
                                stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
        try:
            assert sink.recv(4096) == b"READY=1"
            assert (tmp_path / "q.sock").exists()  # ready means listening
            proc.terminate()
            assert sink.recv(4096) == b"STOPPING=1"
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_qsd_style_pidfile_and_chardev(tmp_path: Path) -> None:
    sock = tmp_path / "mon.sock"
    d = start_daemon(blockd_argv("--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
                                 "--monitor", "chardev=m0"), tmp_path, "qsdstyle")
    assert Path(d.pidfile).read_text().strip() == str(d.proc.pid)
    assert sock.exists()
    assert d.stop() == 0
    assert not Path(d.pidfile).exists() and not sock.exists()


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockd.ctl", *args], capture_output=True,
                          text=True, env=ENV, timeout=30, check=False)


async def test_blockd_ctl_against_blockd(blockd: DaemonProcess) -> None:
    sock = blockd.qmp_path
    added = await asyncio.to_thread(ctl, sock, "blockdev-add", "driver=null-co",
                                    "node-name=n1", "size=1048576")
    assert (added.returncode, added.stdout, added.stderr) == (0, "", "")
    await asyncio.to_thread(ctl, sock, "device_add", "driver=hd", "id=hd1", "drive=n1")
    table = await asyncio.to_thread(ctl, sock, "query-block")
    assert table.returncode == 0
    header, row = table.stdout.splitlines()[:2]
    assert "device" in header and row.split()[0] == "hd1"
    as_json = await asyncio.to_thread(ctl, sock, "query-named-block-nodes", "--json")
    assert '"virtual-size": 1048576' in as_json.stdout
    failed = await asyncio.to_thread(ctl, sock, "device_del", "id=nope")
    assert failed.returncode == 1
    assert failed.stderr.strip() == "error: DeviceNotFound: Device 'nope' not found"


async def test_qmp_shell_against_blockd(blockd: DaemonProcess) -> None:
    script = "blockdev-add driver=null-co node-name=s1 size=4096\nquery-named-block-nodes\n"
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "qemu.qmp.qmp_shell", blockd.qmp_path],
        input=script, capture_output=True, text=True, timeout=30, env=ENV, check=False)
    assert result.returncode == 0, result.stderr
    assert '"node-name": "s1"' in result.stdout


async def test_many_sessions_do_not_wait_for_each_other(blockd: DaemonProcess) -> None:
    # A client that connects and never negotiates must not hold up the others.
    idle = [await asyncio.open_unix_connection(blockd.qmp_path) for _ in range(5)]
    start = time.monotonic()
    qmp = await blockd.client()
    for _ in range(50):
        await qmp.execute("query-block")
    assert time.monotonic() - start < 30  # generous: only a hang would exceed it
    for _, writer in idle:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
