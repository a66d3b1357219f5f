"""One QMP session (blockd.qmp.protocol) against the transcripts of qmp-reference.md 1.3-1.6."""

from __future__ import annotations

import json

import pytest

from blockd.qmp.message import JsonStreamParser
from blockd.qmp.protocol import Action, Execute, Phase, QmpSession, Send

VERSION = {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockd 0.1"}
COMMANDS = {"query-version", "query-block", "blockdev-del", "eject"}
NEGOTIATING = "Expecting capabilities negotiation with 'qmp_capabilities'"


def make(capabilities: tuple[str, ...] = ()) -> QmpSession:
    return QmpSession(version=VERSION, is_command=COMMANDS.__contains__, capabilities=capabilities)


def negotiated(capabilities: tuple[str, ...] = (), enable: tuple[str, ...] = ()) -> QmpSession:
    session = make(capabilities)
    request = {"execute": "qmp_capabilities", "arguments": {"enable": list(enable)}}
    assert decode(session.receive_data(json.dumps(request).encode())) == [{"return": {}}]
    assert phase(session) is Phase.COMMAND
    return session


def phase(session: QmpSession) -> Phase:
    """The session's phase (a call, so mypy does not narrow it across requests)."""
    return session.phase


def line(data: bytes) -> object:
    """Decode one server message, checking QEMU's framing: one ASCII line ending in CRLF."""
    assert data.endswith(b"\r\n")
    assert data.count(b"\n") == 1
    assert data.isascii()
    return json.loads(data)


def decode(actions: list[Action]) -> list[object]:
    """The Send actions as JSON (all actions must be Sends)."""
    out = []
    for action in actions:
        assert isinstance(action, Send), action
        out.append(line(action.data))
    return out


def exchange(session: QmpSession, request: str) -> object:
    """Send one request the session answers itself; return the decoded reply."""
    (reply,) = decode(session.receive_data(request.encode()))
    return reply


def error(desc: str, error_class: str = "GenericError", **id_: object) -> dict[str, object]:
    return {**id_, "error": {"class": error_class, "desc": desc}}


# 1.2 Greeting -----------------------------------------------------------------------------


def test_greeting() -> None:
    assert line(make(("oob",)).greeting()) == {"QMP": {"version": VERSION, "capabilities": ["oob"]}}
    assert line(make().greeting()) == {"QMP": {"version": VERSION, "capabilities": []}}


def test_unknown_capability_cannot_be_offered() -> None:
    with pytest.raises(ValueError):
        make(("bogus",))


# 1.3 Capabilities negotiation ------------------------------------------------------------------


def test_negotiation_transcript() -> None:
    session = make(("oob",))
    assert phase(session) is Phase.NEGOTIATION
    assert exchange(session, '{"execute": "query-version", "id": 1}') == error(
        NEGOTIATING, "CommandNotFound", id=1
    )
    assert exchange(session, '{"execute": "no-such-command", "id": 2}') == error(
        NEGOTIATING, "CommandNotFound", id=2
    )
    assert exchange(
        session, '{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": 3}'
    ) == error("Parameter 'null' does not accept value 'bogus'", id=3)
    assert phase(session) is Phase.NEGOTIATION
    assert exchange(
        session, '{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 4}'
    ) == {"return": {}, "id": 4}
    assert phase(session) is Phase.COMMAND
    assert session.enabled_capabilities == frozenset({"oob"})
    assert exchange(session, '{"execute": "qmp_capabilities", "id": 5}') == error(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound", id=5
    )


def test_reply_bytes_are_qemus() -> None:
    session = make()
    (action,) = session.receive_data(b'{"execute": "qmp_capabilities", "id": 4}')
    assert action == Send(b'{"return": {}, "id": 4}\r\n')
    (action,) = session.receive_data(b'{"execute": "qmp_capabilities", "id": 5}')
    assert action == Send(
        b'{"id": 5, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation'
        b' is already complete, command ignored"}}\r\n'
    )


def test_negotiation_errors_keep_envelope_texts() -> None:
    # Only CommandNotFound is rewritten before negotiation; envelope errors keep their text.
    session = make()
    assert exchange(session, '{"execute": 1, "id": 1}') == error(
        "QMP input member 'execute' must be a string", id=1
    )
    assert exchange(session, '{"exec-oob": "qmp_capabilities", "id": 2}') == error(
        "QMP input member 'exec-oob' is unexpected", id=2
    )
    assert exchange(session, '{"id": 3}') == error("QMP input lacks member 'execute'", id=3)
    assert exchange(session, "[]") == error("QMP input must be a JSON object")
    assert exchange(session, "{,}") == error("JSON parse error, expecting value")
    assert phase(session) is Phase.NEGOTIATION


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ('{"enable": "oob"}', "Invalid parameter type for 'enable', expected: array"),
        ('{"enable": null}', "Invalid parameter type for 'enable', expected: array"),
        ('{"enable": ["oob", 1]}', "Invalid parameter type for 'enable[1]', expected: string"),
        ('{"enable": ["bogus", 1]}', "Parameter 'null' does not accept value 'bogus'"),
        ('{"foo": 1}', "Parameter 'foo' is unexpected"),
        ('{"enable": [], "foo": 1}', "Parameter 'foo' is unexpected"),
        ('{"foo": 1, "enable": 7}', "Invalid parameter type for 'enable', expected: array"),
        ('{"enable": ["oob"]}', "Capability oob not available"),
        ('{"enable": ["oob", "oob"]}', "Capability oob, oob not available"),
    ],
)
def test_qmp_capabilities_argument_errors(arguments: str, desc: str) -> None:
    session = make()  # blockd offers no capabilities
    request = f'{{"execute": "qmp_capabilities", "arguments": {arguments}, "id": "c"}}'
    assert exchange(session, request) == error(desc, id="c")
    assert phase(session) is Phase.NEGOTIATION
    assert exchange(session, '{"execute": "qmp_capabilities"}') == {"return": {}}
    assert phase(session) is Phase.COMMAND
    assert session.enabled_capabilities == frozenset()


