"""NBD wire layouts: precompiled ``struct`` formats, message builders, option parsers, and the
receive buffer the protocol state machine reads from.

Everything here is pure: builders return ``bytes``, parsers take ``bytes`` and raise
:class:`ValueError` for input that does not fit the layout. All integers are big-endian
("network byte order"), as the specification requires. The transmission reply builders are
on the hot path: each is one call of a bound ``Struct.pack`` with plain ``int`` magics.

:class:`ReceiveBuffer` keeps received data in the chunks it arrived in and hands out
contiguous views without copying whenever a message lies inside one chunk; only a message
that straddles chunks is joined, and only its own bytes are copied. Chunks are immutable
``bytes``, so a ``memoryview`` handed out (a WRITE payload) stays valid however the buffer
moves on, at the price of keeping its chunk alive as long as the view lives.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Final

from blockd.nbd.constants import (
    MAX_STRING,
    HandshakeFlag,
    Info,
    Magic,
    OptionReply,
    ReplyFlag,
    ReplyType,
)

__all__ = [
    "BLOCK_STATUS_HEADER",
    "CHUNK_HEADER",
    "CLIENT_FLAGS",
    "ERROR_CHUNK",
    "EXPORT_NAME_PADDING",
    "EXPORT_NAME_REPLY",
    "EXTENT",
    "GREETING",
    "INFO_BLOCK_SIZE",
    "INFO_EXPORT",
    "OFFSET_DATA_HEADER",
    "OFFSET_HOLE_CHUNK",
    "OPTION_HEADER",
    "OPTION_REPLY_HEADER",
    "REQUEST",
    "SIMPLE_REPLY",
    "ReceiveBuffer",
    "block_status_chunk",
    "decode_string",
    "encode_string",
    "error_chunk",
    "export_name_reply",
    "final_data_header",
    "greeting",
    "offset_data_header",
    "offset_hole_chunk",
    "option_reply",
    "parse_info_request",
    "parse_meta_context_request",
    "rep_info_block_size",
    "rep_info_export",
    "rep_info_string",
    "rep_meta_context",
    "rep_server",
    "simple_ok",
    "simple_reply",
]

# Handshake ---------------------------------------------------------------------------------
#: S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
GREETING: Final = struct.Struct(">QQH")
#: C: 32-bit client flags.
CLIENT_FLAGS: Final = struct.Struct(">I")
#: C: IHAVEOPT, 32-bit option, 32-bit length of option data.
OPTION_HEADER: Final = struct.Struct(">QII")
#: S: reply magic, 32-bit option, 32-bit reply type, 32-bit length of reply data.
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
#: S: after NBD_OPT_EXPORT_NAME: 64-bit export size, 16-bit transmission flags (then zeroes).
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
#: The reserved zeroes after EXPORT_NAME_REPLY unless the client set NBD_FLAG_C_NO_ZEROES.
EXPORT_NAME_PADDING: Final = 124
#: NBD_REP_INFO payloads: type + size + transmission flags; type + min, preferred, max block.
INFO_EXPORT: Final = struct.Struct(">HQH")
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")

# Transmission ------------------------------------------------------------------------------
#: C: magic, 16-bit command flags, 16-bit type, 64-bit cookie, 64-bit offset, 32-bit length.
REQUEST: Final = struct.Struct(">IHHQQI")
#: S: magic, 32-bit error, 64-bit cookie.
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
#: S: magic, 16-bit flags, 16-bit type, 64-bit cookie, 32-bit payload length.
CHUNK_HEADER: Final = struct.Struct(">IHHQI")
#: CHUNK_HEADER + the 64-bit offset of NBD_REPLY_TYPE_OFFSET_DATA (the data follows).
OFFSET_DATA_HEADER: Final = struct.Struct(">IHHQIQ")
#: CHUNK_HEADER + 64-bit offset + 32-bit hole size (NBD_REPLY_TYPE_OFFSET_HOLE).
OFFSET_HOLE_CHUNK: Final = struct.Struct(">IHHQIQI")
#: CHUNK_HEADER + 32-bit error + 16-bit message length (NBD_REPLY_TYPE_ERROR; message follows).
ERROR_CHUNK: Final = struct.Struct(">IHHQIIH")
#: CHUNK_HEADER + 32-bit metadata context id (NBD_REPLY_TYPE_BLOCK_STATUS; extents follow).
BLOCK_STATUS_HEADER: Final = struct.Struct(">IHHQII")
#: One block status descriptor: 32-bit extent length, 32-bit status flags.
EXTENT: Final = struct.Struct(">II")

# Plain ints and bound methods for the hot path (enum attribute lookups are slow).
_SIMPLE_MAGIC: Final = int(Magic.SIMPLE_REPLY)
_STRUCTURED_MAGIC: Final = int(Magic.STRUCTURED_REPLY)
_OPTION_REPLY_MAGIC: Final = int(Magic.OPTION_REPLY)
_DONE: Final = int(ReplyFlag.DONE)
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)
_OFFSET_HOLE: Final = int(ReplyType.OFFSET_HOLE)
_ERROR: Final = int(ReplyType.ERROR)
_BLOCK_STATUS: Final = int(ReplyType.BLOCK_STATUS)
_pack_simple: Final = SIMPLE_REPLY.pack
_pack_offset_data: Final = OFFSET_DATA_HEADER.pack
_pack_offset_hole: Final = OFFSET_HOLE_CHUNK.pack
_pack_error: Final = ERROR_CHUNK.pack
_pack_extent: Final = EXTENT.pack
_U32_MAX: Final = 0xFFFFFFFF


# Strings -----------------------------------------------------------------------------------


def decode_string(raw: bytes) -> str:
    """A protocol string: UTF-8, no NUL, at most 4096 bytes; ValueError otherwise."""
    # "that string is a sequence of UTF-8 code points, which is not NUL terminated, MUST NOT
    # contain NUL characters, SHOULD be no longer than 256 bytes and MUST be no longer than
    # 4096 bytes."
    if len(raw) > MAX_STRING:
        raise ValueError(f"string of {len(raw)} bytes exceeds {MAX_STRING}")
    if b"\0" in raw:
        raise ValueError("string contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("string is not valid UTF-8") from None


def encode_string(text: str) -> bytes:
    """Encode a string we send; ValueError if it breaks the same rules."""
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING or b"\0" in raw:
        raise ValueError(f"{text[:40]!r}... is not a valid NBD string")
    return raw


# Handshake and options ---------------------------------------------------------------------


def greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    """The newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags."""
    return GREETING.pack(Magic.NBDMAGIC, Magic.IHAVEOPT, flags)


def export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """The reply that ends NBD_OPT_EXPORT_NAME (no option reply header)."""
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(EXPORT_NAME_PADDING)


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    """One fixed-newstyle option reply: header then payload."""
    return OPTION_REPLY_HEADER.pack(_OPTION_REPLY_MAGIC, option, reply_type, len(payload)) + payload


def rep_server(option: int, name: bytes, description: bytes) -> bytes:
    """NBD_REP_SERVER: 32-bit name length, name, then the description (rest of the payload)."""
    return option_reply(option, OptionReply.SERVER, _U32.pack(len(name)) + name + description)


def rep_info_export(option: int, size: int, flags: int) -> bytes:
    """NBD_REP_INFO carrying NBD_INFO_EXPORT (length 12)."""
    return option_reply(option, OptionReply.INFO, INFO_EXPORT.pack(Info.EXPORT, size, flags))


def rep_info_string(option: int, info: int, text: bytes) -> bytes:
    """NBD_REP_INFO carrying NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return option_reply(option, OptionReply.INFO, _U16.pack(info) + text)


