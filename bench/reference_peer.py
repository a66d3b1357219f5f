"""Run nbdkit or qemu-nbd as a benchmark peer, from the options every peer is given.

nbd_bench.py starts each peer with qemu-storage-daemon's command line
(``--blockdev``, ``--nbd-server``, ``--export``, ``--pidfile``, a QMP monitor).
These two NBD servers are written in C and take other options; this script
translates and then execs the server, so the peer's pid is the server's and its
CPU time is measured as for any other peer.  They are references: what a
server without Python's cost per request reaches with the same client on the
same backing (bench/README.md, "Where the targets are missed").

Only what a benchmark backing needs is translated: the ``file``,
``host_device`` and ``null-co`` drivers, a UNIX socket, the export name and
whether it is writable.  The QMP monitor has no counterpart and is dropped.

    reference_peer.py nbdkit|qemu-nbd QSD-STYLE-OPTIONS...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # blockd, when run by hand
from blockd.qmp.keyval import KeyvalError, parse_keyval

SERVERS = ("nbdkit", "qemu-nbd")
_IGNORED = ("--chardev", "--monitor")


class UsageError(Exception):
    """The options cannot be translated."""


def _keyval(text: str) -> dict[str, str]:
    """One option in QSD's keyval syntax, flattened: ``addr.type=unix`` stays one key."""
    try:
        tree = parse_keyval(text)
    except KeyvalError as exc:
        raise UsageError(str(exc)) from None
    flat: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        elif isinstance(value, str):
            flat[prefix[:-1]] = value
        else:  # a list (a.0=...): no benchmark option has one
            raise UsageError(f"unsupported list in {text!r}")

    walk("", tree)
    return flat


def _options(args: Sequence[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str], str]:
    """The --blockdev, --nbd-server and --export key-values, and the --pidfile path."""
    keyvals: dict[str, dict[str, str]] = {}
    pidfile = None
    it = iter(args)
    for opt in it:
        value = next(it, None)
        if value is None:
            raise UsageError(f"{opt} needs a value")
        if opt in _IGNORED:
            continue
        if opt == "--pidfile":
            pidfile = value
        elif opt in ("--blockdev", "--nbd-server", "--export"):
            keyvals[opt[2:]] = _keyval(value)
        else:
            raise UsageError(f"unsupported option {opt}")
    for need in ("blockdev", "nbd-server", "export"):
        if need not in keyvals:
            raise UsageError(f"--{need} is missing")
    if pidfile is None:
        raise UsageError("--pidfile is missing")
    return keyvals["blockdev"], keyvals["nbd-server"], keyvals["export"], pidfile


def command(server: str, args: Sequence[str]) -> list[str]:
    """The argv that runs ``server`` with what the QSD-style ``args`` describe."""
    blockdev, nbd, export, pidfile = _options(args)
    if nbd.get("addr.type") != "unix" or "addr.path" not in nbd:
        raise UsageError("only a UNIX socket (addr.type=unix,addr.path=...) is supported")
    sock = nbd["addr.path"]
    name = export.get("name", export.get("node-name", ""))
    writable = export.get("writable") == "on"
    driver = blockdev.get("driver")
    if driver in ("file", "host_device"):
        if "filename" not in blockdev:
            raise UsageError(f"driver={driver} needs filename=")
    elif driver == "null-co":
        if "size" not in blockdev:
            raise UsageError("driver=null-co needs size=")
    else:
        raise UsageError(f"unsupported driver {driver!r}")

    if server == "nbdkit":
        argv = ["nbdkit", "--foreground", "--unix", sock, "--pidfile", pidfile,
                "--exportname", name]
        if not writable:
            argv.append("--readonly")
        if driver == "null-co":
            return [*argv, "null", f"size={blockdev['size']}"]
        return [*argv, "file", f"file={blockdev['filename']}"]
    if server == "qemu-nbd":
        # Same cache and AIO modes as a qemu-storage-daemon --blockdev by default;
        # --shared=0: any number of connections (nbdcopy opens several).
        image = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in blockdev.items()
                         if k != "node-name")
        argv = ["qemu-nbd", "--persistent", "--shared=0", "--socket", sock,
                "--export-name", name, "--pid-file", pidfile, "--cache=writeback",
                "--aio=threads", "--image-opts", image]
        if not writable:
            argv.insert(1, "--read-only")
        return argv
    raise UsageError(f"unknown server {server!r} (choose from {', '.join(SERVERS)})")


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(f"usage: reference_peer.py {'|'.join(SERVERS)} QSD-STYLE-OPTIONS...",
              file=sys.stderr)
        return 2
    try:
        cmd = command(argv[0], argv[1:])
    except UsageError as exc:
        print(f"reference_peer: {exc}", file=sys.stderr)
        return 2
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