def test_second_qmp_capabilities_checks_arguments_first() -> None:
    session = negotiated()
    assert exchange(
        session, '{"execute": "qmp_capabilities", "arguments": {"x": 1}, "id": 6}'
    ) == error("Parameter 'x' is unexpected", id=6)
    assert exchange(
        session, '{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 7}'
    ) == error(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound", id=7
    )


def test_commands_run_only_after_negotiation() -> None:
    session = make()
    actions = session.receive_data(
        b'{"execute": "query-version", "id": 1}'
        b'{"execute": "qmp_capabilities", "id": 2}'
        b'{"execute": "query-version", "id": 3}'
    )
    assert len(actions) == 3
    assert decode(actions[:2]) == [
        error(NEGOTIATING, "CommandNotFound", id=1),
        {"return": {}, "id": 2},
    ]
    assert actions[2] == Execute("query-version", {}, 3, True)


# 1.4 Request envelope ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_text", "reply"),
    [
        ('{"execute": 1, "id": 1}', error("QMP input member 'execute' must be a string", id=1)),
        ('{"execute": null, "id": 2}', error("QMP input member 'execute' must be a string", id=2)),
        (
            '{"execute": "query-version", "arguments": [], "id": 17}',
            error("QMP input member 'arguments' must be an object", id=17),
        ),
        (
            '{"execute": "query-version", "arguments": null, "id": 18}',
            error("QMP input member 'arguments' must be an object", id=18),
        ),
        (
            '{"execute": "query-version", "foo": 1, "id": 19}',
            error("QMP input member 'foo' is unexpected", id=19),
        ),
        (
            '{"exec-oob": "query-version", "id": 25}',
            error("QMP input member 'exec-oob' is unexpected", id=25),
        ),
        ('{"arguments": {}, "id": 20}', error("QMP input lacks member 'execute'", id=20)),
        ("{}", error("QMP input lacks member 'execute'")),
        (
            '{"execute": "foo", "id": 21}',
            error("The command foo has not been found", "CommandNotFound", id=21),
        ),
        # Members are checked in input order.
        (
            '{"foo": 1, "execute": 2, "id": 22}',
            error("QMP input member 'foo' is unexpected", id=22),
        ),
        (
            '{"execute": 2, "foo": 1, "id": 23}',
            error("QMP input member 'execute' must be a string", id=23),
        ),
        # An envelope error wins over an unknown command.
        (
            '{"execute": "foo", "arguments": 1, "id": 24}',
            error("QMP input member 'arguments' must be an object", id=24),
        ),
    ],
)
def test_envelope_errors(request_text: str, reply: object) -> None:
    assert exchange(negotiated(), request_text) == reply


