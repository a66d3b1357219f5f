"""Bad NBD input against a running blockd: the spec's answer, no crash, no hang, no leak."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from pathlib import Path

from daemons import BlockdFactory, DaemonProcess
from nbdclients import libnbd

MiB = 1 << 20
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO, OPT_LIST = 7, 3
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW = 22, 28, 75


class RawNbd:
    """A byte-level NBD client that can send anything."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str) -> RawNbd:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        greeting = await client.read(18)
        assert greeting[:16] == b"NBDMAGIC" + IHAVEOPT
        assert struct.unpack(">H", greeting[16:])[0] & 1  # fixed newstyle
        return client

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), 10)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def option(self, opt: int, data: bytes = b"") -> tuple[int, bytes]:
        self.send(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)
        magic, echoed, reply, length = struct.unpack(">QIII", await self.read(20))
        assert (magic, echoed) == (OPT_REPLY_MAGIC, opt)
        return reply, await self.read(length)

    async def go(self, name: bytes) -> int:
        """NBD_OPT_GO; returns the export size."""
        reply, data = await self.option(OPT_GO, struct.pack(">I", len(name)) + name +
                                        struct.pack(">H", 0))
        size = 0
        while reply == REP_INFO:
            if struct.unpack(">H", data[:2])[0] == 0:  # NBD_INFO_EXPORT
                size = struct.unpack(">Q", data[2:10])[0]
            reply, data = await self.option_reply(OPT_GO)
        assert reply == REP_ACK, reply
        return size

    async def option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, echoed, reply, length = struct.unpack(">QIII", await self.read(20))
        assert (magic, echoed) == (OPT_REPLY_MAGIC, opt)
        return reply, await self.read(length)

    def request(self, cmd: int, cookie: int, offset: int, length: int, flags: int = 0,
                magic: int = REQUEST_MAGIC) -> None:
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length))

    async def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", await self.read(16))
        assert magic == SIMPLE_REPLY_MAGIC
        return error, cookie

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 10) == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def exported(blockd_factory: BlockdFactory, tmp_path: Path) -> tuple[DaemonProcess, str]:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(MiB))
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory("--blockdev", f"driver=file,node-name=f0,filename={img}",
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on")
    return d, sock


async def serving(sock: str) -> bool:
    """A well-behaved client still gets served."""
    c = await RawNbd.connect(sock)
    c.send(struct.pack(">I", 3))
    assert await c.go(b"disk") == MiB
    c.request(CMD_READ, 99, 0, 512)
    error, cookie = await c.simple_reply()
    data = await c.read(512)
    await c.close()
    return (error, cookie, len(data)) == (0, 99, 512)


async def test_options_and_requests_get_the_specs_answers(blockd_factory: BlockdFactory,
                                                          tmp_path: Path) -> None:
    _d, sock = await exported(blockd_factory, tmp_path)
    c = await RawNbd.connect(sock)
    c.send(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    reply, _ = await c.option(12345, b"junk")
    assert reply == REP_ERR_UNSUP  # unknown option: refused, the connection goes on
    reply, data = await c.option(OPT_LIST)
    assert reply == 2  # NBD_REP_SERVER
    assert data[4:] == b"disk"
    assert (await c.option_reply(OPT_LIST))[0] == REP_ACK
    assert await c.go(b"disk") == MiB
    c.request(CMD_READ, 1, MiB - 512, 1024)  # past the end
    assert await c.simple_reply() == (NBD_EINVAL, 1)
    c.request(CMD_WRITE, 2, MiB, 512)  # a write past the end carries its payload
    c.send(b"\0" * 512)
    assert (await c.simple_reply())[1] == 2
    c.request(99, 3, 0, 0)  # unknown command
    assert await c.simple_reply() == (NBD_EINVAL, 3)
    c.request(CMD_READ, 4, 0, 0)  # zero length
    error, cookie = await c.simple_reply()
    assert cookie == 4 and error in (0, NBD_EINVAL)
    c.request(CMD_READ, 5, 0, 64 * MiB)  # over the advertised maximum
    assert (await c.simple_reply())[0] in (NBD_EINVAL, NBD_EOVERFLOW)
    c.request(CMD_READ, 6, 4096, 4096)  # and it still works
    assert await c.simple_reply() == (0, 6)
    assert len(await c.read(4096)) == 4096
    c.request(CMD_DISC, 7, 0, 0)
    assert await c.closed()
    assert await serving(sock)


async def test_bad_magics_and_truncation_disconnect_only_that_client(
        blockd_factory: BlockdFactory, tmp_path: Path) -> None:
    d, sock = await exported(blockd_factory, tmp_path)
    # Bad option magic.
    c = await RawNbd.connect(sock)
    c.send(struct.pack(">I", 3) + b"NOTAMAGC" + struct.pack(">II", OPT_GO, 0))
    assert await c.closed()
    # Bad request magic in transmission.
    c = await RawNbd.connect(sock)
    c.send(struct.pack(">I", 3))
    await c.go(b"disk")
    c.request(CMD_READ, 1, 0, 512, magic=0xDEADBEEF)
    assert await c.closed()
    # Truncated request header, then a hang-up.
    c = await RawNbd.connect(sock)
    c.send(struct.pack(">I", 3))
    await c.go(b"disk")
    c.send(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_READ))
    await c.close()
    # A client that hangs up in the middle of a write payload.
    c = await RawNbd.connect(sock)
    c.send(struct.pack(">I", 3))
    await c.go(b"disk")
    c.request(CMD_WRITE, 1, 0, 65536)
    c.send(b"\xff" * 1000)
    await c.close()
    # Unknown export name with GO: an error reply, not a disconnect.
    c = await RawNbd.connect(sock)
    c.send(struct.pack(">I", 3))
    reply, _ = await c.option(OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert reply == (1 << 31) + 6  # NBD_REP_ERR_UNKNOWN
    await c.close()
    assert await serving(sock)
    assert d.proc.poll() is None


async def test_a_thousand_short_connections_leak_nothing(blockd_factory: BlockdFactory,
                                                         tmp_path: Path) -> None:
    d, sock = await exported(blockd_factory, tmp_path)
    fd_dir = f"/proc/{d.proc.pid}/fd"
    assert await serving(sock)
    before = len(os.listdir(fd_dir))

    async def one(i: int) -> None:
        c = await RawNbd.connect(sock)
        if i % 3 == 0:
            c.send(struct.pack(">I", 3))
            await c.go(b"disk")
            c.request(CMD_READ, i, 0, 512)
        await c.close()

    for batch in range(10):
        await asyncio.gather(*(one(batch * 100 + i) for i in range(100)))
    assert await serving(sock)
    for _ in range(50):  # closing is asynchronous on the server side
        if len(os.listdir(fd_dir)) <= before:
            break
        await asyncio.sleep(0.1)
    assert len(os.listdir(fd_dir)) <= before


async def test_acknowledged_writes_survive_a_kill(blockd_factory: BlockdFactory,
                                                  tmp_path: Path) -> None:
    nbd = libnbd()
    d, sock = await exported(blockd_factory, tmp_path)
    h = nbd.NBD()
    h.set_export_name("disk")
    await asyncio.to_thread(h.connect_unix, sock)
    payload = os.urandom(256 * 1024)
    await asyncio.to_thread(h.pwrite, payload, 4096)
    await asyncio.to_thread(h.flush)
    d.proc.kill()  # no clean shutdown at all
    d.proc.wait()
    assert (tmp_path / "disk.img").read_bytes()[4096:4096 + len(payload)] == payload


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_burst_of_reads_never_read_back_holds_bounded_memory(
    blockd_factory: BlockdFactory, tmp_path: Path
) -> None:
    """1,500 reads of 2 MiB sent in one burst by a client that reads no reply (finding 1 of
    the hardening issue: RSS went from 46 MB to 3.1 GB).  blockd takes requests only while
    the client is under its in-flight and unsent-reply limits; the rest wait unparsed."""
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory("--blockdev", f"driver=file,node-name=f0,filename={img}",
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "type=nbd,id=e0,node-name=f0,name=disk")
    before = _rss(d.proc.pid)
    c = await RawNbd.connect(sock)
    c.send(struct.pack(">I", 3))
    assert await c.go(b"disk") == 64 * MiB
    burst = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, n,
                                 (n % 32) * 2 * MiB, 2 * MiB) for n in range(1500))
    c.send(burst)
    await c.writer.drain()
    await asyncio.sleep(3)  # let blockd do whatever it does with the burst
    grown = _rss(d.proc.pid) - before
    # 128 requests or 64 MiB in flight, 8 MiB of unsent replies, the socket buffers: far
    # below the 3 GB of the unbounded server.
    assert grown < 256 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    other = await RawNbd.connect(sock)
    other.send(struct.pack(">I", 3))
    assert await other.go(b"disk") == 64 * MiB
    other.request(CMD_READ, 7, 0, 4096)
    assert await other.simple_reply() == (0, 7), "another client was not served meanwhile"
    assert await other.read(4096) == bytes(4096)
    await other.close()
    # Every request is still answered, in full, once the client reads.
    cookies = set()
    for _ in range(1500):
        error, cookie = await c.simple_reply()
        assert error == 0
        await c.read(2 * MiB)
        cookies.add(cookie)
    assert cookies == set(range(1500))
    await c.close()
    print(f"RSS grew by {grown / MiB:.1f} MiB during the burst")


