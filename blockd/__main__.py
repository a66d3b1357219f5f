"""The ``blockd`` command: parse options, configure logging, run the daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from blockd.daemon.config import ConfigError, InfoRequested, parse_command_line
from blockd.daemon.root import Daemon, StartupError
from blockd.daemon.tuning import Tuning

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_command_line(args)
    except ConfigError as err:
        print(f"blockd: {err}", file=sys.stderr)
        return 1
    except InfoRequested as info:  # --help / --version
        print(info.text)
        return 0
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="blockd: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    tuning = Tuning.from_environ(os.environ)
    daemon = Daemon(config, tuning)
    try:
        _event_loop_runner(tuning.uvloop)(_run(daemon, config.default_used))
    except StartupError as err:
        print(f"blockd: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _event_loop_runner(want_uvloop: bool) -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop's runner when wanted and installed (less overhead per request), else asyncio's."""
    if want_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run
    return asyncio.run


async def _run(daemon: Daemon, default_used: bool) -> None:
    try:
        await daemon.start()
        for where in daemon.listening:
            # Printed (not only logged) so a new user sees where to connect.
            print(f"blockd: QMP listening on {where}", file=sys.stderr, flush=True)
        if daemon.metrics_url is not None:
            print(f"blockd: metrics on {daemon.metrics_url}", file=sys.stderr, flush=True)
        if default_used:
            print("blockd: running the embedded default configuration "
                  "(see `blockd --help`)", file=sys.stderr, flush=True)
        await daemon.serve()
    finally:
        await daemon.shutdown()


if __name__ == "__main__":
    sys.exit(main())
