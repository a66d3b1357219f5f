"""One NBD server connection, sans-IO: bytes in, events out, replies as bytes.

Theory of operation. A connection speaks the fixed newstyle protocol of NetworkBlockDevice/nbd
``doc/proto.md`` (no oldstyle). The server writes :meth:`NbdServerConnection.
initial_data` as soon as the socket opens, hands every read to :meth:`~NbdServerConnection.
receive_data` (``b""`` at EOF), and then calls :meth:`~NbdServerConnection.next_event` until
it returns :data:`NEED_DATA`. Events come out in input order:

* :class:`Send` (negotiation only): bytes the server must write now, one per option, all of
  that option's replies in one piece.
* :class:`StartTls` (negotiation only, right after the :class:`Send` carrying the
  ``NBD_OPT_STARTTLS`` ACK): the server must wrap the socket in TLS before it reads
  again; negotiation then goes on over TLS.
* :class:`Ready`: option haggling is over (``NBD_OPT_GO`` acknowledged, or
  ``NBD_OPT_EXPORT_NAME`` answered); the :class:`Send` carrying that answer comes first.
  Requests may follow at once in the same input.
* :class:`Read`, :class:`Write`, :class:`Flush`, :class:`Trim`, :class:`WriteZeroes`,
  :class:`BlockStatus`: valid requests for the device. The server answers each with
  :meth:`~NbdServerConnection.reply_ok`, :meth:`~NbdServerConnection.reply_error`,
  :meth:`~NbdServerConnection.reply_read_header` (+ the data, which it has already read
  completely: a structured data chunk is sent with the DONE flag, so no error may follow
  it), :meth:`~NbdServerConnection.reply_read_hole` or
  :meth:`~NbdServerConnection.reply_block_status`, in any order (replies may be reordered).
* :class:`Rejected`: a request the protocol layer refuses itself, per the spec, without
  touching the device; the server answers it with ``reply_error(cookie, error)``.
* :class:`Disconnect`: ``NBD_CMD_DISC``. The server finishes outstanding requests, then
  closes; there is no reply and later input is ignored.
* :class:`Closed`: the connection is over (EOF, EOF mid-message, ``NBD_OPT_ABORT`` after its
  ACK was sent, an ``NBD_OPT_EXPORT_NAME`` that cannot be satisfied, or after a Disconnect).
  ``next_event`` keeps returning it.

A peer that breaks a rule that leaves no way to continue (bad magic, unknown client flags, a
WRITE payload too big to even discard) makes ``next_event`` raise
:class:`~blockd.nbd.errors.NbdProtocolError`; the server must drop the connection (the spec
allows a hard disconnect after "a violation of a mandatory condition").

Phases (:class:`Phase`) change only in :meth:`NbdServerConnection._enter`::

    HANDSHAKE --client flags--> OPTIONS --GO / EXPORT_NAME--> TRANSMISSION
        |                          |                               |
        +--------------------------+--> CLOSED <-------------------+   (and any -> ERROR)

Memory is bounded: option data is buffered only up to ``max_option_length`` (longer options
are skipped as they arrive and refused with ``NBD_REP_ERR_TOO_BIG``), and a WRITE payload
only up to the advertised maximum payload; a refused WRITE's payload is skipped as it
arrives, never buffered.

Choices where the spec leaves room:

* A client that does not set ``NBD_FLAG_C_FIXED_NEWSTYLE`` still gets fixed-newstyle replies
  ("Servers MAY choose to honour fixed newstyle from clients that didn't set this bit").
* TLS, as qemu-nbd does it: with ``tls=True`` the server is in FORCEDTLS mode. Before
  ``NBD_OPT_STARTTLS`` every option but STARTTLS is answered ``NBD_REP_ERR_TLS_REQD``
  (an ``NBD_OPT_ABORT`` too, then the connection ends) and ``NBD_OPT_EXPORT_NAME``, which
  cannot be refused, ends the connection. Without TLS, STARTTLS is answered
  ``NBD_REP_ERR_POLICY`` ("TLS not configured"); once TLS is on, ``NBD_REP_ERR_INVALID``.
  A STARTTLS carrying data is refused with ``NBD_REP_ERR_INVALID`` and ends the connection,
  and input the client sent behind a STARTTLS (before seeing its ACK) is a protocol error.
* ``NBD_INFO_BLOCK_SIZE`` is always sent for INFO/GO. Size constraints are always enforced
  (unaligned requests get ``NBD_EINVAL``: a server "MUST cleanly error commands that fall
  outside the constraints"). With ``require_block_size=True``, an export with non-default
  constraints (minimum block > 1 or maximum payload < 2^25) is refused to clients that did not
  request ``NBD_INFO_BLOCK_SIZE``: GO gets ``NBD_REP_ERR_BLOCK_SIZE_REQD``, EXPORT_NAME a
  close. :attr:`Ready.block_size_agreed` tells whether the client promised to obey them.
* Zero-length READ, WRITE, TRIM, WRITE_ZEROES and BLOCK_STATUS get ``NBD_EINVAL`` (the spec
  leaves their behaviour "unspecified", only asking not to disconnect).
* Reads longer than the maximum payload get ``NBD_EOVERFLOW`` with structured replies ("the
  server is also permitted to reject large read requests up front with NBD_EOVERFLOW"),
  ``NBD_EINVAL`` with simple replies. TRIM, WRITE_ZEROES and BLOCK_STATUS have no length
  limit.
* ``NBD_OPT_LIST_META_CONTEXT`` works without structured replies (the spec only says the
  server MAY refuse); ``NBD_OPT_SET_META_CONTEXT`` needs them.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

from blockd.nbd.constants import (
    BASE_ALLOCATION,
    DOS_PAYLOAD_LIMIT,
    MAX_STRING,
    ClientFlag,
    Command,
    CommandFlag,
    ErrorCode,
    Info,
    Magic,
    Option,
    OptionReply,
    TransmissionFlag,
)
from blockd.nbd.errors import NbdProtocolError
from blockd.nbd.wire import (
    CLIENT_FLAGS,
    OPTION_HEADER,
    REQUEST,
    ReceiveBuffer,
    block_status_chunk,
    decode_string,
    encode_string,
    error_chunk,
    export_name_reply,
    final_data_header,
    greeting,
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

__all__ = [
    "BASE_ALLOCATION_ID",
    "NEED_DATA",
    "BlockStatus",
    "CloseReason",
    "Closed",
    "Disconnect",
    "Event",
    "ExportCatalog",
    "ExportInfo",
    "Flush",
    "IoRequest",
    "NbdServerConnection",
    "NeedData",
    "Phase",
    "Read",
    "Ready",
    "Rejected",
    "Request",
    "Send",
    "StartTls",
    "Trim",
    "Write",
    "WriteZeroes",
    "transmission_flags",
]


# Exports -----------------------------------------------------------------------------------


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the protocol needs to know about one export; ``handle`` is the server's own.

    Raises ValueError for values the spec forbids advertising: the minimum block "MUST be a
    power of 2, MUST NOT be larger than 2^16", the preferred block "MUST be a power of 2 at
    least as large as the maximum of the minimum block size and 2^9", the maximum payload
    "MUST be at least as large as the preferred block size" (and fits 32 bits).
    """

    name: str
    description: str
    size: int
    read_only: bool
    can_flush: bool
    can_fua: bool
    can_trim: bool
    can_write_zeroes: bool
    can_fast_zero: bool
    can_multi_conn: bool
    can_allocation: bool  # base:allocation available
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 << 20
    handle: object = field(default=None, compare=False)

    def __post_init__(self) -> None:
        encode_string(self.name)
        encode_string(self.description)
        if not 0 <= self.size < 1 << 64:
            raise ValueError(f"export size {self.size} does not fit 64 bits")
        if not _power_of_two(self.min_block) or self.min_block > 1 << 16:
            raise ValueError(f"minimum block {self.min_block}: not a power of 2 up to 2^16")
        if not _power_of_two(self.preferred_block) or self.preferred_block < max(
            self.min_block, 512
        ):
            raise ValueError(
                f"preferred block {self.preferred_block}: not a power of 2 at least "
                f"max(minimum block, 512)"
            )
        if not self.preferred_block <= self.max_block <= 0xFFFFFFFF:
            raise ValueError(
                f"maximum payload {self.max_block}: not between the preferred block and 2^32-1"
            )