async def test_half_finished_handshakes_and_messages_release_their_slots(
    blockd_factory: BlockdFactory, tmp_path: Path
) -> None:
    """64 QMP sessions with half a message and NBD connections that never finish the
    handshake held every slot for ever (hardening issue, finding 4).  They are dropped
    after 10 s; idle, negotiated QMP sessions and NBD connections are never dropped."""
    from test_qmp_raw import RawQmp, negotiated

    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory("--blockdev", f"driver=file,node-name=f0,filename={img}",
                       "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=9",
                       "--export", "type=nbd,id=e0,node-name=f0,name=disk")
    idle_qmp = await negotiated(d)
    idle_nbd = await RawNbd.connect(sock)
    idle_nbd.send(struct.pack(">I", 3))
    assert await idle_nbd.go(b"disk") == MiB
    stuck_qmp = []
    for _ in range(63):  # with the idle one: every one of the 64 QMP slots
        raw = await negotiated(d)
        await raw.send(b'{"execute": "query-')
        stuck_qmp.append(raw)
    stuck_nbd = [await RawNbd.connect(sock) for _ in range(8)]  # never send client flags

    async def qmp_served() -> bool:
        try:
            raw = await RawQmp.connect(d.qmp_path)
            greeting = await asyncio.wait_for(raw.reader.readline(), 2)
            await raw.close()
            return b'"QMP"' in greeting
        except (TimeoutError, ConnectionError):
            return False

    assert not await qmp_served(), "the slots were not all taken: the test proves nothing"
    deadline = asyncio.get_running_loop().time() + 20
    while not await qmp_served():
        assert asyncio.get_running_loop().time() < deadline, "QMP slots never came back"
        await asyncio.sleep(0.5)
    # The stuck NBD connections were opened after the QMP ones: they expire a little later.
    async def nbd_served() -> bool:
        try:
            return await asyncio.wait_for(serving(sock), 5)
        except (AssertionError, TimeoutError, OSError, asyncio.IncompleteReadError):
            return False

    while not await nbd_served():
        assert asyncio.get_running_loop().time() < deadline + 5, "NBD slots never came back"
        await asyncio.sleep(0.5)
    for raw in stuck_qmp:
        assert await asyncio.wait_for(raw.reader.read(1), 5) == b""  # dropped
    for c in stuck_nbd:
        assert await c.closed()
    # The idle, negotiated ones are still there and still work.
    await idle_qmp.send(b'{"execute": "query-version", "id": 1}')
    assert (await idle_qmp.recv())["id"] == 1
    idle_nbd.request(CMD_READ, 5, 0, 512)
    assert await idle_nbd.simple_reply() == (0, 5)
    await idle_qmp.close()
    await idle_nbd.close()


