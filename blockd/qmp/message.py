"""The QMP wire format: a JSON stream parser that frames messages, and the reply encoder.

QMP input has no framing. A message ends when its braces and brackets balance (a top-level
scalar ends with its token), several messages may arrive in one read and one message may be
split anywhere. :class:`JsonStreamParser` turns such a byte stream into a list of parsed values
and parse errors, behaving like QEMU 7.2's JSON lexer, streamer and parser, error texts
included.

Theory of operation. Three stages handle each token once, as it completes (input is never
rescanned, except that a token cut by the end of a feed is matched once more, byte by byte):

1. The *lexer* cuts the stream into tokens: ``{ } [ ] , :``, strings (double or single
   quoted, with ``\\'`` as an extra escape), integers, floats and ``[a-z]+`` keywords.
   Complete tokens are matched in bulk by one regular expression; a token that straddles the
   end of the input is kept as partial text together with the lexer state, and finished by
   the per-state rules on the next feed. A byte that cannot continue or start a token (a
   control character other than whitespace, ``0xFE``/``0xFF``, an upper-case letter...) is a
   lexical error. After one the lexer is in *recovery*: it skips input up to the next
   structural character or control character (newline included), so a client resynchronises
   by sending e.g. ``\\x01`` or ``0xFF``.
2. The *streamer* counts braces and brackets. A lexical error discards the pending message
   and reports ``JSON parse error, stray '<token text>'``. Otherwise, once the counts are
   back to zero (or one goes negative), the message is finished and reported. It also
   enforces the limits: total token bytes per message (the partial token included, so memory
   stays bounded), tokens per message and nesting depth.
3. The *builder* turns the tokens of the current message into Python values as they arrive
   (iteratively, so 1024 levels of nesting cost no recursion). Like QEMU's recursive-descent
   parser it keeps the first error it meets and reports it when the streamer finishes the
   message, so later garbage in the same message does not change the reply.

One deliberate difference from QEMU: after a limit error QEMU feeds the tail of the
oversized message to the parser as fresh input, which yields a cascade of further errors
(one per excess closing bracket, say). This parser instead discards tokens until the
oversized message's brackets balance, and reports exactly one error.

Values map to Python as in QEMU: integers that fit int64 or uint64 become ``int``, other
integers and numbers with a fraction or exponent become ``float``; ``true``/``false``/``null``
become ``True``/``False``/``None``; objects are ``dict`` and arrays ``list``.

:func:`encode` writes one reply: a single line of ASCII JSON (non-ASCII and control
characters as upper-case ``\\uXXXX``, like QEMU's output), with ``", "`` and ``": "`` as
separators, terminated by CRLF.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["JsonStreamParser", "ParseError", "ParsedValue", "encode"]


@dataclass(frozen=True, slots=True)
class ParsedValue:
    """One complete JSON value from the stream (not necessarily an object)."""

    value: object


@dataclass(frozen=True, slots=True)
class ParseError:
    """Input that could not be parsed; ``desc`` is QEMU's text for it."""

    desc: str


# --------------------------------------------------------------------------------------------
# Tokens and lexer states
# --------------------------------------------------------------------------------------------

# Token kinds. Structural tokens use their own byte value as kind.
_STRING: Final = 1
_INTEGER: Final = 2
_FLOAT: Final = 3
_KEYWORD: Final = 4
_ERROR: Final = 5
_LCURLY: Final = ord("{")
_RCURLY: Final = ord("}")
_LSQUARE: Final = ord("[")
_RSQUARE: Final = ord("]")
_COMMA: Final = ord(",")
_COLON: Final = ord(":")
_STRUCTURAL: Final = frozenset(b"{}[],:")

# Lexer states.
_START: Final = 0
_RECOVERY: Final = 1
_DQ: Final = 2  # inside a double-quoted string
_DQ_ESC: Final = 3  # after a backslash in a double-quoted string
_SQ: Final = 4
_SQ_ESC: Final = 5
_ZERO: Final = 6  # "0" or "-0"
_SIGN: Final = 7  # "-"
_DIGITS: Final = 8  # integer part, not starting with 0
_MANT: Final = 9  # after "."
_MANT_DIGITS: Final = 10
_EXP_E: Final = 11  # after "e" / "E"
_EXP_SIGN: Final = 12  # after "e+" / "e-"
_EXP_DIGITS: Final = 13
_KW: Final = 14  # keyword letters

