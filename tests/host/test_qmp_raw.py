"""Bad input over a raw socket against a running blockd: exact replies, no crash, no hang."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from daemons import DaemonProcess


class RawQmp:
    """A byte-level QMP peer: what a broken or hostile client would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> RawQmp:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> dict[str, object]:
        line = await asyncio.wait_for(self.reader.readline(), 10)
        assert line.endswith(b"\r\n"), line
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def generic(desc: str, **extra: object) -> dict[str, object]:
    return {"error": {"class": "GenericError", "desc": desc}, **extra}


async def negotiated(d: DaemonProcess) -> RawQmp:
    raw = await RawQmp.connect(d.qmp_path)
    assert "QMP" in await raw.recv()
    await raw.send(b'{"execute":"qmp_capabilities"}')  # no newline, as qemu.qmp sends
    assert await raw.recv() == {"return": {}}
    return raw


async def test_bad_json_gets_exact_errors_and_session_survives(blockd: DaemonProcess) -> None:
    raw = await negotiated(blockd)
    cases = [
        (b"[1, 2]", generic("QMP input must be a JSON object")),
        (b'{"execute": }', generic("JSON parse error, expecting value")),
        (b'{"execute": "query-version" "id": 22}',
         generic("JSON parse error, expected separator in dict")),
        (b'{"execute": tru}', generic("JSON parse error, invalid keyword 'tru'")),
        (b'{"execute": "query-version", "id": 23, "id": 24}',
         generic("JSON parse error, duplicate key")),
        (b'{"execute": 1, "id": 5}', generic("QMP input member 'execute' must be a string", id=5)),
        (b'{"execute": "query-block", "arguments": [], "id": 6}',
         generic("QMP input member 'arguments' must be an object", id=6)),
        (b'{"exec-oob": "query-version", "id": 25}',
         generic("QMP input member 'exec-oob' is unexpected", id=25)),
        (b'{"id": 7}', generic("QMP input lacks member 'execute'", id=7)),
        (b'{"execute": "blockdev-del", "arguments": {"node-name": "x"}, "id": {"a": [1]}}',
         generic("Failed to find node with node-name='x'", id={"a": [1]})),
    ]
    for request, reply in cases:
        await raw.send(request + b"\n")
        assert await raw.recv() == reply, request
    await raw.send(b'{"execute": "query-version", "id": 26')
    await raw.send(b"\x01")
    assert await raw.recv() == generic("JSON parse error, stray '\x01'")
    await raw.send(b"{'execute': 'query-block', 'id': 'single'}")
    assert await raw.recv() == {"return": [], "id": "single"}
    await raw.close()


async def test_two_commands_in_one_write(blockd: DaemonProcess) -> None:
    raw = await negotiated(blockd)
    await raw.send(b'{"execute":"query-block","id":1}{"execute":"query-version","id":2}')
    first, second = await raw.recv(), await raw.recv()
    assert first == {"return": [], "id": 1}
    assert second["id"] == 2 and "qemu" in second["return"]  # type: ignore[operator]
    await raw.close()


async def test_deep_nesting_and_huge_message(blockd: DaemonProcess) -> None:
    raw = await negotiated(blockd)
    await raw.send(b"[" * 1025 + b"]" * 1025)
    assert await raw.recv() == generic("JSON nesting depth limit exceeded")
    huge = b'{"execute": "query-block", "arguments": {"x": "' + b"a" * (64 << 20) + b'"}}'
    await raw.send(huge)
    assert await raw.recv() == generic("JSON token size limit exceeded")
    await raw.send(b'{"execute": "query-block", "id": "after"}')
    assert await raw.recv() == {"return": [], "id": "after"}
    await raw.close()


