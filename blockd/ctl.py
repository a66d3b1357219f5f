"""``blockd-ctl``: run one QMP command against blockd (or any QMP server) from a shell.

::

    blockd-ctl /run/blockd/qmp.sock query-block
    blockd-ctl blockd.sock eject id=cd0
    blockd-ctl blockd.sock blockdev-add driver=null-co node-name=n1 size=1048576
    blockd-ctl blockd.sock blockdev-add driver=file node-name=f filename=a,,b.img cache.direct=true
    blockd-ctl localhost:4444 query-blockstats --json
    blockd-ctl blockd.sock --events 2            # watch two events (e.g. tray moves)

SOCKET is a UNIX socket path, or ``HOST:PORT`` (``[V6ADDR]:PORT``) for TCP when no file
of that name exists.  The client is qemu.qmp's ``QMPClient``, which performs the
greeting and capabilities negotiation.

How arguments become JSON:

1. ``key=value`` words are parsed with QEMU's keyval syntax as one option: dotted keys
   nest (``cache.direct=true``), ``a.0=x a.1=y`` is a list, ``,,`` is a literal comma, and
   one word may hold several pairs (``driver=null-co,node-name=n1``).
2. Then every string value that is exactly a JSON integer (``-?(0|[1-9][0-9]*)``),
   ``true``, ``false`` or ``null`` becomes that JSON value; everything else (``on``,
   ``1.5``, ``0660``) stays a string.
3. ``key:=JSON`` takes the value as raw JSON, as httpie does: ``size:=1048576``,
   ``name:='"123"'`` for a string that looks like a number, ``files:='["a","b"]'``.
   The key may be dotted to reach into nested objects.

Output: by default a table for a list of objects (one column per key, nested values as
compact JSON), ``key: value`` lines for an object, nothing for ``{}``; ``--json`` prints
the reply as indented JSON.  Events (``--events N``, counted from before the command is
sent) print one per line: ``SECONDS.MICROSECONDS EVENT {data}``, or as compact JSON
with ``--json``.

Exit status: 0 on success, 1 if the server answered with an error (printed as
``error: CLASS: description`` on stderr), 2 for usage errors and for connection
failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
)

from blockd.qmp.keyval import KeyvalError, parse_keyval_words

__all__ = [
    "UsageError",
    "build_arguments",
    "format_event",
    "format_reply",
    "main",
    "main_async",
    "parse_address",
]

_JSON_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_JSON_WORDS: dict[str, object] = {"true": True, "false": False, "null": None}
_TCP_ADDRESS = re.compile(r"(\[[^\]]*\]|[^:/\[\]]*):([0-9]+)")
_DEFAULT_HOST = "127.0.0.1"


class UsageError(ValueError):
    """The command line cannot be turned into a QMP command."""


class _ConnectionLost(Exception):
    """The server hung up while we were waiting for it."""


# --------------------------------------------------------------------------------------
# Arguments


def build_arguments(words: Sequence[str]) -> dict[str, object]:
    """Turn ``key=value`` and ``key:=JSON`` words into QMP command arguments.

    :raise UsageError: for a word that is neither form, bad keyval syntax, bad JSON, or
        a ``:=`` key that conflicts with another argument.
    """
    keyval_words: list[str] = []
    raw: list[tuple[str, str]] = []
    for word in words:
        equals = word.find("=")
        if equals <= 0 or (equals == 1 and word[0] == ":"):
            raise UsageError(f"expected key=value or key:=JSON, not {word!r}")
        if word[equals - 1] == ":":
            raw.append((word[: equals - 1], word[equals + 1 :]))
        else:
            keyval_words.append(word)
    try:
        arguments = parse_keyval_words(keyval_words)
    except KeyvalError as exc:
        raise UsageError(str(exc)) from None
    converted = _convert_scalars(arguments)
    assert isinstance(converted, dict)
    for key, text in raw:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{key}:= is not valid JSON: {exc.msg}") from None
        _set_path(converted, key, value)
    return converted


def _convert_scalars(value: object) -> object:
    """Apply rule 2 of the module docstring, recursively."""
    if isinstance(value, dict):
        return {key: _convert_scalars(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_convert_scalars(item) for item in value]
    if isinstance(value, str):
        if _JSON_INT.fullmatch(value):
            return int(value)
        if value in _JSON_WORDS:
            return _JSON_WORDS[value]
    return value


def _set_path(arguments: dict[str, object], key: str, value: object) -> None:
    fragments = key.split(".")
    if not all(fragments):
        raise UsageError(f"invalid key {key!r}")
    node = arguments
    for fragment in fragments[:-1]:
        child = node.setdefault(fragment, {})
        if not isinstance(child, dict):
            raise UsageError(f"{key}:= conflicts with another argument")
        node = child
    if isinstance(node.get(fragments[-1]), dict | list):
        raise UsageError(f"{key}:= conflicts with another argument")
    node[fragments[-1]] = value


def parse_address(text: str) -> str | tuple[str, int]:
    """A UNIX socket path, or ``(host, port)`` for ``HOST:PORT`` when no such file exists.

    An empty host (``:4444``) means the loopback address.
    """
    match = _TCP_ADDRESS.fullmatch(text)
    if match is None or os.path.exists(text):
        return text
    host = match.group(1)
    if host.startswith("["):
        host = host[1:-1]
    return (host or _DEFAULT_HOST, int(match.group(2)))


# --------------------------------------------------------------------------------------
# Output


def _cell(value: object) -> str:
    """One value as text: strings bare, everything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _table(rows: Sequence[Mapping[str, object]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    cells = [[_cell(row[col]) if col in row else "" for col in columns] for row in rows]
    widths = [max([len(col)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def format_reply(reply: object, *, as_json: bool = False) -> str:
    """The text to print for a command's return value ("" prints nothing)."""
    if as_json:
        return json.dumps(reply, indent=2)
    if isinstance(reply, dict):
        return "\n".join(f"{key}: {_cell(value)}" for key, value in reply.items())
    if isinstance(reply, list):
        if reply and all(isinstance(item, dict) for item in reply):
            return _table(reply)
        if all(not isinstance(item, dict | list) for item in reply):
            return "\n".join(_cell(item) for item in reply)
        return json.dumps(reply, indent=2)
    return _cell(reply)


def format_event(event: Mapping[str, object], *, as_json: bool = False) -> str:
    """One line for an event message."""
    if as_json:
        return json.dumps(dict(event), separators=(",", ":"))
    stamp = event.get("timestamp")
    when = "-"
    if isinstance(stamp, dict):
        seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
        if isinstance(seconds, int) and isinstance(micros, int):
            when = f"{seconds}.{micros:06d}"
    line = f"{when} {event.get('event')}"
    if "data" in event:
        line += " " + _cell(event["data"])
    return line


# --------------------------------------------------------------------------------------
# Running


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockd-ctl",
        description="Run a QMP command on blockd (or any QMP server) and print the reply.",
        epilog="Arguments: key=value (keyval; JSON ints, true, false, null are converted) "
        "or key:=JSON (raw).",
    )
    parser.add_argument("socket", help="UNIX socket path, or HOST:PORT for TCP")
    parser.add_argument("command", nargs="?", help="QMP command, e.g. query-block")
    parser.add_argument("arguments", nargs="*", metavar="key=value", help="command arguments")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--json", action="store_true", help="print the reply as JSON")
    style.add_argument("--table", action="store_true", help="print a table (the default)")
    parser.add_argument(
        "--events", type=int, default=0, metavar="N", help="then wait for and print N events"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    # qemu.qmp logs connection trouble itself; we report it in one line instead.
    logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
    return asyncio.run(main_async(argv))


async def main_async(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """:func:`main` for callers already inside an event loop."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = _parser()
    try:
        options = parser.parse_intermixed_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if options.command is None and options.events <= 0:
        print("blockd-ctl: give a COMMAND, or --events N", file=err)
        return 2
    if options.events < 0:
        print("blockd-ctl: --events needs a count of 0 or more", file=err)
        return 2
    try:
        arguments = build_arguments(options.arguments)
    except UsageError as exc:
        print(f"blockd-ctl: {exc}", file=err)
        return 2

    try:
        async with asyncio.timeout(options.timeout):
            return await _session(options, arguments, out, err)
    except TimeoutError:
        print(f"blockd-ctl: {options.socket}: timed out", file=err)
        return 2


async def _session(
    options: argparse.Namespace, arguments: dict[str, object], out: TextIO, err: TextIO
) -> int:
    client = QMPClient("blockd-ctl")
    try:
        await client.connect(parse_address(options.socket))
    except ConnectError as exc:
        print(f"blockd-ctl: cannot connect to {options.socket}: {_reason(exc.exc)}", file=err)
        return 2
    status = 0
    try:
        listener = EventListener()
        with client.listen(listener):
            if options.command is not None:
                status = await _execute(client, options, arguments, out, err)
            for _ in range(options.events):
                event = await _next_event(client, listener)
                print(format_event(event, as_json=options.json), file=out, flush=True)
    except (_ConnectionLost, ExecInterruptedError):
        print(f"blockd-ctl: {options.socket}: connection lost", file=err)
        status = 2
    finally:
        # disconnect() re-raises what ended the session; it has been reported already.
        with contextlib.suppress(Exception):
            await client.disconnect()
    return status


async def _execute(
    client: QMPClient,
    options: argparse.Namespace,
    arguments: dict[str, object],
    out: TextIO,
    err: TextIO,
) -> int:
    try:
        reply = await client.execute(options.command, arguments or None)
    except ExecuteError as exc:
        print(f"error: {exc.error_class}: {exc}", file=err)
        return 1
    text = format_reply(reply, as_json=options.json)
    if text:
        print(text, file=out, flush=True)
    return 0


async def _next_event(client: QMPClient, listener: EventListener) -> Mapping[str, object]:
    """The next event, or :class:`_ConnectionLost` if the session ends first."""
    get = asyncio.ensure_future(listener.get())
    try:
        while True:
            # qemu.qmp signals a state change only to coroutines already waiting, so
            # start waiting first, then look at the state: no change can slip between.
            changed = asyncio.ensure_future(client.runstate_changed())
            await asyncio.sleep(0)
            if client.runstate != Runstate.RUNNING and not get.done():
                changed.cancel()
                raise _ConnectionLost
            done, _ = await asyncio.wait({get, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if get in done:
                event: Mapping[str, object] = get.result()
                return event
    finally:
        get.cancel()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