# Transition codes besides states: end the token without consuming the byte, or reject it.
_TERM: Final = 254
_ERR: Final = 255

# The kind of token a state produces when the next byte ends it.
_TERM_KIND: Final[Mapping[int, int]] = {
    _ZERO: _INTEGER,
    _DIGITS: _INTEGER,
    _MANT_DIGITS: _FLOAT,
    _EXP_DIGITS: _FLOAT,
    _KW: _KEYWORD,
}


def _table(default: int, *rules: tuple[bytes, int]) -> bytes:
    """Build a byte-indexed transition table; later rules override earlier ones."""
    table = bytearray([default]) * 256
    for chars, target in rules:
        for char in chars:
            table[char] = target
    return bytes(table)


_NONZERO = b"123456789"
_DIGIT = b"0" + _NONZERO
_LOWER = bytes(range(ord("a"), ord("z") + 1))

# Number and keyword states, one byte at a time (used only for tokens split across feeds).
_STEP: Final[Mapping[int, bytes]] = {
    _ZERO: _table(_TERM, (_DIGIT, _ERR), (b".", _MANT)),
    _SIGN: _table(_ERR, (b"0", _ZERO), (_NONZERO, _DIGITS)),
    _DIGITS: _table(_TERM, (_DIGIT, _DIGITS), (b"eE", _EXP_E), (b".", _MANT)),
    _MANT: _table(_ERR, (_DIGIT, _MANT_DIGITS)),
    _MANT_DIGITS: _table(_TERM, (_DIGIT, _MANT_DIGITS), (b"eE", _EXP_E)),
    _EXP_E: _table(_ERR, (b"+-", _EXP_SIGN), (_DIGIT, _EXP_DIGITS)),
    _EXP_SIGN: _table(_ERR, (_DIGIT, _EXP_DIGITS)),
    _EXP_DIGITS: _table(_TERM, (_DIGIT, _EXP_DIGITS)),
    _KW: _table(_TERM, (_LOWER, _KW)),
}
# The first byte of a non-structural token (whitespace is skipped before this is consulted).
_START_STEP: Final = _table(
    _ERR,
    (b'"', _DQ),
    (b"'", _SQ),
    (b"0", _ZERO),
    (_NONZERO, _DIGITS),
    (b"-", _SIGN),
    (_LOWER, _KW),
)

# Bytes allowed unescaped in a string: 0x20..0xFD except the quote and the backslash.
_DQ_CHAR = rb'[^"\\\x00-\x1f\xfe\xff]'
_SQ_CHAR = rb"[^'\\\x00-\x1f\xfe\xff]"
_ESCAPE_PAIR = rb"\\[\x20-\xfd]"

# One complete token after optional whitespace, exactly as the lexer states would cut it (so
# no exponent right after a bare "0": QEMU lexes "0e1" as 0, then the keyword "e"). Numbers
# and keywords need the byte that ends them; the lookahead for numbers is stricter than the
# lexer (it refuses any of "0-9.eE"), which only sends rare input such as "0e1" or "1e5e" down
# the byte-at-a-time path.
_TOKEN_RE: Final = re.compile(
    rb"[ \t\r\n]*(?:"
    rb'(?P<d>"' + _DQ_CHAR + rb"*(?:" + _ESCAPE_PAIR + _DQ_CHAR + rb'*)*")'
    rb"|(?P<s>'" + _SQ_CHAR + rb"*(?:" + _ESCAPE_PAIR + _SQ_CHAR + rb"*)*')"
    rb"|(?P<n>-?(?:0(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?)?"
    rb"|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?))(?=[^0-9.eE])"
    rb"|(?P<k>[a-z]+)(?=[^a-z])"
    rb"|(?P<p>[{}\[\],:])"
    rb")"
)
_WS_RUN: Final = re.compile(rb"[ \t\r\n]*")
_DQ_RUN: Final = re.compile(_DQ_CHAR + rb"*")
_SQ_RUN: Final = re.compile(_SQ_CHAR + rb"*")
# Recovery skips everything but structural characters, control characters other than TAB,
# and 0xFE/0xFF.
_RECOVERY_RUN: Final = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]*")