class ExportCatalog(Protocol):
    """The exports a connection may offer; the server passes one in."""

    def lookup(self, name: str) -> ExportInfo | None:
        """The export a client's name selects ("" is the default export), or None."""
        ...

    def names(self) -> Sequence[tuple[str, str]]:
        """``(name, description)`` of every export, for ``NBD_OPT_LIST``."""
        ...


def transmission_flags(export: ExportInfo) -> int:
    """The transmission flags that tell the truth about ``export``.

    Write-side features (FUA, TRIM, WRITE_ZEROES, FAST_ZERO) are advertised only on writable
    exports, and FAST_ZERO only with WRITE_ZEROES (the server "MUST set this transmission flag
    to 0 if NBD_FLAG_SEND_WRITE_ZEROES is not set"). SEND_DF, SEND_CACHE and ROTATIONAL are
    never set.
    """
    flags = TransmissionFlag.HAS_FLAGS  # "bit 0, NBD_FLAG_HAS_FLAGS: MUST always be 1."
    if export.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        if export.can_fua:
            flags |= TransmissionFlag.SEND_FUA
        if export.can_trim:
            flags |= TransmissionFlag.SEND_TRIM
        if export.can_write_zeroes:
            flags |= TransmissionFlag.SEND_WRITE_ZEROES
            if export.can_fast_zero:
                flags |= TransmissionFlag.SEND_FAST_ZERO
    if export.can_flush:
        flags |= TransmissionFlag.SEND_FLUSH
    if export.can_multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


def _default_sizes(export: ExportInfo) -> bool:
    """Whether the export works with the spec's default size constraints."""
    # "a server SHOULD support a default minimum block size of 1, a preferred block size of
    # 2^12 (4,096), and a maximum payload size that is at least 2^25 (33,554,432)"
    return export.min_block == 1 and export.max_block >= DOS_PAYLOAD_LIMIT


# Events ------------------------------------------------------------------------------------


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = "need-data"


#: ``next_event`` has nothing more until the server feeds more input.
NEED_DATA: Final = NeedData.NEED_DATA


class CloseReason(enum.Enum):
    """Why a connection is over."""

    EOF = "eof"  # the peer closed between messages
    TRUNCATED = "truncated"  # the peer closed in the middle of a message
    ABORT = "abort"  # NBD_OPT_ABORT (its ACK came in the Send before)
    REFUSED = "refused"  # an NBD_OPT_EXPORT_NAME that cannot be satisfied
    DISCONNECT = "disconnect"  # NBD_CMD_DISC (after the Disconnect event)


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes the server must write now (negotiation replies)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Wrap the connection in TLS now (the STARTTLS ACK was in the Send before)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The transmission phase starts on ``export``.

    ``meta_context`` says whether ``base:allocation`` was negotiated for this export (so
    BLOCK_STATUS requests will come); ``block_size_agreed`` whether the client requested
    ``NBD_INFO_BLOCK_SIZE`` in the GO, promising to obey the size constraints.
    """

    export: ExportInfo
    transmission_flags: int
    structured_replies: bool
    meta_context: bool
    block_size_agreed: bool


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over; the server closes the socket once its writes are done."""

    reason: CloseReason
    detail: str = ""


