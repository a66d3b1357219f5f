"""NBD constants, wire layouts, builders, parsers, the receive buffer (blockd.nbd.wire,
blockd.nbd.constants) and the errno table (blockd.nbd.errors), against doc/proto.md.

Expected bytes are built here with explicit struct formats transcribed from the spec, never
with the module's own layouts.
"""

from __future__ import annotations

import errno
import struct

import pytest

from blockd.nbd.constants import (
    ClientFlag,
    Command,
    CommandFlag,
    ErrorCode,
    HandshakeFlag,
    Info,
    Magic,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
    StateFlag,
    TransmissionFlag,
)
from blockd.nbd.errors import NbdProtocolError, errno_to_nbd
from blockd.nbd.wire import (
    CHUNK_HEADER,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REQUEST,
    SIMPLE_REPLY,
    ReceiveBuffer,
    block_status_chunk,
    decode_string,
    encode_string,
    error_chunk,
    export_name_reply,
    final_data_header,
    greeting,
    offset_data_header,
    offset_hole_chunk,
    option_reply,
    parse_info_request,
    parse_meta_context_request,
    rep_info_block_size,
    rep_info_export,
    rep_info_string,
    rep_meta_context,
    rep_server,
    simple_ok,
    simple_reply,
)

REPLY_MAGIC = 0x3E889045565A9


# Constants ---------------------------------------------------------------------------------


def test_magics_spell_what_the_spec_says() -> None:
    assert struct.pack(">Q", Magic.NBDMAGIC) == b"NBDMAGIC"
    assert struct.pack(">Q", Magic.IHAVEOPT) == b"IHAVEOPT"
    assert int(Magic.OPTION_REPLY) == 0x3E889045565A9
    assert int(Magic.REQUEST) == 0x25609513
    assert int(Magic.SIMPLE_REPLY) == 0x67446698
    assert int(Magic.STRUCTURED_REPLY) == 0x668E33EF


def test_numbers_pinned_to_the_spec() -> None:
    assert (HandshakeFlag.FIXED_NEWSTYLE, HandshakeFlag.NO_ZEROES) == (1, 2)
    assert (ClientFlag.FIXED_NEWSTYLE, ClientFlag.NO_ZEROES) == (1, 2)
    assert [int(flag) for flag in TransmissionFlag] == [1 << bit for bit in range(13)]
    assert int(TransmissionFlag.SEND_FAST_ZERO) == 1 << 11
    assert int(TransmissionFlag.CAN_MULTI_CONN) == 1 << 8
    assert [int(o) for o in Option] == list(range(1, 12))
    assert int(Option.GO) == 7 and int(Option.SET_META_CONTEXT) == 10
    assert int(OptionReply.ACK) == 1 and int(OptionReply.META_CONTEXT) == 4
    assert int(OptionReply.ERR_UNSUP) == 2**31 + 1
    assert int(OptionReply.ERR_UNKNOWN) == 2**31 + 6
    assert int(OptionReply.ERR_TOO_BIG) == 2**31 + 9
    assert [int(i) for i in Info] == [0, 1, 2, 3]
    assert [int(c) for c in Command] == list(range(9))
    assert int(Command.WRITE_ZEROES) == 6 and int(Command.BLOCK_STATUS) == 7
    assert [int(f) for f in CommandFlag] == [1, 2, 4, 8, 16, 32]
    assert int(CommandFlag.REQ_ONE) == 8 and int(CommandFlag.FAST_ZERO) == 16
    assert int(ReplyFlag.DONE) == 1
    assert int(ReplyType.OFFSET_DATA) == 1 and int(ReplyType.OFFSET_HOLE) == 2
    assert int(ReplyType.BLOCK_STATUS) == 5
    assert int(ReplyType.ERROR) == 2**15 + 1 and int(ReplyType.ERROR_OFFSET) == 2**15 + 2
    assert {e.name: int(e) for e in ErrorCode} == {
        "EPERM": 1,
        "EIO": 5,
        "ENOMEM": 12,
        "EINVAL": 22,
        "ENOSPC": 28,
        "EOVERFLOW": 75,
        "ENOTSUP": 95,
        "ESHUTDOWN": 108,
    }
    assert (StateFlag.HOLE, StateFlag.ZERO) == (1, 2)


