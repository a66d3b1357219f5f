"""The skip policy: the one list of tests that may skip in strict mode, and why.

In strict mode (``BLOCKD_STRICT_SKIPS=1``, which ``.ci/run`` sets) a skipped test is
a failure, unless an entry of :data:`ALLOWED_SKIPS` below names it, its skip reason
matches the entry's, and the entry's condition really holds on this machine.  So an
allowed skip still fails where its reason does not apply.  Skips replayed from the VM
tier's guest count the same (the guest's own run is never strict: its skips come back
as skips and are judged here, with the conditions checked on the host).  A module
that skips as a whole fails to collect.  xfail is not a skip.  Without the variable
(a developer's laptop, no root) skips stay skips.

The hooks at the end of this file do it; tests/conftest.py imports them.

CI runs as root with every Debian and PyPI package of ``./dev test`` installed, so
nothing needs root or a tool to skip there; what remains are properties of the
kernel or the CPU that a CI machine could lack.  On the project's machines none of
the conditions below holds: nothing may skip in CI.
"""

from __future__ import annotations

import ctypes
import fnmatch
import functools
import os
import platform
import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

STRICT_ENV = "BLOCKD_STRICT_SKIPS"  # "1": a skip not allowed below fails


def strict() -> bool:
    return os.environ.get(STRICT_ENV) == "1"


@dataclass(frozen=True)
class AllowedSkip:
    """Tests that may skip with a given reason where a condition holds."""

    tests: tuple[str, ...]  # node id patterns (fnmatch), e.g. "tests/unit/test_uring.py::*"
    reason: str  # a regular expression the skip reason must contain
    condition: str  # the condition in words, for the failure message
    holds: Callable[[], bool]  # checks the condition on this machine

    def names(self, nodeid: str) -> bool:
        # "::" lets a module pattern ("tests/x.py::*") name a skip of the whole module.
        return any(fnmatch.fnmatchcase(nodeid, p) or fnmatch.fnmatchcase(nodeid + "::", p)
                   for p in self.tests)


# -- conditions: each asks the machine itself, not the code under test ------------------


@functools.cache
def io_uring_setup_fails() -> bool:
    """io_uring_setup(2) fails here (seccomp'd containers, kernel.io_uring_disabled)."""
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    nr_io_uring_setup = 425  # the same number on every architecture
    fd = libc.syscall(nr_io_uring_setup, 1, params)
    if fd < 0:
        return True
    os.close(fd)
    return False


def kernel_older_than(major: int, minor: int) -> Callable[[], bool]:
    def check() -> bool:
        found = re.match(r"(\d+)\.(\d+)", platform.release())
        return found is not None and (int(found[1]), int(found[2])) < (major, minor)
    return check


def not_x86_64() -> bool:
    return platform.machine() != "x86_64"


# -- the list ---------------------------------------------------------------------------

ALLOWED_SKIPS: Sequence[AllowedSkip] = (
    AllowedSkip(
        tests=("tests/unit/test_uring.py::*", "tests/host/test_io_uring_route.py::*"),
        reason=r"io_uring unavailable here|io_uring cannot be set up here",
        condition="io_uring_setup(2) fails on this machine (seccomp'd containers, "
                  "kernel.io_uring_disabled=2); blockd then uses its worker threads",
        holds=io_uring_setup_fails,
    ),
    AllowedSkip(
        tests=("tests/unit/test_uring.py::"
               "test_completions_reach_the_eventfd_without_interrupting_the_loop",),
        reason=r"has no IORING_SETUP_COOP_TASKRUN",
        condition="the kernel is older than 5.19 (no IORING_SETUP_COOP_TASKRUN)",
        holds=kernel_older_than(5, 19),
    ),
    AllowedSkip(
        tests=("tests/unit/test_scsi.py::*",),
        reason=r"layout pinned for x86_64",
        condition="the machine is not x86_64 (struct sg_io_hdr's layout is checked for it)",
        holds=not_x86_64,
    ),
)


def refusal(nodeid: str, reason: str) -> str | None:
    """None if the skip of ``nodeid`` with ``reason`` is allowed here, else why it fails."""
    head = (f"skipped in strict mode ({STRICT_ENV}=1): {reason}\n"
            "A skip fails here unless tests/allowed_skips.py allows it")
    named = [a for a in ALLOWED_SKIPS if a.names(nodeid) and re.search(a.reason, reason)]
    if not named:
        return f"{head}, and it has no entry for this test with this reason."
    for entry in named:
        try:
            if entry.holds():
                return None
        except Exception as exc:  # a broken check allows nothing
            return f"{head}, but checking the condition ({entry.condition}) failed: {exc!r}"
    conditions = "; ".join(e.condition for e in named)
    return f"{head} only where {conditions}: not so on this machine."


# -- the hooks (imported by tests/conftest.py) -------------------------------------------


def _judge(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (report.skipped and strict()) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    why = refusal(report.nodeid, reason.removeprefix("Skipped: "))
    if why is not None:
        report.outcome = "failed"
        report.longrepr = why


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A skipped test (or setup: skip marks) fails unless allowed."""
    report = yield
    _judge(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, Any]:
    """A module that skips as a whole (``allow_module_level``) fails to collect unless allowed."""
    report = yield
    _judge(report)
    return report