def test_valid_requests_become_execute() -> None:
    session = negotiated()
    assert session.receive_data(b'{"execute": "query-block"}') == [
        Execute("query-block", {}, None, False)
    ]
    assert session.receive_data(
        b'{"id": "x", "arguments": {"node-name": 42}, "execute": "blockdev-del"}'
    ) == [Execute("blockdev-del", {"node-name": 42}, "x", True)]
    # Argument errors are the dispatcher's: the session passes the arguments on unchecked.
    assert session.receive_data(b'{"execute": "query-version", "arguments": {"foo": 1}}') == [
        Execute("query-version", {"foo": 1}, None, False)
    ]


def test_replies_for_executed_commands() -> None:
    session = negotiated()
    (request,) = session.receive_data(b'{"execute": "query-version", "id": "v-1"}')
    assert isinstance(request, Execute)
    assert line(session.reply(request, VERSION)) == {"return": VERSION, "id": "v-1"}
    assert session.reply(request, {}) == b'{"return": {}, "id": "v-1"}\r\n'
    assert line(session.error(request, "DeviceNotFound", "Device 'cd9' not found")) == error(
        "Device 'cd9' not found", "DeviceNotFound", id="v-1"
    )
    (no_id,) = session.receive_data(b'{"execute": "query-block"}')
    assert isinstance(no_id, Execute)
    assert session.reply(no_id, []) == b'{"return": []}\r\n'
    assert line(session.error(no_id, "GenericError", "x")) == error("x")
    assert line(session.error(None, "GenericError", "y")) == error("y")


# 1.5 Replies (ids) -----------------------------------------------------------------------


IDS = [1, -7, 2.5, "v-1", "", {"a": [1, {"b": None}]}, [1, "x"], None, True, False]


@pytest.mark.parametrize("id_", IDS, ids=[json.dumps(i) for i in IDS])
def test_id_is_echoed_verbatim(id_: object) -> None:
    id_text = json.dumps(id_)
    session = make()
    assert exchange(session, f'{{"execute": "query-version", "id": {id_text}}}') == error(
        NEGOTIATING, "CommandNotFound", id=id_
    )
    assert exchange(session, f'{{"execute": "qmp_capabilities", "id": {id_text}}}') == {
        "return": {},
        "id": id_,
    }
    assert exchange(session, f'{{"execute": "nope", "id": {id_text}}}') == error(
        "The command nope has not been found", "CommandNotFound", id=id_
    )
    assert exchange(session, f'{{"execute": [], "id": {id_text}}}') == error(
        "QMP input member 'execute' must be a string", id=id_
    )
    (request,) = session.receive_data(f'{{"execute": "eject", "id": {id_text}}}'.encode())
    assert request == Execute("eject", {}, id_, True)
    assert line(session.reply(request, {})) == {"return": {}, "id": id_}
    assert line(session.error(request, "GenericError", "no")) == error("no", id=id_)


def test_null_id_is_present() -> None:
    session = negotiated()
    (request,) = session.receive_data(b'{"execute": "eject", "id": null}')
    assert request == Execute("eject", {}, None, True)
    assert session.reply(request, {}) == b'{"return": {}, "id": null}\r\n'


# 1.6 JSON parse errors ---------------------------------------------------------------------


def test_parse_error_transcript() -> None:
    session = negotiated()
    assert decode(
        session.receive_data(
            b"[1, 2]\n"
            b'{"execute": }\n'
            b'{"execute": "query-version" "id": 22}\n'
            b'{"execute": tru}\n'
            b'{"execute": "query-version", "id": 23, "id": 24}\n'
            b'"x"\n'
        )
    ) == [
        error("QMP input must be a JSON object"),
        error("JSON parse error, expecting value"),
        error("JSON parse error, expected separator in dict"),
        error("JSON parse error, invalid keyword 'tru'"),
        error("JSON parse error, duplicate key"),
        error("QMP input must be a JSON object"),
    ]


def test_recovery_transcript() -> None:
    session = negotiated()
    assert session.receive_data(b'{"execute": "query-version", "id": 26\n') == []
    (stray,) = session.receive_data(b"\x01")
    assert isinstance(stray, Send)
    assert stray.data == (
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\u0001\'"}}\r\n'
    )
    (request,) = session.receive_data(b'{"execute": "query-version", "id": 27}')
    assert request == Execute("query-version", {}, 27, True)
    assert line(session.reply(request, VERSION)) == {"return": VERSION, "id": 27}


