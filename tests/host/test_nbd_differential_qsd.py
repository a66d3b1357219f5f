"""The same NBD conversations with qemu-storage-daemon and with blockd, replies compared.

Both daemons export a copy of the same sparse image twice from one node (``rw``, writable,
and ``ro``, read-only) with the same qemu-storage-daemon command line, then hold the same
conversations: option haggling (INFO, GO, LIST, the meta-context options, STARTTLS without
TLS, unknown options, lying lengths), requests in the transmission phase (out-of-range
offsets, zero lengths, bad flags, unknown commands, writes to the read-only export, simple
and structured replies, block status) and protocol violations (does the server disconnect
or answer with an error). A fixed corpus and a hypothesis-generated set of request
sequences are each played to both daemons and the normalized transcripts compared.

Normalized away, as the spec leaves them to the server (NetworkBlockDevice/nbd
doc/proto.md): the human-readable text of errors; how a structured read reply is cut into
data and hole chunks (the bytes they describe are compared); whether a reply to anything
but a read is simple or structured; the order of NBD_REP_SERVER replies; meta-context ids
(compared through the names they were given for). Where the two still differ and the spec
allows both, the case says so in ACCEPTED, with the reason and blockd's answer, which is
asserted; where QSD is right and blockd is not, the case is an xfail(strict=True) naming
what blockd must change.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbdwire as w
import pytest
from daemons import DaemonProcess, blockd_argv, start_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None,
    reason="qemu-storage-daemon not installed (Debian package qemu-system-common)",
)

SIZE = 4 << 20
WAIT = 1.0  # seconds to wait for a reply before calling the server silent
# The image: data here, holes elsewhere, so reads and block status see both.
DATA_AT = [(0, 64 << 10), (1 << 20, 4096), ((2 << 20) + 512, 1024), (SIZE - 4096, 4096)]

# Transmission flags (doc/proto.md "Transmission phase: Flag fields").
HAS_FLAGS, READ_ONLY, SEND_FUA = 1, 2, 8
SEND_DF, SEND_CACHE, SEND_FAST_ZERO = 1 << 7, 1 << 10, 1 << 11
# Features the spec makes optional that QSD offers and blockd does not (yet): masked in
# the advertised flags; what a client that uses them anyway gets is in ACCEPTED.
UNOFFERED = SEND_DF | SEND_CACHE | SEND_FAST_ZERO


# -- the two daemons -----------------------------------------------------------------------


def _image(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length in DATA_AT:
            f.seek(offset)
            f.write(bytes((offset // 512 + i) % 251 + 1 for i in range(length)))


@dataclass
class Pair:
    qsd: str
    blockd: str
    daemons: list[DaemonProcess] = field(default_factory=list)

    def __repr__(self) -> str:
        return "<QSD and blockd>"


def _start_pair(tmp: Path) -> Pair:
    sockets, daemons = {}, []
    for who in ("qsd", "blockd"):
        _image(tmp / f"{who}.img")
        sockets[who] = str(tmp / f"{who}-nbd.sock")
        args = ["--blockdev", f"driver=file,node-name=f0,filename={tmp}/{who}.img",
                "--nbd-server", f"addr.type=unix,addr.path={sockets[who]}",
                "--export", "type=nbd,id=rw,node-name=f0,name=rw,writable=on",
                "--export", "type=nbd,id=ro,node-name=f0,name=ro"]
        if who == "qsd":
            argv = ["qemu-storage-daemon", *args]
        else:
            argv = blockd_argv("--qmp", str(tmp / "blockd-qmp.sock"), *args)
        daemons.append(start_daemon(argv, tmp, who))
    return Pair(sockets["qsd"], sockets["blockd"], daemons)


def _stop_pair(pair: Pair) -> None:
    for d in pair.daemons:
        d.stop()
    for d in pair.daemons:
        assert "Traceback" not in d.stderr(), d.stderr()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """QSD and blockd, each exporting its own copy of the image as ``rw`` and ``ro``."""
    started = _start_pair(tmp_path_factory.mktemp("nbd-differential"))
    yield started
    _stop_pair(started)


@pytest.fixture(scope="module")
def fresh_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Another such pair, for the generated sequences (the corpus's writes stay apart)."""
    started = _start_pair(tmp_path_factory.mktemp("nbd-differential-generated"))
    yield started
    _stop_pair(started)


# -- a conversation and its normalized transcript ------------------------------------------


@dataclass(frozen=True)
class Flags:
    """The client's flags (4 bytes); the first step of every conversation."""

    value: int = 3  # FIXED_NEWSTYLE | NO_ZEROES


