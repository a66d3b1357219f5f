"""Fuzzing the running daemon: hostile QMP and NBD byte streams into its real sockets while
a well-behaved client keeps working beside them.

tests/unit/test_fuzz_wires.py fuzzes the sans-IO cores; this reaches what they leave out:
the asyncio adapters, the dispatcher, the devices, split reads from a real socket, clients
that hang up mid-message or half-close. For every input the daemon must answer with valid
messages (QMP: JSON objects of the right shape, one per CRLF line; NBD: replies framed as
the spec says, to requests that were sent, or a clean close), must close a session whose
client has half-closed, and must never die. Meanwhile a watcher (qemu.qmp on a second QMP
session, libnbd on a second export) checks that its own requests succeed with the right
data within 2 s (a liveness bound, not a speed claim), and at the end the daemon's
descriptors and RSS are back near where they started.

CI runs a bounded number of examples; ``BLOCKD_FUZZ_EXAMPLES=100000`` with pytest's
``--timeout 0`` runs a long campaign (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbdwire as w
import pytest
from daemons import BlockdFactory, DaemonProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdclients import libnbd
from qemu.qmp import QMPClient

# The unit fuzzers' strategies, imported under the name pytest gives that module too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from test_fuzz_wires import (
    IHAVEOPT,
    NASTY_SCALARS,
    SIZE,
    _check_qmp_output,
    _qmp_message,
    _splits,
    nbd_request,
    nbd_streams,
    qmp_messages,
)

EXAMPLES = int(os.environ.get("BLOCKD_FUZZ_EXAMPLES", "1000"))
DAEMON_FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
LIVENESS = 2.0  # seconds any one watcher request may take, however hard the fuzzer pushes
EOF_WAIT = 10.0  # seconds the daemon has to close a connection its client half-closed
WATCH_SIZE = 1 << 20


# -- the daemon and the watcher ------------------------------------------------------------


@dataclass(repr=False)
class Daemon:
    proc: DaemonProcess
    nbd: str  # the NBD server's UNIX socket
    tmp: Path

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.proc.pid}/fd"))

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def __repr__(self) -> str:
        return f"<blockd pid {self.proc.proc.pid}>"

    def alive(self) -> None:
        assert self.proc.proc.poll() is None, f"blockd died: {self.proc.stderr()[-3000:]}"


@pytest.fixture
def daemon(blockd_factory: BlockdFactory, tmp_path: Path) -> Iterator[Daemon]:
    """blockd with ``disk`` (the fuzz target, 1 MiB, writable, the size the unit fuzz
    strategies aim at) and ``watch`` (the watcher's) exported over a UNIX socket."""
    for name in ("disk.img", "watch.img", "scratch.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(SIZE)
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory("--blockdev", f"driver=file,node-name=disk,filename={tmp_path}/disk.img",
                       "--blockdev", f"driver=file,node-name=watch,filename={tmp_path}/watch.img",
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "type=nbd,id=disk,node-name=disk,name=disk,writable=on",
                       "--export", "type=nbd,id=watch,node-name=watch,name=watch,writable=on",
                       "--log-level", "warning")
    yield Daemon(d, sock, tmp_path)
    assert d.stop() == 0, d.stderr()[-5000:]
    assert "Traceback" not in d.stderr(), d.stderr()[-5000:]


@dataclass(repr=False)
class Watcher:
    """A QMP session (qemu.qmp) and an NBD connection (libnbd) doing real work throughout."""

    daemon: Daemon
    stop: threading.Event = field(default_factory=threading.Event)
    failures: list[str] = field(default_factory=list)
    slowest: dict[str, float] = field(default_factory=lambda: {"qmp": 0.0, "nbd": 0.0})
    slowest_unstarved: dict[str, float] = field(
        default_factory=lambda: {"qmp": 0.0, "nbd": 0.0})
    count: dict[str, int] = field(default_factory=lambda: {"qmp": 0, "nbd": 0})
    threads: list[threading.Thread] = field(default_factory=list)
    # The last inputs the fuzzer sent, to tell which one stalled the watcher.
    recent: deque[bytes] = field(default_factory=lambda: deque(maxlen=3))

    gc_began: float = 0.0
    gc_total: float = 0.0  # seconds the test process spent collecting garbage
    gc_longest: float = 0.0

    def collecting(self, phase: str, _info: dict[str, int]) -> None:
        """gc callback: the test process's own collections stall the watcher too (hypothesis
        holds a growing tree of what it tried: 3.9 s pauses after 40,000 inputs)."""
        if phase == "start":
            self.gc_began = time.monotonic()
        else:
            pause = time.monotonic() - self.gc_began
            self.gc_total += pause
            self.gc_longest = max(self.gc_longest, pause)

    def _clock(self) -> tuple[float, int, float]:
        """Now, how long the daemon's threads and this one have waited for a CPU, and how
        long the test process has spent collecting garbage."""
        return time.monotonic(), self._waited(), self.gc_total

    def _waited(self) -> int:
        """Nanoseconds spent runnable but not running (schedstat's run_delay): the most of
        any one of the daemon's threads, or of the calling thread."""
        paths = [Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")]
        with contextlib.suppress(OSError):
            paths += Path(f"/proc/{self.daemon.proc.proc.pid}/task").glob("*/schedstat")
        delays = [0]
        for path in paths:
            with contextlib.suppress(OSError, IndexError, ValueError):
                delays.append(int(path.read_text().split()[1]))
        return max(delays)

    def _timed(self, kind: str, what: str, since: tuple[float, int, float]) -> None:
        """Check one request's time. The bound is on the daemon, not on the machine's
        scheduler nor on the test process: time the daemon (or this thread) spent waiting
        for a CPU that other programs held, and the test process's own GC pauses, are not
        counted against it."""
        took = time.monotonic() - since[0]
        starved = max(0, self._waited() - since[1]) / 1e9 + (self.gc_total - since[2])
        self.slowest[kind] = max(self.slowest[kind], took)
        self.slowest_unstarved[kind] = max(self.slowest_unstarved[kind], took - starved)
        self.count[kind] += 1
        if took - starved > LIVENESS:
            self.failures.append(
                f"the watcher's {what} took {took:.2f} s ({starved:.2f} s of it waiting for "
                f"a CPU or for the test's GC); the last inputs sent: {list(self.recent)!r}")

    def _qmp(self) -> None:
        async def run() -> None:
            qmp = QMPClient("watcher")
            await qmp.connect(self.daemon.proc.qmp_path)
            try:
                while not self.stop.is_set():
                    since = self._clock()
                    exports = await asyncio.wait_for(qmp.execute("query-block-exports"), 30)
                    self._timed("qmp", "query-block-exports", since)
                    since = self._clock()
                    stats = await asyncio.wait_for(qmp.execute("query-blockstats"), 30)
                    self._timed("qmp", "query-blockstats", since)
                    since = self._clock()
                    version = await asyncio.wait_for(qmp.execute("query-version"), 30)
                    self._timed("qmp", "query-version", since)
                    ids = {e["id"] for e in exports}
                    assert {"disk", "watch"} <= ids, exports
                    assert isinstance(stats, list) and stats, stats
                    assert version["qemu"]["major"] == 7, version
                    await asyncio.sleep(0.01)
            finally:
                await qmp.disconnect()

        try:
            asyncio.run(run())
        except BaseException as exc:
            self.failures.append(f"QMP watcher: {exc!r}")

    def _nbd(self) -> None:
        try:
            nbd = libnbd()
            h = nbd.NBD()
            h.set_export_name("watch")
            h.connect_unix(self.daemon.nbd)
            rng = random.Random(1)
            known = rng.randbytes(64 << 10)
            h.pwrite(known, 0)
            shadow = bytearray(WATCH_SIZE)
            shadow[:len(known)] = known
            while not self.stop.is_set():
                offset = rng.randrange(0, WATCH_SIZE // 4096) * 4096
                data = rng.randbytes(4096)
                since = self._clock()
                h.pwrite(data, offset)
                self._timed("nbd", "write", since)
                shadow[offset:offset + 4096] = data
                since = self._clock()
                back = h.pread(4096, offset)
                self._timed("nbd", "read", since)
                since = self._clock()
                whole = h.pread(64 << 10, 0)
                self._timed("nbd", "read", since)
                assert back == data, f"read back at {offset} differs"
                assert whole == shadow[:64 << 10], "the watcher's first 64 KiB changed"
                time.sleep(0.005)
            h.flush()
            h.shutdown()
        except BaseException as exc:
            self.failures.append(f"NBD watcher: {exc!r}")

    def start(self) -> None:
        for target in (self._qmp, self._nbd):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)
        deadline = time.monotonic() + 20
        while min(self.count.values()) < 3 and not self.failures:
            assert time.monotonic() < deadline, "the watcher never got going"
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not self.failures, self.failures
        assert min(self.count.values()) > 0, self.count


@dataclass
class Baseline:
    fds: int
    rss: int


def settle(daemon: Daemon, baseline: Baseline, label: str) -> None:
    """The daemon's descriptors come back to the baseline and RSS stays near it."""
    deadline = time.monotonic() + 20
    while daemon.fds() > baseline.fds and time.monotonic() < deadline:
        time.sleep(0.1)  # closing is asynchronous on the daemon's side
    fds, rss = daemon.fds(), daemon.rss()
    print(f"{label}: fds {baseline.fds} -> {fds}, RSS {baseline.rss >> 20} -> {rss >> 20} MiB")
    assert fds <= baseline.fds, f"descriptors: {baseline.fds} before, {fds} after"
    assert rss - baseline.rss < 64 << 20, f"RSS grew by {(rss - baseline.rss) >> 20} MiB"


@dataclass(repr=False)
class Run:
    """One fuzzing run: its watcher, the daemon's baseline and what was sent."""

    daemon: Daemon
    watcher: Watcher
    baseline: Baseline
    inputs: int = 0
    replies: int = 0
    began: float = field(default_factory=time.monotonic)

    def __repr__(self) -> str:
        return f"<fuzzing {self.daemon!r}>"


@pytest.fixture
def fuzzing(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[Run]:
    """The watcher works throughout the examples; afterwards its verdict, then the leak
    check, once what the stateful QMP commands left is removed."""
    libnbd()  # skips here, not in the watcher's thread, where it is missing
    watcher = Watcher(daemon)
    gc.callbacks.append(watcher.collecting)
    watcher.start()
    run = Run(daemon, watcher, Baseline(daemon.fds(), daemon.rss()))
    try:
        yield run
        watcher.finish()
    finally:
        gc.callbacks.remove(watcher.collecting)
        print(f"the test process's longest GC pause: {watcher.gc_longest:.3f} s")
    _cleanup(daemon)
    took = time.monotonic() - run.began
    print(f"{request.node.name}: {run.inputs} inputs in {took:.1f} s, {run.replies} replies "
          f"checked; watcher {watcher.count} requests, slowest "
          f"{ {k: round(v, 3) for k, v in watcher.slowest.items()} } s, without the time "
          f"spent waiting for a CPU or the test's GC "
          f"{ {k: round(v, 3) for k, v in watcher.slowest_unstarved.items()} } s")
    settle(daemon, run.baseline, request.node.name)
    daemon.alive()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(EOF_WAIT)
    sock.connect(path)
    return sock


def send_chunks(sock: socket.socket, chunks: list[bytes], pause: bool) -> None:
    """Each chunk in its own send; with ``pause`` a yield between, so reads split too."""
    try:
        for chunk in chunks:
            sock.sendall(chunk)
            if pause:
                time.sleep(0.0005)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon gave up on us first: what it sent is still checked


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes; a daemon that never closes fails."""
    out = bytearray()
    deadline = time.monotonic() + EOF_WAIT
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            raise AssertionError(
                f"the daemon kept a half-closed connection open {EOF_WAIT} s; got {out[-300:]!r}"
            ) from None
        except ConnectionResetError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


ENDINGS = st.sampled_from(["half-close", "half-close", "drop"])


# -- QMP -----------------------------------------------------------------------------------

def _quits(message: bytes) -> bool:
    """A ``quit`` the daemon would obey (one with arguments is refused)."""
    return message.startswith(b'{"execute":"quit"') and b'"arguments"' not in message


# Well-formed commands that change state, on names of their own, so the fuzzer reaches the
# dispatcher, the registry, the NBD exports and the file driver, not only the parser. A
# file node opens a descriptor: the fd count at the end shows a leak.
_FZ = st.sampled_from([b'"fz0"', b'"fz1"', b'"fz2"'])
stateful_messages = st.one_of(
    st.builds(lambda n, size: b'{"execute":"blockdev-add","arguments":{"driver":"null-co",'
              b'"node-name":' + n + b',"size":' + size + b"}}", _FZ,
              st.sampled_from([b"0", b"512", b"1048576", b"-1", b"1e999"])),
    st.builds(lambda n, ro: b'{"execute":"blockdev-add","arguments":{"driver":"file",'
              b'"node-name":' + n + b',"filename":"scratch.img","read-only":' + ro + b"}}",
              _FZ, st.sampled_from([b"true", b"false"])),
    st.builds(lambda n: b'{"execute":"blockdev-del","arguments":{"node-name":' + n + b"}}", _FZ),
    st.builds(lambda e, n, wr: b'{"execute":"block-export-add","arguments":{"type":"nbd",'
              b'"id":' + e + b',"node-name":' + n + b',"writable":' + wr + b"}}",
              _FZ, _FZ, st.sampled_from([b"true", b"false"])),
    st.builds(lambda e, mode: b'{"execute":"block-export-del","arguments":{"id":' + e + mode
              + b"}}", _FZ, st.sampled_from([b"", b',"mode":"hard"', b',"mode":"safe"'])),
    st.sampled_from([b'{"execute":"query-block"}', b'{"execute":"query-blockstats",'
                     b'"arguments":{"query-nodes":true}}',
                     b'{"execute":"query-named-block-nodes"}',
                     b'{"execute":"query-block-exports"}', b'{"execute":"query-commands"}',
                     b'{"execute":"blockd-query-limits"}']),
    # Every command the daemon lists, with nasty arguments (quit and the NBD server's stop
    # excepted: the watcher needs both).
    st.builds(_qmp_message, st.sampled_from([
        b"query-version", b"query-block", b"query-blockstats", b"blockdev-add",
        b"blockdev-del", b"block-export-add", b"block-export-del", b"nbd-server-add",
        b"nbd-server-remove", b"eject", b"blockdev-open-tray", b"blockdev-close-tray",
        b"blockdev-change-medium", b"block_set_io_throttle", b"block-set-write-threshold",
        b"blockd-query-limits", b"query-named-block-nodes", b"query-commands"]),
        st.lists(st.tuples(st.sampled_from([b"id", b"node-name", b"device", b"driver",
                                            b"filename", b"name", b"writable", b"size"]),
                           st.one_of(NASTY_SCALARS, _FZ)), max_size=4),
        st.one_of(st.none(), NASTY_SCALARS)),
)
daemon_qmp_streams = st.lists(
    st.one_of(qmp_messages.filter(lambda m: not _quits(m)), stateful_messages,
              st.binary(max_size=64), NASTY_SCALARS),
    min_size=1, max_size=12)


def check_qmp_transcript(out: bytes, negotiated: bool) -> int:
    """Every line a valid QMP message; the greeting first. Returns the number of replies."""
    assert not out or out.endswith(b"\r\n"), f"a message cut short: {out[-300:]!r}"
    lines = out.split(b"\r\n")[:-1]
    assert lines, "no greeting"
    replies = 0
    for i, line in enumerate(lines):
        _check_qmp_output(line + b"\r\n")
        value = json.loads(line)
        if i == 0:
            assert set(value) == {"QMP"}, value
        elif "event" in value:
            # Events only reach a negotiated session (the stream may negotiate itself:
            # the first successful reply is qmp_capabilities').
            assert negotiated and set(value) <= {"event", "data", "timestamp"}, value
        else:
            assert set(value) <= {"return", "error", "id"}, value
            negotiated = negotiated or "return" in value
            replies += 1
    return replies


@DAEMON_FUZZ
@given(stream=daemon_qmp_streams, cuts=st.lists(st.integers(0, 10_000), max_size=8),
       negotiate=st.booleans(), ending=ENDINGS, pause=st.booleans(),
       drop_after=st.integers(0, 8))
def test_qmp_fuzz_against_the_running_daemon(
    fuzzing: Run, stream: list[bytes], cuts: list[int], negotiate: bool, ending: str,
    pause: bool, drop_after: int,
) -> None:
    daemon, state = fuzzing.daemon, fuzzing
    data = (b'{"execute":"qmp_capabilities"}' if negotiate else b"") + b"\n".join(stream)
    chunks = _splits(data, cuts)
    state.watcher.recent.append(data)
    sock = connect(daemon.proc.qmp_path)
    try:
        if ending == "drop":  # hang up somewhere in the middle, reading nothing
            send_chunks(sock, chunks[:drop_after], pause)
        else:
            send_chunks(sock, chunks, pause)
            sock.shutdown(socket.SHUT_WR)
            state.replies += check_qmp_transcript(read_to_eof(sock), negotiate)
    finally:
        sock.close()
    state.inputs += 1
    daemon.alive()


def _cleanup(daemon: Daemon) -> None:
    async def run() -> None:
        qmp = QMPClient("cleanup")
        await qmp.connect(daemon.proc.qmp_path)
        try:
            for _ in range(100):
                exports = [e["id"] for e in await qmp.execute("query-block-exports")]
                nodes = [n["node-name"] for n in await qmp.execute("query-named-block-nodes")]
                left = [e for e in exports if e.startswith("fz")] + \
                    [n for n in nodes if n.startswith("fz")]
                if not left:
                    return
                for e in exports:
                    if e.startswith("fz"):
                        await qmp.execute("block-export-del", {"id": e, "mode": "hard"})
                for n in nodes:
                    if n.startswith("fz") and not any(e.startswith("fz") for e in exports):
                        await qmp.execute("blockdev-del", {"node-name": n})
                await asyncio.sleep(0.1)
            raise AssertionError(f"could not remove {left}")
        finally:
            await qmp.disconnect()

    asyncio.run(run())


# -- NBD -----------------------------------------------------------------------------------

GO_DISK = w.option_bytes(w.OPT_GO, w.name_and_infos(b"disk"))


@st.composite
def nbd_sessions(draw: st.DrawFn) -> tuple[bytes, list[bytes], bool, list[bytes], bytes]:
    """A clean handshake (simple or structured replies, base:allocation or not), then the
    unit fuzzer's structure-aware requests: most inputs reach the transmission phase."""
    flags = struct.pack(">I", draw(st.sampled_from([1, 3])))
    options = []
    if draw(st.booleans()):
        options.append(w.option_bytes(w.OPT_STRUCTURED_REPLY))
        if draw(st.booleans()):
            options.append(w.option_bytes(w.OPT_SET_META_CONTEXT, w.meta_context_body(
                b"disk", (b"base:allocation",))))
    return flags, options, True, draw(st.lists(nbd_request(), max_size=12)), draw(
        st.binary(max_size=16))


def _numbered(requests: list[bytes]) -> tuple[list[bytes], dict[int, w.Request]]:
    """The requests with cookies 1, 2, ... (so every reply names the one it answers)."""
    out, sent = [], {}
    for cookie, raw in enumerate(requests, 1):
        magic, flags, cmd, _cookie, offset, length = struct.unpack(">IHHQQI", raw[:28])
        out.append(raw[:8] + struct.pack(">Q", cookie) + raw[16:])
        if magic == w.REQUEST_MAGIC:
            sent[cookie] = w.Request(cmd, offset, length, flags)
    return out, sent


def _options_sent(options: list[bytes]) -> set[int]:
    return {struct.unpack(">I", o[8:12])[0] for o in options if o.startswith(IHAVEOPT)} | {
        w.OPT_GO}


def check_nbd_transcript(out: bytes, client_flags: bytes, options: set[int],
                         requests: dict[int, w.Request]) -> int:
    """Everything the daemon sent on one connection, parsed as a strict client would:
    the greeting, replies to options that were sent, then replies to requests that were
    sent, each framed as the spec says; the stream may end only between messages.
    Returns the number of transmission replies."""
    source = w.BufferSource(out)
    no_zeroes = len(client_flags) == 4 and bool(struct.unpack(">I", client_flags)[0] & 2)
    structured = transmission = False
    answered: set[int] = set()
    replies = 0
    try:
        w.read_greeting(source)
        while not transmission and not source.at_end():
            if source.peek(8) == struct.pack(">Q", w.OPT_REPLY_MAGIC):
                reply = w.read_option_reply(source)
                assert reply.option in options, f"a reply to option {reply.option}, never sent"
                if reply.type == w.REP_ACK and reply.option == w.OPT_STRUCTURED_REPLY:
                    structured = True
                if reply.type == w.REP_ACK and reply.option == w.OPT_GO:
                    transmission = True
                if reply.type == w.REP_ACK and reply.option == w.OPT_ABORT:
                    assert source.at_end(), "the daemon went on after NBD_OPT_ABORT"
            else:
                assert w.OPT_EXPORT_NAME in options, f"not an option reply: {out[-200:]!r}"
                size, _flags = w.read_export_name_reply(source, no_zeroes)
                assert size == SIZE
                transmission = True
        while not source.at_end():
            reply = w.read_reply(source, requests)
            assert reply.cookie not in answered, f"cookie {reply.cookie} answered twice"
            request = requests[reply.cookie]
            if structured:
                assert reply.structured or request.cmd != w.CMD_READ, \
                    "a simple reply to NBD_CMD_READ after structured replies were agreed"
            else:
                assert not reply.structured, "a structured reply that was never agreed"
            if reply.done:
                answered.add(reply.cookie)
                replies += 1
    except w.EndOfStream as end:
        assert not end.partial, f"the daemon closed in the middle of a message: {out[-200:]!r}"
    return replies


@DAEMON_FUZZ
@given(parts=st.one_of(nbd_streams, nbd_sessions()),
       cuts=st.lists(st.integers(0, 100_000), max_size=8), ending=ENDINGS,
       pause=st.booleans(), drop_after=st.integers(0, 8))
def test_nbd_fuzz_against_the_running_daemon(
    fuzzing: Run, parts: tuple[bytes, list[bytes], bool, list[bytes], bytes],
    cuts: list[int], ending: str, pause: bool, drop_after: int,
) -> None:
    daemon, state = fuzzing.daemon, fuzzing
    flags, options, go, requests, tail = parts
    numbered, sent = _numbered(requests)
    data = flags + b"".join(options) + (GO_DISK if go else b"") + b"".join(numbered) + tail
    chunks = _splits(data, cuts)
    state.watcher.recent.append(data)
    sock = connect(daemon.nbd)
    try:
        if ending == "drop":
            send_chunks(sock, chunks[:drop_after], pause)
        else:
            send_chunks(sock, chunks, pause)
            sock.shutdown(socket.SHUT_WR)
            state.replies += check_nbd_transcript(read_to_eof(sock), flags,
                                                  _options_sent(options), sent)
    finally:
        sock.close()
    state.inputs += 1
    daemon.alive()