def test_blank_lines_get_no_reply() -> None:
    session = negotiated()
    assert session.receive_data(b"\r\n\n   \n") == []


def test_every_split_gives_the_same_actions() -> None:
    data = (
        b'{"execute": "qmp_capabilities", "id": 1}'
        b'{"execute": 5}\n'
        b"{'execute': 'query-block', 'arguments': {'x': '\\u00e9'}, 'id': [null]}"
    )
    want = [
        Send(b'{"return": {}, "id": 1}\r\n'),
        Send(
            b'{"error": {"class": "GenericError",'
            b' "desc": "QMP input member \'execute\' must be a string"}}\r\n'
        ),
        Execute("query-block", {"x": "\u00e9"}, [None], True),
    ]
    for cut in range(len(data) + 1):
        session = make()
        actions = session.receive_data(data[:cut]) + session.receive_data(data[cut:])
        assert actions == want, cut


def test_session_uses_the_given_parser() -> None:
    parser = JsonStreamParser(max_depth=2)
    session = QmpSession(version=VERSION, is_command=COMMANDS.__contains__, parser=parser)
    assert decode(session.receive_data(b'{"execute": "qmp_capabilities", "id": [[1]]}')) == [
        error("JSON nesting depth limit exceeded")
    ]


# 1.7 Events ------------------------------------------------------------------------------


def test_events_are_dropped_before_negotiation() -> None:
    session = make()
    assert session.event("DEVICE_TRAY_MOVED", {"id": "cd0", "tray-open": True}, 1, 2) is None
    session.receive_data(b'{"execute": "qmp_capabilities"}')
    data = session.event("DEVICE_TRAY_MOVED", {"id": "cd0", "tray-open": True}, 1795681889, 5)
    assert data is not None
    assert data == (
        b'{"timestamp": {"seconds": 1795681889, "microseconds": 5}, "event": "DEVICE_TRAY_MOVED",'
        b' "data": {"id": "cd0", "tray-open": true}}\r\n'
    )


def test_event_without_data_has_no_data_member() -> None:
    data = negotiated().event("STOP", None, -1, -1)
    assert data is not None
    assert line(data) == {"timestamp": {"seconds": -1, "microseconds": -1}, "event": "STOP"}


def test_event_with_empty_data_keeps_it() -> None:
    data = negotiated().event("X", {}, 0, 0)
    assert data is not None
    assert line(data) == {"timestamp": {"seconds": 0, "microseconds": 0}, "event": "X", "data": {}}


# 1.8 Out-of-band execution -------------------------------------------------------------------


def test_oob_offered_but_not_enabled() -> None:
    session = negotiated(("oob",))
    assert session.enabled_capabilities == frozenset()
    assert exchange(session, '{"exec-oob": "query-version", "id": 25}') == error(
        "QMP input member 'exec-oob' is unexpected", id=25
    )


def test_oob_enabled() -> None:
    session = negotiated(("oob",), enable=("oob",))
    assert exchange(session, '{"exec-oob": "query-version", "id": 1}') == error(
        "The command query-version does not support OOB", id=1
    )
    assert exchange(session, '{"exec-oob": "qmp_capabilities", "id": 2}') == error(
        "The command qmp_capabilities does not support OOB", id=2
    )
    assert exchange(session, '{"exec-oob": "nope", "id": 3}') == error(
        "The command nope has not been found", "CommandNotFound", id=3
    )
    assert exchange(session, '{"exec-oob": 1, "id": 4}') == error(
        "QMP input member 'exec-oob' must be a string", id=4
    )
    assert exchange(session, '{"execute": "query-version", "exec-oob": "eject", "id": 5}') == (
        error("QMP input member 'exec-oob' clashes with 'execute'", id=5)
    )
    assert exchange(session, '{"exec-oob": "eject", "execute": "query-version", "id": 6}') == (
        error("QMP input member 'execute' clashes with 'exec-oob'", id=6)
    )
    assert exchange(session, '{"exec-oob": "eject", "arguments": [], "id": 7}') == error(
        "QMP input member 'arguments' must be an object", id=7
    )
    # In-band commands still work as usual.
    assert session.receive_data(b'{"execute": "eject", "arguments": {"id": "cd0"}}') == [
        Execute("eject", {"id": "cd0"}, None, False)
    ]