def _run_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    """Where a run of ``pattern`` (which matches the empty string) starting at ``pos`` ends."""
    match = pattern.match(data, pos)
    return pos if match is None else match.end()


# --------------------------------------------------------------------------------------------
# Token values
# --------------------------------------------------------------------------------------------


class _SyntaxError(Exception):
    """A parse error detail, reported as ``JSON parse error, <detail>``."""


_INT64_MIN: Final = -(1 << 63)
_UINT64_MAX: Final = (1 << 64) - 1
_SIMPLE_ESCAPES: Final[Mapping[int, str]] = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX4: Final = re.compile(rb"[0-9A-Fa-f]{4}")
# Unicode's 66 noncharacters, which QEMU refuses in input.
_NONCHARACTER: Final = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)


def _valid_codepoint(cp: int) -> bool:
    """Whether QEMU accepts ``cp`` in a string: no surrogates, no noncharacters."""
    return (
        0 <= cp <= 0x10FFFF
        and not 0xD800 <= cp <= 0xDFFF
        and not 0xFDD0 <= cp <= 0xFDEF
        and cp & 0xFFFE != 0xFFFE
    )


def _decode_raw(raw: bytes) -> str:
    """Decode unescaped string bytes as QEMU's modified UTF-8 (``C0 80`` is U+0000)."""
    if raw.isascii():
        return raw.decode("ascii")
    if b"\xc0\x80" in raw:
        raw = raw.replace(b"\xc0\x80", b"\x00")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _SyntaxError("invalid UTF-8 sequence in string") from None
    if _NONCHARACTER.search(text):
        raise _SyntaxError("invalid UTF-8 sequence in string")
    return text


def _hex4(token: bytes, pos: int) -> int:
    """The value of four hex digits at ``pos``, or -1 if there are not four."""
    match = _HEX4.match(token, pos)
    return -1 if match is None else int(match.group(), 16)


