"""The server's side of the NBD wire, read as a strict client would: for the daemon fuzzer
and the differential run against qemu-storage-daemon.

A :class:`Source` hands out bytes (from a socket, or from a whole recorded reply stream);
the ``read_*`` functions take one server message off it and check its framing against
NetworkBlockDevice/nbd doc/proto.md, raising :class:`Malformed` for a message no server
may send, :class:`EndOfStream` where the server closed (``partial`` tells whether it
closed in the middle of a message) and :class:`Silent` where a socket gave nothing in
time.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR = 1 << 31
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2
REPLY_FLAG_DONE = 1
# The only error values the spec lets a server send (doc/proto.md, "Error values").
NBD_ERRORS = {1, 5, 12, 22, 28, 75, 95, 108}


class Malformed(AssertionError):
    """The server sent something no NBD server may send."""


class EndOfStream(Exception):
    """The server closed; ``partial`` if it did so in the middle of a message."""

    def __init__(self, partial: bool) -> None:
        super().__init__("closed mid-message" if partial else "closed")
        self.partial = partial


class Silent(Exception):
    """The server sent nothing more within the wait."""


class Source:
    """Bytes from the server, taken one message at a time."""

    def begin(self) -> None:
        """A message starts here (so that an EOF inside it counts as partial)."""
        raise NotImplementedError

    def take(self, n: int) -> bytes:
        raise NotImplementedError

    def peek(self, n: int) -> bytes:
        """Up to ``n`` next bytes, left unread."""
        raise NotImplementedError


class BufferSource(Source):
    """A whole recorded reply stream; its end is where the server closed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.start = 0

    def begin(self) -> None:
        self.start = self.pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EndOfStream(partial=len(self.data) > self.start)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def peek(self, n: int) -> bytes:
        return self.data[self.pos:self.pos + n]

    def at_end(self) -> bool:
        return self.pos == len(self.data)


class SocketSource(Source):
    """A live connection; waits up to ``wait`` seconds for each piece of a message."""

    def __init__(self, sock: socket.socket, wait: float) -> None:
        self.sock = sock
        self.wait = wait
        self.buf = bytearray()
        self.taken = 0  # bytes of the current message already taken

    def begin(self) -> None:
        self.taken = 0

    def _fill(self) -> bool:
        """Read more; False at EOF, Silent when nothing came within the wait."""
        self.sock.settimeout(self.wait)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            raise Silent() from None
        except ConnectionResetError:
            return False
        self.buf += chunk
        return bool(chunk)

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EndOfStream(partial=bool(self.buf) or self.taken > 0)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.taken += n
        return out

    def peek(self, n: int) -> bytes:
        while len(self.buf) < n and self._fill():
            pass
        return bytes(self.buf[:n])


def read_greeting(source: Source) -> int:
    """The server's first 18 bytes; returns its handshake flags."""
    source.begin()
    data = source.take(18)
    if data[:16] != NBDMAGIC + IHAVEOPT:
        raise Malformed(f"greeting {data!r}")
    flags = struct.unpack(">H", data[16:])[0]
    if flags & ~3:
        raise Malformed(f"unknown handshake flags {flags:#x}")
    return int(flags)


@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & REP_ERR)


def read_option_reply(source: Source) -> OptionReply:
    """One option reply, its data checked against its type."""
    source.begin()
    header = source.take(20)
    magic, option, rtype, length = struct.unpack(">QIII", header)
    if magic != OPT_REPLY_MAGIC:
        raise Malformed(f"option reply magic {magic:#x}")
    data = source.take(length)
    check_option_reply(option, rtype, data)
    return OptionReply(option, rtype, data)


def check_option_reply(option: int, rtype: int, data: bytes) -> None:
    if rtype == REP_ACK and data:
        raise Malformed(f"ACK to option {option} with {len(data)} bytes of data")
    if rtype == REP_SERVER:
        if len(data) < 4 or 4 + struct.unpack(">I", data[:4])[0] > len(data):
            raise Malformed(f"NBD_REP_SERVER {data!r}")
    elif rtype == REP_META_CONTEXT:
        if len(data) < 4 or option not in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            raise Malformed(f"NBD_REP_META_CONTEXT to option {option}: {data!r}")
    elif rtype == REP_INFO:
        if option not in (OPT_INFO, OPT_GO) or len(data) < 2:
            raise Malformed(f"NBD_REP_INFO to option {option}: {data!r}")
        info = struct.unpack(">H", data[:2])[0]
        want = {INFO_EXPORT: 12, INFO_BLOCK_SIZE: 14}.get(info)
        if want is not None and len(data) != want:
            raise Malformed(f"NBD_INFO {info} of {len(data)} bytes")
        if info == INFO_BLOCK_SIZE:
            minimum, preferred, maximum = struct.unpack(">III", data[2:])
            if not (minimum & (minimum - 1) == 0 < minimum <= preferred <= maximum):
                raise Malformed(f"block sizes {minimum} {preferred} {maximum}")
    elif rtype not in (REP_ACK,) and not rtype & REP_ERR:
        raise Malformed(f"unknown option reply type {rtype:#x}")


