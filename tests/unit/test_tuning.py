"""The data path's environment switches, read once at start (blockd/daemon/tuning.py)."""

from __future__ import annotations

import pytest

from blockd.aio.polling import DEFAULT_MAX_NS
from blockd.daemon.tuning import Tuning


def test_defaults_are_what_users_run() -> None:
    assert Tuning.from_environ({}) == Tuning()
    assert Tuning() == Tuning(io_uring=True, splice=True, poll_max_ns=DEFAULT_MAX_NS,
                              accounting=True, uvloop=True)


def test_each_switch_turns_one_thing_off() -> None:
    assert Tuning.from_environ({"BLOCKD_IO_URING": "0"}) == Tuning(io_uring=False)
    assert Tuning.from_environ({"BLOCKD_SPLICE": "0"}) == Tuning(splice=False)
    assert Tuning.from_environ({"BLOCKD_NO_ACCOUNTING": "1"}) == Tuning(accounting=False)
    assert Tuning.from_environ({"BLOCKD_EVENT_LOOP": "asyncio"}) == Tuning(uvloop=False)
    # Anything but the documented value leaves the default.
    assert Tuning.from_environ({"BLOCKD_IO_URING": "1", "BLOCKD_NO_ACCOUNTING": "0",
                                "BLOCKD_EVENT_LOOP": "uvloop"}) == Tuning()


@pytest.mark.parametrize(("value", "expected"),
                         [(None, DEFAULT_MAX_NS), ("0", 0), ("250000", 250_000),
                          ("-5", 0), ("lots", DEFAULT_MAX_NS)])
def test_poll_limit_from_environment(value: str | None, expected: int) -> None:
    environ = {} if value is None else {"BLOCKD_POLL_MAX_NS": value}
    assert Tuning.from_environ(environ).poll_max_ns == expected
