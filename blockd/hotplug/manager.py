"""Hotplug: attach, export and detach host devices as udev reports them, by the rules.

:class:`Hotplug` takes events from :class:`~blockd.hotplug.udev.UdevSource`
(and from full rescans: at start, after lost events, on request) and keeps the
registry in line with the rules:

* a device that appears (or gains a size) and whose first matching rule says
  ``attach`` gets a node (never read-write unless the rule says so), a ``cd``
  or ``hd`` device, optionally an NBD export, and a BLOCKD_DEVICE_ADDED event;
* a device that goes away (or whose size drops to zero) loses its export (NBD
  clients are disconnected, never left hanging), its device (DEVICE_DELETED)
  and its node;
* a change of an attached device's size refreshes it (media in card readers;
  CD trays are followed by :mod:`blockd.hotplug.media_watch`).

Devices holding mounted filesystems, swap or device-mapper/md members are never
taken (:mod:`blockd.hotplug.safety`).  Events for one device are handled one
at a time and in order, the newest replacing older ones still waiting, so a
storm is absorbed; different devices proceed independently.  Everything that
reads sysfs or the udev database runs in the control executor, at most
:data:`CONCURRENCY` jobs at once, so hotplug never starves QMP's opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockd.block.device import Device, DeviceKind
from blockd.block.exports import ExportService
from blockd.block.registry import Registry
from blockd.devices.base import NodeOptions, Removable
from blockd.errors import BlockdError
from blockd.events import BlockdDeviceAdded, BlockExportDeleted, Event, EventBus
from blockd.hotplug import safety
from blockd.hotplug.rules import NODE_NAME_MAX, Rule, Seen, first_match, render
from blockd.hotplug.udev import SUBSYSTEMS, UDEV_CONTROL, UdevSource, udevd_running

__all__ = ["CONCURRENCY", "EVENT_PROPERTIES", "Attached", "Hotplug", "RuleCounters"]

log = logging.getLogger(__name__)

CONCURRENCY = 2  # hotplug jobs in the control executor at once
RELEASE_POLL = 0.1  # seconds between reads of attached loop devices' autoclear flags
EXPORT_GONE_TIMEOUT = 10.0  # seconds for NBD clients of a removed device to be cut off
# The udev properties BLOCKD_DEVICE_ADDED carries (those the device has).
EVENT_PROPERTIES = ("SUBSYSTEM", "DEVTYPE", "ID_BUS", "ID_TYPE", "ID_MODEL", "ID_VENDOR",
                    "ID_SERIAL", "ID_SERIAL_SHORT", "ID_WWN", "ID_PATH", "ID_CDROM",
                    "ID_FS_TYPE", "MAJOR", "MINOR")


@dataclass
class RuleCounters:
    """What one rule did: devices it matched, attached, and failed to attach."""

    matched: int = 0
    attached: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Attached:
    """A device hotplug attached, and what it made for it."""

    sys_path: str
    id: str
    node_name: str
    devname: str
    driver: str
    rule: Rule
    export_id: str | None
    loop_autoclear: str | None = None  # a loop device's autoclear flag when attached


@dataclass
class _Inspection:
    """What the executor found out about a device for one decision."""

    seen: Seen
    rule: Rule | None
    present: bool
    protected: bool
    size: int | None
    loop_autoclear: str | None = None


@dataclass
class _Queue:
    """The newest event waiting for one device, and whether a task drains it."""

    pending: tuple[str, Any] | None = None
    running: bool = False
    done: list[asyncio.Future[None]] = field(default_factory=list)


def _read_attributes(sys_paths: list[str], name: str) -> list[str | None]:
    """One sysfs attribute of several devices (executor)."""
    values: list[str | None] = []
    for sys_path in sys_paths:
        try:
            with open(f"{sys_path}/{name}") as f:
                values.append(f.read().strip())
        except OSError:
            values.append(None)
    return values


def _seen_of(device: Any) -> Seen:
    """A :class:`Seen` of a pyudev Device (properties copied now, attributes on demand)."""
    properties = {str(k): str(v) for k, v in device.properties.items()}

    def attribute(name: str) -> str | None:
        try:
            value = device.attributes.get(name)
        except (OSError, KeyError, UnicodeDecodeError):
            return None
        if value is None:
            return None
        return value.decode("utf-8", "replace").strip() if isinstance(value, bytes) \
            else str(value).strip()

    return Seen(properties, str(device.sys_name), str(device.device_node or ""), attribute)


class Hotplug:
    """Follows device events and applies the rules (event loop thread only)."""

    def __init__(
        self,
        registry: Registry,
        exports: ExportService,
        rules: tuple[Rule, ...],
        *,
        count_action: Callable[[str], None] | None = None,
        udev_control: str = UDEV_CONTROL,
        receive_buffer: int | None = None,
        sys_root: str = "/sys",
        proc_root: str = "/proc",
        enumerate_devices: Callable[[], list[Any]] | None = None,
    ) -> None:
        self.registry = registry
        self.exports = exports
        self.bus: EventBus = registry.bus
        self.rules = rules
        self.counters = {rule.index: RuleCounters() for rule in rules}
        self.acted = 0
        self.ignored = 0
        self.rescans = 0
        self.attached: dict[str, Attached] = {}
        self._count_action = count_action or (lambda action: None)
        self.source = UdevSource(self._on_device, self._on_lost, control=udev_control,
                                 receive_buffer=receive_buffer)
        self._sys_root = sys_root
        self._proc_root = proc_root
        self._enumerate = enumerate_devices or self._enumerate_udev
        self._queues: dict[str, _Queue] = {}
        self._jobs = asyncio.Semaphore(CONCURRENCY)
        self._refused: set[str] = set()  # protected devices already logged
        self._failing: set[str] = set()  # devices whose last attach failed (logged once)
        self._rescan_task: asyncio.Task[None] | None = None
        self._release_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # one per device with events to handle
        self._closed = False

    # -- life cycle -----------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    async def start(self) -> None:
        """Listen first, then enumerate, so nothing falls between (coldplug)."""
        if not self.enabled:
            return
        self.source.start()
        await self.rescan()
        self._release_task = asyncio.get_running_loop().create_task(self._watch_releases())

    async def close(self) -> None:
        """Stop listening (attached devices stay until the daemon closes everything)."""
        self._closed = True
        self.source.close()
        tasks = [t for t in (self._rescan_task, self._release_task, *self._tasks)
                 if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- events -------------------------------------------------------------------

    def _on_device(self, device: Any) -> None:
        action = str(device.action or "change")
        if action not in ("add", "change", "remove"):
            return  # bind, unbind, move, offline, online: nothing for blockd
        self._submit(str(device.sys_path), action, device)

    def _on_lost(self) -> None:
        if self._rescan_task is None or self._rescan_task.done():
            self._rescan_task = asyncio.get_running_loop().create_task(self.rescan())

    def _submit(self, key: str, action: str, device: Any) -> asyncio.Future[None]:
        """Queue the newest event for a device; one task per device drains its queue."""
        queue = self._queues.setdefault(key, _Queue())
        queue.pending = (action, device)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.done.append(waiter)
        if not queue.running:
            queue.running = True
            task = asyncio.get_running_loop().create_task(self._drain(key, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return waiter

    async def _drain(self, key: str, queue: _Queue) -> None:
        try:
            while queue.pending is not None and not self._closed:
                (action, device), queue.pending = queue.pending, None
                waiters, queue.done = queue.done, []
                try:
                    await self._handle(key, action, device)
                except Exception:
                    log.exception("hotplug: %s %s failed", action, key)
                finally:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            queue.running = False
            for waiter in queue.done:
                if not waiter.done():
                    waiter.set_result(None)
            queue.done = []
            if queue.pending is None and self._queues.get(key) is queue:
                del self._queues[key]

    async def _in_executor(self, fn: Callable[..., Any], *args: object) -> Any:
        async with self._jobs:
            return await self.registry.run_control(fn, *args)

    def _inspect(self, device: Any) -> _Inspection:
        """Rules, presence and protection of a device (executor: reads sysfs)."""
        seen = device if isinstance(device, Seen) else _seen_of(device)
        rule = first_match(self.rules, seen)
        props = seen.properties
        size: int | None = None
        present = True
        if props.get("SUBSYSTEM") == "block":
            sectors = seen.attributes("size")
            size = int(sectors) * 512 if sectors and sectors.isdigit() else 0
            # A drive without a disc is still a drive; any other block device
            # without a size (an unbound loop device, an empty reader) is absent.
            present = size > 0 or props.get("ID_CDROM") == "1"
        protected = False
        if rule is not None and rule.action == "attach" and present:
            taken = safety.protected(self._proc_root, self._sys_root)
            if props.get("SUBSYSTEM") == "scsi_generic":
                mine = safety.scsi_generic_disks(seen.kernel, self._sys_root)
            else:
                mine = {f"{props.get('MAJOR')}:{props.get('MINOR')}"}
            protected = bool(mine & taken)
        autoclear = seen.attributes("loop/autoclear") if seen.kernel.startswith("loop") \
            else None
        return _Inspection(seen, rule, present, protected, size, autoclear)

    async def _handle(self, key: str, action: str, device: Any) -> None:
        current = self.attached.get(key)
        if action in ("remove", "release"):
            if current is not None:
                await self._detach(current, "removed" if action == "remove"
                                   else "released (losetup -d)")
            return
        found: _Inspection = await self._in_executor(self._inspect, device)
        if current is not None:
            if not found.present:
                await self._detach(current, "has no medium any more")
            elif found.size is not None:
                await self._resize(current, found.size)
            return
        rule = found.rule
        if rule is None:
            self.ignored += 1
            return
        self.counters[rule.index].matched += 1
        if rule.action == "ignore" or not found.present:
            self.ignored += 1
            return
        if found.protected:
            self.ignored += 1
            if key not in self._refused:
                self._refused.add(key)
                log.warning("hotplug: %s (%s) matches %s but holds a mounted filesystem, "
                            "swap or a device-mapper/md member: never attached",
                            found.seen.devname or found.seen.kernel, key, rule.label)
            return
        await self._attach(key, rule, found.seen, found.loop_autoclear)

    # -- actions --------------------------------------------------------------------

    def _failed(self, key: str, rule: Rule, message: str, *args: object) -> None:
        """Count a failed attach; log it the first time for this device."""
        self.counters[rule.index].failed += 1
        level = logging.DEBUG if key in self._failing else logging.WARNING
        self._failing.add(key)
        log.log(level, "hotplug: %s: " + message, rule.label, *args)

    async def _attach(self, key: str, rule: Rule, seen: Seen,
                      loop_autoclear: str | None = None) -> None:
        counters = self.counters[rule.index]
        started = time.monotonic()
        try:
            id = render(rule.id, seen)
            node_name = render(rule.node_name, seen, id=id, limit=NODE_NAME_MAX)
            export_name = None if rule.export is None else render(rule.export.name, seen, id=id)
        except KeyError as exc:
            self._failed(key, rule, "its templates name the udev property %s, which %s does "
                         "not have", exc, seen.devname or seen.kernel)
            return
        driver = rule.driver_for(seen)
        options = NodeOptions(driver=driver, node_name=node_name, filename=seen.devname,
                              read_only=rule.read_only)
        registry = self.registry
        try:
            node = await registry.add_node(options, monitor_owned=False)
        except BlockdError as exc:
            self._failed(key, rule, "cannot open %s (%s): %s", seen.devname, driver, exc)
            return
        kind: DeviceKind = "cd" if isinstance(node.driver, Removable) else "hd"
        try:
            device = registry.add_device(kind, id, node_name, rerror=rule.rerror,
                                         werror=rule.werror)
        except BlockdError as exc:
            self._failed(key, rule, "cannot create device %s for %s: %s", id, seen.devname,
                         exc)
            await registry.del_node(node_name, implicit=True)
            return
        export_id = None
        if rule.export is not None and export_name is not None:
            export_id = self._export(device, node_name, export_name, rule.export.writable,
                                     rule.label)
        self.attached[key] = Attached(key, id, node_name, seen.devname, node.drv, rule,
                                      export_id, loop_autoclear)
        counters.attached += 1
        self._failing.discard(key)
        self.acted += 1
        self._count_action("add")
        props = tuple((k, seen.properties[k]) for k in EVENT_PROPERTIES if k in seen.properties)
        self.bus.publish(BlockdDeviceAdded(id, node_name, seen.devname, node.drv, props))
        log.info("hotplug: %s attached %s as %s (node %s, %s%s) in %.0f ms", rule.label,
                 seen.devname, id, node_name, node.drv,
                 f", export {export_name}" if export_id else "",
                 (time.monotonic() - started) * 1000)

    def _export(self, device: Device, node_name: str, name: str, writable: bool,
                label: str) -> str | None:
        if not self.exports.running:
            log.warning("hotplug: %s asks for an export of %s, but no NBD server runs",
                        label, device.id)
            return None
        try:
            export = self.registry.add_export(device.id, node_name, name=name,
                                              writable=writable)
        except BlockdError as exc:
            log.warning("hotplug: %s: cannot export %s as %s: %s", label, device.id, name, exc)
            return None
        self.exports.export_added(export)
        return export.id

    async def _detach(self, current: Attached, why: str) -> None:
        registry = self.registry
        self.attached.pop(current.sys_path, None)
        for export in [e for e in registry.exports.values() if e.device.id == current.id]:
            await self._delete_export(export)
        device = registry.devices.get(current.id)
        if device is not None and device.node is not None \
                and device.node.name == current.node_name:
            registry.del_device(current.id)
        node = registry.nodes.get(current.node_name)
        if node is not None and node.user is None:
            await registry.del_node(current.node_name, implicit=True)
        self.acted += 1
        self._count_action("remove")
        log.info("hotplug: %s %s: detached %s", current.devname, why, current.id)

    async def _delete_export(self, export: Any) -> None:
        """Cut the export's clients off and wait until it is gone (BLOCK_EXPORT_DELETED)."""
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def watch(event: Event) -> None:
            if isinstance(event, BlockExportDeleted) and event.id == export.id \
                    and not gone.done():
                gone.set_result(None)

        unsubscribe = self.bus.subscribe(watch)
        try:
            if not export.shutting_down:
                await self.exports.delete_export(export, hard=True)
            if self.registry.exports.get(export.id) is export:
                await asyncio.wait_for(gone, EXPORT_GONE_TIMEOUT)
        except (BlockdError, TimeoutError) as exc:
            log.warning("hotplug: export %s did not go away: %s", export.id, exc)
        finally:
            unsubscribe()

    async def _resize(self, current: Attached, size: int) -> None:
        device = self.registry.devices.get(current.id)
        node = device.node if device is not None else None
        if device is None or node is None or node.size == size \
                or isinstance(node.driver, Removable):
            return
        device.note_medium(node, size)
        self.acted += 1
        self._count_action("change")
        log.info("hotplug: %s is now %d bytes", current.devname, size)

    # -- loop devices released while open ---------------------------------------------

    async def _watch_releases(self) -> None:
        """Notice ``losetup -d`` of an attached loop device.

        The kernel defers releasing a loop device that is open (blockd holds
        it) and sends no event until the last close: it only sets the device's
        autoclear flag.  A flag that went from 0 to 1 while blockd held the
        device is that request; blockd then lets go, and the kernel finishes.
        """
        while True:
            await asyncio.sleep(RELEASE_POLL)
            watched = [a for a in self.attached.values() if a.loop_autoclear == "0"]
            if not watched:
                continue
            flags = await self._in_executor(
                _read_attributes, [a.sys_path for a in watched], "loop/autoclear")
            for attached, flag in zip(watched, flags, strict=True):
                if flag == "1" and self.attached.get(attached.sys_path) is attached:
                    self._submit(attached.sys_path, "release", None)

    # -- rescans ---------------------------------------------------------------------

    def _enumerate_udev(self) -> list[Any]:
        """Every device of the watched subsystems now (executor: reads sysfs, udev's db)."""
        import pyudev

        context = self.source.context or pyudev.Context()
        found: list[Any] = []
        for subsystem in SUBSYSTEMS:
            found += [_seen_of(d) for d in context.list_devices(subsystem=subsystem)]
        return found

    async def rescan(self) -> None:
        """Bring every device in line with the rules, as if each had just been added."""
        if not self.enabled:
            return
        self.rescans += 1
        devices: list[Any] = await self._in_executor(self._enumerate)
        keys: dict[str, Any] = {}
        for device in devices:
            seen = device if isinstance(device, Seen) else _seen_of(device)
            key = seen.properties.get("DEVPATH")
            keys[f"{self._sys_root}{key}" if key else seen.kernel] = device
        waiters = [self._submit(key, "change", dev) for key, dev in keys.items()]
        for key in list(self.attached):
            if key not in keys:
                waiters.append(self._submit(key, "remove", None))
        if waiters:
            await asyncio.gather(*waiters)

    # -- QMP -----------------------------------------------------------------------------

    def recheck_udevd(self) -> None:
        """Listen again if udevd started or stopped since (blockd-hotplug-rescan)."""
        if self.enabled and not self._closed \
                and udevd_running(self.source.control) != self.source.udevd:
            self.source.restart()

    def query(self) -> dict[str, object]:
        """blockd-query-hotplug's reply."""
        source = self.source
        return {
            "enabled": self.enabled,
            "monitor": source.source,
            "udevd-running": source.udevd,
            "events": {"seen": source.seen, "acted": self.acted, "ignored": self.ignored,
                       "lost": source.lost},
            "rescans": self.rescans,
            "rules": [self._rule_info(rule) for rule in self.rules],
            "devices": [
                {"id": a.id, "node-name": a.node_name, "devname": a.devname,
                 "driver": a.driver, "rule": a.rule.label,
                 **({"export": a.export_id} if a.export_id else {})}
                for a in self.attached.values()
            ],
        }

    def metrics(self) -> tuple[bool, int, tuple[tuple[str, int, int, int], ...]]:
        """What the metrics show: udevd answering, events lost, per-rule counts."""
        rows = tuple((rule.label, self.counters[rule.index].matched,
                      self.counters[rule.index].attached, self.counters[rule.index].failed)
                     for rule in self.rules)
        return self.source.udevd, self.source.lost, rows

    def _rule_info(self, rule: Rule) -> dict[str, object]:
        counters = self.counters[rule.index]
        return {"index": rule.index, "name": rule.label, "action": rule.action,
                "match": dict(rule.match), "matched": counters.matched,
                "attached": counters.attached, "failed": counters.failed}

