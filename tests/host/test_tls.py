"""TLS as qemu-storage-daemon does it: tls-creds-x509 objects, NBD STARTTLS, QMP over TLS,
and no plaintext beyond loopback unless the operator says so (hardening issue, item 5).

Real peers only: qemu-io/qemu-img and nbdinfo/nbdcopy with their own TLS stacks (GnuTLS),
qemu.qmp with Python's ssl, qemu-storage-daemon for the error texts, and certificates
made by openssl (tests/tlscerts.py) in QEMU's directory layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest
from daemons import ROOT, BlockdFactory, blockd_argv, start_daemon
from prometheus_support import free_port
from qemu.qmp import ExecuteError, QMPClient
from tlscerts import make_pki

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-io") is None or shutil.which("nbdinfo") is None,
    reason="qemu-io (qemu-utils) or nbdinfo (libnbd-bin) not installed",
)

IHAVEOPT = 0x49484156454F5054
OPT_LIST, OPT_EXPORT_NAME, OPT_STARTTLS = 3, 1, 5
ERR_TLS_REQD = 2**31 + 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _image(tmp: Path) -> Path:
    image = tmp / "disk.img"
    image.write_bytes(bytes(range(256)) * 4096 * 4)  # 4 MiB, every byte known
    return image


def _tls_blockd(factory: BlockdFactory, tmp: Path, pki: dict[str, Path], port: int,
                verify_peer: str = "on") -> object:
    image = _image(tmp)
    return factory(
        "--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server,"
                    f"verify-peer={verify_peer}",
        "--blockdev", f"driver=file,node-name=disk0,filename={image}",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0",
        "--export", "type=nbd,id=e0,node-name=disk0,writable=on")


def _qemu_io(port: int, client_dir: Path | None, *commands: str
             ) -> subprocess.CompletedProcess[str]:
    opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk0"
    argv = ["qemu-io", "-f", "raw"] if client_dir is None else ["qemu-io"]
    if client_dir is not None:
        argv += ["--object", f"tls-creds-x509,id=c0,dir={client_dir},endpoint=client",
                 "--image-opts", opts + ",tls-creds=c0"]
    else:
        argv += [f"nbd://127.0.0.1:{port}/disk0"]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_nbd_over_tls_serves_qemu_io_nbdinfo_and_nbdcopy(
    blockd_factory: BlockdFactory, tmp_path: Path, pki: dict[str, Path]
) -> None:
    port = free_port()
    _tls_blockd(blockd_factory, tmp_path, pki, port)
    done = _qemu_io(port, pki["client"], "write -P 0x5a 65536 131072",
                    "read -P 0x5a 65536 131072", "flush")
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done
    image = (tmp_path / "disk.img").read_bytes()
    assert image[65536:196608] == b"\x5a" * 131072  # acknowledged over TLS, on disk
    uri = f"nbds://127.0.0.1:{port}/disk0?tls-certificates={pki['client']}"
    info = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "with TLS" in info.stdout and "4194304" in info.stdout
    copy = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", uri, str(copy)], check=True, timeout=60)
    assert copy.read_bytes() == image


async def test_nbd_tls_refuses_plaintext_other_ca_and_missing_client_certificate(
    blockd_factory: BlockdFactory, tmp_path: Path, pki: dict[str, Path]
) -> None:
    port = free_port()
    d = _tls_blockd(blockd_factory, tmp_path, pki, port)
    pid = d.proc.pid  # type: ignore[attr-defined]
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    plain = _qemu_io(port, None, "read 0 512")
    assert "not permitted before TLS" in plain.stdout + plain.stderr, plain
    for name in ("client-other-ca", "client-no-cert"):
        refused = _qemu_io(port, pki[name], "read 0 512")
        assert refused.returncode != 0 and "read 512/512" not in refused.stdout, (name, refused)
    nbdinfo = subprocess.run(
        ["nbdinfo", f"nbds://127.0.0.1:{port}/disk0?tls-certificates={pki['client-no-cert']}"],
        capture_output=True, text=True, timeout=60)
    assert nbdinfo.returncode != 0
    qmp = await d.client()  # type: ignore[attr-defined]
    hits = (await qmp.execute("blockd-query-limits"))["hits"]
    assert hits.get("nbd-tls-failures", 0) >= 3, hits
    await asyncio.sleep(0.5)
    # Every refused connection was let go: no descriptor kept (the QMP session adds one).
    assert len(os.listdir(f"/proc/{pid}/fd")) <= fds_before + 1
    assert "certificate" in d.stderr()  # type: ignore[attr-defined]


def test_options_before_starttls_get_tls_reqd_and_export_name_closes(
    blockd_factory: BlockdFactory, tmp_path: Path, pki: dict[str, Path]
) -> None:
    port = free_port()
    _tls_blockd(blockd_factory, tmp_path, pki, port)

    def negotiate() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        greeting = _recv(sock, 18)
        assert greeting[:8] == b"NBDMAGIC"
        sock.sendall(struct.pack(">I", 1))  # fixed newstyle
        return sock

    with negotiate() as sock:
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0))
        _, option, reply, length = struct.unpack(">QIII", _recv(sock, 20))
        assert (option, reply) == (OPT_LIST, ERR_TLS_REQD)
        assert b"not permitted before TLS" in _recv(sock, length)
    with negotiate() as sock:
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 5) + b"disk0")
        assert sock.recv(1) == b""  # no way to refuse EXPORT_NAME: the server hangs up


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def test_verify_peer_off_takes_a_client_without_certificate(
    blockd_factory: BlockdFactory, tmp_path: Path, pki: dict[str, Path]
) -> None:
    port = free_port()
    _tls_blockd(blockd_factory, tmp_path, pki, port, verify_peer="off")
    done = _qemu_io(port, pki["client-no-cert"], "read -P 0 0 1")
    assert done.returncode == 0 and "read 1/1" in done.stdout, done


async def _disconnect(qmp: QMPClient) -> None:
    """qemu.qmp's disconnect on a TLS stream, bounded: its flush sets the write limits
    to (0, 0), with which Python 3.11's TLS transport pauses writing with nothing
    buffered and never resumes, so drain() never returns.  A plain asyncio TLS client
    closes against blockd in milliseconds (checked by hand); the hang is the client's."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(qmp.disconnect(), 2)