@dataclass(frozen=True)
class Opt:
    """An option; ``length`` lies about the data when given."""

    option: int
    data: bytes = b""
    length: int | None = None


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are; then whatever the server says within the wait."""

    data: bytes


@dataclass(frozen=True)
class Req:
    cmd: int
    offset: int = 0
    length: int = 0
    flags: int = 0
    payload: bytes | None = None  # WRITE: defaults to ``length`` bytes of a pattern
    magic: int = w.REQUEST_MAGIC


@dataclass(frozen=True)
class Batch:
    """Several requests in one write; their replies compared in cookie order."""

    requests: tuple[Req, ...]


Step = Flags | Opt | Raw | Req | Batch


def _digest(data: bytes) -> str:
    if not any(data):
        return f"{len(data)} zero bytes"
    return f"{len(data)} bytes {hashlib.sha256(data).hexdigest()[:12]}"


class Conversation:
    """One connection to one daemon, turning what it says into comparable records."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.source = w.SocketSource(self.sock, WAIT)
        self.records: list[object] = []
        self.contexts: dict[int, str] = {}
        self.structured = False
        self.transmission = False
        self.no_zeroes = False
        self.cookie = 0
        self.over = False

    def close(self) -> None:
        self.sock.close()

    def play(self, steps: list[Step]) -> list[object]:
        self.records.append(("greeting", self._step(lambda: w.read_greeting(self.source))))
        for step in steps:
            if self.over:
                self.records.append(("not sent", type(step).__name__))
                continue
            self.records.append(self._one(step))
        return self.records

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)  # if the server closed, what it said is read next

    def _step(self, read: object) -> object:
        """Run a reader; EOF and silence become records."""
        try:
            return read()  # type: ignore[operator]
        except w.EndOfStream as end:
            self.over = True
            return "closed mid-message" if end.partial else "closed"
        except w.Silent:
            return "silent"

    def _one(self, step: Step) -> object:
        if isinstance(step, Flags):
            self.no_zeroes = bool(step.value & 2)
            self._send(struct.pack(">I", step.value))
            return ("flags", step.value)
        if isinstance(step, Opt):
            self._send(w.option_bytes(step.option, step.data, step.length))
            if step.option == w.OPT_EXPORT_NAME:
                return ("export-name", self._step(self._export_name_reply))
            return ("option", step.option, self._step(self._option_replies))
        if isinstance(step, Raw):
            self._send(step.data)
            return ("raw", self._step(self._whatever))
        requests = step.requests if isinstance(step, Batch) else (step,)
        sent: dict[int, w.Request] = {}
        out = b""
        for req in requests:
            self.cookie += 1
            payload = req.payload
            if req.cmd == w.CMD_WRITE and payload is None:
                payload = bytes((self.cookie + i) % 253 for i in range(req.length))
            out += struct.pack(">IHHQQI", req.magic, req.flags, req.cmd, self.cookie,
                               req.offset, req.length) + (payload or b"")
            sent[self.cookie] = w.Request(req.cmd, req.offset, req.length, req.flags)
        self._send(out)
        expect = {c: r for c, r in sent.items() if r.cmd != w.CMD_DISC}
        return ("requests", self._step(lambda: self._replies(sent, expect)))

    def _whatever(self) -> object:
        """After raw bytes: the option replies or transmission replies that come."""
        if not self.transmission:
            return ("option-replies", self._option_replies())
        return ("bytes", _digest(self.source.take(1)))

    def _export_name_reply(self) -> object:
        size, flags = w.read_export_name_reply(self.source, self.no_zeroes)
        self.transmission = True
        return ("size", size, "flags", _flags(flags))

    def _option_replies(self) -> list[object]:
        """Option replies up to the final one (ACK or an error)."""
        replies: list[object] = []  # in any order the server likes: sorted
        while True:
            reply = w.read_option_reply(self.source)
            if reply.is_error:
                # The error's text is the server's own.
                return [*sorted(replies, key=repr), ("error", reply.type - w.REP_ERR)]
            if reply.type == w.REP_ACK:
                if reply.option == w.OPT_STRUCTURED_REPLY:
                    self.structured = True
                if reply.option in (w.OPT_GO, w.OPT_EXPORT_NAME):
                    self.transmission = True
                if reply.option == w.OPT_ABORT:
                    return [*sorted(replies, key=repr), ("ack, then", self._step(self._eof))]
                return [*sorted(replies, key=repr), "ack"]
            if reply.type == w.REP_SERVER:
                (n,) = struct.unpack(">I", reply.data[:4])
                replies.append(("server", reply.data[4:4 + n], reply.data[4 + n:]))
            elif reply.type == w.REP_META_CONTEXT:
                (cid,) = struct.unpack(">I", reply.data[:4])
                name = reply.data[4:].decode()
                if reply.option == w.OPT_SET_META_CONTEXT:
                    self.contexts[cid] = name
                replies.append(("meta-context", name))
            elif reply.type == w.REP_INFO:
                replies.append(_info(reply.data))

    def _eof(self) -> str:
        self.source.begin()
        self.source.take(1)
        return "more data"

    def _replies(self, sent: dict[int, w.Request], expect: dict[int, w.Request]) -> object:
        chunks: dict[int, list[w.Reply]] = {c: [] for c in expect}
        pending = set(expect)
        while pending:
            reply = w.read_reply(self.source, sent)
            assert reply.cookie in pending, f"a reply to cookie {reply.cookie} after its end"
            chunks[reply.cookie].append(reply)
            if reply.done:
                pending.discard(reply.cookie)
        out = [self._normalize(sent[c], chunks[c]) for c in sorted(chunks)]
        if len(expect) < len(sent):  # NBD_CMD_DISC: the server must close, saying nothing
            out.append(("after disconnect", self._step(self._eof)))
        return out

    def _normalize(self, request: w.Request, chunks: list[w.Reply]) -> object:
        errors = []
        content = bytearray(request.length) if request.cmd == w.CMD_READ else None
        covered = 0
        extents: list[object] = []
        for chunk in chunks:
            if not chunk.structured:
                if request.cmd == w.CMD_READ:
                    assert not self.structured, "a simple reply to a read (spec: MUST NOT)"
                    if not chunk.error:
                        return ("read", _digest(chunk.payload))
                return ("error", chunk.error) if chunk.error else "ok"
            if chunk.type in (w.CHUNK_ERROR, w.CHUNK_ERROR_OFFSET):
                errors.append(struct.unpack(">I", chunk.payload[:4])[0])
            elif chunk.type == w.CHUNK_OFFSET_DATA:
                (offset,) = struct.unpack(">Q", chunk.payload[:8])
                data = chunk.payload[8:]
                assert content is not None
                content[offset - request.offset:offset - request.offset + len(data)] = data
                covered += len(data)
            elif chunk.type == w.CHUNK_OFFSET_HOLE:
                covered += struct.unpack(">QI", chunk.payload)[1]
            elif chunk.type == w.CHUNK_BLOCK_STATUS:
                (cid,) = struct.unpack(">I", chunk.payload[:4])
                pairs = [struct.unpack(">II", chunk.payload[i:i + 8])
                         for i in range(4, len(chunk.payload), 8)]
                extents.append((self.contexts.get(cid, f"unnegotiated id {cid}"), pairs))
        if errors:
            return ("error", *errors)
        if request.cmd == w.CMD_READ:
            assert content is not None
            assert covered == request.length, f"read chunks cover {covered} of {request}"
            return ("read", _digest(bytes(content)))
        if extents:
            return ("block-status", *extents)
        return "ok"