def rep_info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE (length 14)."""
    payload = INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)
    return option_reply(option, OptionReply.INFO, payload)


def rep_meta_context(option: int, context_id: int, name: bytes) -> bytes:
    """NBD_REP_META_CONTEXT: 32-bit context id, context name."""
    return option_reply(option, OptionReply.META_CONTEXT, _U32.pack(context_id) + name)


def _string_at(data: bytes, pos: int, what: str) -> tuple[str, int]:
    """A 32-bit length and the string it measures at ``pos``; return it and the next offset."""
    if pos + 4 > len(data):
        raise ValueError(f"option data ends before the length of {what}")
    (length,) = _U32.unpack_from(data, pos)
    pos += 4
    if length > len(data) - pos:
        raise ValueError(f"length of {what} ({length}) runs past the option data")
    return decode_string(data[pos : pos + length]), pos + length


def parse_info_request(data: bytes) -> tuple[str, tuple[int, ...]]:
    """NBD_OPT_INFO / NBD_OPT_GO data: the export name and the information requests."""
    # "32 bits, length of name (unsigned); MUST be no larger than the option data length - 6"
    if len(data) < 6:
        raise ValueError("option data is shorter than 6 bytes")
    (name_length,) = _U32.unpack_from(data, 0)
    if name_length > len(data) - 6:
        raise ValueError(f"name length {name_length} exceeds the option data length - 6")
    name = decode_string(data[4 : 4 + name_length])
    pos = 4 + name_length
    (count,) = _U16.unpack_from(data, pos)
    if len(data) != pos + 2 + 2 * count:
        raise ValueError(f"{count} information requests do not fill the option data")
    return name, struct.unpack_from(f">{count}H", data, pos + 2)


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: export name and queries."""
    name, pos = _string_at(data, 0, "the export name")
    if pos + 4 > len(data):
        raise ValueError("option data ends before the number of queries")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for index in range(count):  # each query takes at least 4 bytes, so this stays bounded
        query, pos = _string_at(data, pos, f"query {index}")
        queries.append(query)
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes follow the last query")
    return name, queries


