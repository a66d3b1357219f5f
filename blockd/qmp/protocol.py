"""One QMP session, sans-IO: bytes in, actions out; replies and events as bytes.

Theory of operation. A session starts in :attr:`Phase.NEGOTIATION`. The server sends
:meth:`QmpSession.greeting` and then hands every chunk of input to
:meth:`QmpSession.receive_data`, which frames it into JSON values and returns one action per
value, in input order:

* :class:`Send` carries a reply the session made itself: every parse error, every envelope
  error, unknown commands, and ``qmp_capabilities`` in full (it validates its arguments,
  enables the capabilities and moves the session to :attr:`Phase.COMMAND`; a second one is
  refused). In NEGOTIATION every other command is refused with QEMU's CommandNotFound text
  "Expecting capabilities negotiation with 'qmp_capabilities'".
* :class:`Execute` is a command the dispatcher must run (only in COMMAND phase). The
  dispatcher validates its arguments, and answers with :meth:`QmpSession.reply` or
  :meth:`QmpSession.error`.

Without out-of-band execution QEMU answers requests strictly in order, so the server must
write a Send only after the replies to the Execute actions before it. Events
(:meth:`QmpSession.event`) go only to negotiated sessions; before that they are dropped.

A request is checked in QEMU's order: parse -> is it an object -> envelope members (in input
order: ``execute`` and, when OOB is enabled, ``exec-oob`` must be strings and not both;
``arguments`` an object; ``id`` anything; nothing else) -> ``execute`` present -> command
known -> OOB allowed -> arguments. Only parse errors and non-object input lose the ``id``.

The only phase change is NEGOTIATION -> COMMAND, made in :meth:`QmpSession._enter`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from blockd.qmp.message import JsonStreamParser, ParseError, encode
from blockd.qmp.schema import SchemaError, validate

__all__ = [
    "KNOWN_CAPABILITIES",
    "QMP_CAPABILITIES",
    "Action",
    "Execute",
    "Phase",
    "QmpSession",
    "Send",
]


class Phase(enum.Enum):
    """Where a session is in its life."""

    NEGOTIATION = "negotiation"
    COMMAND = "command"


_TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = {
    Phase.NEGOTIATION: frozenset({Phase.COMMAND}),
    Phase.COMMAND: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Execute:
    """A command the dispatcher must run (COMMAND phase only).

    ``id`` is the request's id, any JSON value; ``has_id`` says whether there was one at all,
    since an id may be ``null``.
    """

    name: str
    arguments: dict[str, object]
    id: object
    has_id: bool


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write now: a reply the session produced itself."""

    data: bytes


Action = Execute | Send

QMP_CAPABILITIES: Final = "qmp_capabilities"
# Every capability QEMU 7.2 knows (QMPCapability).
Capability = Literal["oob"]
KNOWN_CAPABILITIES: Final = get_args(Capability)


@dataclass(frozen=True, slots=True, kw_only=True)
class _CapabilitiesArgs:
    """qmp_capabilities's arguments: the capabilities to enable."""

    enable: tuple[Capability, ...] = ()