def _client_context(pki: dict[str, Path], name: str = "client") -> ssl.SSLContext:
    directory = pki[name]
    context = ssl.create_default_context(cafile=str(pki["client"] / "ca-cert.pem"))
    if (directory / "client-cert.pem").exists():
        context.load_cert_chain(directory / "client-cert.pem", directory / "client-key.pem")
    return context


async def test_qmp_over_tls_with_qemu_qmp(
    blockd_factory: BlockdFactory, tmp_path: Path, pki: dict[str, Path]
) -> None:
    port = free_port()
    d = blockd_factory(
        "--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server",
        "--chardev", f"socket,id=m1,host=127.0.0.1,port={port},server=on,wait=off,"
                     "tls-creds=tls0",
        "--monitor", "m1")
    qmp = QMPClient("tls")
    await qmp.connect(("127.0.0.1", port), ssl=_client_context(pki))
    version = await qmp.execute("query-version")
    assert version["qemu"]["major"] == 7  # type: ignore[index]
    with pytest.raises(ExecuteError, match="in use"):
        await qmp.execute("object-del", {"id": "tls0"})
    await _disconnect(qmp)
    # No client certificate, or plaintext: no QMP greeting.
    for context in (_client_context(pki, "client-no-cert"), None):
        stranger = QMPClient("stranger")
        with pytest.raises(Exception):  # noqa: B017 - qemu.qmp wraps the TLS/EOF error
            await asyncio.wait_for(
                stranger.connect(("127.0.0.1", port), ssl=context), 15)
        await _disconnect(stranger)
    # The UNIX socket next to it still works, and so does the TLS one after the strangers.
    local = await d.client()
    assert "qemu" in await local.execute("query-version")  # type: ignore[operator]