def read_export_name_reply(source: Source, no_zeroes: bool) -> tuple[int, int]:
    """The reply to NBD_OPT_EXPORT_NAME: (size, transmission flags)."""
    source.begin()
    size, flags = struct.unpack(">QH", source.take(10))
    if not no_zeroes and source.take(124) != bytes(124):
        raise Malformed("EXPORT_NAME padding is not zeroes")
    if not flags & 1:
        raise Malformed(f"transmission flags {flags:#x} without HAS_FLAGS")
    return size, flags


@dataclass(frozen=True)
class Request:
    """What the client asked, for checking a reply to it."""

    cmd: int
    offset: int
    length: int
    flags: int = 0


@dataclass(frozen=True)
class Reply:
    """One simple reply or one structured chunk."""

    cookie: int
    structured: bool
    error: int  # simple replies; 0 for chunks
    flags: int = 0  # chunk flags
    type: int = 0  # chunk type
    payload: bytes = b""  # read data, or the chunk's payload

    @property
    def done(self) -> bool:
        return not self.structured or bool(self.flags & REPLY_FLAG_DONE)


def read_reply(source: Source, requests: dict[int, Request]) -> Reply:
    """One transmission reply to one of ``requests`` (by cookie), its framing checked."""
    source.begin()
    magic = struct.unpack(">I", source.take(4))[0]
    if magic == SIMPLE_MAGIC:
        error, cookie = struct.unpack(">IQ", source.take(12))
        request = requests.get(cookie)
        if request is None:
            raise Malformed(f"simple reply to unknown cookie {cookie}")
        if error and error not in NBD_ERRORS:
            raise Malformed(f"error value {error} is not in the spec")
        data = b""
        if request.cmd == CMD_READ and not error:
            data = source.take(request.length)
        return Reply(cookie, False, error, payload=data)
    if magic != STRUCTURED_MAGIC:
        raise Malformed(f"reply magic {magic:#x}")
    flags, ctype, cookie, length = struct.unpack(">HHQI", source.take(16))
    request = requests.get(cookie)
    if request is None:
        raise Malformed(f"structured chunk for unknown cookie {cookie}")
    if flags & ~REPLY_FLAG_DONE:
        raise Malformed(f"chunk flags {flags:#x}")
    payload = source.take(length)
    check_chunk(request, flags, ctype, payload)
    return Reply(cookie, True, 0, flags, ctype, payload)


def check_chunk(request: Request, flags: int, ctype: int, payload: bytes) -> None:
    end = request.offset + request.length
    if ctype == CHUNK_NONE:
        if payload or not flags & REPLY_FLAG_DONE:
            raise Malformed("NBD_REPLY_TYPE_NONE with a payload or without DONE")
    elif ctype in (CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE):
        if request.cmd != CMD_READ:
            raise Malformed(f"read chunk for command {request.cmd}")
        if ctype == CHUNK_OFFSET_DATA:
            if len(payload) <= 8:
                raise Malformed("NBD_REPLY_TYPE_OFFSET_DATA without data")
            offset, size = struct.unpack(">Q", payload[:8])[0], len(payload) - 8
        else:
            if len(payload) != 12:
                raise Malformed("NBD_REPLY_TYPE_OFFSET_HOLE of the wrong size")
            offset, size = struct.unpack(">QI", payload)
        if not (request.offset <= offset and offset + size <= end and size > 0):
            raise Malformed(f"read chunk {offset}+{size} outside {request}")
    elif ctype == CHUNK_BLOCK_STATUS:
        if request.cmd != CMD_BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
            raise Malformed(f"block status chunk of {len(payload)} bytes for {request}")
        lengths = [struct.unpack(">I", payload[i:i + 4])[0] for i in range(4, len(payload), 8)]
        if request.flags & FLAG_REQ_ONE and len(lengths) != 1:
            raise Malformed("more than one extent with NBD_CMD_FLAG_REQ_ONE")
        # Only the last extent may reach past the request ("the length of the final extent
        # MAY result in a sum larger than the original requested length").
        if 0 in lengths or sum(lengths[:-1]) >= request.length:
            raise Malformed(f"extents {lengths} for {request}")
    elif ctype in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
        if len(payload) < 6:
            raise Malformed("error chunk too short")
        error, msglen = struct.unpack(">IH", payload[:6])
        if not error or error not in NBD_ERRORS:
            raise Malformed(f"error value {error} in an error chunk")
        if len(payload) != 6 + msglen + (8 if ctype == CHUNK_ERROR_OFFSET else 0):
            raise Malformed("error chunk length disagrees with its message length")
    else:
        raise Malformed(f"unknown chunk type {ctype}")


def request_bytes(cmd: int, cookie: int, offset: int, length: int, flags: int = 0,
                  payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def option_bytes(option: int, data: bytes = b"", length: int | None = None) -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data) if length is None else length) + data


def name_and_infos(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    """The body of NBD_OPT_INFO and NBD_OPT_GO."""
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_context_body(name: bytes, queries: tuple[bytes, ...]) -> bytes:
    """The body of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))
