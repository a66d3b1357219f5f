"""bench/reference_peer.py: QSD-style peer options translated for nbdkit and qemu-nbd."""

from __future__ import annotations

import benchscripts
import pytest

rp = benchscripts.load("reference_peer")


def _args(blockdev: str, writable: str = "on") -> list[str]:
    """The options nbd_bench.Peer gives every peer."""
    return ["--blockdev", f"node-name=n0,{blockdev}",
            "--nbd-server", "addr.type=unix,addr.path=/run/b/x.sock",
            "--export", f"type=nbd,id=e0,node-name=n0,name=e0,writable={writable}",
            "--chardev", "socket,id=m0,path=/run/b/x.qmp,server=on,wait=off",
            "--monitor", "chardev=m0",
            "--pidfile", "/run/b/x.pid"]


def test_nbdkit_file_and_null() -> None:
    assert rp.command("nbdkit", _args("driver=file,filename=/var/tmp/a.img")) == [
        "nbdkit", "--foreground", "--unix", "/run/b/x.sock", "--pidfile", "/run/b/x.pid",
        "--exportname", "e0", "file", "file=/var/tmp/a.img"]
    argv = rp.command("nbdkit", _args("driver=null-co,size=1024,read-zeroes=on", "off"))
    assert argv[-3:] == ["--readonly", "null", "size=1024"]


def test_qemu_nbd_keeps_the_blockdev_options() -> None:
    argv = rp.command("qemu-nbd", _args("driver=host_device,filename=/dev/loop3,locking=off"))
    assert argv == [
        "qemu-nbd", "--persistent", "--shared=0", "--socket", "/run/b/x.sock",
        "--export-name", "e0", "--pid-file", "/run/b/x.pid", "--cache=writeback",
        "--aio=threads", "--image-opts", "driver=host_device,filename=/dev/loop3,locking=off"]
    assert "--read-only" in rp.command("qemu-nbd", _args("driver=file,filename=/a", "off"))
    # keyval's ",," escape survives the round trip, and nested keys stay dotted
    argv = rp.command("qemu-nbd", _args("driver=file,filename=/a,,b,cache.direct=off"))
    assert argv[-1] == "driver=file,filename=/a,,b,cache.direct=off"
    assert rp.command("nbdkit", _args("driver=file,filename=/a,,b"))[-1] == "file=/a,b"


@pytest.mark.parametrize("server, args, message", [
    ("nbdd", _args("driver=file,filename=/a"), "unknown server"),
    ("nbdkit", _args("driver=qcow2,file=x"), "unsupported driver"),
    ("nbdkit", _args("driver=file"), "needs filename"),
    ("nbdkit", _args("driver=null-co"), "needs size"),
    ("nbdkit", _args("driver=file,filename=/a")[:-2], "--pidfile is missing"),
    ("nbdkit", [*_args("driver=file,filename=/a"), "--daemonize"], "needs a value"),
    ("nbdkit", [*_args("driver=file,filename=/a"), "--trace", "x"], "unsupported option"),
    ("nbdkit", [*_args("driver=file,filename=/a"), "--export", "name"],
     "Expected '=' after parameter 'name'"),
    ("nbdkit", [*_args("driver=file,filename=/a"), "--blockdev", "driver=file,a.0=x"],
     "unsupported list"),
    ("qemu-nbd", [*_args("driver=file,filename=/a"),
                  "--nbd-server", "addr.type=inet,addr.host=::,addr.port=1"], "UNIX socket"),
])
def test_what_cannot_be_translated(server: str, args: list[str], message: str) -> None:
    with pytest.raises(rp.UsageError, match=message):
        rp.command(server, args)
