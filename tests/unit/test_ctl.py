"""blockd-ctl: argument building, output formatting, and round trips to a scripted server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from blockd.ctl import (
    UsageError,
    build_arguments,
    format_event,
    format_reply,
    main,
    main_async,
    parse_address,
)

# --- arguments ------------------------------------------------------------------------


def test_build_arguments_converts_json_scalars() -> None:
    words = ["driver=null-co", "node-name=n1", "size=1048576", "read-zeroes=true"]
    assert build_arguments(words) == {
        "driver": "null-co",
        "node-name": "n1",
        "size": 1048576,
        "read-zeroes": True,
    }


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("-12", -12),
        ("false", False),
        ("null", None),
        ("on", "on"),
        ("0660", "0660"),
        ("1.5", "1.5"),
        ("-", "-"),
        ("True", "True"),
        ("", ""),
    ],
)
def test_scalar_conversion_rule(text: str, value: object) -> None:
    assert build_arguments([f"x={text}"]) == {"x": value}


def test_build_arguments_keyval_features() -> None:
    assert build_arguments(["cache.direct=true", "filename=a,,b.img", "f.0=x", "f.1=2"]) == {
        "cache": {"direct": True},
        "filename": "a,b.img",
        "f": ["x", 2],
    }


def test_several_pairs_in_one_word() -> None:
    assert build_arguments(["driver=null-co,node-name=n1"]) == {
        "driver": "null-co",
        "node-name": "n1",
    }


def test_raw_json_values() -> None:
    assert build_arguments(
        ["id=cd0", 'name:="123"', 'files:=["a","b"]', "cache.direct:=false", "n:=1"]
    ) == {"id": "cd0", "name": "123", "files": ["a", "b"], "cache": {"direct": False}, "n": 1}


def test_raw_json_merges_into_keyval_objects() -> None:
    assert build_arguments(["cache.no-flush=true", "cache.direct:=true"]) == {
        "cache": {"no-flush": True, "direct": True}
    }


def test_no_arguments() -> None:
    assert build_arguments([]) == {}


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["novalue"], "expected key=value or key:=JSON, not 'novalue'"),
        (["=x"], "expected key=value or key:=JSON, not '=x'"),
        ([":=1"], "expected key=value or key:=JSON, not ':=1'"),
        (["a..b=1"], "Invalid parameter 'a..b'"),
        (["a.1=x"], "Parameter 'a.0' missing"),
        (["x:={"], "x:= is not valid JSON: Expecting property name enclosed in double quotes"),
        (["a=1", "a.b:=1"], "a.b:= conflicts with another argument"),
        (["a.b=1", "a:=1"], "a:= conflicts with another argument"),
        (["a..b:=1"], "invalid key 'a..b'"),
    ],
)
def test_build_arguments_errors(words: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        build_arguments(words)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("/run/blockd/qmp.sock", "/run/blockd/qmp.sock"),
        ("blockd.sock", "blockd.sock"),
        ("localhost:4444", ("localhost", 4444)),
        ("10.0.0.1:4444", ("10.0.0.1", 4444)),
        ("[::1]:4444", ("::1", 4444)),
        (":4444", ("127.0.0.1", 4444)),
        ("dir/a:1", "dir/a:1"),
    ],
)
def test_parse_address(text: str, address: object) -> None:
    assert parse_address(text) == address


def test_existing_file_wins_over_tcp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd:1").touch()
    assert parse_address("odd:1") == "odd:1"


# --- output ---------------------------------------------------------------------------


def test_table_for_list_of_dicts() -> None:
    reply = [
        {"device": "cd0", "locked": False, "tray_open": True},
        {"device": "hd0", "locked": False, "inserted": {"node-name": "null0", "ro": False}},
    ]
    assert format_reply(reply) == (
        "device  locked  tray_open  inserted\n"
        "cd0     false   true\n"
        'hd0     false              {"node-name":"null0","ro":false}'
    )


def test_key_value_lines_for_dict() -> None:
    reply = {"status": "running", "running": True, "info": {"a": [1, 2]}, "none": None}
    assert format_reply(reply) == ('status: running\nrunning: true\ninfo: {"a":[1,2]}\nnone: null')


def test_empty_replies_print_nothing() -> None:
    assert format_reply({}) == ""
    assert format_reply([]) == ""


def test_list_of_scalars_one_per_line() -> None:
    assert format_reply(["a", 1, None]) == "a\n1\nnull"


def test_mixed_list_falls_back_to_json() -> None:
    assert format_reply([{"a": 1}, 2]) == json.dumps([{"a": 1}, 2], indent=2)


def test_json_output() -> None:
    reply = [{"device": "cd0"}]
    assert format_reply(reply, as_json=True) == json.dumps(reply, indent=2)
    assert json.loads(format_reply({"a": 1}, as_json=True)) == {"a": 1}


def test_format_event() -> None:
    event = {
        "event": "DEVICE_TRAY_MOVED",
        "data": {"device": "cd0", "tray-open": True},
        "timestamp": {"seconds": 1700000000, "microseconds": 42},
    }
    assert format_event(event) == (
        '1700000000.000042 DEVICE_TRAY_MOVED {"device":"cd0","tray-open":true}'
    )
    assert json.loads(format_event(event, as_json=True)) == event
    assert "\n" not in format_event(event, as_json=True)
    assert format_event({"event": "STOP"}) == "- STOP"


# --- usage errors ---------------------------------------------------------------------


def test_usage_without_command_or_events(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["x.sock"]) == 2
    assert capsys.readouterr().err == "blockd-ctl: give a COMMAND, or --events N\n"


def test_usage_bad_argument_word(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["x.sock", "eject", "cd0"]) == 2
    assert capsys.readouterr().err == ("blockd-ctl: expected key=value or key:=JSON, not 'cd0'\n")


def test_usage_json_and_table_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["x.sock", "query-block", "--json", "--table"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_connection_failure_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.sock")
    assert main([path, "query-block"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"blockd-ctl: cannot connect to {path}: No such file or directory\n"
    assert captured.out == ""


# --- round trips to a scripted QMP server ----------------------------------------------

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"},
        "capabilities": [],
    }
}
TRAY_EVENT: dict[str, object] = {
    "event": "DEVICE_TRAY_MOVED",
    "data": {"device": "cd0", "tray-open": True},
    "timestamp": {"seconds": 1700000000, "microseconds": 5},
}

Script = Callable[[dict[str, object]], list[dict[str, object]]]


class FakeQmpServer:
    """A QMP responder: greets, reads a JSON stream (no newlines needed), and answers
    each command with what ``script`` returns (the reply gets the command's id)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[dict[str, object]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\n")
        decoder = json.JSONDecoder()
        buffer = ""
        try:
            while data := await reader.read(4096):
                buffer += data.decode()
                while buffer.strip():
                    buffer = buffer.lstrip()
                    try:
                        message, end = decoder.raw_decode(buffer)
                    except json.JSONDecodeError:
                        break
                    buffer = buffer[end:]
                    self.received.append(message)
                    if message.get("execute") == "qmp_capabilities":
                        out: list[dict[str, object]] = [{"return": {}}]
                    else:
                        out = self.script(message)
                    for item in out:
                        if "return" in item or "error" in item:
                            item = {**item, "id": message.get("id")}
                        elif item.get("hangup"):
                            writer.close()
                            return
                        writer.write(json.dumps(item).encode() + b"\n")
                    await writer.drain()
        finally:
            writer.close()


Serve = Callable[[Script], Awaitable[tuple[str, FakeQmpServer]]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start fake servers on UNIX sockets in tmp_path; returns (path, server)."""
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> tuple[str, FakeQmpServer]:
        fake = FakeQmpServer(script)
        path = str(tmp_path / f"qmp{len(servers)}.sock")
        servers.append(await asyncio.start_unix_server(fake.handle, path))
        return path, fake

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def run_ctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await main_async([*argv, "--timeout", "10"], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


async def test_round_trip_table(serve: Serve) -> None:
    def script(message: dict[str, object]) -> list[dict[str, object]]:
        assert message["execute"] == "query-block"
        return [{"return": [{"device": "cd0", "tray_open": False, "locked": False}]}]

    path, fake = await serve(script)
    status, out, err = await run_ctl(path, "query-block")
    assert (status, err) == (0, "")
    assert out == "device  tray_open  locked\ncd0     false      false\n"
    assert [m["execute"] for m in fake.received] == ["qmp_capabilities", "query-block"]
    assert "arguments" not in fake.received[1]


async def test_round_trip_arguments_and_json_output(serve: Serve) -> None:
    path, fake = await serve(lambda message: [{"return": {"node-name": "n1"}}])
    status, out, err = await run_ctl(
        path, "blockdev-add", "driver=null-co", "node-name=n1", "size=1048576", "--json"
    )
    assert (status, err) == (0, "")
    assert json.loads(out) == {"node-name": "n1"}
    assert fake.received[1]["arguments"] == {
        "driver": "null-co",
        "node-name": "n1",
        "size": 1048576,
    }


async def test_round_trip_empty_return_prints_nothing(serve: Serve) -> None:
    path, _ = await serve(lambda message: [{"return": {}}])
    assert await run_ctl(path, "eject", "id=cd0") == (0, "", "")


async def test_round_trip_qmp_error(serve: Serve) -> None:
    error = {"class": "DeviceNotFound", "desc": "Device 'cd9' not found"}
    path, _ = await serve(lambda message: [{"error": error}])
    status, out, err = await run_ctl(path, "eject", "id=cd9")
    assert status == 1
    assert out == ""
    assert err == "error: DeviceNotFound: Device 'cd9' not found\n"


async def test_round_trip_events_after_command(serve: Serve) -> None:
    # The event arrives right after the reply; it must still be counted.
    path, _ = await serve(lambda message: [{"return": {}}, TRAY_EVENT])
    status, out, err = await run_ctl(path, "eject", "id=cd0", "--events", "1")
    assert (status, err) == (0, "")
    assert out == '1700000000.000005 DEVICE_TRAY_MOVED {"device":"cd0","tray-open":true}\n'


async def test_round_trip_events_json(serve: Serve) -> None:
    path, _ = await serve(lambda message: [{"return": {}}, TRAY_EVENT, TRAY_EVENT])
    status, out, _ = await run_ctl(path, "eject", "id=cd0", "--events", "2", "--json")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "{}"
    assert [json.loads(line) for line in lines[1:]] == [TRAY_EVENT, TRAY_EVENT]


async def test_server_hangs_up_while_waiting_for_events(serve: Serve) -> None:
    path, _ = await serve(lambda message: [{"return": {}}, {"hangup": True}])
    status, out, err = await run_ctl(path, "eject", "id=cd0", "--events", "1")
    assert (status, out) == (2, "")
    assert err == f"blockd-ctl: {path}: connection lost\n"


def test_main_runs_its_own_loop_against_a_threaded_server(tmp_path: Path) -> None:
    """The console entry point (asyncio.run inside) against a server on another thread."""
    path = str(tmp_path / "t.sock")
    ready = threading.Event()
    stop: list[Callable[[], object]] = []

    def serve_forever() -> None:
        loop = asyncio.new_event_loop()
        fake = FakeQmpServer(lambda message: [{"return": {"status": "running", "running": True}}])

        async def run() -> None:
            server = await asyncio.start_unix_server(fake.handle, path)
            done = asyncio.Event()
            stop.append(lambda: loop.call_soon_threadsafe(done.set))
            ready.set()
            await done.wait()
            server.close()

        loop.run_until_complete(run())
        loop.close()

    thread = threading.Thread(target=serve_forever)
    thread.start()
    try:
        assert ready.wait(10)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([path, "query-status"]) == 0
        assert out.getvalue() == "status: running\nrunning: true\n"
    finally:
        for callback in stop:
            callback()
        thread.join(10)