async def test_commands_before_negotiation(blockd: DaemonProcess) -> None:
    raw = await RawQmp.connect(blockd.qmp_path)
    greeting = await raw.recv()
    assert greeting["QMP"]["capabilities"] == []  # type: ignore[index]
    expect = {"class": "CommandNotFound",
              "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    for name in (b"query-version", b"no-such-command"):
        await raw.send(b'{"execute": "' + name + b'", "id": 1}')
        assert await raw.recv() == {"error": expect, "id": 1}
    await raw.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 2}')
    assert await raw.recv() == generic("Capability oob not available", id=2)
    await raw.send(b'{"execute": "qmp_capabilities", "id": 3}')
    assert await raw.recv() == {"return": {}, "id": 3}
    await raw.send(b'{"execute": "qmp_capabilities", "id": 4}')
    assert await raw.recv() == {"id": 4, "error": {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"}}
    await raw.close()


async def test_abrupt_disconnects_do_not_hurt_the_daemon(blockd: DaemonProcess) -> None:
    for _ in range(20):
        raw = await RawQmp.connect(blockd.qmp_path)
        await raw.send(b'{"execute": "qmp_capabilities"}{"execute": "query-blo')
        raw.writer.transport.abort()
    raw = await negotiated(blockd)
    await raw.send(b'{"execute": "query-block", "id": 1}')
    assert await raw.recv() == {"return": [], "id": 1}
    await raw.close()


async def test_an_id_too_large_for_a_double_comes_back_as_valid_json(
    blockd: DaemonProcess,
) -> None:
    """QEMU echoes ``"id": inf``, which JSON parsers reject (hardening issue, finding 9)."""
    raw = await negotiated(blockd)
    try:
        await raw.send(b'{"execute": "query-version", "id": 1e999}')
        line = await asyncio.wait_for(raw.reader.readline(), 10)
        assert line.endswith(b', "id": 1e999}\r\n'), line

        def strict(name: str) -> object:
            raise AssertionError(f"not JSON: {name} in {line!r}")

        reply = json.loads(line, parse_constant=strict)
        assert "return" in reply and reply["id"] == float("inf")
    finally:
        await raw.close()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _with_devices(blockd: DaemonProcess, count: int) -> None:
    qmp = await blockd.client()
    for n in range(count):
        await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": f"n{n}"})
        await qmp.execute("device_add", {"driver": "hd", "id": f"d{n}", "drive": f"n{n}"})


async def test_a_flooding_client_does_not_stall_another(blockd: DaemonProcess) -> None:
    """2,000 query-block in one write, with 200 devices (hardening issue, finding 2: every
    other client waited 42.7 s).  Commands of one session yield to everyone else."""
    await _with_devices(blockd, 200)
    flooder = await negotiated(blockd)
    other = await negotiated(blockd)
    try:
        await flooder.send(b'{"execute": "query-block"}' * 2000)
        await asyncio.sleep(0.05)  # the flood is under way
        slowest = 0.0
        for n in range(20):
            t0 = time.monotonic()
            await other.send(b'{"execute": "query-version", "id": %d}' % n)
            assert (await other.recv())["id"] == n
            slowest = max(slowest, time.monotonic() - t0)
        # One query-block of 200 devices takes milliseconds; the flood takes seconds.
        assert slowest < 1.0, f"another client waited {slowest:.2f} s"
        for _ in range(2000):
            assert "return" in await flooder.recv()
    finally:
        await flooder.close()
        await other.close()


async def test_big_replies_never_read_hold_bounded_memory(blockd: DaemonProcess) -> None:
    """A client that asks for 2,000 large replies and reads none (finding 8: the cap counted
    messages, not bytes): blockd stops running its commands until it reads."""
    await _with_devices(blockd, 200)
    pid = blockd.proc.pid
    raw = await negotiated(blockd)
    other = await negotiated(blockd)
    try:
        before = _rss(pid)
        await raw.send(b'{"execute": "query-block"}' * 2000)  # about 200 MB of replies
        await asyncio.sleep(3)
        grown = _rss(pid) - before
        assert grown < 100 << 20, f"RSS grew by {grown >> 20} MiB"
        await other.send(b'{"execute": "query-version", "id": 1}')
        assert (await other.recv())["id"] == 1  # the daemon still serves others
        for _ in range(2000):  # and the client gets every reply once it reads
            assert "return" in await raw.recv()
    finally:
        await raw.close()
        await other.close()


async def test_unfinished_messages_of_all_sessions_together_are_bounded(
    blockd_factory: object, tmp_path: Path
) -> None:
    """Finding 8's other half: 64 sessions each holding a 63 MiB unfinished message reach
    4 GiB.  The sessions' unfinished messages together are capped (``qmp-partial-bytes``);
    the session that would pass the cap is cut off, the others and new ones are served."""
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nqmp-partial-bytes = 4194304\nmessage-timeout = 120\n")
    d = blockd_factory("--config", str(config))  # type: ignore[operator]
    holders = []
    for _ in range(6):  # 6 x just under 1 MiB: the fifth passes 4 MiB
        raw = await negotiated(d)
        with contextlib.suppress(ConnectionError):  # a session cut off while it sends
            await raw.send(b'{"execute": "query-version", "arguments": {"a": "'
                           + b"x" * ((1 << 20) - 1000))
        holders.append(raw)
        await asyncio.sleep(0.2)
    cut = 0
    for raw in holders:
        try:
            if await asyncio.wait_for(raw.reader.read(1), 2) == b"":
                cut += 1
        except TimeoutError:
            pass  # still connected, still holding its message
        except ConnectionError:
            cut += 1
    assert cut == 2, cut
    fresh = await negotiated(d)
    await fresh.send(b'{"execute": "blockd-query-limits", "id": 1}')
    reply = await fresh.recv()
    assert reply["return"]["hits"]["qmp-partial-bytes"] == 2  # type: ignore[index]
    assert reply["return"]["limits"]["qmp-partial-bytes"] == 4 << 20  # type: ignore[index]
    # A session that finishes its message is answered and frees its share.
    await holders[0].send(b'"}}')
    answer = await holders[0].recv()
    assert "error" in answer  # query-version takes no "a": a clean error, not a cut