def _flags(flags: int) -> str:
    """Transmission flags without the optional features blockd does not offer."""
    masked = flags & ~UNOFFERED
    if masked & READ_ONLY:
        masked &= ~SEND_FUA  # FUA means nothing where nothing is written
    return f"{masked:#x}"


def _info(data: bytes) -> object:
    (info,) = struct.unpack(">H", data[:2])
    if info == w.INFO_EXPORT:
        size, flags = struct.unpack(">QH", data[2:])
        return ("info-export", size, _flags(flags))
    if info == w.INFO_BLOCK_SIZE:
        return ("info-block-size", *struct.unpack(">III", data[2:]))
    return ("info", info, data[2:])


def transcript(path: str, steps: list[Step]) -> list[object]:
    conversation = Conversation(path)
    try:
        return conversation.play(steps)
    finally:
        conversation.close()


# -- the corpus ----------------------------------------------------------------------------

NI = w.name_and_infos
MC = w.meta_context_body
GO_RW = Opt(w.OPT_GO, NI(b"rw"))
GO_RO = Opt(w.OPT_GO, NI(b"ro"))
SR = Opt(w.OPT_STRUCTURED_REPLY)
SET_ALLOC_RW = Opt(w.OPT_SET_META_CONTEXT, MC(b"rw", (b"base:allocation",)))
SET_ALLOC_RO = Opt(w.OPT_SET_META_CONTEXT, MC(b"ro", (b"base:allocation",)))
F = Flags()


def simple(export: Opt = GO_RW) -> list[Step]:
    return [F, export]


def structured(export: Opt = GO_RW, meta: Opt | None = SET_ALLOC_RW) -> list[Step]:
    return [F, SR, *([meta] if meta else []), export]


