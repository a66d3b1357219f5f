"""The numbers of the NBD protocol (NetworkBlockDevice/nbd ``doc/proto.md``).

Each enum gathers one family of the specification's constants; the spec's name is the enum
name plus the member, e.g. ``NBD_OPT_GO`` is :attr:`Option.GO`, ``NBD_REP_ERR_UNSUP`` is
:attr:`OptionReply.ERR_UNSUP`, ``NBD_CMD_FLAG_FUA`` is :attr:`CommandFlag.FUA` and the error
value ``NBD_EINVAL`` is :attr:`ErrorCode.EINVAL`. All are ``int`` subclasses, so they pack
straight into ``struct`` layouts. Values reserved for experimental extensions (extended
headers, resize) are listed so they can be recognised, not because blockd implements them.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "BASE_ALLOCATION",
    "DOS_PAYLOAD_LIMIT",
    "MAX_STRING",
    "ClientFlag",
    "Command",
    "CommandFlag",
    "ErrorCode",
    "HandshakeFlag",
    "Info",
    "Magic",
    "Option",
    "OptionReply",
    "ReplyFlag",
    "ReplyType",
    "StateFlag",
    "TransmissionFlag",
]


class Magic(enum.IntEnum):
    """Magic numbers framing the handshake, options, requests and replies."""

    NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", the INIT_PASSWD
    IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option
    OPTION_REPLY = 0x3E889045565A9
    REQUEST = 0x25609513
    SIMPLE_REPLY = 0x67446698
    STRUCTURED_REPLY = 0x668E33EF
    EXTENDED_REQUEST = 0x21E41C71  # experimental EXTENDED_HEADERS
    EXTENDED_REPLY = 0x6E8A278C  # experimental EXTENDED_HEADERS


class HandshakeFlag(enum.IntFlag):
    """The server's 16 handshake flags (``NBD_FLAG_*``)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """The client's 32 flags (``NBD_FLAG_C_*``)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """The 16 transmission flags sent with the export's size (``NBD_FLAG_*``)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9  # experimental RESIZE
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12  # experimental EXTENDED_HEADERS


class Option(enum.IntEnum):
    """Option types sent during option haggling (``NBD_OPT_*``)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  # experimental


_ERR: Final = 1 << 31


class OptionReply(enum.IntEnum):
    """Option reply types (``NBD_REP_*``); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9
    ERR_EXT_HEADER_REQD = _ERR + 10  # experimental


class Info(enum.IntEnum):
    """Information types of ``NBD_REP_INFO`` replies and requests (``NBD_INFO_*``)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Request types of the transmission phase (``NBD_CMD_*``)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  # experimental


class CommandFlag(enum.IntFlag):
    """Command flags of a request (``NBD_CMD_FLAG_*``)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # experimental EXTENDED_HEADERS


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags (``NBD_REPLY_FLAG_*``)."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types (``NBD_REPLY_TYPE_*``); error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6  # experimental
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class ErrorCode(enum.IntEnum):
    """The only error values allowed on the wire (``NBD_E*``), numbered like Linux errno."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(enum.IntFlag):
    """Extent flags of the ``base:allocation`` metadata context (``NBD_STATE_*``)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


#: The one metadata context the specification defines.
BASE_ALLOCATION: Final = "base:allocation"
#: Strings (export names, descriptions, context names, messages) "MUST be no longer than 4096
#: bytes".
MAX_STRING: Final = 4096
#: "any payload not exceeding 2^25 (33,554,432) bytes SHOULD NOT be considered a denial of
#: service attack, even if that length is larger than the advertised maximum payload size."
DOS_PAYLOAD_LIMIT: Final = 1 << 25