def test_layout_sizes() -> None:
    assert OPTION_HEADER.size == 16
    assert OPTION_REPLY_HEADER.size == 20
    assert REQUEST.size == 28
    assert SIMPLE_REPLY.size == 16
    assert CHUNK_HEADER.size == 20


# Errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (errno.EPERM, ErrorCode.EPERM),
        (errno.EACCES, ErrorCode.EPERM),
        (errno.EROFS, ErrorCode.EPERM),
        (errno.EIO, ErrorCode.EIO),
        (errno.ENOMEM, ErrorCode.ENOMEM),
        (errno.EINVAL, ErrorCode.EINVAL),
        (errno.ENOSPC, ErrorCode.ENOSPC),
        (errno.EDQUOT, ErrorCode.ENOSPC),
        (errno.EFBIG, ErrorCode.ENOSPC),
        (errno.EOVERFLOW, ErrorCode.EOVERFLOW),
        (errno.ENOTSUP, ErrorCode.ENOTSUP),
        (errno.EOPNOTSUPP, ErrorCode.ENOTSUP),
        (errno.ESHUTDOWN, ErrorCode.ESHUTDOWN),
        # Everything else is a device failure.
        (errno.ENOMEDIUM, ErrorCode.EIO),
        (errno.ENXIO, ErrorCode.EIO),
        (errno.ENODEV, ErrorCode.EIO),
        (errno.EBUSY, ErrorCode.EIO),
        (errno.ETIMEDOUT, ErrorCode.EIO),
        (errno.ENOENT, ErrorCode.EIO),
        (0, ErrorCode.EIO),
        (-1, ErrorCode.EIO),
        (99999, ErrorCode.EIO),
    ],
)
def test_errno_to_nbd(err: int, expected: ErrorCode) -> None:
    assert errno_to_nbd(err) is expected


def test_errno_to_nbd_never_returns_an_undefined_value() -> None:
    allowed = {int(code) for code in ErrorCode}
    assert {errno_to_nbd(err) for err in range(0, 200)} <= allowed


def test_protocol_error_is_an_exception() -> None:
    assert issubclass(NbdProtocolError, Exception)
    assert str(NbdProtocolError("bad magic")) == "bad magic"


# Strings -----------------------------------------------------------------------------------


def test_decode_string() -> None:
    assert decode_string(b"") == ""
    assert decode_string("caf\u00e9".encode()) == "caf\u00e9"
    assert decode_string(b"x" * 4096) == "x" * 4096
    for bad in (b"x" * 4097, b"a\0b", b"\xff", b"\xc0\x80"):
        with pytest.raises(ValueError):
            decode_string(bad)


def test_encode_string() -> None:
    assert encode_string("disk \u00e9") == "disk \u00e9".encode()
    with pytest.raises(ValueError):
        encode_string("a\0b")
    with pytest.raises(ValueError):
        encode_string("\u00e9" * 2049)  # 4098 bytes


# Handshake and option builders -----------------------------------------------------------


def test_greeting() -> None:
    assert greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert greeting(1) == b"NBDMAGICIHAVEOPT\x00\x01"


def test_export_name_reply() -> None:
    short = struct.pack(">QH", 1 << 40, 0x0123)
    assert export_name_reply(1 << 40, 0x0123, no_zeroes=True) == short
    assert export_name_reply(1 << 40, 0x0123, no_zeroes=False) == short + bytes(124)


def test_option_reply_layout() -> None:
    assert option_reply(7, 1) == struct.pack(">QIII", REPLY_MAGIC, 7, 1, 0)
    assert option_reply(3, 2**31 + 1, b"why") == (
        struct.pack(">QIII", REPLY_MAGIC, 3, 2**31 + 1, 3) + b"why"
    )