# name -> steps. Out-of-range lengths and offsets are about the 4 MiB export. The cases
# share the images: writes go to [W, W + 64 KiB), which reads of the image's own data and
# block status queries keep clear of, so that one case's accepted difference (QSD zeroing
# with a hole where blockd writes zeroes, say) never shows up in another.
W = 3 << 20
CORPUS: dict[str, list[Step]] = {
    # Option haggling.
    "list": [F, Opt(w.OPT_LIST)],
    "list with data": [F, Opt(w.OPT_LIST, b"junk")],
    "info rw": [F, Opt(w.OPT_INFO, NI(b"rw"))],
    "info ro, every info": [F, Opt(w.OPT_INFO, NI(b"ro", (0, 1, 2, 3)))],
    "info twice the same, unknown info": [F, Opt(w.OPT_INFO, NI(b"rw", (3, 3, 77)))],
    "info unknown export": [F, Opt(w.OPT_INFO, NI(b"nope"))],
    "info default export": [F, Opt(w.OPT_INFO, NI(b""))],
    "info name longer than the option": [F, Opt(w.OPT_INFO, struct.pack(">I", 99) + b"rw")],
    "info trailing bytes": [F, Opt(w.OPT_INFO, NI(b"rw") + b"xx")],
    "info infos count lies": [F, Opt(w.OPT_INFO, NI(b"rw", (1,))[:-2])],
    "info empty": [F, Opt(w.OPT_INFO)],
    "go then read": [*simple(), Req(w.CMD_READ, 0, 4096)],
    "go ro, every info": [F, Opt(w.OPT_GO, NI(b"ro", (0, 1, 2, 3)))],
    "go unknown export, then go": [F, Opt(w.OPT_GO, NI(b"nope")), GO_RO],
    "go truncated": [F, Opt(w.OPT_GO, NI(b"rw")[:5])],
    "export name rw": [F, Opt(w.OPT_EXPORT_NAME, b"rw"), Req(w.CMD_READ, 0, 512)],
    "export name, zeroes": [Flags(1), Opt(w.OPT_EXPORT_NAME, b"ro")],
    "export name unknown": [F, Opt(w.OPT_EXPORT_NAME, b"nope")],
    "abort": [F, Opt(w.OPT_ABORT)],
    "abort with data": [F, Opt(w.OPT_ABORT, b"x")],
    "starttls without tls": [F, Opt(w.OPT_STARTTLS), Opt(w.OPT_LIST)],
    "starttls with data": [F, Opt(w.OPT_STARTTLS, b"x")],
    "unknown option": [F, Opt(99, b"junk"), Opt(w.OPT_LIST)],
    "unknown option, not fixed newstyle": [Flags(0), Opt(99, b"junk"), Opt(w.OPT_LIST)],
    "unknown client flags": [Flags(0xFF), Opt(w.OPT_LIST)],
    "bad option magic": [F, Raw(b"NOTMAGIC" + struct.pack(">II", w.OPT_LIST, 0))],
    "option length 1 MiB": [F, Opt(w.OPT_LIST, bytes(1 << 20))],
    "option length 2^32-1": [F, Opt(w.OPT_INFO, NI(b"rw"), 0xFFFFFFFF)],
    "structured reply with data": [F, Opt(w.OPT_STRUCTURED_REPLY, b"x")],
    "structured reply twice": [F, SR, SR],
    "list meta, no structured": [F, Opt(w.OPT_LIST_META_CONTEXT, MC(b"rw", (b"base:allocation",)))],
    "list meta": [F, SR, Opt(w.OPT_LIST_META_CONTEXT, MC(b"rw", (b"base:allocation",)))],
    "list meta, all": [F, SR, Opt(w.OPT_LIST_META_CONTEXT, MC(b"rw", ()))],
    "list meta, namespace": [F, SR, Opt(w.OPT_LIST_META_CONTEXT, MC(b"ro", (b"base:",)))],
    "list meta, unknown": [F, SR, Opt(w.OPT_LIST_META_CONTEXT, MC(b"rw", (b"x:y", b"base:z")))],
    "list meta, unknown export": [F, SR, Opt(w.OPT_LIST_META_CONTEXT,
                                             MC(b"nope", (b"base:allocation",)))],
    "list meta, bad length": [F, SR, Opt(w.OPT_LIST_META_CONTEXT,
                                         MC(b"rw", (b"base:allocation",))[:-3])],
    "set meta, no structured": [F, SET_ALLOC_RW],
    "set meta": [F, SR, SET_ALLOC_RW],
    "set meta, none": [F, SR, Opt(w.OPT_SET_META_CONTEXT, MC(b"rw", ()))],
    "set meta, namespace": [F, SR, Opt(w.OPT_SET_META_CONTEXT, MC(b"rw", (b"base:",)))],
    "set meta, unknown export": [F, SR, Opt(w.OPT_SET_META_CONTEXT,
                                            MC(b"nope", (b"base:allocation",)))],
    "set meta for ro, go rw": [F, SR, SET_ALLOC_RO, GO_RW,
                               Req(w.CMD_BLOCK_STATUS, 0, 1 << 20)],
    # Transmission, simple replies.
    "read across the data": [*simple(), Req(w.CMD_READ, 60 << 10, 8192)],
    "read unaligned": [*simple(), Req(w.CMD_READ, 1, 3)],
    "read past the end": [*simple(), Req(w.CMD_READ, SIZE - 512, 1024)],
    "read at the end": [*simple(), Req(w.CMD_READ, SIZE, 512)],
    "read offset overflows": [*simple(), Req(w.CMD_READ, (1 << 64) - 512, 1024)],
    "read zero length": [*simple(), Req(w.CMD_READ, 0, 0)],
    "read zero length at the end": [*simple(), Req(w.CMD_READ, SIZE, 0)],
    "read 32 MiB + 1": [*simple(), Req(w.CMD_READ, 0, (32 << 20) + 1)],
    "read with fua": [*simple(), Req(w.CMD_READ, 0, 512, w.FLAG_FUA)],
    "read with an unknown flag": [*simple(), Req(w.CMD_READ, 0, 512, 1 << 9)],
    "read with df, simple": [*simple(), Req(w.CMD_READ, 0, 512, w.FLAG_DF)],
    "write and read back": [*simple(), Req(w.CMD_WRITE, W + 8192, 4096),
                            Req(w.CMD_READ, W + 8192, 4096)],
    "write fua": [*simple(), Req(w.CMD_WRITE, W + 12288, 512, w.FLAG_FUA)],
    "write past the end": [*simple(), Req(w.CMD_WRITE, SIZE - 512, 1024),
                           Req(w.CMD_READ, SIZE - 512, 512)],
    "write at the end": [*simple(), Req(w.CMD_WRITE, SIZE, 512)],
    "write zero length": [*simple(), Req(w.CMD_WRITE, W, 0)],
    "write to ro": [*simple(GO_RO), Req(w.CMD_WRITE, 0, 512), Req(w.CMD_READ, 0, 512)],
    "write to ro past the end": [*simple(GO_RO), Req(w.CMD_WRITE, SIZE, 512)],
    "trim": [*simple(), Req(w.CMD_TRIM, W, 4096)],
    "trim to ro": [*simple(GO_RO), Req(w.CMD_TRIM, 0, 4096)],
    "trim past the end": [*simple(), Req(w.CMD_TRIM, SIZE - 512, 4096)],
    "trim zero length": [*simple(), Req(w.CMD_TRIM, W, 0)],
    "write zeroes": [*simple(), Req(w.CMD_WRITE_ZEROES, W + 16384, 4096),
                     Req(w.CMD_READ, W + 16384, 4096)],
    "write zeroes no hole": [*simple(), Req(w.CMD_WRITE_ZEROES, W + 16384, 4096,
                                                            w.FLAG_NO_HOLE)],
    "write zeroes fast": [*simple(), Req(w.CMD_WRITE_ZEROES, W + 16384, 4096,
                                                         w.FLAG_FAST_ZERO)],
    "write zeroes to ro": [*simple(GO_RO), Req(w.CMD_WRITE_ZEROES, 0, 4096)],
    "write zeroes past the end": [*simple(), Req(w.CMD_WRITE_ZEROES, SIZE - 512, 4096)],
    "write zeroes zero length": [*simple(), Req(w.CMD_WRITE_ZEROES, W, 0)],
    "flush": [*simple(), Req(w.CMD_FLUSH)],
    "flush on ro": [*simple(GO_RO), Req(w.CMD_FLUSH)],
    "flush with offset and length": [*simple(), Req(w.CMD_FLUSH, 4096, 4096)],
    "cache": [*simple(), Req(w.CMD_CACHE, 0, 4096)],
    "unknown command": [*simple(), Req(99, 0, 512)],
    "unknown command 8": [*simple(), Req(8, 0, 512)],
    "block status, simple": [*simple(), Req(w.CMD_BLOCK_STATUS, 0, 4096)],
    "bad request magic": [*simple(), Req(w.CMD_READ, 0, 512, magic=0xDEADBEEF)],
    "disconnect": [*simple(), Req(w.CMD_DISC)],
    "disconnect with a length": [*simple(), Req(w.CMD_DISC, 0, 512)],
    "disconnect after a read": [*simple(), Batch((Req(w.CMD_READ, 0, 4096), Req(w.CMD_DISC)))],
    "many at once": [*simple(), Batch((Req(w.CMD_WRITE, W + 20480, 4096), Req(w.CMD_FLUSH),
                                       Req(w.CMD_READ, 0, 65536), Req(w.CMD_TRIM, W, 512),
                                       Req(w.CMD_READ, SIZE, 1)))],
    # Transmission, structured replies.
    "s read across data and holes": [*structured(), Req(w.CMD_READ, 0, 2 << 20)],
    "s read a hole": [*structured(), Req(w.CMD_READ, 2 << 20, 65536)],
    "s read past the end": [*structured(), Req(w.CMD_READ, SIZE - 512, 1024)],
    "s read zero length": [*structured(), Req(w.CMD_READ, 0, 0)],
    "s read 32 MiB + 1": [*structured(), Req(w.CMD_READ, 0, (32 << 20) + 1)],
    "s read with df": [*structured(), Req(w.CMD_READ, 0, 65536, w.FLAG_DF)],
    "s read with an unknown flag": [*structured(), Req(w.CMD_READ, 0, 512, 1 << 9)],
    "s write to ro": [*structured(GO_RO, SET_ALLOC_RO), Req(w.CMD_WRITE, 0, 512)],
    "s unknown command": [*structured(), Req(99, 0, 512)],
    "s block status": [*structured(), Req(w.CMD_BLOCK_STATUS, 0, W)],
    "s block status ro": [*structured(GO_RO, SET_ALLOC_RO), Req(w.CMD_BLOCK_STATUS, 0, W)],
    "s block status req one": [*structured(), Req(w.CMD_BLOCK_STATUS, 0, W, w.FLAG_REQ_ONE)],
    "s block status unaligned": [*structured(), Req(w.CMD_BLOCK_STATUS, 100, 5000)],
    "s block status past the end": [*structured(), Req(w.CMD_BLOCK_STATUS, SIZE - 512, 4096)],
    "s block status zero length": [*structured(), Req(w.CMD_BLOCK_STATUS, 0, 0)],
    "s block status, no meta context": [*structured(meta=None),
                                        Req(w.CMD_BLOCK_STATUS, 0, 4096)],
    "s block status after a trim": [*structured(), Req(w.CMD_WRITE, W + 32768, 32768),
                                    Req(w.CMD_TRIM, W + 32768, 32768),
                                    Req(w.CMD_BLOCK_STATUS, W + 32768, 32768)],
    "s block status at the end": [*structured(), Req(w.CMD_BLOCK_STATUS, SIZE - 8192, 8192)],
    "write 32 MiB + 1, header only": [*simple(), Req(w.CMD_WRITE, W, (32 << 20) + 1,
                                                     payload=b"")],
    "write with an unknown flag": [*simple(), Req(w.CMD_WRITE, W, 512, 1 << 9)],
    "trim and write zeroes with fua": [*simple(), Req(w.CMD_TRIM, W, 512, w.FLAG_FUA),
                                       Req(w.CMD_WRITE_ZEROES, W, 512, w.FLAG_FUA)],
    "s set meta twice": [F, SR, SET_ALLOC_RW, Opt(w.OPT_SET_META_CONTEXT, MC(b"rw", ())),
                         GO_RW, Req(w.CMD_BLOCK_STATUS, 0, 4096)],
    "go name of 5000 bytes": [F, Opt(w.OPT_GO, NI(b"r" * 5000)), GO_RW],
    "list meta, query of 5000 bytes": [F, SR, Opt(w.OPT_LIST_META_CONTEXT,
                                                  MC(b"rw", (b"base:" + b"a" * 5000,)))],
    "read with no hole flag": [*simple(), Req(w.CMD_READ, 0, 512, w.FLAG_NO_HOLE)],
    "flush with fua": [*simple(), Req(w.CMD_FLUSH, 0, 0, w.FLAG_FUA)],
    "flush with fua, ro": [*simple(GO_RO), Req(w.CMD_FLUSH, 0, 0, w.FLAG_FUA)],
    "read with fua, ro": [*simple(GO_RO), Req(w.CMD_READ, 0, 512, w.FLAG_FUA)],
    "s block status with fua": [*structured(), Req(w.CMD_BLOCK_STATUS, 0, 4096, w.FLAG_FUA)],
    "s list meta ro": [F, SR, Opt(w.OPT_LIST_META_CONTEXT, MC(b"ro", (b"base:allocation",)))],
    "s block status 64 MiB": [*structured(), Req(w.CMD_BLOCK_STATUS, 0, 64 << 20)],
    "s block status offset past the end": [*structured(), Req(w.CMD_BLOCK_STATUS, SIZE, 512)],
    "s cache": [*structured(), Req(w.CMD_CACHE, 0, 4096)],
}

