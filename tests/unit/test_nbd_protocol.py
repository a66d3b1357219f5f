"""One NBD server connection (blockd.nbd.protocol) against doc/proto.md.

Client input and expected server output are built by hand from the spec's layouts (explicit
struct formats, no helpers from blockd.nbd.wire). Streams are fed whole, byte by byte and
split at every offset.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, replace

import pytest

from blockd.nbd.constants import ErrorCode
from blockd.nbd.errors import NbdProtocolError
from blockd.nbd.protocol import (
    BASE_ALLOCATION_ID,
    NEED_DATA,
    BlockStatus,
    Closed,
    CloseReason,
    Disconnect,
    Event,
    ExportInfo,
    Flush,
    NbdServerConnection,
    Phase,
    Read,
    Ready,
    Rejected,
    Send,
    StartTls,
    Trim,
    Write,
    WriteZeroes,
    transmission_flags,
)

# Numbers transcribed from the spec.
IHAVEOPT = 0x49484156454F5054
OPT_REPLY = 0x3E889045565A9
REQUEST = 0x25609513
SIMPLE = 0x67446698
STRUCTURED = 0x668E33EF
EXPORT_NAME, ABORT, LIST, PEEK, STARTTLS, INFO, GO = 1, 2, 3, 4, 5, 6, 7
STRUCTURED_REPLY, LIST_META, SET_META, EXTENDED_HEADERS = 8, 9, 10, 11
ACK, SERVER, REP_INFO, META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN = 2**31 + 1, 2**31 + 2, 2**31 + 3, 2**31 + 6
ERR_TLS_REQD = 2**31 + 5
ERR_BLOCK_SIZE_REQD, ERR_TOO_BIG = 2**31 + 8, 2**31 + 9
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EINVAL, ENOSPC, EOVERFLOW = 1, 22, 28, 75
# Transmission flags.
HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA = 1, 2, 4, 8
SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN, SEND_FAST_ZERO = 32, 64, 256, 2048

DISK = ExportInfo(
    name="disk",
    description="A test disk",
    size=1 << 20,
    read_only=False,
    can_flush=True,
    can_fua=True,
    can_trim=True,
    can_write_zeroes=True,
    can_fast_zero=True,
    can_multi_conn=True,
    can_allocation=True,
)
DISK_FLAGS = (
    HAS_FLAGS
    | SEND_FLUSH
    | SEND_FUA
    | SEND_TRIM
    | SEND_WRITE_ZEROES
    | CAN_MULTI_CONN
    | SEND_FAST_ZERO
)
CDROM = ExportInfo(
    name="cd0",
    description="",
    size=8 * 2048,
    read_only=True,
    can_flush=False,
    can_fua=False,
    can_trim=False,
    can_write_zeroes=False,
    can_fast_zero=False,
    can_multi_conn=False,
    can_allocation=False,
    min_block=2048,
    preferred_block=2048,
    max_block=64 << 10,
    handle=object(),
)
# Writable, but without the optional commands.
PLAIN = replace(
    DISK,
    name="plain",
    description="",
    can_flush=False,
    can_fua=False,
    can_trim=False,
    can_write_zeroes=False,
    can_fast_zero=False,
    can_multi_conn=False,
    can_allocation=False,
    max_block=64 << 10,
)


class Catalog:
    """Exports by name; "" is the first one."""

    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {export.name: export for export in exports}
        self.default = exports[0].name if exports else ""

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name or self.default)

    def names(self) -> Sequence[tuple[str, str]]:
        return [(e.name, e.description) for e in self.exports.values()]


def make(*exports: ExportInfo, **options: object) -> NbdServerConnection:
    return NbdServerConnection(Catalog(*(exports or (DISK, CDROM, PLAIN))), **options)  # type: ignore[arg-type]


# Client messages ---------------------------------------------------------------------------


def flags(value: int = 3) -> bytes:
    return struct.pack(">I", value)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def info_data(name: bytes, *requests: int) -> bytes:
    items = b"".join(struct.pack(">H", r) for r in requests)
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests)) + items


def meta_data(name: bytes, *queries: bytes) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def req(
    command: int,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    cmd_flags: int = 0,
    payload: bytes = b"",
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST, cmd_flags, command, cookie, offset, length) + payload


# Server messages ---------------------------------------------------------------------------


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPT_REPLY, option, reply, len(data)) + data


def info_export(option: int, export: ExportInfo, tflags: int) -> bytes:
    return rep(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size, tflags))


def info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return rep(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum))


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, reply type, payload), checking the magic."""
    out = []
    while data:
        magic, option, reply, length = struct.unpack_from(">QIII", data)
        assert magic == OPT_REPLY
        out.append((option, reply, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def refusal(event: Event, option: int, reply: int) -> str:
    """Check a Send holding a single error reply; return its message."""
    assert isinstance(event, Send)
    ((got_option, got_reply, message),) = replies(event.data)
    assert (got_option, got_reply) == (option, reply)
    assert message  # a human-readable reason
    return message.decode()


# Driving a connection ----------------------------------------------------------------------


def drain(conn: NbdServerConnection) -> list[Event]:
    """Events until NEED_DATA or Closed (which would repeat)."""
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, Closed):
            return out


def run(conn: NbdServerConnection, chunks: Sequence[bytes], eof: bool = False) -> list[Event]:
    out: list[Event] = []
    for chunk in [*chunks, b""] if eof else chunks:
        if out and isinstance(out[-1], Closed):
            conn.receive_data(chunk)
            continue
        conn.receive_data(chunk)
        out += drain(conn)
    return out


def feed(conn: NbdServerConnection, data: bytes, eof: bool = False) -> list[Event]:
    return run(conn, [data], eof)


def splits(data: bytes) -> list[list[bytes]]:
    """The data whole, byte by byte, and cut in two at every offset."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    return ways


def negotiate(
    conn: NbdServerConnection, prelude: bytes = b"", go: bytes = info_data(b"disk", 3)
) -> Ready:
    """Client flags (unless sent), ``prelude`` options, then GO; return Ready (Sends are
    dropped)."""
    handshake = flags() if conn.phase is Phase.HANDSHAKE else b""
    events = feed(conn, handshake + prelude + opt(GO, go))
    assert all(isinstance(e, Send) for e in events[:-1]), events
    ready = events[-1]
    assert isinstance(ready, Ready), events
    assert conn.phase is Phase.TRANSMISSION
    return ready


def session(
    export: ExportInfo = DISK, *, structured: bool = False, meta: bool = False
) -> NbdServerConnection:
    """A connection in transmission on ``export``."""
    name = export.name.encode()
    prelude = opt(STRUCTURED_REPLY) if structured or meta else b""
    if meta:
        prelude += opt(SET_META, meta_data(name, b"base:allocation"))
    conn = make(export)
    ready = negotiate(conn, prelude, info_data(name, INFO_BLOCK_SIZE))
    assert ready.structured_replies is (structured or meta)
    assert ready.meta_context is meta
    return conn


def phase(conn: NbdServerConnection) -> Phase:
    """The phase (a call, so mypy does not narrow it across feeds)."""
    return conn.phase


# Handshake ---------------------------------------------------------------------------------


def test_initial_data() -> None:
    # NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES.
    assert make().initial_data() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert phase(make()) is Phase.HANDSHAKE


def test_client_flags_then_options() -> None:
    conn = make()
    assert feed(conn, flags(1)) == []
    assert phase(conn) is Phase.OPTIONS


@pytest.mark.parametrize("value", [4, 1 << 31, 0xFFFFFFFF, 3 | 8])
def test_unknown_client_flags_are_a_protocol_error(value: int) -> None:
    # "the server MUST drop the TCP connection if the client sets an unknown flag"
    conn = make()
    conn.receive_data(flags(value))
    with pytest.raises(NbdProtocolError, match="unknown flags"):
        conn.next_event()
    assert phase(conn) is Phase.ERROR
    conn.receive_data(opt(LIST))  # ignored
    with pytest.raises(NbdProtocolError):
        conn.next_event()


def test_client_without_fixed_newstyle_is_still_answered() -> None:
    conn = make(DISK)
    assert feed(conn, flags(0)) == []
    (send,) = feed(conn, opt(LIST))
    assert isinstance(send, Send)
    assert [r[1] for r in replies(send.data)] == [SERVER, ACK]


# NBD_OPT_EXPORT_NAME -----------------------------------------------------------------------


@pytest.mark.parametrize(("client_flags", "zeroes"), [(1, 124), (3, 0), (0, 124), (2, 0)])
def test_export_name_reply_with_and_without_zeroes(client_flags: int, zeroes: int) -> None:
    conn = make()
    events = feed(conn, flags(client_flags) + opt(EXPORT_NAME, b"disk"))
    assert events == [
        Send(struct.pack(">QH", DISK.size, DISK_FLAGS) + bytes(zeroes)),
        Ready(DISK, DISK_FLAGS, False, False, False),
    ]
    assert phase(conn) is Phase.TRANSMISSION
    assert conn.export is DISK
    assert conn.transmission_flags == DISK_FLAGS


def test_export_name_default_export() -> None:
    conn = make(CDROM, DISK)
    (send, ready) = feed(conn, flags() + opt(EXPORT_NAME))
    assert send == Send(struct.pack(">QH", CDROM.size, HAS_FLAGS | READ_ONLY))
    assert isinstance(ready, Ready) and ready.export is CDROM


@pytest.mark.parametrize("name", [b"nope", b"dis\xff", b"di\0sk"])
def test_export_name_unknown_closes(name: bytes) -> None:
    # "If the chosen export does not exist ... the server MUST terminate the session."
    conn = make()
    (closed,) = feed(conn, flags() + opt(EXPORT_NAME, name) + opt(LIST))
    assert isinstance(closed, Closed) and closed.reason is CloseReason.REFUSED
    assert phase(conn) is Phase.CLOSED
    conn.receive_data(opt(LIST))  # ignored
    assert conn.next_event() == closed  # and it keeps saying so


def test_export_name_needing_block_size_closes_when_required() -> None:
    conn = make(require_block_size=True)
    (closed,) = feed(conn, flags() + opt(EXPORT_NAME, b"cd0"))
    assert isinstance(closed, Closed) and closed.reason is CloseReason.REFUSED
    assert "NBD_INFO_BLOCK_SIZE" in closed.detail
    # Default constraints need no agreement.
    conn = make(require_block_size=True)
    assert isinstance(feed(conn, flags() + opt(EXPORT_NAME, b"disk"))[-1], Ready)


# NBD_OPT_ABORT, NBD_OPT_LIST, unsupported options ------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort(data: bytes) -> None:
    # "The server MUST reply with NBD_REP_ACK"; "a server SHOULD ignore any data".
    conn = make()
    events = feed(conn, flags() + opt(ABORT, data) + opt(LIST))
    assert events == [Send(rep(ABORT, ACK)), Closed(CloseReason.ABORT)]
    assert phase(conn) is Phase.CLOSED


def test_list() -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(LIST))
    assert send == Send(
        rep(LIST, SERVER, b"\x00\x00\x00\x04disk" + b"A test disk")
        + rep(LIST, SERVER, b"\x00\x00\x00\x03cd0")
        + rep(LIST, SERVER, b"\x00\x00\x00\x05plain")
        + rep(LIST, ACK)
    )
    assert phase(conn) is Phase.OPTIONS


def test_list_with_data_is_invalid() -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(LIST, b"x"))
    refusal(send, LIST, ERR_INVALID)


@pytest.mark.parametrize("option", [PEEK, EXTENDED_HEADERS, 0, 12, 0xFFFFFFFF])
def test_unsupported_options(option: int) -> None:
    conn = make()
    events = feed(conn, flags() + opt(option, b"some data") + opt(LIST))
    assert len(events) == 2
    refusal(events[0], option, ERR_UNSUP)
    assert isinstance(events[1], Send) and replies(events[1].data)[-1] == (LIST, ACK, b"")


# TLS (FORCEDTLS as qemu-nbd, or none) -----------------------------------------------------


def test_starttls_without_tls_is_policy_and_negotiation_goes_on() -> None:
    conn = make()
    events = feed(conn, flags() + opt(STARTTLS) + opt(LIST))
    assert "TLS not configured" in refusal(events[0], STARTTLS, ERR_POLICY)
    assert replies(events[1].data)[-1] == (LIST, ACK, b"")  # type: ignore[union-attr]


@pytest.mark.parametrize("tls", [False, True])
def test_starttls_with_data_is_refused_and_ends_the_connection(tls: bool) -> None:
    conn = make(tls=tls)
    events = feed(conn, flags() + opt(STARTTLS, b"x"))
    refusal(events[0], STARTTLS, ERR_INVALID)
    assert isinstance(events[1], Closed) and phase(conn) is Phase.CLOSED


@pytest.mark.parametrize("option", [LIST, INFO, GO, STRUCTURED_REPLY, LIST_META, 12])
def test_forced_tls_refuses_options_before_starttls(option: int) -> None:
    conn = make(tls=True)
    data = info_data(b"disk") if option in (INFO, GO) else b""
    events = feed(conn, flags() + opt(option, data) + opt(LIST))
    assert "not permitted before TLS" in refusal(events[0], option, ERR_TLS_REQD)
    refusal(events[1], LIST, ERR_TLS_REQD)
    assert phase(conn) is Phase.OPTIONS


def test_forced_tls_export_name_before_starttls_closes() -> None:
    conn = make(tls=True)
    (event,) = feed(conn, flags() + opt(EXPORT_NAME, b"disk"))
    assert isinstance(event, Closed) and event.reason is CloseReason.REFUSED


def test_forced_tls_abort_before_starttls_is_refused_then_closes() -> None:
    conn = make(tls=True)
    events = feed(conn, flags() + opt(ABORT))
    refusal(events[0], ABORT, ERR_TLS_REQD)
    assert isinstance(events[1], Closed) and events[1].reason is CloseReason.ABORT


def test_starttls_then_negotiation_over_tls() -> None:
    conn = make(tls=True)
    events = feed(conn, flags() + opt(STARTTLS))
    assert events == [Send(rep(STARTTLS, ACK)), StartTls()]
    conn.tls_started()
    (send, ready) = feed(conn, opt(GO, info_data(b"disk")))
    assert replies(send.data)[-1] == (GO, ACK, b"")  # type: ignore[union-attr]
    assert isinstance(ready, Ready) and ready.export.name == "disk"
    # Once TLS is on, another STARTTLS is invalid.
    conn = make(tls=True)
    feed(conn, flags() + opt(STARTTLS))
    conn.tls_started()
    assert "already" in refusal(feed(conn, opt(STARTTLS))[0], STARTTLS, ERR_INVALID)


def test_data_behind_starttls_is_a_protocol_error() -> None:
    # The client must wait for the ACK: bytes behind STARTTLS would be plaintext.
    conn = make(tls=True)
    with pytest.raises(NbdProtocolError):
        feed(conn, flags() + opt(STARTTLS) + opt(LIST))


# NBD_OPT_INFO / NBD_OPT_GO ----------------------------------------------------------------


def test_info_minimal() -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(INFO, info_data(b"disk")))
    assert send == Send(
        info_export(INFO, DISK, DISK_FLAGS)
        + info_block_size(INFO, 1, 4096, 32 << 20)  # always sent
        + rep(INFO, ACK)
    )
    assert phase(conn) is Phase.OPTIONS  # INFO does not end negotiation


def test_info_with_every_request() -> None:
    conn = make()
    data = info_data(b"disk", INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77)
    (send,) = feed(conn, flags() + opt(INFO, data))
    assert send == Send(
        info_export(INFO, DISK, DISK_FLAGS)
        + rep(INFO, REP_INFO, b"\x00\x01disk")
        + rep(INFO, REP_INFO, b"\x00\x02A test disk")
        + info_block_size(INFO, 1, 4096, 32 << 20)
        + rep(INFO, ACK)
    )


def test_info_default_export_names_itself() -> None:
    conn = make(CDROM, DISK)
    (send,) = feed(conn, flags() + opt(INFO, info_data(b"", INFO_NAME, INFO_DESCRIPTION)))
    assert send == Send(
        info_export(INFO, CDROM, HAS_FLAGS | READ_ONLY)
        + rep(INFO, REP_INFO, b"\x00\x01cd0")  # no description: it is empty
        + info_block_size(INFO, 2048, 2048, 64 << 10)
        + rep(INFO, ACK)
    )


@pytest.mark.parametrize("option", [INFO, GO])
def test_info_go_unknown_export(option: int) -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(option, info_data(b"nope", INFO_NAME)))
    assert "nope" in refusal(send, option, ERR_UNKNOWN)  # and no NBD_REP_INFO
    assert phase(conn) is Phase.OPTIONS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x05disk\x00\x00",  # name length > data length - 6
        info_data(b"disk", 1) + b"\x00",
        info_data(b"disk") + b"\x00\x01",
        info_data(b"\xff\xfe"),
    ],
)
@pytest.mark.parametrize("option", [INFO, GO])
def test_info_go_malformed(option: int, data: bytes) -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(option, data))
    refusal(send, option, ERR_INVALID)
    assert phase(conn) is Phase.OPTIONS


def test_go() -> None:
    conn = make()
    events = feed(conn, flags() + opt(GO, info_data(b"disk", INFO_BLOCK_SIZE)))
    assert events == [
        Send(
            info_export(GO, DISK, DISK_FLAGS)
            + info_block_size(GO, 1, 4096, 32 << 20)
            + rep(GO, ACK)
        ),
        Ready(DISK, DISK_FLAGS, False, False, True),
    ]
    assert phase(conn) is Phase.TRANSMISSION


def test_go_without_block_size_request() -> None:
    conn = make()
    ready = negotiate(conn, go=info_data(b"cd0"))
    assert ready == Ready(CDROM, HAS_FLAGS | READ_ONLY, False, False, False)
    assert ready.export.handle is CDROM.handle


def test_go_requiring_block_size() -> None:
    conn = make(require_block_size=True)
    (send,) = feed(conn, flags() + opt(GO, info_data(b"cd0", INFO_NAME)))
    # "SHOULD ensure it first sends an NBD_INFO_BLOCK_SIZE information reply"
    assert isinstance(send, Send)
    assert send.data.startswith(info_block_size(GO, 2048, 2048, 64 << 10))
    refusal(Send(send.data[34:]), GO, ERR_BLOCK_SIZE_REQD)
    assert phase(conn) is Phase.OPTIONS
    # INFO is not refused; GO with the request is accepted.
    (send,) = feed(conn, opt(INFO, info_data(b"cd0")))
    assert isinstance(send, Send) and replies(send.data)[-1] == (INFO, ACK, b"")
    events = feed(conn, opt(GO, info_data(b"cd0", INFO_BLOCK_SIZE)))
    assert events[-1] == Ready(CDROM, HAS_FLAGS | READ_ONLY, False, False, True)


# NBD_OPT_STRUCTURED_REPLY ------------------------------------------------------------------


def test_structured_reply() -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(STRUCTURED_REPLY))
    assert send == Send(rep(STRUCTURED_REPLY, ACK))
    assert conn.structured_replies
    ready = negotiate(conn, go=info_data(b"disk"))
    assert ready.structured_replies


def test_structured_reply_with_data_is_invalid() -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(STRUCTURED_REPLY, b"\x00"))
    refusal(send, STRUCTURED_REPLY, ERR_INVALID)
    assert not conn.structured_replies


# Metadata contexts -------------------------------------------------------------------------

ALLOCATION_LISTED = rep(LIST_META, META_CONTEXT, b"\x00\x00\x00\x00base:allocation")


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), True),  # no query: everything available
        ((b"base:",), True),  # the base: wildcard
        ((b"base:allocation",), True),
        ((b"qemu:dirty-bitmap:x", b"base:"), True),
        ((b"base:other",), False),  # unknown leaf: ignored
        ((b"qemu:allocation-depth",), False),  # unknown namespace: ignored
        ((b"nocolon",), False),
    ],
)
@pytest.mark.parametrize("structured", [False, True])
def test_list_meta_context(queries: tuple[bytes, ...], listed: bool, structured: bool) -> None:
    conn = make()
    prelude = opt(STRUCTURED_REPLY) if structured else b""
    events = feed(conn, flags() + prelude + opt(LIST_META, meta_data(b"disk", *queries)))
    assert events[-1] == Send((ALLOCATION_LISTED if listed else b"") + rep(LIST_META, ACK))


def test_list_meta_context_without_allocation() -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(LIST_META, meta_data(b"cd0")))
    assert send == Send(rep(LIST_META, ACK))


@pytest.mark.parametrize("option", [LIST_META, SET_META])
def test_meta_context_unknown_export(option: int) -> None:
    conn = make()
    events = feed(conn, flags() + opt(STRUCTURED_REPLY) + opt(option, meta_data(b"x", b"base:")))
    refusal(events[-1], option, ERR_UNKNOWN)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        meta_data(b"disk", b"base:allocation")[:-1],
        meta_data(b"disk", b"base:allocation") + b"\x00",
        b"\x00\x00\x00\x04disk\x00\x00\x00\x02\x00\x00\x00\x05base:",  # 2 queries counted
    ],
)
@pytest.mark.parametrize("option", [LIST_META, SET_META])
def test_meta_context_malformed(option: int, data: bytes) -> None:
    # "If the option request is syntactically invalid ..., the server MUST fail the request
    # with NBD_REP_ERR_INVALID."
    conn = make()
    events = feed(conn, flags() + opt(STRUCTURED_REPLY) + opt(option, data))
    refusal(events[-1], option, ERR_INVALID)


def test_set_meta_context_needs_structured_replies() -> None:
    conn = make()
    (send,) = feed(conn, flags() + opt(SET_META, meta_data(b"disk", b"base:allocation")))
    refusal(send, SET_META, ERR_INVALID)


def test_set_meta_context_selects_base_allocation() -> None:
    conn = make()
    data = meta_data(b"disk", b"x-foo:bar", b"base:allocation", b"base:allocation")
    events = feed(conn, flags() + opt(STRUCTURED_REPLY) + opt(SET_META, data))
    id_ = struct.pack(">I", BASE_ALLOCATION_ID)
    assert events[-1] == Send(
        rep(SET_META, META_CONTEXT, id_ + b"base:allocation") + rep(SET_META, ACK)
    )
    ready = negotiate(conn, go=info_data(b"disk"))
    assert ready.meta_context
    assert conn.meta_context_id == BASE_ALLOCATION_ID


@pytest.mark.parametrize(
    "second",
    [
        meta_data(b"disk"),  # no query selects nothing
        meta_data(b"disk", b"base:"),  # "MUST ignore this form during SET"
        meta_data(b"nope", b"base:allocation"),  # a failed SET also replaces the selection
        b"\x00",  # so does a malformed one
    ],
)
def test_set_meta_context_replaces_the_selection(second: bytes) -> None:
    conn = make()
    first = opt(SET_META, meta_data(b"disk", b"base:allocation"))
    prelude = opt(STRUCTURED_REPLY) + first + opt(SET_META, second)
    last = feed(conn, flags() + prelude)[-1]
    assert isinstance(last, Send)
    assert replies(last.data)[0][1] != META_CONTEXT
    ready = negotiate(conn, go=info_data(b"disk"))
    assert not ready.meta_context
    assert conn.meta_context_id is None


def test_set_meta_context_on_export_without_allocation() -> None:
    conn = make()
    prelude = opt(STRUCTURED_REPLY) + opt(SET_META, meta_data(b"plain", b"base:allocation"))
    events = feed(conn, flags() + prelude)
    assert events[-1] == Send(rep(SET_META, ACK))
    assert not negotiate(conn, go=info_data(b"plain")).meta_context


def test_meta_context_only_for_the_same_export_name() -> None:
    # SET for "disk", GO for "" (which is also disk): the names differ, so no context.
    conn = make()
    prelude = opt(STRUCTURED_REPLY) + opt(SET_META, meta_data(b"disk", b"base:allocation"))
    ready = negotiate(conn, prelude, info_data(b""))
    assert ready.export is DISK and not ready.meta_context
    (rejected,) = feed(conn, req(BLOCK_STATUS, 3, 0, 4096))
    assert isinstance(rejected, Rejected)
    assert (rejected.cookie, rejected.error, rejected.command) == (3, EINVAL, BLOCK_STATUS)


# Option length limits and magic ------------------------------------------------------------


def test_oversized_option_is_skipped_in_bounded_memory() -> None:
    conn = make()
    length = (64 << 10) + 1
    events = feed(conn, flags() + struct.pack(">QII", IHAVEOPT, INFO, length))
    assert len(events) == 1
    refusal(events[0], INFO, ERR_TOO_BIG)
    for _ in range(length // 4096):
        assert feed(conn, bytes(4096)) == []
        assert conn.buffered <= 4096
    # The rest of the skipped data and the next option in one read.
    (send,) = feed(conn, bytes(length % 4096) + opt(LIST))
    assert isinstance(send, Send) and replies(send.data)[-1] == (LIST, ACK, b"")


def test_option_at_the_limit_is_read() -> None:
    conn = make(max_option_length=8192)
    data = info_data(b"disk") + bytes(8192 - 10)
    (send,) = feed(conn, flags() + opt(INFO, data))
    refusal(send, INFO, ERR_INVALID)  # parsed, not refused for its size
    (send,) = feed(conn, opt(INFO, data + b"\x00"))
    refusal(send, INFO, ERR_TOO_BIG)


def test_oversized_export_name_closes() -> None:
    conn = make()
    events = feed(conn, flags() + struct.pack(">QII", IHAVEOPT, EXPORT_NAME, 1 << 20))
    assert len(events) == 1
    assert isinstance(events[0], Closed) and events[0].reason is CloseReason.REFUSED


def test_max_option_length_must_fit_a_name() -> None:
    with pytest.raises(ValueError):
        make(max_option_length=100)


@pytest.mark.parametrize("magic", [0, IHAVEOPT + 1, 0x4E42444D41474943])
def test_bad_option_magic_is_a_protocol_error(magic: int) -> None:
    conn = make()
    conn.receive_data(flags() + struct.pack(">QII", magic, LIST, 0))
    with pytest.raises(NbdProtocolError, match="option magic"):
        conn.next_event()
    assert phase(conn) is Phase.ERROR


# Transmission flags and exports ------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, DISK_FLAGS),
        ({"read_only": True}, HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN),
        ({"can_flush": False}, DISK_FLAGS & ~SEND_FLUSH),
        ({"can_fua": False}, DISK_FLAGS & ~SEND_FUA),
        ({"can_trim": False}, DISK_FLAGS & ~SEND_TRIM),
        ({"can_write_zeroes": False}, DISK_FLAGS & ~SEND_WRITE_ZEROES & ~SEND_FAST_ZERO),
        ({"can_fast_zero": False}, DISK_FLAGS & ~SEND_FAST_ZERO),
        ({"can_multi_conn": False}, DISK_FLAGS & ~CAN_MULTI_CONN),
    ],
)
def test_transmission_flags_tell_the_truth(changes: dict[str, bool], expected: int) -> None:
    assert transmission_flags(replace(DISK, **changes)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"min_block": 3},
        {"min_block": 1 << 17, "preferred_block": 1 << 17},
        {"preferred_block": 256},
        {"min_block": 8192},  # preferred below minimum
        {"preferred_block": 3000},
        {"max_block": 2048},  # below preferred
        {"max_block": 1 << 32},
        {"size": -1},
        {"size": 1 << 64},
        {"name": "a\0b"},
        {"description": "x" * 4097},
    ],
)
def test_export_info_refuses_what_the_spec_forbids(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        replace(DISK, **changes)  # type: ignore[arg-type]


def test_events_are_frozen() -> None:
    read = Read(1, 2, 3, 4)
    with pytest.raises(FrozenInstanceError):
        read.cookie = 5  # type: ignore[misc]
    write = Write(1, 2, memoryview(b"x"), FUA)
    with pytest.raises(FrozenInstanceError):
        write.offset = 5  # type: ignore[misc]
    assert write.fua and read == Read(1, 2, 3, 4) and read != Read(1, 2, 3, 5)
    with pytest.raises(FrozenInstanceError):
        DISK.size = 0  # type: ignore[misc]


# Requests ----------------------------------------------------------------------------------


def test_valid_requests() -> None:
    conn = session(meta=True)
    data = (
        req(READ, 1, 4096, 512)
        + req(READ, 2, 0, 1 << 20, FUA)  # FUA is "valid for all commands" once advertised
        + req(WRITE, 3, 512, 5, FUA, b"hello")
        + req(FLUSH, 4)
        + req(TRIM, 5, 0, 8192, FUA)
        + req(WRITE_ZEROES, 6, 8192, 4096, NO_HOLE | FAST_ZERO | FUA)
        + req(BLOCK_STATUS, 7, 0, 1 << 20, REQ_ONE)
        + req(BLOCK_STATUS, 0xFFFFFFFFFFFFFFFF, (1 << 20) - 1, 1)
        + req(DISC)
    )
    events = feed(conn, data)
    assert events == [
        Read(1, 4096, 512, 0),
        Read(2, 0, 1 << 20, FUA),
        Write(3, 512, memoryview(b"hello"), FUA),
        Flush(4),
        Trim(5, 0, 8192, FUA),
        WriteZeroes(6, 8192, 4096, NO_HOLE | FAST_ZERO | FUA),
        BlockStatus(7, 0, 1 << 20, REQ_ONE),
        BlockStatus(0xFFFFFFFFFFFFFFFF, (1 << 20) - 1, 1, 0),
        Disconnect(),
        Closed(CloseReason.DISCONNECT),
    ]
    write = events[2]
    assert isinstance(write, Write) and write.fua
    zeroes = events[5]
    assert isinstance(zeroes, WriteZeroes) and zeroes.no_hole and zeroes.fast_zero and zeroes.fua
    trim = events[4]
    assert isinstance(trim, Trim) and trim.fua
    status = events[6]
    assert isinstance(status, BlockStatus) and status.req_one


def test_next_io_takes_valid_reads_and_whole_writes_as_tuples() -> None:
    conn = session()
    conn.receive_data(req(READ, 1, 4096, 512) + req(WRITE, 2, 512, 5, FUA, b"hello")
                      + req(FLUSH, 3) + req(WRITE, 4, 0, 4, 0, b"ab"))
    assert conn.next_io() == (1, 4096, 512, 0, None)
    write = conn.next_io()
    assert write is not None and write[:4] == (2, 512, 5, FUA)
    assert write[4] is not None and write[4].readonly and write[4] == b"hello"
    assert conn.next_io() is None  # a FLUSH is an event
    assert conn.next_event() == Flush(3)
    assert conn.next_io() is None  # the payload is not all here yet
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"cd")
    assert conn.next_io() is None  # it straddles two chunks: next_event joins them
    assert conn.next_event() == Write(4, 0, memoryview(b"abcd"), 0)
    assert conn.next_io() is None and conn.next_event() is NEED_DATA  # nothing buffered
    # A request to refuse is left for next_event, which answers it.
    conn.receive_data(req(READ, 5, 1 << 40, 512) + req(READ, 6, 0, 512))
    assert conn.next_io() is None
    rejected = conn.next_event()
    assert isinstance(rejected, Rejected) and rejected.cookie == 5
    assert conn.next_io() == (6, 0, 512, 0, None)
    # Nothing is taken outside transmission.
    conn.receive_data(req(DISC) + req(READ, 7, 0, 512))
    assert conn.next_io() is None and conn.next_event() == Disconnect()
    assert conn.next_io() is None


def test_write_payload_is_a_view_of_the_input() -> None:
    conn = session()
    data = req(WRITE, 9, 0, 4096, 0, bytes(range(256)) * 16) + req(READ, 10, 0, 512)
    (write, read) = feed(conn, data)
    assert isinstance(write, Write)
    assert write.data.obj is data  # zero copy
    assert write.data.readonly
    assert bytes(write.data) == bytes(range(256)) * 16
    assert read == Read(10, 0, 512, 0)
    assert not write.fua


def test_write_payload_across_reads() -> None:
    conn = session()
    payload = bytes(range(256)) * 64
    data = req(WRITE, 9, 4096, len(payload), 0, payload)
    events = run(conn, [data[i : i + 1000] for i in range(0, len(data), 1000)])
    assert events == [Write(9, 4096, memoryview(payload), 0)]


def test_disconnect_ignores_what_follows() -> None:
    conn = session()
    events = feed(conn, req(DISC, 5, 1, 2) + b"garbage after disc")
    assert events == [Disconnect(), Closed(CloseReason.DISCONNECT)]
    conn.receive_data(req(READ, 1, 0, 512))
    assert conn.next_event() == Closed(CloseReason.DISCONNECT)


# Rejected rules: (export, structured, meta, request) -> error.
REJECTIONS = [
    # Unknown and unadvertised commands.
    ("unknown command", DISK, False, False, req(9, length=512), EINVAL),
    ("unknown command 0xffff", DISK, False, False, req(0xFFFF, length=512), EINVAL),
    ("cache not advertised", DISK, False, False, req(CACHE, length=512), EINVAL),
    ("flush not advertised", PLAIN, False, False, req(FLUSH), EINVAL),
    ("trim not advertised", PLAIN, False, False, req(TRIM, length=512), EINVAL),
    ("write zeroes not advertised", PLAIN, False, False, req(WRITE_ZEROES, length=512), EINVAL),
    ("block status without context", DISK, True, False, req(BLOCK_STATUS, length=512), EINVAL),
    # Read-only export.
    ("write read-only", CDROM, False, False, req(WRITE, 1, 0, 2048, 0, bytes(2048)), EPERM),
    ("trim read-only", CDROM, False, False, req(TRIM, length=2048), EPERM),
    ("zeroes read-only", CDROM, False, False, req(WRITE_ZEROES, length=2048), EPERM),
    # Flags.
    ("fua not advertised", PLAIN, False, False, req(WRITE, 1, 0, 1, FUA, b"x"), EINVAL),
    ("fua not advertised, read", CDROM, False, False, req(READ, 1, 0, 2048, FUA), EINVAL),
    ("df never advertised", DISK, True, False, req(READ, 1, 0, 512, DF), EINVAL),
    ("no_hole on write", DISK, False, False, req(WRITE, 1, 0, 1, NO_HOLE, b"x"), EINVAL),
    ("req_one on read", DISK, False, False, req(READ, 1, 0, 512, REQ_ONE), EINVAL),
    ("unknown flag", DISK, False, False, req(READ, 1, 0, 512, 1 << 15), EINVAL),
    ("fast_zero unadvertised", replace(DISK, can_fast_zero=False), False, False,
     req(WRITE_ZEROES, 1, 0, 512, FAST_ZERO), EINVAL),
    ("flags on flush", DISK, False, False, req(FLUSH, cmd_flags=NO_HOLE), EINVAL),
    ("flush with offset", DISK, False, False, req(FLUSH, 1, 512), EINVAL),
    ("flush with length", DISK, False, False, req(FLUSH, 1, 0, 512), EINVAL),
    # Zero length.
    ("zero read", DISK, False, False, req(READ, 1, 0, 0), EINVAL),
    ("zero write", DISK, False, False, req(WRITE, 1, 0, 0), EINVAL),
    ("zero trim", DISK, False, False, req(TRIM, 1, 0, 0), EINVAL),
    ("zero zeroes", DISK, False, False, req(WRITE_ZEROES, 1, 0, 0), EINVAL),
    ("zero block status", DISK, True, True, req(BLOCK_STATUS, 1, 0, 0), EINVAL),
    # Beyond the end.
    ("read past end", DISK, False, False, req(READ, 1, (1 << 20) - 511, 512), EINVAL),
    ("read at end", DISK, False, False, req(READ, 1, 1 << 20, 1), EINVAL),
    ("read far past end", DISK, False, False, req(READ, 1, (1 << 64) - 1, 1), EINVAL),
    ("write past end", DISK, False, False, req(WRITE, 1, 1 << 20, 1, 0, b"x"), ENOSPC),
    ("trim past end", DISK, False, False, req(TRIM, 1, 4096, 1 << 20), EINVAL),
    ("zeroes past end", DISK, False, False, req(WRITE_ZEROES, 1, 1 << 20, 512), ENOSPC),
    ("status past end", DISK, True, True, req(BLOCK_STATUS, 1, 1 << 20, 512), EINVAL),
    # Alignment to the minimum block.
    ("read unaligned offset", CDROM, False, False, req(READ, 1, 512, 2048), EINVAL),
    ("read unaligned length", CDROM, False, False, req(READ, 1, 0, 512), EINVAL),
    # Over the maximum payload.
    ("read over max, simple", PLAIN, False, False, req(READ, 1, 0, (64 << 10) + 1), EINVAL),
    ("read over max, structured", PLAIN, True, False, req(READ, 1, 0, 128 << 10), EOVERFLOW),
    ("write over max", PLAIN, False, False,
     req(WRITE, 1, 0, (64 << 10) + 1, 0, bytes((64 << 10) + 1)), EINVAL),
]  # fmt: skip


@pytest.mark.parametrize(
    ("export", "structured", "meta", "message", "error"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_rejected(
    export: ExportInfo, structured: bool, meta: bool, message: bytes, error: int
) -> None:
    conn = session(export, structured=structured, meta=meta)
    command = struct.unpack_from(">H", message, 6)[0]
    # The request is answered by the protocol layer and parsing goes on after it (after the
    # payload, for a write).
    events = feed(conn, message + req(READ, 99, 0, export.min_block))
    assert len(events) == 2, events
    rejected = events[0]
    assert isinstance(rejected, Rejected)
    assert (rejected.cookie, rejected.error, rejected.command) == (1, error, command)
    assert rejected.reason
    assert events[1] == Read(99, 0, export.min_block, 0)


def test_trim_and_zeroes_have_no_length_limit() -> None:
    # "the client MAY request an effect length larger than the maximum payload size; the
    # server SHOULD NOT disconnect"
    conn = session(replace(DISK, max_block=64 << 10))
    events = feed(conn, req(TRIM, 1, 0, 1 << 20) + req(WRITE_ZEROES, 2, 0, 1 << 20))
    assert events == [Trim(1, 0, 1 << 20, 0), WriteZeroes(2, 0, 1 << 20, 0)]


def test_refused_write_payload_is_skipped_in_bounded_memory() -> None:
    conn = session(PLAIN)  # maximum payload 64 KiB
    length = 1 << 20  # over the maximum, within the 2^25 the spec says is no attack
    (rejected,) = feed(conn, req(WRITE, 7, 0, length))
    assert isinstance(rejected, Rejected) and rejected.error == EINVAL
    for _ in range(length // 4096 - 1):
        assert feed(conn, bytes(4096)) == []
        assert conn.buffered == 0
    assert feed(conn, bytes(4096) + req(FLUSH, 8)) == [
        Rejected(8, ErrorCode.EINVAL, FLUSH, "NBD_CMD_FLUSH: not supported by the export")
    ]


def test_write_too_big_to_skip_is_a_protocol_error() -> None:
    conn = session(PLAIN)
    conn.receive_data(req(WRITE, 7, 0, (1 << 25) + 1))
    with pytest.raises(NbdProtocolError):
        conn.next_event()
    assert phase(conn) is Phase.ERROR


def test_write_too_big_for_a_read_only_export_is_a_protocol_error() -> None:
    conn = session(CDROM)
    conn.receive_data(req(WRITE, 7, 0, 0xFFFFFFFF))
    with pytest.raises(NbdProtocolError):
        conn.next_event()


@pytest.mark.parametrize("magic", [0, REQUEST + 1, 0x12560953, 0x21E41C71])
def test_bad_request_magic_is_a_protocol_error(magic: int) -> None:
    conn = session()
    conn.receive_data(struct.pack(">IHHQQI", magic, 0, READ, 1, 0, 512))
    with pytest.raises(NbdProtocolError, match="request magic"):
        conn.next_event()
    assert phase(conn) is Phase.ERROR
    conn.receive_data(req(READ, 1, 0, 512))  # ignored
    with pytest.raises(NbdProtocolError):
        conn.next_event()


# EOF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", CloseReason.EOF),
        (flags()[:2], CloseReason.TRUNCATED),
        (flags(), CloseReason.EOF),
        (flags() + opt(LIST)[:10], CloseReason.TRUNCATED),
        (flags() + opt(INFO, info_data(b"disk"))[:-1], CloseReason.TRUNCATED),
        (flags() + struct.pack(">QII", IHAVEOPT, INFO, 1 << 20) + bytes(10), CloseReason.TRUNCATED),
    ],
)
def test_eof_during_negotiation(data: bytes, reason: CloseReason) -> None:
    conn = make()
    events = feed(conn, data, eof=True)
    assert isinstance(events[-1], Closed) and events[-1].reason is reason
    assert all(isinstance(e, Send) for e in events[:-1])
    assert phase(conn) is Phase.CLOSED


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", CloseReason.EOF),
        (req(READ, 1, 0, 512), CloseReason.EOF),
        (req(READ, 1, 0, 512)[:27], CloseReason.TRUNCATED),
        (req(WRITE, 1, 0, 512, 0, bytes(511)), CloseReason.TRUNCATED),
        (req(WRITE, 1, 0, 1 << 20, 0, bytes(4096)), CloseReason.TRUNCATED),  # refused, skipping
    ],
)
def test_eof_during_transmission(data: bytes, reason: CloseReason) -> None:
    conn = session(PLAIN)
    events = feed(conn, data, eof=True)
    assert events[-1] == Closed(reason, events[-1].detail)  # type: ignore[union-attr]
    assert phase(conn) is Phase.CLOSED
    assert conn.next_event() is events[-1]


def test_data_after_eof_is_a_caller_bug() -> None:
    conn = make()
    conn.receive_data(b"")
    conn.receive_data(b"")
    with pytest.raises(RuntimeError):
        conn.receive_data(b"x")


# Splitting ---------------------------------------------------------------------------------

TRANSCRIPT = (
    flags()
    + opt(STRUCTURED_REPLY)
    + opt(LIST)
    + opt(LIST_META, meta_data(b"disk"))
    + opt(SET_META, meta_data(b"disk", b"base:allocation"))
    + opt(INFO, info_data(b"nope"))
    + opt(99, b"xyz")
    + opt(GO, info_data(b"disk", INFO_NAME, INFO_BLOCK_SIZE))
    + req(READ, 1, 0, 4096)
    + req(WRITE, 2, 4096, 11, FUA, b"hello world")
    + req(WRITE, 3, 1 << 20, 5, 0, b"past!")  # refused, payload skipped
    + req(BLOCK_STATUS, 4, 0, 1 << 20, REQ_ONE)
    + req(WRITE_ZEROES, 5, 0, 4096, NO_HOLE)
    + req(READ, 6, 0, 0)
    + req(FLUSH, 7)
    + req(DISC)
)


def expected_transcript() -> list[Event]:
    conn = make()
    return feed(conn, TRANSCRIPT)


def test_transcript_events() -> None:
    events = expected_transcript()
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Send"] * 7 + ["Ready", "Read", "Write", "Rejected", "BlockStatus"] + [
        "WriteZeroes",
        "Rejected",
        "Flush",
        "Disconnect",
        "Closed",
    ]
    assert events[7] == Ready(DISK, DISK_FLAGS, True, True, True)
    assert events[9] == Write(2, 4096, memoryview(b"hello world"), FUA)
    rejected = events[10]
    assert isinstance(rejected, Rejected)
    assert (rejected.cookie, rejected.error, rejected.command) == (3, ENOSPC, WRITE)


def test_transcript_split_every_way() -> None:
    expected = expected_transcript()
    for chunks in splits(TRANSCRIPT):
        assert run(make(), chunks) == expected, [len(c) for c in chunks]


def test_transcript_split_with_eof() -> None:
    expected = expected_transcript()
    for chunks in splits(TRANSCRIPT)[:50]:
        assert run(make(), chunks, eof=True) == expected


def test_handshake_split_every_way() -> None:
    data = flags(3) + opt(EXPORT_NAME, b"disk") + req(READ, 1, 0, 512)
    expected = [
        Send(struct.pack(">QH", DISK.size, DISK_FLAGS)),
        Ready(DISK, DISK_FLAGS, False, False, False),
        Read(1, 0, 512, 0),
    ]
    for chunks in splits(data):
        assert run(make(), chunks) == expected


# Replies -----------------------------------------------------------------------------------


def test_simple_replies() -> None:
    conn = session()
    assert conn.reply_ok(0x1122334455667788) == (struct.pack(">IIQ", SIMPLE, 0, 0x1122334455667788))
    assert conn.reply_error(5, EINVAL, "ignored without structured replies") == struct.pack(
        ">IIQ", SIMPLE, EINVAL, 5
    )
    # The data follows the 16-byte simple reply.
    assert conn.reply_read_header(6, 4096, 512) == struct.pack(">IIQ", SIMPLE, 0, 6)
    with pytest.raises(RuntimeError):
        conn.reply_read_hole(6, 0, 512)
    with pytest.raises(RuntimeError):
        conn.reply_block_status(6, [(512, 0)])
    with pytest.raises(ValueError):
        conn.reply_error(6, 0)


def test_structured_replies() -> None:
    conn = session(structured=True)
    # Success without data may stay simple.
    assert conn.reply_ok(1) == struct.pack(">IIQ", SIMPLE, 0, 1)
    # One NBD_REPLY_TYPE_OFFSET_DATA chunk with DONE; length covers the offset and the data.
    assert conn.reply_read_header(2, 4096, 512) == struct.pack(
        ">IHHQIQ", STRUCTURED, 1, 1, 2, 8 + 512, 4096
    )
    assert conn.reply_read_hole(3, 8192, 4096) == struct.pack(
        ">IHHQIQI", STRUCTURED, 1, 2, 3, 12, 8192, 4096
    )
    assert conn.reply_error(4, EPERM) == struct.pack(
        ">IHHQIIH", STRUCTURED, 1, 0x8001, 4, 6, EPERM, 0
    )
    assert conn.reply_error(4, ENOSPC, "disk full") == (
        struct.pack(">IHHQIIH", STRUCTURED, 1, 0x8001, 4, 6 + 9, ENOSPC, 9) + b"disk full"
    )
    # Messages are strings: at most 4096 bytes, cut on a character boundary.
    long = conn.reply_error(4, ENOSPC, "\u00e9" * 3000)
    assert struct.unpack_from(">H", long, 24)[0] == 4096
    assert long[26:].decode() == "\u00e9" * 2048
    with pytest.raises(RuntimeError):
        conn.reply_block_status(5, [(512, 0)])


def test_block_status_reply() -> None:
    conn = session(meta=True)
    assert conn.reply_block_status(7, [(4096, 0), (1 << 19, 3), (512, 1)]) == struct.pack(
        ">IHHQII" + "II" * 3,
        STRUCTURED,
        1,  # DONE
        5,  # NBD_REPLY_TYPE_BLOCK_STATUS
        7,
        4 + 8 * 3,
        BASE_ALLOCATION_ID,
        4096,
        0,
        1 << 19,
        3,
        512,
        1,
    )
    with pytest.raises(ValueError):
        conn.reply_block_status(7, [])
    with pytest.raises(ValueError):
        conn.reply_block_status(7, [(0, 0)])


def test_list_skips_names_that_are_not_nbd_strings() -> None:
    class Odd(Catalog):
        def names(self) -> Sequence[tuple[str, str]]:
            return [("a\0b", ""), ("disk", "x" * 5000), *super().names()]

    conn = NbdServerConnection(Odd(DISK))
    (send,) = feed(conn, flags() + opt(LIST))
    assert send == Send(rep(LIST, SERVER, b"\x00\x00\x00\x04diskA test disk") + rep(LIST, ACK))