def test_rep_server() -> None:
    payload = struct.pack(">I", 4) + b"disk" + b"A disk"
    assert rep_server(3, b"disk", b"A disk") == (
        struct.pack(">QIII", REPLY_MAGIC, 3, 2, len(payload)) + payload
    )


def test_rep_info() -> None:
    assert rep_info_export(7, 1 << 30, 0x1234) == (
        struct.pack(">QIII", REPLY_MAGIC, 7, 3, 12) + struct.pack(">HQH", 0, 1 << 30, 0x1234)
    )
    assert rep_info_string(6, 1, b"cd0") == (
        struct.pack(">QIII", REPLY_MAGIC, 6, 3, 5) + b"\x00\x01cd0"
    )
    assert rep_info_block_size(7, 512, 4096, 1 << 25) == (
        struct.pack(">QIII", REPLY_MAGIC, 7, 3, 14) + struct.pack(">HIII", 3, 512, 4096, 1 << 25)
    )


def test_rep_meta_context() -> None:
    assert rep_meta_context(10, 1, b"base:allocation") == (
        struct.pack(">QIII", REPLY_MAGIC, 10, 4, 19) + b"\x00\x00\x00\x01base:allocation"
    )


# Option parsers ----------------------------------------------------------------------------


def info_data(name: bytes, *requests: int, name_length: int | None = None) -> bytes:
    length = len(name) if name_length is None else name_length
    items = b"".join(struct.pack(">H", r) for r in requests)
    return struct.pack(">I", length) + name + struct.pack(">H", len(requests)) + items


def test_parse_info_request() -> None:
    assert parse_info_request(info_data(b"")) == ("", ())
    assert parse_info_request(info_data(b"disk", 3, 1, 999)) == ("disk", (3, 1, 999))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x00\x00",  # 5 bytes
        info_data(b"disk", name_length=5),  # name longer than data - 6
        info_data(b"disk", 1) + b"\x00",  # trailing byte
        info_data(b"disk", 1, 2)[:-1],  # half an information request
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2) + b"\x00\x01",  # count too big
        info_data(b"a\0b"),
        info_data(b"\xff"),
    ],
)
def test_parse_info_request_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_info_request(data)


def meta_data(name: bytes, *queries: bytes, count: int | None = None) -> bytes:
    out = struct.pack(">I", len(name)) + name
    out += struct.pack(">I", len(queries) if count is None else count)
    for query in queries:
        out += struct.pack(">I", len(query)) + query
    return out


def test_parse_meta_context_request() -> None:
    assert parse_meta_context_request(meta_data(b"disk")) == ("disk", [])
    assert parse_meta_context_request(meta_data(b"", b"base:", b"qemu:x")) == (
        "",
        ["base:", "qemu:x"],
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x04dis",  # name runs past the data
        struct.pack(">I", 4) + b"disk",  # no query count
        meta_data(b"disk", b"base:", count=2),  # fewer queries than counted
        meta_data(b"disk", count=0xFFFFFFFF),  # absurd count, bounded by the data
        meta_data(b"disk", b"base:")[:-1],  # query runs past the data
        meta_data(b"disk", b"base:") + b"\x00",  # trailing byte
        meta_data(b"disk", b"ba\xffse:"),  # not UTF-8
    ],
)
def test_parse_meta_context_request_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_meta_context_request(data)


# Transmission replies ----------------------------------------------------------------------


def test_simple_reply() -> None:
    assert simple_reply(0x0102030405060708) == (
        b"\x67\x44\x66\x98" + b"\x00" * 4 + bytes(range(1, 9))
    )
    assert simple_reply(9, 22) == struct.pack(">IIQ", 0x67446698, 22, 9)