#: A valid READ or WRITE as :meth:`NbdServerConnection.next_io` returns it:
#: ``(cookie, offset, length, flags, payload)``, the payload None for a READ.
IoRequest: TypeAlias = tuple[int, int, int, int, memoryview | None]


# Read and Write are made once per request, so they get an __init__ that fills the slots
# through their descriptors: still frozen, at half the cost of dataclass's frozen __init__
# (which goes through object.__setattr__ for every field).


@dataclass(frozen=True, slots=True, init=False)
class Read:
    """``NBD_CMD_READ`` of ``length`` bytes at ``offset`` (validated)."""

    cookie: int
    offset: int
    length: int
    flags: int

    def __init__(self, cookie: int, offset: int, length: int, flags: int) -> None:
        _set_read_cookie(self, cookie)
        _set_read_offset(self, offset)
        _set_read_length(self, length)
        _set_read_flags(self, flags)


_set_read_cookie: Final = Read.__dict__["cookie"].__set__
_set_read_offset: Final = Read.__dict__["offset"].__set__
_set_read_length: Final = Read.__dict__["length"].__set__
_set_read_flags: Final = Read.__dict__["flags"].__set__


@dataclass(frozen=True, slots=True, init=False)
class Write:
    """``NBD_CMD_WRITE`` of ``data`` at ``offset``; ``flags`` may hold FUA.

    ``data`` is a read-only view into received bytes (not a copy); it keeps the chunk it was
    received in alive, so the server should drop it once the write is done.
    """

    cookie: int
    offset: int
    data: memoryview
    flags: int

    def __init__(self, cookie: int, offset: int, data: memoryview, flags: int) -> None:
        _set_write_cookie(self, cookie)
        _set_write_offset(self, offset)
        _set_write_data(self, data)
        _set_write_flags(self, flags)

    @property
    def fua(self) -> bool:
        return bool(self.flags & CommandFlag.FUA)


_set_write_cookie: Final = Write.__dict__["cookie"].__set__
_set_write_offset: Final = Write.__dict__["offset"].__set__
_set_write_data: Final = Write.__dict__["data"].__set__
_set_write_flags: Final = Write.__dict__["flags"].__set__


@dataclass(frozen=True, slots=True)
class Flush:
    """``NBD_CMD_FLUSH``."""

    cookie: int


@dataclass(frozen=True, slots=True)
class Trim:
    """``NBD_CMD_TRIM`` of ``length`` bytes at ``offset``; ``flags`` may hold FUA."""

    cookie: int
    offset: int
    length: int
    flags: int

    @property
    def fua(self) -> bool:
        return bool(self.flags & CommandFlag.FUA)


@dataclass(frozen=True, slots=True)
class WriteZeroes:
    """``NBD_CMD_WRITE_ZEROES``; ``flags`` may hold FUA, NO_HOLE and FAST_ZERO.

    With FAST_ZERO the server "MUST fail quickly with an error of NBD_ENOTSUP" unless it is
    faster than writing; with NO_HOLE it must not deallocate.
    """

    cookie: int
    offset: int
    length: int
    flags: int

    @property
    def fua(self) -> bool:
        return bool(self.flags & CommandFlag.FUA)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & CommandFlag.NO_HOLE)

    @property
    def fast_zero(self) -> bool:
        return bool(self.flags & CommandFlag.FAST_ZERO)


@dataclass(frozen=True, slots=True)
class BlockStatus:
    """``NBD_CMD_BLOCK_STATUS`` for ``base:allocation``; ``length`` is a hint.

    With REQ_ONE in ``flags`` the reply must hold exactly one extent no longer than
    ``length``; otherwise it may hold several, the last possibly reaching beyond.
    """

    cookie: int
    offset: int
    length: int
    flags: int

    @property
    def req_one(self) -> bool:
        return bool(self.flags & CommandFlag.REQ_ONE)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """``NBD_CMD_DISC``: finish outstanding requests, then close. No reply."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request refused by the protocol layer: answer with ``reply_error(cookie, error)``.

    ``command`` is the request's type as sent (maybe unknown); ``reason`` says why, for logs
    and for the message of a structured error reply.
    """

    cookie: int
    error: ErrorCode
    command: int
    reason: str


Request = Read | Write | Flush | Trim | WriteZeroes | BlockStatus
Event = Send | StartTls | Ready | Closed | Request | Disconnect | Rejected


# The connection ----------------------------------------------------------------------------


class Phase(enum.Enum):
    """Where a connection is in its life."""

    HANDSHAKE = "handshake"  # greeting sent, waiting for the client's flags
    OPTIONS = "options"  # option haggling
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"  # the peer broke the protocol


_TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = {
    Phase.HANDSHAKE: frozenset({Phase.OPTIONS, Phase.CLOSED, Phase.ERROR}),
    Phase.OPTIONS: frozenset({Phase.TRANSMISSION, Phase.CLOSED, Phase.ERROR}),
    Phase.TRANSMISSION: frozenset({Phase.CLOSED, Phase.ERROR}),
    Phase.CLOSED: frozenset(),
    Phase.ERROR: frozenset(),
}

#: The metadata context id of ``base:allocation`` after NBD_OPT_SET_META_CONTEXT.
BASE_ALLOCATION_ID: Final = 1