def _decode_string(token: bytes) -> str:
    """Decode a string token (quotes included), reporting the leftmost error like QEMU."""
    body_end = len(token) - 1
    pos = 1
    backslash = token.find(b"\\", pos, body_end)
    if backslash < 0:
        return _decode_raw(token[pos:body_end])
    parts: list[str] = []
    while backslash >= 0:
        parts.append(_decode_raw(token[pos:backslash]))
        code = token[backslash + 1]
        simple = _SIMPLE_ESCAPES.get(code)
        if simple is not None:
            parts.append(simple)
            pos = backslash + 2
        elif code == ord("u"):
            pos = backslash + 2
            cp = _hex4(token, pos)
            pos += 4
            if 0xD800 <= cp <= 0xDBFF and token[pos : pos + 2] == b"\\u":
                trailing = _hex4(token, pos + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp = 0x10000 + ((cp & 0x3FF) << 10 | trailing & 0x3FF)
                    pos += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                shown = _text_of(token[backslash : min(pos, len(token))])
                raise _SyntaxError(f"{shown} is not a valid Unicode character")
            parts.append(chr(cp))
        else:
            raise _SyntaxError("invalid escape sequence in string")
        backslash = token.find(b"\\", pos, body_end)
    parts.append(_decode_raw(token[pos:body_end]))
    return "".join(parts)


class SourceFloat(float):
    """A number too large for a double (``1e999``), with the text the client wrote.

    It compares and computes as the infinity it rounds to, but is written back as
    the client spelt it: an echoed ``id`` stays valid JSON (QEMU prints ``inf``,
    which JSON parsers reject).
    """

    text: str

    def __new__(cls, text: str) -> SourceFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


def _number(text: bytes) -> float:
    number = float(text)
    return number if math.isfinite(number) else SourceFloat(text.decode("ascii"))


def _literal(kind: int, text: bytes) -> object:
    """The value of a string, number or keyword token."""
    if kind == _STRING:
        return _decode_string(text)
    if kind == _INTEGER:
        # At most 20 digits (plus sign) can fit; longer ones go straight to float, which also
        # keeps int() clear of Python's digit limit.
        if len(text) <= 21:
            number = int(text)
            if _INT64_MIN <= number <= _UINT64_MAX:
                return number
        return _number(text)
    if kind == _FLOAT:
        return _number(text)
    if text == b"true":
        return True
    if text == b"false":
        return False
    if text == b"null":
        return None
    raise _SyntaxError(f"invalid keyword '{text.decode('ascii')}'")


def _text_of(raw: bytes) -> str:
    """Token bytes as QEMU shows them in an error: up to a NUL, bad UTF-8 as U+FFFD."""
    raw = raw.split(b"\x00", 1)[0].replace(b"\xc0\x80", b"\x00")
    return raw.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Builder: tokens of one message -> value
# --------------------------------------------------------------------------------------------

# What an open container waits for next. A child container opened in a _W_KEY, _W_VALUE or
# _W_ELEMENT slot reports its value back to that slot when it closes.
_W_KEY_OR_CLOSE: Final = 0  # after "{"
_W_KEY: Final = 1  # a key: any value, which must turn out to be a string
_W_COLON: Final = 2
_W_VALUE: Final = 3  # a member's value
_W_OBJECT_SEP: Final = 4  # "," or "}"
_W_ELEMENT_OR_CLOSE: Final = 5  # after "["
_W_ELEMENT: Final = 6
_W_ARRAY_SEP: Final = 7  # "," or "]"


class _Frame:
    """An open object or array, the key whose value is pending, and what it waits for."""

    __slots__ = ("container", "key", "state")

    def __init__(self, container: dict[str, object] | list[object], state: int) -> None:
        self.container = container
        self.key = ""
        self.state = state


class _Builder:
    """Builds the value of one message token by token; the first error wins."""

    __slots__ = ("_done", "_error", "_stack", "_value")

    def __init__(self) -> None:
        self._stack: list[_Frame] = []
        self._error: str | None = None
        self._done = False
        self._value: object = None

    def push(self, kind: int, text: bytes) -> None:
        """Take the next token of the message."""
        if self._error is not None or self._done:
            return
        try:
            self._push(kind, text)
        except _SyntaxError as err:
            self._error = str(err)

    def result(self) -> ParsedValue | ParseError:
        """The message's value or first error (``premature EOI`` if it is unfinished)."""
        if self._error is not None:
            return ParseError(f"JSON parse error, {self._error}")
        if not self._done:
            return ParseError("JSON parse error, premature EOI")
        return ParsedValue(self._value)

    def _push(self, kind: int, text: bytes) -> None:
        stack = self._stack
        frame = stack[-1] if stack else None
        state = _W_VALUE if frame is None else frame.state
        if state in (_W_KEY_OR_CLOSE, _W_ELEMENT_OR_CLOSE):
            assert frame is not None
            if kind == (_RCURLY if state == _W_KEY_OR_CLOSE else _RSQUARE):
                stack.pop()
                self._complete(frame.container)
                return
            state = frame.state = _W_KEY if state == _W_KEY_OR_CLOSE else _W_ELEMENT
        if state in (_W_KEY, _W_VALUE, _W_ELEMENT):
            if kind == _LCURLY:
                stack.append(_Frame({}, _W_KEY_OR_CLOSE))
            elif kind == _LSQUARE:
                stack.append(_Frame([], _W_ELEMENT_OR_CLOSE))
            elif kind in (_STRING, _INTEGER, _FLOAT, _KEYWORD):
                self._complete(_literal(kind, text))
            else:
                raise _SyntaxError("expecting value")
            return
        assert frame is not None
        if state == _W_COLON:
            if kind != _COLON:
                raise _SyntaxError("missing : in object pair")
            frame.state = _W_VALUE
        elif state == _W_OBJECT_SEP:
            if kind == _RCURLY:
                stack.pop()
                self._complete(frame.container)
            elif kind == _COMMA:
                frame.state = _W_KEY
            else:
                raise _SyntaxError("expected separator in dict")
        else:  # _W_ARRAY_SEP
            if kind == _RSQUARE:
                stack.pop()
                self._complete(frame.container)
            elif kind == _COMMA:
                frame.state = _W_ELEMENT
            else:
                raise _SyntaxError("expected separator in list")

    def _complete(self, value: object) -> None:
        """Hand a finished value to the slot that waits for it."""
        if not self._stack:
            self._done = True
            self._value = value
            return
        frame = self._stack[-1]
        container = frame.container
        if frame.state == _W_KEY:
            if not isinstance(value, str):
                raise _SyntaxError("key is not a string in object")
            frame.key = value
            frame.state = _W_COLON
        elif frame.state == _W_VALUE:
            assert isinstance(container, dict)
            # QEMU would say "Missing value in dict" for a member without a value, but the
            # inner error ("expecting value", ...) is always set first, and the first wins.
            if frame.key in container:
                raise _SyntaxError("duplicate key")
            container[frame.key] = value
            frame.state = _W_OBJECT_SEP
        else:  # _W_ELEMENT
            assert isinstance(container, list)
            container.append(value)
            frame.state = _W_ARRAY_SEP


# --------------------------------------------------------------------------------------------
# The stream parser: lexer + streamer
# --------------------------------------------------------------------------------------------


class JsonStreamParser:
    """Frames and parses an unframed stream of JSON values, like QEMU's QMP input.

    Feed it bytes as they arrive; each call returns the values and errors completed by that
    input, in order. Limits (QEMU's defaults) bound one message: ``max_message_bytes`` of
    token text (whitespace between tokens is not counted, the partial token is),
    ``max_tokens`` tokens and ``max_depth`` open brackets and braces.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = 64 << 20,
        max_tokens: int = 2_000_000,
        max_depth: int = 1024,
    ) -> None:
        if max_message_bytes < 1 or max_tokens < 1 or max_depth < 1:
            raise ValueError("JSON parser limits must be positive")
        self._max_bytes = max_message_bytes
        self._max_tokens = max_tokens
        self._max_depth = max_depth
        self._out: list[ParsedValue | ParseError] = []
        # Lexer: its state and the text of a token that is not finished yet.
        self._state = _START
        self._partial = bytearray()
        # Streamer: the message being collected.
        self._braces = 0
        self._brackets = 0
        self._size = 0
        self._count = 0
        self._discarding = False
        self._builder = _Builder()

    def feed(self, data: bytes) -> list[ParsedValue | ParseError]:
        """Consume ``data``; return what it completed, in input order."""
        self._lex(data)
        if self._partial and self._size + len(self._partial) + 1 > self._max_bytes:
            # An unfinished token may not grow past the limit either.
            self._partial = bytearray()
            self._limit_error("JSON token size limit exceeded", ended=False)
        return self._take_output()

    def flush(self) -> list[ParsedValue | ParseError]:
        """End of input: finish a pending token and report an unfinished message.

        QMP never calls this (QEMU drops a connection's pending input when it closes); it
        exists for complete documents and tests. The parser is reset and can be fed again.
        """
        state = self._state
        if state in _TERM_KIND:
            self._state = _START
            self._token(_TERM_KIND[state], self._take_partial())
        elif state != _START and state != _RECOVERY:
            self._lex_error(b"")
        self._state = _START
        if self._count and not self._discarding:
            self._out.append(self._builder.result())
        self._reset_message()
        return self._take_output()

    @property
    def pending(self) -> bool:
        """Whether a message has begun and not ended (some of it was received)."""
        return bool(self._count or self._partial) or self._state not in (_START, _RECOVERY)

    @property
    def pending_bytes(self) -> int:
        """Token text held for the unfinished message (what a slow sender makes us keep)."""
        return 0 if self._discarding else self._size + len(self._partial)

    def _take_output(self) -> list[ParsedValue | ParseError]:
        out, self._out = self._out, []
        return out

    # Lexer ----------------------------------------------------------------------------------

    def _lex(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _START:
                match = _TOKEN_RE.match(data, pos)
                if match is not None:
                    pos = match.end()
                    group = match.lastgroup
                    text = match[group] if group is not None else b""
                    if group == "p":
                        kind = text[0]
                    elif group == "n":
                        kind = _INTEGER if text.isdigit() or text[1:].isdigit() else _FLOAT
                    else:
                        kind = _KEYWORD if group == "k" else _STRING
                    self._token(kind, text)
                    continue
                pos = _run_end(_WS_RUN, data, pos)
                if pos < end:
                    pos = self._lex_start(data, pos)
            elif state == _RECOVERY:
                pos = _run_end(_RECOVERY_RUN, data, pos)
                if pos < end:
                    self._state = _START  # the stopping byte is lexed again from START
            elif state in (_DQ, _SQ):
                pos = self._lex_string(data, pos, state)
            elif state in (_DQ_ESC, _SQ_ESC):
                if 0x20 <= data[pos] <= 0xFD:
                    self._keep(data[pos : pos + 1])
                    self._state = _DQ if state == _DQ_ESC else _SQ
                else:
                    self._lex_error(data[pos : pos + 1])
                pos += 1
            else:
                pos = self._lex_number(data, pos, state)

    def _lex_start(self, data: bytes, pos: int) -> int:
        """Start a token at ``data[pos]`` (not whitespace) the byte-at-a-time way."""
        byte = data[pos]
        if byte in _STRUCTURAL:
            self._token(byte, data[pos : pos + 1])
            return pos + 1
        target = _START_STEP[byte]
        if target == _ERR:
            self._lex_error(data[pos : pos + 1])
        else:
            self._state = target
            self._keep(data[pos : pos + 1])
        return pos + 1

    def _lex_string(self, data: bytes, pos: int, state: int) -> int:
        run_end = _run_end(_DQ_RUN if state == _DQ else _SQ_RUN, data, pos)
        self._keep(data[pos:run_end])
        pos = run_end
        if pos == len(data):
            return pos
        byte = data[pos]
        if byte == (0x22 if state == _DQ else 0x27):
            self._keep(data[pos : pos + 1])
            self._state = _START
            self._token(_STRING, self._take_partial())
        elif byte == 0x5C:
            self._keep(data[pos : pos + 1])
            self._state = _DQ_ESC if state == _DQ else _SQ_ESC
        else:
            self._lex_error(data[pos : pos + 1])
        return pos + 1

    def _lex_number(self, data: bytes, pos: int, state: int) -> int:
        """Continue a number or keyword one byte at a time."""
        end = len(data)
        start = pos
        while pos < end:
            target = _STEP[state][data[pos]]
            if target == _TERM:
                self._keep(data[start:pos])
                self._state = _START
                self._token(_TERM_KIND[state], self._take_partial())
                return pos  # the byte that ended the token starts the next one
            if target == _ERR:
                self._keep(data[start:pos])
                self._lex_error(data[pos : pos + 1])
                return pos + 1
            state = target
            pos += 1
        self._keep(data[start:pos])
        self._state = state
        return pos

    def _keep(self, chunk: bytes) -> None:
        if not self._discarding:
            self._partial += chunk

    def _take_partial(self) -> bytes:
        text = bytes(self._partial)
        self._partial = bytearray()
        return text

    def _lex_error(self, bad: bytes) -> None:
        """Reject the partial token plus ``bad`` and enter recovery."""
        self._state = _RECOVERY
        self._token(_ERROR, self._take_partial() + bad)

    # Streamer -------------------------------------------------------------------------------

    def _token(self, kind: int, text: bytes) -> None:
        if kind == _ERROR:
            self._reset_message()
            self._out.append(ParseError(f"JSON parse error, stray '{_text_of(text)}'"))
            return
        if kind == _LCURLY:
            self._braces += 1
        elif kind == _RCURLY:
            self._braces -= 1
        elif kind == _LSQUARE:
            self._brackets += 1
        elif kind == _RSQUARE:
            self._brackets -= 1
        braces, brackets = self._braces, self._brackets
        ended = braces < 0 or brackets < 0 or (braces == 0 and brackets == 0)
        if self._discarding:
            if ended:
                self._reset_message()
            return
        if self._size + len(text) + 1 > self._max_bytes:
            self._limit_error("JSON token size limit exceeded", ended)
        elif self._count + 1 > self._max_tokens:
            self._limit_error("JSON token count limit exceeded", ended)
        elif braces + brackets > self._max_depth:
            self._limit_error("JSON nesting depth limit exceeded", ended)
        else:
            self._size += len(text)
            self._count += 1
            self._builder.push(kind, text)
            if ended:
                self._out.append(self._builder.result())
                self._reset_message()

    def _limit_error(self, desc: str, ended: bool) -> None:
        """Report a limit violation; skip the rest of the message unless it just ended."""
        self._out.append(ParseError(desc))
        braces, brackets = self._braces, self._brackets
        self._reset_message()
        if not ended:
            self._braces, self._brackets = braces, brackets
            self._discarding = True

    def _reset_message(self) -> None:
        self._braces = self._brackets = 0
        self._size = self._count = 0
        self._discarding = False
        self._builder = _Builder()


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------

_NEEDS_ESCAPE: Final = re.compile('[\x00-\x1f"\\\\\x7f-\U0010ffff]')
_SHORT_ESCAPES: Final[Mapping[str, str]] = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    cp = ord(char)
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def _quote(text: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def _float_text(number: float) -> str:
    if math.isfinite(number):
        return repr(number)
    if isinstance(number, SourceFloat):
        return number.text  # an echoed id, as the client wrote it: valid JSON
    # What QEMU's "%.17g" prints; not JSON, and nothing blockd makes can hold it.
    return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")


class _Raw(str):
    """Output text that is already encoded (punctuation, keys)."""

    __slots__ = ()


_OPEN_OBJECT: Final = _Raw("{")
_CLOSE_OBJECT: Final = _Raw("}")
_OPEN_ARRAY: Final = _Raw("[")
_CLOSE_ARRAY: Final = _Raw("]")
_SEPARATOR: Final = _Raw(", ")


def encode(message: Mapping[str, object]) -> bytes:
    """Encode one QMP message: a line of ASCII JSON ending in CRLF.

    Accepts mappings with string keys, lists and tuples, strings, ints, floats, bools and
    None, nested to any depth. Raises TypeError for anything else.
    """
    if not isinstance(message, Mapping):
        raise TypeError(f"a QMP message must be a mapping, not {type(message).__name__}")
    out: list[str] = []
    todo: list[object] = [message]  # a stack: the next item to write is at the end
    while todo:
        item = todo.pop()
        if type(item) is _Raw:
            out.append(item)
        elif isinstance(item, str):
            out.append(_quote(item))
        elif item is None:
            out.append("null")
        elif item is True:
            out.append("true")
        elif item is False:
            out.append("false")
        elif isinstance(item, int):
            out.append(str(int(item)))
        elif isinstance(item, float):
            out.append(_float_text(item))
        elif isinstance(item, Mapping):
            out.append(_OPEN_OBJECT)
            todo.append(_CLOSE_OBJECT)
            members = list(item.items())
            for index in range(len(members) - 1, -1, -1):
                key, value = members[index]
                if not isinstance(key, str):
                    raise TypeError(f"QMP object keys must be strings, not {key!r}")
                todo.append(value)
                todo.append(_Raw(_quote(key) + ": "))
                if index:
                    todo.append(_SEPARATOR)
        elif isinstance(item, list | tuple):
            out.append(_OPEN_ARRAY)
            todo.append(_CLOSE_ARRAY)
            for index in range(len(item) - 1, -1, -1):
                todo.append(item[index])
                if index:
                    todo.append(_SEPARATOR)
        else:
            raise TypeError(f"cannot encode {type(item).__name__} as JSON")
    out.append("\r\n")
    return "".join(out).encode("ascii")