def test_one_call_packers_match_the_functions() -> None:
    """simple_ok and final_data_header are the same bytes as simple_reply and
    offset_data_header, as partials of the structs' pack."""
    for cookie, offset, length in ((0, 0, 1), (5, 4096, 512), (2**64 - 1, 2**63, 2**32 - 9)):
        assert simple_ok(cookie) == simple_reply(cookie)
        assert final_data_header(cookie, length + 8, offset) == offset_data_header(
            cookie, offset, length)


def test_offset_data_header() -> None:
    assert offset_data_header(5, 4096, 512) == struct.pack(
        ">IHHQIQ", 0x668E33EF, 1, 1, 5, 520, 4096
    )
    assert offset_data_header(5, 0, 1, done=False)[4:6] == b"\x00\x00"


def test_offset_hole_chunk() -> None:
    assert offset_hole_chunk(6, 8192, 65536) == struct.pack(
        ">IHHQIQI", 0x668E33EF, 1, 2, 6, 12, 8192, 65536
    )


def test_error_chunk() -> None:
    assert error_chunk(7, 5) == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 7, 6, 5, 0)
    assert error_chunk(7, 28, b"full") == (
        struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 7, 10, 28, 4) + b"full"
    )


def test_block_status_chunk() -> None:
    assert block_status_chunk(8, 1, [(4096, 0), (8192, 3)]) == struct.pack(
        ">IHHQII" + "II" * 2, 0x668E33EF, 1, 5, 8, 4 + 16, 1, 4096, 0, 8192, 3
    )
    assert block_status_chunk(8, 1, iter([(1, 1)])) == struct.pack(
        ">IHHQIIII", 0x668E33EF, 1, 5, 8, 12, 1, 1, 1
    )
    with pytest.raises(ValueError):
        block_status_chunk(8, 1, [])
    with pytest.raises(ValueError):
        block_status_chunk(8, 1, [(512, 0), (0, 0)])
    with pytest.raises(ValueError):
        block_status_chunk(8, 1, [(1 << 32, 0)])


# ReceiveBuffer -----------------------------------------------------------------------------


def test_receive_buffer_single_chunk_is_not_copied() -> None:
    buf = ReceiveBuffer()
    chunk = b"0123456789"
    buf.feed(chunk)
    assert len(buf) == 10
    assert buf.ensure(10)
    assert buf.data is chunk
    view = buf.take_view(4)
    assert view.obj is chunk and view.readonly
    assert bytes(view) == b"0123"
    assert buf.take(3) == b"456"
    assert len(buf) == 3
    assert not buf.ensure(4)


def test_receive_buffer_joins_only_the_straddling_bytes() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"abc")
    big = b"defghijklmnop"
    buf.feed(big)
    assert len(buf) == 16
    assert buf.ensure(5)
    assert buf.data[buf.pos : buf.pos + 5] == b"abcde"
    assert len(buf.data) == 5  # only what was asked for was joined
    buf.consume(5)
    assert buf.ensure(4)
    assert buf.data is big  # the rest of the chunk is used in place
    assert buf.take(11) == b"fghijklmnop"
    assert len(buf) == 0


def test_receive_buffer_across_many_chunks() -> None:
    buf = ReceiveBuffer()
    for byte in b"hello world":
        buf.feed(bytes([byte]))
        buf.feed(b"")  # ignored
    assert len(buf) == 11
    assert buf.take(5) == b"hello"
    assert bytes(buf.take_view(6)) == b" world"
    with pytest.raises(ValueError):
        buf.take(1)


def test_receive_buffer_copies_mutable_input() -> None:
    buf = ReceiveBuffer()
    data = bytearray(b"abcd")
    buf.feed(data)  # type: ignore[arg-type]
    data[0] = ord("X")
    assert buf.take(4) == b"abcd"


def test_receive_buffer_skip() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"ab")
    buf.feed(b"cdef")
    buf.feed(b"gh")
    assert buf.skip(3) == 3
    assert len(buf) == 5
    assert buf.skip(100) == 5
    assert len(buf) == 0
    assert buf.data == b""  # the last chunk was released
    buf.feed(b"xyz")
    assert buf.take(3) == b"xyz"
