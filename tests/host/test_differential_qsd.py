"""The same QMP script against qemu-storage-daemon and blockd, replies compared field by field.

Both daemons are started with the same qemu-storage-daemon command line, then
receive the same raw bytes.  Successful replies must have the same shape (the
same keys at every level, the same JSON types) and the same values except at
the paths listed in DELIBERATE (documented in docs/qmp.md); error replies must
have the same class and text.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from daemons import DaemonProcess, blockd_argv, start_daemon

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None,
    reason="qemu-storage-daemon not installed (Debian package qemu-system-common)",
)

# Paths (dotted, '*' for any list index) whose values may differ, and why.
DELIBERATE = {
    # blockd reports 7.2.0 and its own package name.
    "query-version": {"return.qemu.micro", "return.package"},
    # Allocation depends on the file system's state, not on the daemon.
    "query-named-block-nodes": {"return.*.image.actual-size"},
}

SCRIPT: list[tuple[str, bytes]] = [
    ("query-version", b'{"execute": "query-version", "id": 1}'),
    ("query-named-block-nodes", b'{"execute": "query-named-block-nodes", "id": 2}'),
    ("query-named-block-nodes", b'{"execute": "query-named-block-nodes", '
                                b'"arguments": {"flat": true}, "id": 3}'),
    ("query-block", b'{"execute": "query-block", "id": 4}'),
    ("query-blockstats", b'{"execute": "query-blockstats", "id": 5}'),
    ("query-blockstats", b'{"execute": "query-blockstats", '
                         b'"arguments": {"query-nodes": true}, "id": 6}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                     b'"node-name": "null1", "size": 4096}, "id": 7}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                     b'"node-name": "null1"}, "id": 8}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                     b'"node-name": "1bad"}, "id": 9}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "null-co"}, "id": 10}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "file", '
                     b'"node-name": "m1", "filename": "missing.img"}, "id": 11}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "host_device", '
                     b'"node-name": "h1", "filename": "disk.img"}, "id": 12}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "file", '
                     b'"node-name": "x5", "filename": "disk.img", "aio": "native"}, "id": 13}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "file", '
                     b'"node-name": "x6", "filename": "disk.img", "aio": "bogus"}, "id": 14}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                     b'"node-name": "x7", "size": "big"}, "id": 15}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "file", '
                     b'"node-name": "x8", "filename": "disk.img", '
                     b'"cache": {"direct": "yes"}}, "id": 16}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                     b'"node-name": "x9", "bogus-opt": 1}, "id": 17}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                     b'"node-name": "x10", "force-share": true}, "id": 18}'),
    ("blockdev-add", b'{"execute": "blockdev-add", "arguments": {"driver": "file", '
                     b'"node-name": "ro1", "filename": "disk.img", "read-only": true}, "id": 19}'),
    ("query-named-block-nodes", b'{"execute": "query-named-block-nodes", "id": 20}'),
    ("blockdev-del", b'{"execute": "blockdev-del", "arguments": {"node-name": "null1"}, "id": 21}'),
    ("blockdev-del", b'{"execute": "blockdev-del", "arguments": {"node-name": "null1"}, "id": 22}'),
    ("blockdev-del", b'{"execute": "blockdev-del", "id": 23}'),
    ("blockdev-del", b'{"execute": "blockdev-del", "arguments": {"node-name": 42}, "id": 24}'),
    ("query-version", b'{"execute": "query-version", "arguments": {"foo": 1}, "id": 25}'),
    ("query-version", b'{"execute": "query-version", "arguments": [], "id": 26}'),
    ("bogus", b'{"execute": "no-such-command", "id": 27}'),
    ("envelope", b'{"execute": 1, "id": 28}'),
    ("envelope", b'{"id": 29}'),
    ("envelope", b'{"execute": "query-block", "foo": 1, "id": 30}'),
    ("envelope", b'{"exec-oob": "query-version", "id": 31}'),
    ("parse", b"[1, 2]"),
    ("parse", b'{"execute": }'),
    ("parse", b'{"execute": "query-version" "id": 32}'),
    ("parse", b'{"execute": tru}'),
    ("parse", b'{"execute": "query-version", "id": 33, "id": 34}'),
    ("query-block", b"{'execute': 'query-block', 'id': 'single-quoted'}"),
    ("id", b'{"execute": "query-block", "id": {"any": ["json", null]}}'),
    ("id", b'{"execute": "query-block", "id": null}'),
    ("nbd", b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", '
            b'"node-name": "file0"}, "id": 40}'),
    ("nbd", b'{"execute": "nbd-server-add", "arguments": {"device": "file0"}, "id": 41}'),
    ("nbd", b'{"execute": "nbd-server-stop", "id": 42}'),
    ("nbd", b'{"execute": "nbd-server-remove", "arguments": {"name": "x"}, "id": 43}'),
    ("nbd", b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", '
            b'"data": {"path": "nbd.sock"}}}, "id": 44}'),
    ("nbd", b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", '
            b'"data": {"path": "nbd.sock"}}}, "id": 45}'),
    ("nbd", b'{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix"}}, "id": 46}'),
    ("nbd", b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", '
            b'"node-name": "file0", "writable": true, "name": "disk", '
            b'"description": "scratch disk"}, "id": 47}'),
    ("nbd", b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", '
            b'"node-name": "null0"}, "id": 48}'),
    ("nbd", b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", '
            b'"node-name": "nope"}, "id": 49}'),
    ("nbd", b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e3", '
            b'"node-name": "ro1", "writable": true}, "id": 50}'),
    ("nbd", b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", '
            b'"node-name": "null0", "name": "disk"}, "id": 51}'),
    ("nbd", b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "9x", '
            b'"node-name": "null0"}, "id": 52}'),
    ("nbd", b'{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e5"}, '
            b'"id": 53}'),
    ("nbd", b'{"execute": "nbd-server-add", "arguments": {"device": "ro1", "writable": true}, '
            b'"id": 54}'),
    ("nbd", b'{"execute": "nbd-server-add", "arguments": {"device": "nope"}, "id": 55}'),
    ("query-block-exports", b'{"execute": "query-block-exports", "id": 56}'),
    ("blockdev-del", b'{"execute": "blockdev-del", "arguments": {"node-name": "file0"}, "id": 57}'),
    ("nbd", b'{"execute": "block-export-del", "arguments": {"id": "nope"}, "id": 58}'),
    ("nbd", b'{"execute": "block-export-del", "arguments": {"id": "e0", "mode": "bogus"}, '
            b'"id": 59}'),
    ("nbd", b'{"execute": "block-export-del", "arguments": {"id": "e0"}, "id": 60}'),
    ("nbd", b'{"execute": "nbd-server-remove", "arguments": {"name": "ro1"}, "id": 61}'),
    ("query-block-exports", b'{"execute": "query-block-exports", "id": 62}'),
    ("nbd", b'{"execute": "nbd-server-stop", "id": 63}'),
    ("blockdev-del", b'{"execute": "blockdev-del", "arguments": {"node-name": "file0"}, "id": 35}'),
    ("query-blockstats", b'{"execute": "query-blockstats", '
                         b'"arguments": {"query-nodes": true}, "id": 36}'),
]


async def run_script(d: DaemonProcess) -> tuple[list[dict[str, object]], list[object]]:
    """Replies in order, and the events (name and data) seen along the way."""
    reader, writer = await asyncio.open_unix_connection(d.qmp_path)
    events: list[object] = []

    async def recv() -> dict[str, object]:
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line.endswith(b"\r\n"), (d.proc.args, line)
            msg = json.loads(line)
            if "event" not in msg:
                return msg  # type: ignore[no-any-return]
            assert set(msg["timestamp"]) == {"seconds", "microseconds"}
            events.append((msg["event"], msg.get("data")))

    greeting = await recv()
    replies = [greeting]
    # Before negotiation: an ordinary command and qmp_capabilities with a bad value.
    for raw in (b'{"execute": "query-version", "id": "pre"}',
                b'{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": "c0"}',
                b'{"execute": "qmp_capabilities", "id": "c1"}',
                b'{"execute": "qmp_capabilities", "id": "c2"}'):
        writer.write(raw)
        await writer.drain()
        replies.append(await recv())
    for _, raw in SCRIPT:
        writer.write(raw + b"\n")
        await writer.drain()
        replies.append(await recv())
    writer.close()
    await writer.wait_closed()
    return replies, events


def differences(a: object, b: object, path: str, masked: set[str]) -> list[str]:
    """Where two JSON values differ in shape or value (masked paths: JSON type only)."""
    if path in masked:
        return [] if type(a) is type(b) else [f"{path}: type differs"]
    if type(a) is not type(b) and not (isinstance(a, int | float) and isinstance(b, int | float)
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return [f"{path}: type {type(a).__name__} != {type(b).__name__}"]
    if isinstance(a, dict):
        assert isinstance(b, dict)
        out = [f"{path}.{k}: missing in blockd" for k in a.keys() - b.keys()]
        out += [f"{path}.{k}: only in blockd" for k in b.keys() - a.keys()]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{path}.{k}".lstrip("."), masked)
        return out
    if isinstance(a, list):
        assert isinstance(b, list)
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        out = []
        for x, y in zip(a, b, strict=True):
            out += differences(x, y, f"{path}.*".lstrip("."), masked)
        return out
    if a == b:
        return []
    return [f"{path}: {a!r} != {b!r}"]


async def test_same_script_same_replies(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"\xab" * (1 << 20))
    common = ["--blockdev", "driver=file,node-name=file0,filename=disk.img",
              "--blockdev", "driver=null-co,node-name=null0,size=1073741824,read-zeroes=on"]
    qsd = start_daemon(
        ["qemu-storage-daemon", *common,
         "--chardev", f"socket,id=mon0,path={tmp_path / 'qsd.sock'},server=on,wait=off",
         "--monitor", "chardev=mon0"], tmp_path, "qsd")
    blockd_sock = tmp_path / "blockd.sock"
    ours = start_daemon(
        blockd_argv(*common,
                    "--chardev", f"socket,id=mon0,path={blockd_sock},server=on,wait=off",
                    "--monitor", "chardev=mon0"), tmp_path, "blockd")
    try:
        expected, qsd_events = await run_script(qsd)
        actual, our_events = await run_script(ours)
    finally:
        qsd.stop()
        assert ours.stop() == 0, ours.stderr()
    labels = ["greeting", "pre", "caps-bogus", "caps", "caps-again"] + [n for n, _ in SCRIPT]
    problems = []
    for label, want, got in zip(labels, expected, actual, strict=True):
        masked = DELIBERATE.get(label, set())
        if label == "greeting":
            masked = {"QMP.version.qemu.micro", "QMP.version.package", "QMP.capabilities"}
        if "error" in want:
            if want != got:
                problems.append(f"{label}: QSD {want} != blockd {got}")
            continue
        problems += [f"{label}: {p}" for p in differences(want, got, "", masked)]
    if sorted(map(str, qsd_events)) != sorted(map(str, our_events)):
        problems.append(f"events: QSD {qsd_events} != blockd {our_events}")
    assert not problems, "\n".join(problems)
