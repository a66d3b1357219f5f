"""The VM tier: test modules that run inside a QEMU guest (see tests/vm/README.md).

A module is a *group* when it declares the guest's hardware, with a module-level
``VM_HARDWARE = [...]`` (preset names or :class:`guest.Hardware`) or
``pytestmark = pytest.mark.vm(hardware=[...])``.

On the host, each test of a group is replaced by a :class:`VMReplayItem` with the same
node id and markers and no fixtures.  The first one to run boots the guest once for the
whole group (:func:`guest.run_group`), which runs the group's selected tests inside the
guest; every item then replays its inner result.  In the guest (``BLOCKD_IN_VM=1``)
nothing is replaced: the tests run for real with the ``vm`` and ``witness`` fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guest
import pytest
from guest import VM, GroupRun, Hardware, VMUnavailable, Witness

_GROUPS = pytest.StashKey[dict[str, "GroupRun | VMUnavailable"]]()


def group_hardware(module: pytest.Module) -> list[Hardware] | None:
    """The hardware a module declares, or None if it is not a VM group."""
    spec: Any = getattr(module.obj, "VM_HARDWARE", None)
    if spec is None:
        marker = module.get_closest_marker("vm")
        if marker is not None:
            spec = marker.kwargs.get("hardware")
    if spec is None:
        return None
    return guest.resolve_hardware(spec)


class VMReplayItem(pytest.Item):
    """A test of a VM group, seen from the host: its outcome comes from the guest."""

    def __init__(self, *, location: tuple[str, int | None, str], hardware: list[Hardware],
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._location = location
        self.hardware = hardware

    def reportinfo(self) -> tuple[str, int | None, str]:
        return self._location

    @property
    def group_key(self) -> str:
        module = self.getparent(pytest.Module)
        assert module is not None
        return module.nodeid

    def _group(self) -> GroupRun | VMUnavailable:
        groups = self.config.stash.setdefault(_GROUPS, {})
        key = self.group_key
        if key not in groups:
            nodeids = [it.nodeid for it in self.session.items
                       if isinstance(it, VMReplayItem) and it.group_key == key]
            workdir = self.config._tmp_path_factory.mktemp(  # type: ignore[attr-defined]
                "vm-" + Path(key).stem, numbered=True)
            try:
                groups[key] = guest.run_group(key, nodeids, self.hardware, workdir)
            except VMUnavailable as e:
                groups[key] = e
            except BaseException as e:  # pytest-timeout, ^C: the next test must not boot again
                groups[key] = GroupRun(key, error=f"the group's run was interrupted: {e!r}")
                raise
        return groups[key]

    def runtest(self) -> None:
        run = self._group()
        if isinstance(run, VMUnavailable):
            if os.environ.get(guest.REQUIRE_ENV) == "1":
                pytest.fail(f"VM tier required ({guest.REQUIRE_ENV}=1) but unavailable: {run}",
                            pytrace=False)
            pytest.skip(f"VM tier unavailable: {run}")
        if run.error:
            pytest.fail(run.error, pytrace=False)
        guest.replay(run.result(self.nodeid),
                     f"---- tail of {run.log} ----\n{run.log_tail}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    if guest.in_vm():
        return
    for i, item in enumerate(items):
        module = item.getparent(pytest.Module)
        if module is None or item.parent is None:
            continue
        hardware = group_hardware(module)
        if hardware is None:
            continue
        path, lineno, name = item.reportinfo()
        replay = VMReplayItem.from_parent(
            item.parent, name=item.name, location=(str(path), lineno, name),
            hardware=hardware)
        # The function's own marks (for -m); skip/xfail marks are the guest's to evaluate.
        for marker in item.own_markers:
            if marker.name not in ("skip", "skipif", "xfail", "usefixtures", "parametrize"):
                replay.add_marker(getattr(pytest.mark, marker.name)(*marker.args,
                                                                    **marker.kwargs))
        if replay.get_closest_marker("vm") is None:
            replay.add_marker("vm")
        # The first test of a group boots it and runs the whole group (pytest-timeout).
        replay.add_marker(pytest.mark.timeout(guest.group_timeout()
                                              + guest.REPLAY_TIMEOUT_MARGIN))
        items[i] = replay


def pytest_configure(config: pytest.Config) -> None:
    report = os.environ.get(guest.REPORT_ENV)
    if guest.in_vm() and report:
        config.pluginmanager.register(guest.ReportWriter(report), "blockd-vm-report")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    groups = config.stash.get(_GROUPS, {})
    if not groups:
        return
    terminalreporter.section("VM groups")
    for key, run in groups.items():
        if isinstance(run, VMUnavailable):
            terminalreporter.write_line(f"{key}: not run: {run}")
            continue
        boot = "?" if run.boot_seconds is None else f"{run.boot_seconds:.1f} s"
        counts: dict[str, int] = {}
        for res in run.results.values():
            counts[res.outcome] = counts.get(res.outcome, 0) + 1
        summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no results"
        terminalreporter.write_line(
            f"{key}: boot {boot}, boot+run {run.total_seconds:.1f} s, {summary}; log {run.log}"
            + (" (FAILED)" if run.error else ""))


# --------------------------------------------------------------------------- inner fixtures


@pytest.fixture(scope="session")
def vm() -> VM:
    """The guest's hardware: ``vm.device(id)`` (nodes), ``vm.disc(label)`` (images)."""
    manifest = os.environ.get(guest.MANIFEST_ENV)
    if not guest.in_vm() or not manifest:
        pytest.skip("runs only inside the VM tier's guest")
    return VM.from_manifest(manifest)


@pytest.fixture
def witness(vm: VM) -> Iterator[Witness]:
    """A fresh QMP session with the emulator: events since this test started."""
    w = Witness()
    try:
        yield w
    finally:
        w.close()