class _Refused(Exception):
    """A request the session answers with an error itself."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def _generic(desc: str) -> _Refused:
    return _Refused("GenericError", desc)


def _requested_capabilities(arguments: Mapping[str, object]) -> tuple[Capability, ...]:
    """Validate qmp_capabilities's arguments with the schema (QEMU's texts)."""
    try:
        return validate(_CapabilitiesArgs, arguments).enable
    except SchemaError as err:
        raise _generic(str(err)) from None


class QmpSession:
    """The protocol state of one QMP connection; see the module docstring."""

    def __init__(
        self,
        *,
        version: Mapping[str, object],
        is_command: Callable[[str], bool],
        capabilities: Sequence[str] = (),
        parser: JsonStreamParser | None = None,
    ) -> None:
        """``capabilities`` are offered in the greeting; raises ValueError for unknown ones."""
        for capability in capabilities:
            if capability not in KNOWN_CAPABILITIES:
                raise ValueError(f"unknown QMP capability {capability!r}")
        self._version = version
        self._is_command = is_command
        self._offered = tuple(capabilities)
        self._enabled: frozenset[str] = frozenset()
        self._parser = parser if parser is not None else JsonStreamParser()
        self._phase = Phase.NEGOTIATION

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def enabled_capabilities(self) -> frozenset[str]:
        """What the client enabled with qmp_capabilities."""
        return self._enabled

    @property
    def mid_message(self) -> bool:
        """Whether part of a message has arrived and the rest has not."""
        return self._parser.pending

    @property
    def partial_bytes(self) -> int:
        """Bytes of the unfinished message held so far."""
        return self._parser.pending_bytes

    def greeting(self) -> bytes:
        """The message to send as soon as the connection opens."""
        return encode({"QMP": {"version": self._version, "capabilities": list(self._offered)}})

    def receive_data(self, data: bytes) -> list[Action]:
        """Consume input; return one action per complete message, in input order."""
        actions: list[Action] = []
        for item in self._parser.feed(data):
            if isinstance(item, ParseError):
                actions.append(Send(self._error_message(False, None, "GenericError", item.desc)))
            else:
                actions.append(self._handle(item.value))
        return actions

    def reply(self, request: Execute, result: object) -> bytes:
        """A command's success reply."""
        message: dict[str, object] = {"return": result}
        if request.has_id:
            message["id"] = request.id
        return encode(message)

    def error(self, request: Execute | None, error_class: str, desc: str) -> bytes:
        """An error reply; with ``request`` None (or without an id) it carries no id."""
        if request is None:
            return self._error_message(False, None, error_class, desc)
        return self._error_message(request.has_id, request.id, error_class, desc)

    def event(
        self, name: str, data: Mapping[str, object] | None, seconds: int, microseconds: int
    ) -> bytes | None:
        """An event message, or None before negotiation (the event is dropped, not queued)."""
        if self._phase is not Phase.COMMAND:
            return None
        message: dict[str, object] = {
            "timestamp": {"seconds": seconds, "microseconds": microseconds},
            "event": name,
        }
        if data is not None:
            message["data"] = data
        return encode(message)

    # Requests ---------------------------------------------------------------------------------

    def _handle(self, request: object) -> Action:
        if not isinstance(request, dict):
            return Send(
                self._error_message(False, None, "GenericError", "QMP input must be a JSON object")
            )
        has_id = "id" in request
        request_id = request.get("id")
        try:
            return self._dispatch(request, has_id, request_id)
        except _Refused as refused:
            return Send(self._error_message(has_id, request_id, refused.error_class, refused.desc))

    def _dispatch(self, request: dict[str, object], has_id: bool, request_id: object) -> Action:
        name, oob = self._check_envelope(request)
        if self._phase is Phase.NEGOTIATION:
            if name != QMP_CAPABILITIES:
                raise _Refused(
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
        elif name != QMP_CAPABILITIES and not self._is_command(name):
            raise _Refused("CommandNotFound", f"The command {name} has not been found")
        if oob:
            # No command supports out-of-band execution yet.
            raise _generic(f"The command {name} does not support OOB")
        arguments = request.get("arguments", {})
        assert isinstance(arguments, dict)  # checked with the envelope
        if name == QMP_CAPABILITIES:
            return Send(self._negotiate(arguments, has_id, request_id))
        return Execute(name, arguments, request_id, has_id)

    def _check_envelope(self, request: dict[str, object]) -> tuple[str, bool]:
        """Check the members; return the command name and whether it came as exec-oob."""
        allow_oob = "oob" in self._enabled
        exec_key: str | None = None
        for key, member in request.items():
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(member, str):
                    raise _generic(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise _generic(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(member, dict):
                    raise _generic("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise _generic(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise _generic("QMP input lacks member 'execute'")
        name = request[exec_key]
        assert isinstance(name, str)
        return name, exec_key == "exec-oob"

    def _negotiate(self, arguments: dict[str, object], has_id: bool, request_id: object) -> bytes:
        """Run qmp_capabilities: arguments first, then the phase, then availability."""
        requested = _requested_capabilities(arguments)
        if self._phase is Phase.COMMAND:
            raise _Refused(
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
            )
        unavailable = [name for name in requested if name not in self._offered]
        if unavailable:
            raise _generic(f"Capability {', '.join(unavailable)} not available")
        self._enabled = frozenset(requested)
        self._enter(Phase.COMMAND)
        message: dict[str, object] = {"return": {}}
        if has_id:
            message["id"] = request_id
        return encode(message)

    def _enter(self, phase: Phase) -> None:
        """The one place the phase changes."""
        if phase not in _TRANSITIONS[self._phase]:
            raise RuntimeError(f"QMP session cannot go from {self._phase.name} to {phase.name}")
        self._phase = phase

    @staticmethod
    def _error_message(has_id: bool, request_id: object, error_class: str, desc: str) -> bytes:
        message: dict[str, object] = {}
        if has_id:
            message["id"] = request_id
        message["error"] = {"class": error_class, "desc": desc}
        return encode(message)