# Differences the spec allows: name -> (why, {record index: blockd's record}). blockd's
# records are asserted; QSD's at those indices are not compared. Record 0 is the greeting,
# record i the answer to step i - 1.
EINVAL, EPERM, ENOSPC, EOVERFLOW = 22, 1, 28, 75
_REFUSED = ("requests", [("error", EINVAL)])
_UNOFFERED = ("blockd does not advertise this optional feature (NBD_FLAG_SEND_CACHE, "
              "SEND_DF, SEND_FAST_ZERO); a client MUST NOT use it then, and blockd refuses "
              "it with NBD_EINVAL")
_ZERO = ("a zero length is unspecified by the spec ('the server SHOULD NOT disconnect'); "
         "blockd answers NBD_EINVAL, QSD succeeds doing nothing")
_RO = ("the spec: the server 'SHOULD return NBD_EPERM if it receives a write or trim request "
       "on a read-only export' (and for write zeroes); QSD 7.2 answers NBD_EINVAL")
_PAST_END = ("the spec: the server 'SHOULD return NBD_ENOSPC if it receives a write request "
             "including one or more sectors beyond the size of the device' (and for write "
             "zeroes); QSD 7.2 answers NBD_EINVAL")
_RO_FUA = ("blockd does not advertise NBD_FLAG_SEND_FUA on a read-only export (nothing is "
           "written there) and the flag 'is valid for all commands, provided "
           "NBD_FLAG_SEND_FUA has been negotiated': blockd refuses it with NBD_EINVAL, QSD "
           "advertises FUA there and accepts it")
