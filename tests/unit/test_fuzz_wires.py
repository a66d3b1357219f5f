"""Fuzzing the two wire protocols' sans-IO cores with hypothesis.

Every input a client could send (random bytes, near-valid JSON with nasty values,
structure-aware NBD handshakes and requests with bad fields, any split into reads) must
end in a defined outcome: for QMP, replies that are valid JSON each ending in CRLF,
never an exception; for NBD, only the protocol's events, or NbdProtocolError (the
connection is dropped), never another exception and never a request outside the export.
CI runs a bounded number of examples; ``BLOCKD_FUZZ_EXAMPLES=100000`` with pytest's
``--timeout 0`` runs a long campaign (see docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd.nbd.errors import NbdProtocolError
from blockd.nbd.protocol import (
    NEED_DATA,
    BlockStatus,
    Closed,
    Disconnect,
    ExportInfo,
    Flush,
    NbdServerConnection,
    Read,
    Ready,
    Rejected,
    Send,
    Trim,
    Write,
    WriteZeroes,
)
from blockd.qmp.protocol import Execute, QmpSession
from blockd.qmp.protocol import Send as QmpSend

EXAMPLES = int(os.environ.get("BLOCKD_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- QMP -----------------------------------------------------------------------------------

NASTY_SCALARS = st.sampled_from([
    b"1e999", b"-1e999", b"1e-999", b"123456789012345678901234567890", b"-0", b"0.0e0",
    b'"\\ud800"', b'"\\u0000"', b'"\xff\xfe"', b'"\xc3\x28"', b"true", b"null", b"nul",
    b"'single'", b'"\\x"', b"[]", b"{}", b"[[[[[[[[[[", b"]]]]", b"{\"a\":1,\"a\":2}",
    b'"' + b"x" * 5000 + b'"', b"NaN", b"Infinity", b"0x10",
])
COMMANDS = st.sampled_from([
    b"qmp_capabilities", b"query-version", b"query-block", b"blockdev-add", b"eject",
    b"device_add", b"block-export-add", b"nbd-server-start", b"x" * 300, b"", b"quit",
])


def _qmp_message(draw_cmd: bytes, args: list[tuple[bytes, bytes]], with_id: bytes | None
                 ) -> bytes:
    body = b",".join(b'"' + k + b'":' + v for k, v in args)
    parts = [b'"execute":"' + draw_cmd + b'"']
    if args:
        parts.append(b'"arguments":{' + body + b"}")
    if with_id is not None:
        parts.append(b'"id":' + with_id)
    return b"{" + b",".join(parts) + b"}"


qmp_messages = st.builds(
    _qmp_message, COMMANDS,
    st.lists(st.tuples(st.sampled_from([b"id", b"node-name", b"driver", b"size", b"force",
                                        b"filename", b"device", b"a" * 100]),
                       NASTY_SCALARS), max_size=4),
    st.one_of(st.none(), NASTY_SCALARS))
qmp_streams = st.lists(st.one_of(qmp_messages, st.binary(max_size=64), NASTY_SCALARS),
                       min_size=1, max_size=12)


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for point in points:
        out.append(data[start:point])
        start = point
    out.append(data[start:])
    return [chunk for chunk in out if chunk]


def _check_qmp_output(data: bytes) -> None:
    assert data.endswith(b"\r\n"), data

    def strict(name: str) -> object:
        raise AssertionError(f"not JSON ({name}): {data!r}")

    value = json.loads(data, parse_constant=strict)
    assert isinstance(value, dict)
    assert ("return" in value) != ("error" in value) or "QMP" in value or "event" in value
    if "error" in value:
        assert set(value["error"]) == {"class", "desc"}


@FUZZ
@given(stream=qmp_streams, cuts=st.lists(st.integers(0, 10_000), max_size=8),
       negotiate=st.booleans())
def test_qmp_session_answers_anything_with_valid_json(
    stream: list[bytes], cuts: list[int], negotiate: bool
) -> None:
    session = QmpSession(version={"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                         is_command=lambda name: name in ("query-version", "query-block"),
                         capabilities=())
    _check_qmp_output(session.greeting())
    data = (b'{"execute":"qmp_capabilities"}' if negotiate else b"") + b"\n".join(stream)
    for chunk in _splits(data, cuts):
        for action in session.receive_data(chunk):
            if isinstance(action, QmpSend):
                _check_qmp_output(action.data)
            else:
                assert isinstance(action, Execute)
                # What the dispatcher would send back, for either outcome.
                _check_qmp_output(session.reply(action, {"ok": True}))
                _check_qmp_output(session.error(action, "GenericError", "no"))


# -- NBD -----------------------------------------------------------------------------------

SIZE = 1 << 20
DISK = ExportInfo(name="disk", description="", size=SIZE, read_only=False, can_flush=True,
                  can_fua=True, can_trim=True, can_write_zeroes=True, can_fast_zero=False,
                  can_multi_conn=True, can_allocation=True, min_block=512)


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return DISK if name in ("disk", "") else None

    def names(self) -> list[tuple[str, str]]:
        return [("disk", "")]


IHAVEOPT = b"IHAVEOPT"
REQUEST_MAGIC = 0x25609513
u32 = st.one_of(st.sampled_from([0, 1, 7, 0xFFFFFFFF, 1 << 31, 4096, 65536]),
                st.integers(0, 0xFFFFFFFF))
u64 = st.one_of(st.sampled_from([0, SIZE - 1, SIZE, SIZE + 1, 1 << 63, (1 << 64) - 1]),
                st.integers(0, (1 << 64) - 1))


@st.composite
def nbd_option(draw: st.DrawFn) -> bytes:
    opt = draw(st.one_of(st.integers(0, 12), u32))
    if opt in (6, 7) and draw(st.booleans()):  # INFO/GO with a mostly sane body
        name = draw(st.sampled_from([b"disk", b"", b"nope", b"x" * 5000]))
        infos = draw(st.lists(st.integers(0, 0xFFFF), max_size=4))
        body = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
            struct.pack(">H", i) for i in infos)
        body = body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    else:
        body = draw(st.binary(max_size=64))
    length = len(body) if draw(st.booleans()) else draw(u32)
    return IHAVEOPT + struct.pack(">II", opt, length) + body


@st.composite
def nbd_request(draw: st.DrawFn) -> bytes:
    magic = REQUEST_MAGIC if draw(st.integers(0, 9)) else draw(u32)
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16]), st.integers(0, 0xFFFF)))
    cmd = draw(st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)))
    length = draw(st.one_of(st.sampled_from([0, 512, 4096, 1 << 25, 1 << 26]), u32))
    offset = draw(u64)
    header = struct.pack(">IHHQQI", magic, flags, cmd, draw(u64), offset, length)
    payload = b""
    if cmd == 1 and length <= 8192:
        payload = bytes(draw(st.integers(0, length)))
    return header + payload


nbd_streams = st.tuples(
    st.sampled_from([struct.pack(">I", 3), struct.pack(">I", 1), struct.pack(">I", 0),
                     b"\xff\xff\xff\xff", b""]),
    st.lists(nbd_option(), max_size=4),
    st.booleans(),
    st.lists(nbd_request(), max_size=8),
    st.binary(max_size=32),
)
EVENTS = (Send, Ready, Closed, Read, Write, Flush, Trim, WriteZeroes, BlockStatus,
          Disconnect, Rejected)


@FUZZ
@given(parts=nbd_streams, cuts=st.lists(st.integers(0, 100_000), max_size=8))
def test_nbd_connection_ends_every_input_in_a_defined_way(
    parts: tuple[bytes, list[bytes], bool, list[bytes], bytes], cuts: list[int]
) -> None:
    flags, options, go, requests, tail = parts
    data = flags + b"".join(options)
    if go:  # a valid GO, so requests are reached often
        data += IHAVEOPT + struct.pack(">II", 7, 10) + struct.pack(">I", 4) + b"disk" + \
            struct.pack(">H", 0)
    data += b"".join(requests) + tail
    conn = NbdServerConnection(Catalog())
    assert conn.initial_data().startswith(b"NBDMAGIC")
    try:
        for chunk in _splits(data, cuts):
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                assert isinstance(event, EVENTS), event
                if isinstance(event, (Read, Write, Trim, WriteZeroes, BlockStatus)):
                    # Admitted requests lie inside the export, as the spec demands.
                    length = len(event.data) if isinstance(event, Write) else event.length
                    assert event.offset >= 0 and event.offset + length <= SIZE, event
                if isinstance(event, Closed):
                    return
    except NbdProtocolError:
        return  # the server drops the connection: a defined end