# Transmission replies ----------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply (16 bytes); for a successful READ the data follows it."""
    return _pack_simple(_SIMPLE_MAGIC, error, cookie)


def offset_data_header(cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
    """An NBD_REPLY_TYPE_OFFSET_DATA chunk up to its data (28 bytes); ``length`` data follow."""
    return _pack_offset_data(
        _STRUCTURED_MAGIC, _DONE if done else 0, _OFFSET_DATA, cookie, 8 + length, offset
    )


#: ``simple_reply(cookie)`` as one C call (a partial of the struct's pack), without a Python
#: frame: the reply to every successful write.
simple_ok: Final[Callable[[int], bytes]] = partial(_pack_simple, _SIMPLE_MAGIC, 0)

#: ``offset_data_header(cookie, offset, length)`` as one C call, its arguments in wire order:
#: ``final_data_header(cookie, length + 8, offset)`` (the chunk's length counts the offset).
final_data_header: Final[Callable[[int, int, int], bytes]] = partial(
    _pack_offset_data, _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA)


def offset_hole_chunk(cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
    """An NBD_REPLY_TYPE_OFFSET_HOLE chunk: ``length`` bytes at ``offset`` read as zeroes."""
    return _pack_offset_hole(
        _STRUCTURED_MAGIC, _DONE if done else 0, _OFFSET_HOLE, cookie, 12, offset, length
    )


def error_chunk(cookie: int, error: int, message: bytes = b"", *, done: bool = True) -> bytes:
    """An NBD_REPLY_TYPE_ERROR chunk with an optional human-readable message."""
    header = _pack_error(
        _STRUCTURED_MAGIC,
        _DONE if done else 0,
        _ERROR,
        cookie,
        6 + len(message),
        error,
        len(message),
    )
    return header + message if message else header


def block_status_chunk(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], *, done: bool = True
) -> bytes:
    """An NBD_REPLY_TYPE_BLOCK_STATUS chunk for one context: ``(length, flags)`` descriptors.

    Raises ValueError for no extents or an extent length outside 1..2^32-1.
    """
    parts = [b""]
    for length, flags in extents:
        # "32 bits, length of the extent to which the status below applies (unsigned, MUST
        # be nonzero)"
        if not 0 < length <= _U32_MAX:
            raise ValueError(f"extent length {length} is not between 1 and 2^32-1")
        parts.append(_pack_extent(length, flags))
    # "length MUST be 4 + (a positive integer multiple of 8)"
    if len(parts) == 1:
        raise ValueError("a block status chunk needs at least one extent")
    parts[0] = BLOCK_STATUS_HEADER.pack(
        _STRUCTURED_MAGIC,
        _DONE if done else 0,
        _BLOCK_STATUS,
        cookie,
        4 + 8 * (len(parts) - 1),
        context_id,
    )
    return b"".join(parts)


# Receiving ---------------------------------------------------------------------------------


class ReceiveBuffer:
    """Received bytes not yet consumed: ``data[pos:]`` followed by queued chunks.

    Readers look at ``data`` from ``pos`` directly (after :meth:`ensure`) and advance ``pos``
    themselves with :meth:`consume`. ``data`` is always a ``bytes`` object, never mutated.
    """

    __slots__ = ("_chunk_pos", "_chunks", "_queued", "data", "pos")

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0
        self._chunks: deque[bytes] = deque()
        self._chunk_pos = 0  # consumed prefix of _chunks[0]
        self._queued = 0  # unconsumed bytes in _chunks

    def __len__(self) -> int:
        """How many bytes are buffered."""
        return len(self.data) - self.pos + self._queued

    def feed(self, chunk: bytes) -> None:
        """Append received bytes (copied first if they are not immutable ``bytes``)."""
        if not chunk:
            return
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        if self.pos == len(self.data) and not self._chunks:
            self.data = chunk
            self.pos = 0
        else:
            self._chunks.append(chunk)
            self._queued += len(chunk)

    def ensure(self, count: int) -> bool:
        """Make ``count`` bytes contiguous at ``data[pos:]``; False if fewer are buffered.

        Joins chunks only when the bytes straddle them, and then copies only those bytes.
        """
        have = len(self.data) - self.pos
        if have >= count:
            return True
        if have + self._queued < count:
            return False
        if not have:
            self._promote()
            have = len(self.data) - self.pos
            if have >= count:
                return True
        parts: list[memoryview] = [memoryview(self.data)[self.pos :]] if have else []
        need = count - have
        chunks = self._chunks
        while need:
            chunk = chunks[0]
            start = self._chunk_pos
            left = len(chunk) - start
            if left <= need:
                parts.append(memoryview(chunk)[start:])
                chunks.popleft()
                self._chunk_pos = 0
                self._queued -= left
                need -= left
            else:
                parts.append(memoryview(chunk)[start : start + need])
                self._chunk_pos = start + need
                self._queued -= need
                need = 0
        self.data = b"".join(parts)
        self.pos = 0
        return True

    def consume(self, count: int) -> None:
        """Advance past ``count`` bytes that :meth:`ensure` made available."""
        self.pos += count

    def take(self, count: int) -> bytes:
        """Remove and return ``count`` bytes (a copy); ValueError if fewer are buffered."""
        if not self.ensure(count):
            raise ValueError(f"{count} bytes wanted, {len(self)} buffered")
        start = self.pos
        self.pos = start + count
        return self.data[start : start + count]

    def take_view(self, count: int) -> memoryview:
        """Remove and return ``count`` bytes as a read-only view (no copy when possible)."""
        if not self.ensure(count):
            raise ValueError(f"{count} bytes wanted, {len(self)} buffered")
        start = self.pos
        self.pos = start + count
        return memoryview(self.data)[start : start + count]

    def skip(self, count: int) -> int:
        """Drop up to ``count`` buffered bytes without joining anything; return how many."""
        dropped = 0
        while dropped < count:
            have = len(self.data) - self.pos
            if not have:
                if not self._chunks:
                    break
                self._promote()
                continue
            step = min(have, count - dropped)
            self.pos += step
            dropped += step
        if self.pos == len(self.data):
            self.data = b""  # let the chunk go
            self.pos = 0
        return dropped

    def _promote(self) -> None:
        """Make the first queued chunk the current one (the current one is exhausted)."""
        self.data = self._chunks.popleft()
        self.pos = self._chunk_pos
        self._chunk_pos = 0
        self._queued -= len(self.data) - self.pos