async def test_object_add_and_nbd_server_start_over_qmp(
    qmp: QMPClient, pki: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ExecuteError, match=r"Unable to access credentials .*server-cert\.pem"):
        await qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": "bad",
                                         "dir": str(pki["client"]), "endpoint": "server"})
    with pytest.raises(ExecuteError, match="not supported by blockd"):
        await qmp.execute("object-add", {"qom-type": "secret", "id": "s0", "data": "x"})
    await qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": "cli",
                                     "dir": str(pki["client"])})  # endpoint: client
    port = free_port()
    addr = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
    with pytest.raises(ExecuteError, match="Expecting TLS credentials with a server endpoint"):
        await qmp.execute("nbd-server-start", {"addr": addr, "tls-creds": "cli"})
    await qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": "srv",
                                     "dir": str(pki["server"]), "endpoint": "server"})
    await qmp.execute("nbd-server-start", {"addr": addr, "tls-creds": "srv"})
    with pytest.raises(ExecuteError, match="is in use"):
        await qmp.execute("object-del", {"id": "srv"})
    image = _image(tmp_path)
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "disk0",
                                       "filename": str(image)})
    await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk0",
                                           "writable": True})
    done = await asyncio.to_thread(_qemu_io, port, pki["client"], "read -P 7 7 1")
    assert done.returncode == 0 and "read 1/1" in done.stdout, done
    await qmp.execute("nbd-server-stop")
    await qmp.execute("object-del", {"id": "srv"})
    with pytest.raises(ExecuteError, match="object 'srv' not found"):
        await qmp.execute("object-del", {"id": "srv"})


def _start_fails(argv: list[str], tmp: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp, env=env, timeout=60)
    assert done.returncode != 0, done
    return done.stderr


async def test_beyond_loopback_needs_tls_or_insecure_network(
    blockd_factory: BlockdFactory, tmp_path: Path, pki: dict[str, Path]
) -> None:
    port = free_port()
    qmp_any = blockd_argv("--qmp", f"tcp:0.0.0.0:{port}")
    assert "needs TLS" in _start_fails(qmp_any, tmp_path)
    nbd_any = blockd_argv("--qmp", str(tmp_path / "q.sock"), "--nbd-server",
                          f"addr.type=inet,addr.host=0.0.0.0,addr.port={port}")
    assert "insecure-network" in _start_fails(nbd_any, tmp_path)
    # Said explicitly, the operator gets plaintext beyond loopback.
    d = start_daemon([*qmp_any, "--insecure-network", "--qmp", str(tmp_path / "i.sock")],
                     tmp_path, "insecure")
    try:
        qmp = QMPClient("insecure")
        await qmp.connect(("127.0.0.1", port))
        await qmp.execute("nbd-server-start", {
            "addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": str(free_port())}}})
        await qmp.disconnect()
    finally:
        assert d.stop() == 0, d.stderr()
    # With TLS no flag is needed; without it, QMP's nbd-server-start is refused too.
    d2 = blockd_factory(
        "--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server",
        "--chardev", f"socket,id=m1,host=0.0.0.0,port={port},server=on,wait=off,"
                     "tls-creds=tls0",
        "--monitor", "m1")
    local = await d2.client()
    with pytest.raises(ExecuteError, match="needs TLS"):
        await local.execute("nbd-server-start", {
            "addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": str(free_port())}}})


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                    reason="qemu-storage-daemon not installed (qemu-system-common)")
def test_plaintext_client_sees_the_same_refusal_from_blockd_and_qsd(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The differential: the same command line, the same texts at a plaintext qemu-img."""
    image = _image(tmp_path)
    texts = []
    for name, program in (("qsd", ["qemu-storage-daemon"]), ("blockd", blockd_argv()[:-2])):
        port = free_port()
        argv = [*program,
                "--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server",
                "--blockdev", f"driver=file,node-name=disk0,filename={image}",
                "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},"
                                "tls-creds=tls0",
                "--export", "type=nbd,id=e0,node-name=disk0,writable=on",
                "--chardev", f"socket,id=m0,path={tmp_path / name}.sock,server=on,wait=off",
                "--monitor", "m0"]
        d = start_daemon(argv, tmp_path, name)
        try:
            plain = _qemu_io(port, None, "read 0 512")
            good = _qemu_io(port, pki["client"], "read -P 0 0 1")
        finally:
            d.stop()
        assert good.returncode == 0 and "read 1/1" in good.stdout, (name, good)
        texts.append([line.replace(str(port), "PORT")
                      for line in (plain.stdout + plain.stderr).splitlines() if "TLS" in line])
    assert texts[0] == texts[1] and texts[0], texts