_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_IHAVEOPT: Final = int(Magic.IHAVEOPT)
_REQUEST_MAGIC: Final = int(Magic.REQUEST)
_REQUEST_SIZE: Final = REQUEST.size
_unpack_request: Final = REQUEST.unpack_from
_READ: Final = int(Command.READ)
_WRITE: Final = int(Command.WRITE)
_DISC: Final = int(Command.DISC)
# next_event() runs once per request: on Python 3.11 an Enum class attribute goes
# through EnumType.__getattr__ (about 600 instructions), a module global does not.
_TRANSMISSION: Final = Phase.TRANSMISSION
_FLUSH: Final = int(Command.FLUSH)
_WRITE_ZEROES: Final = int(Command.WRITE_ZEROES)
_COMMANDS: Final = len(Command) - 1  # RESIZE (8) is experimental: unknown here
_U32_MAX: Final = 0xFFFFFFFF
_BASE_ALLOCATION: Final = BASE_ALLOCATION.encode()


def _command_name(command: int) -> str:
    try:
        return f"NBD_CMD_{Command(command).name}"
    except ValueError:
        return f"command {command}"


class NbdServerConnection:
    """The protocol state of one NBD connection, server side; see the module docstring."""

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        max_option_length: int = 64 << 10,
        require_block_size: bool = False,
        tls: bool = False,
    ) -> None:
        """``max_option_length`` bounds buffered option data (ValueError below 4 KiB + 16);
        ``tls``: options need TLS first (see the module docstring)."""
        if max_option_length < MAX_STRING + 16:
            raise ValueError(f"max_option_length must be at least {MAX_STRING + 16}")
        self._catalog = catalog
        self._max_option_length = max_option_length
        self._require_block_size = require_block_size
        self._tls = tls
        self._tls_pending = tls  # TLS is required and not started yet
        self._phase = Phase.HANDSHAKE
        self._in = ReceiveBuffer()
        self._eof = False
        self._discard = 0  # bytes of a refused message still to skip
        self._events: deque[Event] = deque()
        self._closed = Closed(CloseReason.EOF)
        self._error: NbdProtocolError | None = None
        # Negotiated state.
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None  # export of the last SET that chose a context
        self._export: ExportInfo | None = None
        self._flags = 0
        self._context_id: int | None = None
        # Transmission limits (see _start).
        self._size = 0
        self._align = 0  # minimum block - 1
        self._max_payload = 0
        self._max_read = 0
        self._discard_limit = 0
        self._allowed_flags: tuple[int, ...] = ()
        self._read_invalid = -1  # ~allowed flags of READ, for the fast path
        self._write_invalid = -1  # ~allowed flags of WRITE, for the fast path
        self._max_fast_write = 0  # the maximum payload, 0 if WRITE is refused anyway
        self._view_of = b""  # the chunk self._view looks at
        self._view = memoryview(b"")
        self._unavailable: tuple[tuple[ErrorCode, str] | None, ...] = ()

    # State -------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def export(self) -> ExportInfo | None:
        """The export in use (TRANSMISSION phase), else None."""
        return self._export

    @property
    def structured_replies(self) -> bool:
        """Whether the client negotiated structured replies."""
        return self._structured

    @property
    def transmission_flags(self) -> int:
        """The transmission flags sent for the export in use (0 before)."""
        return self._flags

    @property
    def meta_context_id(self) -> int | None:
        """The id of ``base:allocation`` if negotiated for the export in use, else None."""
        return self._context_id

    @property
    def mid_message(self) -> bool:
        """Whether part of a message has arrived and the rest has not (negotiated or not)."""
        return bool(self._discard) or bool(len(self._in))

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed (bounded: see the module docstring)."""
        return len(self._in)

    # Input -------------------------------------------------------------------------------

    def initial_data(self) -> bytes:
        """The greeting to write as soon as the connection opens."""
        return greeting()

    def receive_data(self, data: bytes) -> None:
        """Take bytes read from the socket; ``b""`` means EOF.

        Input after the connection is closed or broken is ignored; input after EOF is a
        RuntimeError (the caller's bug).
        """
        if self._eof:
            if data:
                raise RuntimeError("NBD connection received data after EOF")
            return
        if not data:
            self._eof = True
        elif self._phase is not Phase.CLOSED and self._phase is not Phase.ERROR:
            self._in.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`; raises NbdProtocolError (see module doc)."""
        if self._events:
            return self._events.popleft()
        phase = self._phase
        if phase is _TRANSMISSION:
            return self._next_request()
        if phase is Phase.OPTIONS:
            return self._next_option()
        if phase is Phase.HANDSHAKE:
            return self._next_client_flags()
        if phase is Phase.CLOSED:
            return self._closed
        assert self._error is not None
        raise NbdProtocolError(*self._error.args)

    def _enter(self, phase: Phase) -> None:
        """The one place the phase changes."""
        if phase not in _TRANSITIONS[self._phase]:
            raise RuntimeError(f"NBD connection cannot go from {self._phase.name} to {phase.name}")
        self._phase = phase

    def _fail(self, message: str) -> NbdProtocolError:
        """Enter ERROR; return the exception for the caller to raise."""
        self._enter(Phase.ERROR)
        self._error = NbdProtocolError(message)
        return self._error

    def _close(self, reason: CloseReason, detail: str = "") -> Closed:
        self._enter(Phase.CLOSED)
        self._closed = Closed(reason, detail)
        self._in = ReceiveBuffer()  # let buffered input go
        return self._closed

    def _starved(self) -> Closed | NeedData:
        """Not enough input for the next message: wait, or close at EOF."""
        if not self._eof:
            return NEED_DATA
        if self._discard or len(self._in):
            return self._close(
                CloseReason.TRUNCATED, f"EOF in the middle of a message ({self._phase.value})"
            )
        return self._close(CloseReason.EOF)

    def _skip_discard(self) -> bool:
        """Skip what is buffered of a refused message; True once it is all gone."""
        self._discard -= self._in.skip(self._discard)
        return not self._discard

    # Handshake ---------------------------------------------------------------------------

    def _next_client_flags(self) -> Event | NeedData:
        buf = self._in
        if not buf.ensure(CLIENT_FLAGS.size):
            return self._starved()
        (flags,) = CLIENT_FLAGS.unpack_from(buf.data, buf.pos)
        buf.consume(CLIENT_FLAGS.size)
        # "the server MUST drop the TCP connection if the client sets an unknown flag, or a
        # flag that does not match something advertised by the server" (we advertise both).
        unknown = flags & ~_KNOWN_CLIENT_FLAGS
        if unknown:
            raise self._fail(f"client set unknown flags {unknown:#x}")
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._enter(Phase.OPTIONS)
        return self._next_option()

    # Options -----------------------------------------------------------------------------

    def _next_option(self) -> Event | NeedData:
        if self._discard and not self._skip_discard():
            return self._starved()
        buf = self._in
        if not buf.ensure(OPTION_HEADER.size):
            return self._starved()
        magic, option, length = OPTION_HEADER.unpack_from(buf.data, buf.pos)
        if magic != _IHAVEOPT:
            raise self._fail(f"bad option magic {magic:#x}")
        if length > self._max_option_length:
            # A client may not make us buffer without bound: skip the data as it comes and
            # refuse ("NBD_REP_ERR_TOO_BIG: The request or the reply is too large to
            # process"). EXPORT_NAME cannot be refused ("the server MUST terminate the
            # session").
            buf.consume(OPTION_HEADER.size)
            self._discard = length
            if option == Option.EXPORT_NAME:
                return self._close(CloseReason.REFUSED, f"export name of {length} bytes")
            return self._refuse(option, OptionReply.ERR_TOO_BIG, f"option data of {length} bytes")
        if not buf.ensure(OPTION_HEADER.size + length):
            return self._starved()
        buf.consume(OPTION_HEADER.size)
        return self._handle_option(option, buf.take(length))

    def tls_started(self) -> None:
        """The server has wrapped the socket in TLS: options are taken again."""
        if not self._tls_pending or len(self._in) or self._discard:
            raise RuntimeError("tls_started without a pending NBD_OPT_STARTTLS")
        self._tls_pending = False

    def _before_tls(self, option: int, data: bytes) -> Event:
        """FORCEDTLS: what an option gets while TLS has not started."""
        name = f"Option {option:#x} not permitted before TLS"
        if option == Option.STARTTLS:
            if data:
                self._events.append(self._close(CloseReason.REFUSED, "STARTTLS with data"))
                return self._refuse(option, OptionReply.ERR_INVALID,
                                    "option 'NBD_OPT_STARTTLS' has unexpected length")
            if len(self._in):
                # The client must wait for the ACK: what follows would be plaintext.
                raise self._fail("data sent behind NBD_OPT_STARTTLS")
            self._events.append(StartTls())
            return Send(option_reply(option, OptionReply.ACK))
        if option == Option.EXPORT_NAME:
            return self._close(CloseReason.REFUSED, name)
        if option == Option.ABORT:
            self._events.append(self._close(CloseReason.ABORT))
        return self._refuse(option, OptionReply.ERR_TLS_REQD, name)

    def _handle_option(self, option: int, data: bytes) -> Event:
        if self._tls_pending:
            return self._before_tls(option, data)
        match option:
            case Option.EXPORT_NAME:
                return self._opt_export_name(data)
            case Option.ABORT:
                # "The server MUST reply with NBD_REP_ACK"; "a server SHOULD ignore any data".
                self._events.append(self._close(CloseReason.ABORT))
                return Send(option_reply(option, OptionReply.ACK))
            case Option.LIST:
                return self._opt_list(option, data)
            case Option.INFO | Option.GO:
                return self._opt_info(option, data)
            case Option.STRUCTURED_REPLY:
                # "The client MUST NOT send any additional data with the option, and the
                # server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID."
                if data:
                    return self._refuse(option, OptionReply.ERR_INVALID, "unexpected data")
                self._structured = True
                return Send(option_reply(option, OptionReply.ACK))
            case Option.LIST_META_CONTEXT | Option.SET_META_CONTEXT:
                return self._opt_meta_context(option, data)
            case Option.STARTTLS:
                if data:
                    self._events.append(self._close(CloseReason.REFUSED, "STARTTLS with data"))
                    return self._refuse(option, OptionReply.ERR_INVALID,
                                        "option 'NBD_OPT_STARTTLS' has unexpected length")
                if self._tls:
                    return self._refuse(option, OptionReply.ERR_INVALID, "TLS already enabled")
                return self._refuse(option, OptionReply.ERR_POLICY, "TLS not configured")
            case _:
                # "Servers that receive messages which they do not implement MUST reply to
                # them with NBD_REP_ERR_UNSUP"
                return self._refuse(option, OptionReply.ERR_UNSUP, f"option {option} unsupported")

    @staticmethod
    def _refuse(option: int, reply: OptionReply, message: str) -> Send:
        """An error reply with a message for the human at the client."""
        return Send(option_reply(option, reply, message.encode()))

    def _opt_export_name(self, data: bytes) -> Event:
        # "If the chosen export does not exist or requirements for the chosen export are not
        # met ..., the server MUST terminate the session."
        try:
            name = decode_string(data)
        except ValueError as err:
            return self._close(CloseReason.REFUSED, f"export name: {err}")
        export = self._catalog.lookup(name)
        if export is None:
            return self._close(CloseReason.REFUSED, f"no export named {name!r}")
        if self._require_block_size and not _default_sizes(export):
            return self._close(
                CloseReason.REFUSED, f"export {name!r} needs NBD_OPT_GO with NBD_INFO_BLOCK_SIZE"
            )
        ready = self._start(export, name, block_size_agreed=False)
        self._events.append(ready)
        return Send(export_name_reply(export.size, self._flags, no_zeroes=self._no_zeroes))

    def _opt_list(self, option: int, data: bytes) -> Event:
        # "The client MUST NOT send any additional data with the option, and the server
        # SHOULD reject a request that includes data with NBD_REP_ERR_INVALID."
        if data:
            return self._refuse(option, OptionReply.ERR_INVALID, "unexpected data")
        replies = []
        for name, description in self._catalog.names():
            try:
                replies.append(rep_server(option, encode_string(name), encode_string(description)))
            except ValueError:
                continue  # not a valid NBD string: no client could select it anyway
        replies.append(option_reply(option, OptionReply.ACK))
        return Send(b"".join(replies))

    def _opt_info(self, option: int, data: bytes) -> Event:
        try:
            name, requests = parse_info_request(data)
        except ValueError as err:
            return self._refuse(option, OptionReply.ERR_INVALID, str(err))
        export = self._catalog.lookup(name)
        if export is None:
            # "NBD_REP_ERR_UNKNOWN: ... the server SHOULD NOT send NBD_REP_INFO replies."
            return self._refuse(option, OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        block_size = rep_info_block_size(
            option, export.min_block, export.preferred_block, export.max_block
        )
        agreed = Info.BLOCK_SIZE in requests
        if (
            option == Option.GO
            and not agreed
            and self._require_block_size
            and not _default_sizes(export)
        ):
            # "A server sending an NBD_REP_ERR_BLOCK_SIZE_REQD error SHOULD ensure it first
            # sends an NBD_INFO_BLOCK_SIZE information reply"
            refusal = self._refuse(
                option, OptionReply.ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE"
            )
            return Send(block_size + refusal.data)
        # "the server MUST send at least one NBD_REP_INFO, with an NBD_INFO_EXPORT"
        replies = [rep_info_export(option, export.size, transmission_flags(export))]
        if Info.NAME in requests:
            replies.append(rep_info_string(option, Info.NAME, encode_string(export.name)))
        if Info.DESCRIPTION in requests and export.description:
            text = encode_string(export.description)
            replies.append(rep_info_string(option, Info.DESCRIPTION, text))
        # Always sent: "The server MAY send information requests back which are not
        # explicitly requested"; without a request it only informs, it binds nobody.
        replies.append(block_size)
        replies.append(option_reply(option, OptionReply.ACK))
        if option == Option.GO:
            self._events.append(self._start(export, name, block_size_agreed=agreed))
        return Send(b"".join(replies))

    def _opt_meta_context(self, option: int, data: bytes) -> Event:
        selecting = option == Option.SET_META_CONTEXT
        if selecting:
            # "Issuing this command replaces all previously-set metadata contexts (including
            # when this command fails)"
            self._meta_export = None
            # "This option MUST NOT be requested unless structured replies have been
            # negotiated first. If a client attempts to do so, a server SHOULD send
            # NBD_REP_ERR_INVALID."
            if not self._structured:
                return self._refuse(
                    option, OptionReply.ERR_INVALID, "negotiate structured replies first"
                )
        try:
            name, queries = parse_meta_context_request(data)
        except ValueError as err:
            # "If the option request is syntactically invalid ..., the server MUST fail the
            # request with NBD_REP_ERR_INVALID."
            return self._refuse(option, OptionReply.ERR_INVALID, str(err))
        export = self._catalog.lookup(name)
        if export is None:
            return self._refuse(option, OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        if selecting:
            # "If zero queries are sent, the server MUST select no metadata contexts";
            # "base:" - "the server MUST ignore this form during NBD_OPT_SET_META_CONTEXT".
            found = BASE_ALLOCATION in queries
        else:
            # "If zero queries are sent, then the server MUST return all the metadata
            # contexts that are available"; "base:" "MUST support this as a wildcard".
            found = not queries or BASE_ALLOCATION in queries or "base:" in queries
        # Unknown namespaces and leaf names: "the server MUST ignore" them.
        replies = []
        if found and export.can_allocation:
            if selecting:
                self._meta_export = name
                replies.append(rep_meta_context(option, BASE_ALLOCATION_ID, _BASE_ALLOCATION))
            else:
                # "The metadata context ID in these replies is reserved and SHOULD be set to
                # zero"
                replies.append(rep_meta_context(option, 0, _BASE_ALLOCATION))
        replies.append(option_reply(option, OptionReply.ACK))
        return Send(b"".join(replies))

    # Transmission ------------------------------------------------------------------------

    def _start(self, export: ExportInfo, name: str, *, block_size_agreed: bool) -> Ready:
        """Enter TRANSMISSION on ``export``, chosen by the client as ``name``."""
        self._export = export
        self._flags = flags = transmission_flags(export)
        # "A client MUST NOT send NBD_CMD_BLOCK_STATUS unless ... the final time it was sent,
        # it referred to the same export name used to enter transmission phase"
        context = self._meta_export is not None and self._meta_export == name
        self._context_id = BASE_ALLOCATION_ID if context else None
        self._size = export.size
        self._align = export.min_block - 1
        self._max_payload = export.max_block
        # A structured data chunk's length field holds 8 + data length in 32 bits.
        self._max_read = min(export.max_block, _U32_MAX - 8)
        # "any payload not exceeding 2^25 (33,554,432) bytes SHOULD NOT be considered a
        # denial of service attack, even if that length is larger than the advertised
        # maximum payload size": a refused WRITE up to that is skipped, beyond it we hang up.
        self._discard_limit = max(export.max_block, DOS_PAYLOAD_LIMIT)

        # "bit 0, NBD_CMD_FLAG_FUA; This flag is valid for all commands, provided
        # NBD_FLAG_SEND_FUA has been negotiated". DF is never valid: we do not advertise
        # SEND_DF ("Clients MUST NOT set the NBD_CMD_FLAG_DF request flag unless this
        # transmission flag is set").
        fua = CommandFlag.FUA if flags & TransmissionFlag.SEND_FUA else 0
        zero_flags = CommandFlag.NO_HOLE
        if flags & TransmissionFlag.SEND_FAST_ZERO:
            zero_flags |= CommandFlag.FAST_ZERO
        allowed = [fua] * _COMMANDS
        allowed[Command.WRITE_ZEROES] |= zero_flags
        allowed[Command.BLOCK_STATUS] |= CommandFlag.REQ_ONE
        self._allowed_flags = tuple(int(mask) for mask in allowed)
        self._read_invalid = ~self._allowed_flags[Command.READ]

        unavailable: list[tuple[ErrorCode, str] | None] = [None] * _COMMANDS
        # "it SHOULD return NBD_EPERM if it receives a write or trim request on a read-only
        # export"; the same for write zeroes.
        read_only = (ErrorCode.EPERM, "the export is read-only")
        unsupported = (ErrorCode.EINVAL, "not supported by the export")
        if export.read_only:
            for command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES):
                unavailable[command] = read_only
        else:
            if not flags & TransmissionFlag.SEND_TRIM:
                unavailable[Command.TRIM] = unsupported
            if not flags & TransmissionFlag.SEND_WRITE_ZEROES:
                unavailable[Command.WRITE_ZEROES] = unsupported
        if not flags & TransmissionFlag.SEND_FLUSH:
            unavailable[Command.FLUSH] = unsupported
        # NBD_CMD_CACHE: not advertised; clients that send it anyway get NBD_EINVAL.
        unavailable[Command.CACHE] = unsupported
        if self._context_id is None:
            # "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS
            # without selecting at least one metadata context."
            unavailable[Command.BLOCK_STATUS] = (ErrorCode.EINVAL, "no metadata context")
        self._unavailable = tuple(unavailable)
        self._write_invalid = ~self._allowed_flags[Command.WRITE]
        self._max_fast_write = self._max_payload if unavailable[Command.WRITE] is None else 0

        self._enter(Phase.TRANSMISSION)
        return Ready(export, flags, self._structured, context, block_size_agreed)

    def next_io(self) -> IoRequest | None:
        """The next request if it is a valid READ, or a valid WRITE with all its payload
        buffered; None (nothing consumed) for anything else: :meth:`next_event` then.

        A READ is ``(cookie, offset, length, flags, None)``, a WRITE ``(cookie, offset,
        length, flags, payload)`` with the payload as a read-only view, as in
        :class:`Write`.  The same requests :meth:`next_event` returns as :class:`Read`
        and :class:`Write` (it takes them from here), as a tuple: a server's per-request
        loop saves making an event object (events are frozen, which costs).
        """
        if self._events or self._phase is not _TRANSMISSION or self._discard:
            return None
        buf = self._in
        data = buf.data
        pos = buf.pos
        if len(data) - pos < _REQUEST_SIZE:
            return None
        magic, flags, command, cookie, offset, length = _unpack_request(data, pos)
        if magic != _REQUEST_MAGIC:
            return None
        if command == _READ:
            if (
                not flags & self._read_invalid
                and 0 < length <= self._max_read
                and offset + length <= self._size
                and not (offset | length) & self._align
            ):
                buf.pos = pos + _REQUEST_SIZE
                return cookie, offset, length, flags, None
        elif command == _WRITE:
            start = pos + _REQUEST_SIZE
            end = start + length
            if (
                not flags & self._write_invalid
                and 0 < length <= self._max_fast_write
                and offset + length <= self._size
                and not (offset | length) & self._align
                and end <= len(data)  # the payload is in this chunk: a view, no copy
            ):
                buf.pos = end
                if self._view_of is not data:
                    self._view_of = data
                    self._view = memoryview(data)
                return cookie, offset, length, flags, self._view[start:end]
        return None

    def _next_request(self) -> Event | NeedData:
        request = self.next_io()
        if request is not None:
            cookie, offset, length, flags, payload = request
            if payload is None:
                return Read(cookie, offset, length, flags)
            return Write(cookie, offset, payload, flags)
        buf = self._in
        if self._discard and not self._skip_discard():
            return self._starved()
        if not buf.ensure(_REQUEST_SIZE):
            return self._starved()
        magic, flags, command, cookie, offset, length = _unpack_request(buf.data, buf.pos)
        if magic != _REQUEST_MAGIC:
            raise self._fail(f"bad request magic {magic:#x}")
        if command == _DISC:
            # "There is no reply to an NBD_CMD_DISC"; "A client MUST NOT send anything to
            # the server after sending an NBD_CMD_DISC command."
            buf.consume(_REQUEST_SIZE)
            self._close(CloseReason.DISCONNECT)
            return Disconnect()
        # Everything next_io() did not take: other commands, a header or payload split
        # across received chunks (joined here), and requests to refuse.
        return self._other_request(command, flags, cookie, offset, length)

    def _write(
        self, cookie: int, offset: int, length: int, flags: int
    ) -> Write | Closed | NeedData:
        """A valid WRITE: wait for its whole payload, then return it as a view."""
        buf = self._in
        if not buf.ensure(_REQUEST_SIZE + length):
            return self._starved()
        buf.consume(_REQUEST_SIZE)
        return Write(cookie, offset, buf.take_view(length), flags)

    def _other_request(
        self, command: int, flags: int, cookie: int, offset: int, length: int
    ) -> Event | NeedData:
        refusal = self._refusal(command, flags, offset, length)
        if refusal is None:
            if command == _WRITE:
                return self._write(cookie, offset, length, flags)
            self._in.consume(_REQUEST_SIZE)
            return self._request_event(command, flags, cookie, offset, length)
        if command == _WRITE:
            # The payload follows the header whatever we think of the request. Skip it as it
            # arrives (bounded memory), unless it is too big to count as anything but an
            # attack ("either the server or the client MAY initiate a hard disconnect if a
            # payload length ... would be large enough to be deemed a denial of service").
            if length > self._discard_limit:
                raise self._fail(f"refused write with a payload of {length} bytes")
            self._discard = length
        self._in.consume(_REQUEST_SIZE)
        error, reason = refusal
        return Rejected(cookie, error, command, f"{_command_name(command)}: {reason}")

    def _request_event(
        self, command: int, flags: int, cookie: int, offset: int, length: int
    ) -> Request:
        """The event for a validated request other than WRITE."""
        match command:
            case Command.READ:
                return Read(cookie, offset, length, flags)
            case Command.FLUSH:
                return Flush(cookie)
            case Command.TRIM:
                return Trim(cookie, offset, length, flags)
            case Command.WRITE_ZEROES:
                return WriteZeroes(cookie, offset, length, flags)
            case _:
                assert command == Command.BLOCK_STATUS, command
                return BlockStatus(cookie, offset, length, flags)

    def _refusal(
        self, command: int, flags: int, offset: int, length: int
    ) -> tuple[ErrorCode, str] | None:
        """Why the protocol layer refuses a request (error, reason), or None if it is valid."""
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        if command >= _COMMANDS:
            return ErrorCode.EINVAL, "unknown command"
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command flag. It also
        # SHOULD return NBD_EINVAL if it receives a request with a flag not explicitly
        # documented as applicable to the given request."
        invalid = flags & ~self._allowed_flags[command]
        if invalid:
            return ErrorCode.EINVAL, f"flags {invalid:#x} not valid here"
        unavailable = self._unavailable[command]
        if unavailable is not None:
            return unavailable
        if command == _FLUSH:
            # "For a flush request, length and offset are reserved, and MUST be set to
            # all-zero."
            if offset or length:
                return ErrorCode.EINVAL, "offset and length must be zero"
            return None
        if not length:
            return ErrorCode.EINVAL, "zero length"
        if command == _READ and length > self._max_read:
            # Structured: "permitted to reject large read requests up front with
            # NBD_EOVERFLOW"; simple: "the client MUST NOT request a length larger than the
            # maximum payload size".
            error = ErrorCode.EOVERFLOW if self._structured else ErrorCode.EINVAL
            return error, f"length {length} exceeds the maximum payload {self._max_read}"
        if command == _WRITE and length > self._max_payload:
            # EINVAL, not EOVERFLOW: "The server SHOULD NOT return NBD_EOVERFLOW except ...
            # when a command without payload requests a length larger than an advertised
            # maximum payload length."
            return ErrorCode.EINVAL, f"length {length} exceeds the maximum payload"
        if (offset | length) & self._align:
            # "It SHOULD return NBD_EINVAL if ... a read or write request is not aligned to
            # advertised minimum block sizes."
            return ErrorCode.EINVAL, f"not aligned to {self._align + 1} bytes"
        if offset + length > self._size:
            # "The server SHOULD return NBD_ENOSPC if it receives a write request including
            # one or more sectors beyond the size of the device" (and for write zeroes);
            # "NBD_EINVAL if it receives a read or trim request" (and block status) beyond it.
            if command in (_WRITE, _WRITE_ZEROES):
                return ErrorCode.ENOSPC, "beyond the end of the export"
            return ErrorCode.EINVAL, "beyond the end of the export"
        return None

    # Replies -----------------------------------------------------------------------------

    #: ``reply_ok(cookie)``: success for any request but READ and BLOCK_STATUS, a simple
    #: reply (one C call: it answers every write).
    # "If structured replies have been negotiated, a simple reply MAY be used as a reply
    # to any request other than NBD_CMD_READ, but only if the reply has no data payload."
    reply_ok: Final = staticmethod(simple_ok)

    def reply_error(self, cookie: int, error: int, message: str = "") -> bytes:
        """An error reply: NBD_REPLY_TYPE_ERROR when structured replies are on, else simple.

        ``error`` must be a nonzero NBD error value (see :func:`~blockd.nbd.errors.
        errno_to_nbd`); ``message`` is shown to the client's user (structured only).
        """
        if not error:
            raise ValueError("an error reply needs a nonzero error")
        if self._structured:
            # "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an early
            # NBD_EINVAL due to bad flags)"; errors SHOULD be structured then.
            text = message.encode()
            if len(text) > MAX_STRING:
                text = text[:MAX_STRING].decode(errors="ignore").encode()
            return error_chunk(cookie, error, text)
        return simple_reply(cookie, error)

    def reply_read_header(self, cookie: int, offset: int, length: int) -> bytes:
        """What precedes ``length`` bytes of READ data: a simple reply, or one final
        NBD_REPLY_TYPE_OFFSET_DATA chunk header when structured replies are on."""
        if self._structured:
            return final_data_header(cookie, length + 8, offset)
        return simple_reply(cookie)

    def reply_read_hole(self, cookie: int, offset: int, length: int) -> bytes:
        """A whole READ answered as zeroes (one final NBD_REPLY_TYPE_OFFSET_HOLE chunk).

        RuntimeError without structured replies (then send zeroes as data).
        """
        if not self._structured:
            raise RuntimeError("holes need structured replies")
        return offset_hole_chunk(cookie, offset, length)

    def reply_block_status(self, cookie: int, extents: Sequence[tuple[int, int]]) -> bytes:
        """The reply to a BLOCK_STATUS: ``(length, flags)`` extents of ``base:allocation``.

        RuntimeError if no context was negotiated; ValueError for no extents or an extent
        length outside 1..2^32-1. With REQ_ONE the caller passes exactly one extent.
        """
        if self._context_id is None:
            raise RuntimeError("no metadata context was negotiated")
        return block_status_chunk(cookie, self._context_id, extents)