ACCEPTED: dict[str, tuple[str, dict[int, object]]] = {
    "flush with fua, ro": (_RO_FUA, {3: _REFUSED}),
    "read with fua, ro": (_RO_FUA, {3: _REFUSED}),
    "unknown option, not fixed newstyle": (
        "'Servers MAY choose to honour fixed newstyle from clients that didn't set this "
        "bit': blockd refuses the unknown option with NBD_REP_ERR_UNSUP and goes on, QSD "
        "disconnects", {2: ("option", 99, [("error", 1)]),
                        3: ("option", 3, [("server", b"ro", b""), ("server", b"rw", b""),
                                          "ack"])}),
    "option length 1 MiB": (
        "both refuse the option and go on: QSD with NBD_REP_ERR_INVALID (LIST takes no "
        "data), blockd with NBD_REP_ERR_TOO_BIG (it does not buffer 1 MiB of option data)",
        {2: ("option", 3, [("error", 9)])}),
    "option length 2^32-1": (
        "blockd answers NBD_REP_ERR_TOO_BIG ('the request or the reply is too large to "
        "process') and skips the data as it comes; QSD disconnects",
        {2: ("option", 6, [("error", 9)])}),
    "structured reply twice": (
        "the spec says nothing of a second NBD_OPT_STRUCTURED_REPLY; blockd acknowledges "
        "it again (nothing changes), QSD refuses it with NBD_REP_ERR_INVALID",
        {3: ("option", 8, ["ack"])}),
    "list meta, query of 5000 bytes": (
        "a string 'MUST be no longer than 4096 bytes': blockd refuses the query with "
        "NBD_REP_ERR_INVALID, QSD ignores it as an unknown context",
        {3: ("option", 9, [("error", 3)])}),
    "read zero length": (_ZERO, {3: _REFUSED}),
    "read zero length at the end": (_ZERO, {3: _REFUSED}),
    "s read zero length": (_ZERO, {5: _REFUSED}),
    "write zero length": (_ZERO, {3: _REFUSED}),
    "trim zero length": (_ZERO, {3: _REFUSED}),
    "write zeroes zero length": (_ZERO, {3: _REFUSED}),
    "write past the end": (_PAST_END, {3: ("requests", [("error", ENOSPC)])}),
    "write at the end": (_PAST_END, {3: ("requests", [("error", ENOSPC)])}),
    "write zeroes past the end": (_PAST_END, {3: ("requests", [("error", ENOSPC)])}),
    "write to ro": (_RO, {3: ("requests", [("error", EPERM)])}),
    "write to ro past the end": (_RO, {3: ("requests", [("error", EPERM)])}),
    "s write to ro": (_RO, {5: ("requests", [("error", EPERM)])}),
    "trim to ro": (_RO, {3: ("requests", [("error", EPERM)])}),
    "write zeroes to ro": (_RO, {3: ("requests", [("error", EPERM)])}),
    "write zeroes fast": (_UNOFFERED, {3: _REFUSED}),
    "cache": (_UNOFFERED, {3: _REFUSED}),
    "s cache": (_UNOFFERED, {5: _REFUSED}),
    "s read with df": (_UNOFFERED, {5: _REFUSED}),
    "flush with offset and length": (
        "for a flush, length and offset 'MUST be set to all-zero': blockd refuses the "
        "request with NBD_EINVAL, QSD ignores them", {3: _REFUSED}),
    "bad request magic": (
        "a bad magic breaks a mandatory condition ('Either side MAY initiate a hard "
        "disconnect'); nothing after it can be trusted to be framed: blockd disconnects at "
        "once, QSD answers NBD_EINVAL first", {3: ("requests", "closed")}),
    "write 32 MiB + 1, header only": (
        "a payload over 2^25 bytes may be 'deemed a denial of service attack' and end in a "
        "hard disconnect: blockd disconnects at once, QSD answers NBD_EINVAL first",
        {3: ("requests", "closed")}),
    "disconnect after a read": (
        "on NBD_CMD_DISC 'the server MUST handle all outstanding requests': blockd answers "
        "the read first, QSD 7.2 closes without answering it",
        {3: ("requests", [("read", "4096 bytes fe3210fbc33c"), ("after disconnect", "closed")])}),
    "s read 32 MiB + 1": (
        "a read over the maximum payload with structured replies: the spec allows "
        "NBD_EOVERFLOW 'when a command without payload requests a length larger than an "
        "advertised maximum payload length'; blockd sends it, QSD NBD_EINVAL",
        {5: ("requests", [("error", EOVERFLOW)])}),
}