async def test_half_sent_requests_and_unread_replies_release_their_clients(
    blockd_factory: BlockdFactory, tmp_path: Path
) -> None:
    """Negotiated peers that stall hold a connection (and up to a write payload, or the
    unsent replies) for ever: a request left half-sent, replies never read.  With
    ``message-timeout`` and ``stall-timeout`` they are dropped; an idle client and one
    that reads slowly are not (hardening issue, item 1)."""
    from test_qmp_raw import negotiated

    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(4 * MiB))
    sock = str(tmp_path / "nbd.sock")
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nmessage-timeout = 1\nstall-timeout = 2\n")
    d = blockd_factory("--config", str(config),
                       "--blockdev", f"driver=file,node-name=f0,filename={img}",
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on")

    async def client() -> RawNbd:
        c = await RawNbd.connect(sock)
        c.send(struct.pack(">I", 3))
        assert await c.go(b"disk") == 4 * MiB
        return c

    idle = await client()
    half_header = await client()
    half_header.send(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_READ))  # 8 of 28 bytes
    half_write = await client()
    half_write.request(CMD_WRITE, 1, 0, 65536)
    half_write.send(bytes(1000))  # 1,000 of 65,536 payload bytes
    never_reads = await client()
    for cookie in range(64):  # 64 MiB of replies it will never read
        never_reads.request(CMD_READ, cookie, 0, MiB)
    slow = await client()
    for cookie in range(16):
        slow.request(CMD_READ, cookie, 0, MiB)
    qmp = await negotiated(d)
    await qmp.send(b'{"execute": "query-commands"}' * 3000)  # about 10 MB of replies, unread
    # The slow reader takes 64 KiB every 0.2 s (all of it takes about 50 s): progress, so
    # it is never cut off, while the others are.

    async def read_slowly() -> int:
        got = 0
        while got < 16 * (MiB + 16):
            data = await slow.reader.read(65536)
            assert data, f"the slow reader was cut off after {got} bytes"
            got += len(data)
            await asyncio.sleep(0.2)
        return got

    reading = asyncio.ensure_future(read_slowly())
    await asyncio.sleep(5)  # past every timeout
    assert await half_header.closed() and await half_write.closed()
    # It gets what was already in its socket, then EOF: nothing more was sent.
    left = 0
    with contextlib.suppress(ConnectionError):
        while data := await asyncio.wait_for(never_reads.reader.read(1 << 20), 10):
            left += len(data)
    assert left < 64 * MiB
    # The QMP session that reads nothing was cut off too: what is left ends in EOF.
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(qmp.reader.read(1 << 20), 10):
            pass
    idle.request(CMD_READ, 7, 0, 512)
    assert await idle.simple_reply() == (0, 7)
    assert len(await idle.read(512)) == 512
    limits = await _limits(d)
    assert limits["hits"]["nbd-message-timeout"] == 2, limits
    assert limits["hits"]["nbd-stalled-reader"] == 1, limits
    assert limits["hits"]["qmp-stalled-reader"] == 1, limits
    assert limits["limits"]["stall-timeout-ms"] == 2000
    assert not reading.done()  # still reading, slowly, and still served
    reading.cancel()


async def _limits(d: DaemonProcess) -> dict:  # type: ignore[type-arg]
    from test_qmp_raw import negotiated

    raw = await negotiated(d)
    await raw.send(b'{"execute": "blockd-query-limits"}')
    reply = await raw.recv()
    await raw.close()
    return reply["return"]  # type: ignore[return-value]