# Where QSD is right and blockd is not: name -> what blockd must change (xfail, strict).
WRONG: dict[str, str] = {}


def _compare(qsd: list[object], ours: list[object], name: str) -> None:
    if name in ACCEPTED:
        _reason, expected = ACCEPTED[name]
        for index, record in expected.items():
            assert ours[index] == record, f"{name}: blockd {ours[index]!r} (QSD {qsd[index]!r})"
        qsd = [r for i, r in enumerate(qsd) if i not in expected]
        ours = [r for i, r in enumerate(ours) if i not in expected]
    problems = [f"record {i}: QSD {q!r}\n          blockd {b!r}"
                for i, (q, b) in enumerate(zip(qsd, ours, strict=True)) if q != b]
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=WRONG[n])) if n in WRONG else n
    for n in CORPUS])
def test_corpus_same_answers(pair: Pair, name: str) -> None:
    steps = CORPUS[name]
    qsd = transcript(pair.qsd, steps)
    ours = transcript(pair.blockd, steps)
    _compare(qsd, ours, name)


# -- generated sequences -------------------------------------------------------------------

EXAMPLES = int(os.environ.get("BLOCKD_FUZZ_EXAMPLES", "300"))


@st.composite
def requests(draw: st.DrawFn) -> Req:
    cmd = draw(st.sampled_from([w.CMD_READ, w.CMD_READ, w.CMD_WRITE, w.CMD_FLUSH, w.CMD_TRIM,
                                w.CMD_WRITE_ZEROES, w.CMD_BLOCK_STATUS, 9, 200]))
    edge = st.sampled_from([0, 1, 511, 512, 4096, 65536, 1 << 20, SIZE - 4096, SIZE - 1, SIZE,
                            SIZE + 1, 1 << 32, (1 << 64) - 4096])
    offset = draw(st.one_of(edge, st.integers(0, SIZE)))
    length = draw(st.one_of(st.sampled_from([0, 1, 512, 4096, 65536]), st.integers(0, 8192)))
    if cmd == w.CMD_FLUSH and draw(st.booleans()):
        offset = length = 0
    flags = draw(st.sampled_from([0, 0, 0, w.FLAG_FUA, w.FLAG_NO_HOLE, w.FLAG_REQ_ONE,
                                  1 << 7, 1 << 15]))
    return Req(cmd, offset, length, flags)


@st.composite
def sessions(draw: st.DrawFn) -> list[Step]:
    ro = draw(st.booleans())
    go = GO_RO if ro else GO_RW
    how = draw(st.sampled_from(["simple", "structured", "meta"]))
    steps = simple(go) if how == "simple" else structured(
        go, (SET_ALLOC_RO if ro else SET_ALLOC_RW) if how == "meta" else None)
    for batch in draw(st.lists(st.lists(requests(), min_size=1, max_size=4), min_size=1,
                               max_size=4)):
        steps.append(Batch(tuple(batch)) if len(batch) > 1 else batch[0])
    return steps


def _justified(request: Req, read_only: bool) -> list[object]:
    """The refusals of ``request`` the spec names, whatever QSD answers."""
    codes = set()
    writes = request.cmd in (w.CMD_WRITE, w.CMD_TRIM, w.CMD_WRITE_ZEROES)
    if request.length == 0 and request.cmd != w.CMD_FLUSH:
        codes.add(EINVAL)  # _ZERO
    if request.cmd == w.CMD_FLUSH and (request.offset or request.length):
        codes.add(EINVAL)  # reserved fields
    if read_only and writes:
        codes.add(EPERM)  # _RO
    if read_only and request.flags & w.FLAG_FUA:
        codes.add(EINVAL)  # _RO_FUA
    if request.cmd in (w.CMD_WRITE, w.CMD_WRITE_ZEROES) and request.offset + request.length > SIZE:
        codes.add(ENOSPC)  # _PAST_END
    return [("error", c) for c in codes]


def _lenient(record: object) -> bool:
    """QSD succeeded, or refused with NBD_EINVAL."""
    return record in ("ok", ("error", EINVAL)) or (
        isinstance(record, tuple) and record[0] in ("read", "block-status"))


def _both_status(q: object, b: object) -> bool:
    """Both answered block status for the same contexts. Once the sequences have written,
    trimmed and zeroed, the two daemons' allocation differs (QSD punches holes where blockd
    writes zeroes, both allowed) and extents are hints ("0" is always a truthful answer), so
    they are compared only in the corpus, on regions nothing writes."""
    return (isinstance(q, tuple) and isinstance(b, tuple) and q[0] == b[0] == "block-status"
            and [c for c, _ in q[1:]] == [c for c, _ in b[1:]])


def _compare_generated(steps: list[Step], qsd: list[object], ours: list[object]) -> None:
    """Like _compare, request by request, with ACCEPTED's reasons as rules: where QSD
    succeeds or says NBD_EINVAL, blockd may refuse with an error the spec names for that
    request (zero length, reserved flush fields, read-only export, past the end)."""
    read_only = GO_RO in steps
    for index, (step, q, b) in enumerate(zip([None, *steps], qsd, ours, strict=True)):
        if q == b:
            continue
        if isinstance(step, Req | Batch) and isinstance(q, tuple) and isinstance(b, tuple) \
                and isinstance(q[1], list) and isinstance(b[1], list):
            requests = step.requests if isinstance(step, Batch) else (step,)
            for request, qr, br in zip(requests, q[1], b[1], strict=False):
                if qr == br or _both_status(qr, br) or (_lenient(qr) and br in _justified(
                        request, read_only)):
                    continue
                raise AssertionError(f"record {index}, {request}: QSD {qr!r}, blockd {br!r}")
            if len(q[1]) == len(b[1]):
                continue
        raise AssertionError(f"record {index}: QSD {q!r}\n          blockd {b!r}")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=sessions())
def test_generated_sequences_same_answers(fresh_pair: Pair, steps: list[Step]) -> None:
    qsd = transcript(fresh_pair.qsd, steps)
    ours = transcript(fresh_pair.blockd, steps)
    _compare_generated(steps, qsd, ours)
