"""Nodes and devices by name, with QEMU's naming and ownership rules.

The registry is the one place that knows every node and device.  It opens
nodes in threads of their own with a timeout (opening may touch slow hardware or
hang on a dead file server: see :mod:`blockd.block.opens`), enforces unique
names (a node-name may not clash with a device id and vice versa), refuses to
delete what is in use, and publishes the events that follow from its changes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from typing import TypeVar

from blockd.aio.workers import IoWorkers
from blockd.block.device import DEFAULT_MAX_IN_FLIGHT, Device, DeviceKind, ErrorAction
from blockd.block.exports import MAX_NBD_STRING, Export, check_export_id
from blockd.block.node import Node, check_node_name
from blockd.block.opens import OpenRunner
from blockd.block.stats import BlockAcctStats
from blockd.devices import open_driver
from blockd.devices.base import BlockDriver, NodeOptions
from blockd.errors import BlockdError, DeviceNotFound, InUse, InvalidArgument, NotFound, ReadOnly
from blockd.events import BlockExportDeleted, DeviceDeleted, EventBus

__all__ = ["Registry", "check_device_id"]

T = TypeVar("T")

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_QOM_PREFIX = "/machine/peripheral/"
log = logging.getLogger(__name__)

QUIESCE_TIMEOUT = 30.0
"""Seconds a node's close waits for the requests running in its driver."""


def check_device_id(value: str) -> None:
    """QEMU's id rules for devices (qdev ids)."""
    if not _ID.match(value):
        raise InvalidArgument("Parameter 'id' expects an identifier")


class Registry:
    """All nodes and devices of one daemon."""

    def __init__(
        self, *, executor: Executor | None, bus: EventBus, workers: IoWorkers | None = None,
        opens: OpenRunner | None = None, device_max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.executor = executor  # control operations: close, tray
        self.opens = opens if opens is not None else OpenRunner()  # opens and probes
        self.stats_class: type[BlockAcctStats] = BlockAcctStats
        self.workers = workers if workers is not None else IoWorkers()  # data requests
        self.bus = bus
        self.device_max_in_flight = device_max_in_flight  # each device's cap (0: none)
        # Times a device's limit was hit, by name (blockd-query-limits, the metrics).
        self.limit_hits: dict[str, int] = {}
        self.nodes: dict[str, Node] = {}
        self.devices: dict[str, Device] = {}
        self.exports: dict[str, Export] = {}
        # Deleted nodes whose requests outlived blockdev-del's wait, by id: each with the
        # task that closes it once idle.
        self._closing: dict[int, tuple[Node, asyncio.Task[None]]] = {}

    def limit_hit(self, name: str) -> None:
        self.limit_hits[name] = self.limit_hits.get(name, 0) + 1

    async def run_control(self, fn: Callable[..., T], *args: object) -> T:
        """Run a control call that may block (open, close, tray) in the control executor."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- nodes ----------------------------------------------------------------

    async def run_open(self, what: str, fn: Callable[..., T], *args: object,
                       undo: Callable[[T], None] | None = None) -> T:
        """Run a call that opens or stats ``what`` (a path), with the open timeout."""
        return await self.opens.run(what, fn, *args, undo=undo)

    async def add_node(
        self, options: NodeOptions, *, monitor_owned: bool = True, generated: bool = False,
        resolve: Callable[[str], str] | None = None,
    ) -> Node:
        """Open a node; raise BlockdError with QEMU's text on any failure.

        ``generated`` names come from blockd itself (``#blockNNN``, as QEMU names
        implicit nodes) and skip the user's node-name rules.  ``resolve`` turns the
        filename into the path to open (a QMP client's path policy); it runs in the
        open's thread, under the same timeout, since resolving stats the path too.
        An open that does not finish within the open timeout fails with an error
        naming the path; if it finishes later, its driver is closed there and then.
        """
        name = options.node_name
        if not generated:
            check_node_name(name)
        if name in self.nodes:
            raise InUse(f"Duplicate nodes with node-name='{name}'")
        if name in self.devices:
            raise InUse(f"node-name={name} is conflicting with a device id")
        loop = asyncio.get_running_loop()
        node = await self.run_open(options.filename or name, _open_node, options,
                                   monitor_owned, resolve, undo=_close_node)
        if name in self.nodes or name in self.devices:  # lost a race with a concurrent add
            await loop.run_in_executor(self.executor, node.driver.close)
            raise InUse(f"Duplicate nodes with node-name='{name}'")
        self.nodes[name] = node
        return node

    async def del_node(self, name: str, *, implicit: bool = False) -> None:
        """blockdev-del: close and forget a free, monitor-owned node.

        ``implicit`` deletes a node blockd opened itself (a medium that
        blockdev-change-medium opened, once it is removed again).  Waits up to
        :data:`QUIESCE_TIMEOUT` for requests in its driver; if some are left, the
        node is gone at once and its driver is closed when they end.
        """
        node = self.nodes.get(name)
        if node is None:
            raise NotFound(f"Failed to find node with node-name='{name}'")
        if node.user is not None:
            raise InUse(f"Node {name} is in use")
        if not node.monitor_owned and not implicit:
            raise InUse(f"Node {name} is not owned by the monitor")
        del self.nodes[name]
        if not await node.wait_idle(QUIESCE_TIMEOUT):
            # Its requests still run, or wait for a worker thread or io-wq, which look
            # the descriptor up when they start: closing now could hand its number to
            # another open under them.  The node is gone; its descriptor goes later.
            log.warning("node %s: requests still running %g s after blockdev-del; it is "
                        "closed when they end", name, QUIESCE_TIMEOUT)
            task = asyncio.ensure_future(self._close_once_idle(node))
            self._closing[id(node)] = (node, task)
            task.add_done_callback(lambda _: self._closing.pop(id(node), None))
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, node.driver.close)

    async def _close_once_idle(self, node: Node) -> None:
        while not await node.wait_idle(QUIESCE_TIMEOUT):
            pass
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, node.driver.close)
        except OSError as exc:
            log.warning("node %s: closing it after its last request failed: %s", node.name, exc)

    @property
    def closing(self) -> list[Node]:
        """Deleted nodes whose driver is closed once their last requests end."""
        return [node for node, _ in self._closing.values()]

    # -- devices ----------------------------------------------------------------

    def add_device(
        self,
        kind: DeviceKind,
        id: str,
        drive: str | None,
        *,
        rerror: ErrorAction = "auto",
        werror: ErrorAction = "auto",
        stats: BlockAcctStats | None = None,
    ) -> Device:
        """device_add: create a ``cd`` or ``hd`` device, optionally on a node."""
        check_device_id(id)
        if id in self.devices:
            raise InUse(f"Duplicate device ID '{id}'")
        if id in self.nodes:
            raise InUse(f"Device name '{id}' conflicts with an existing node name")
        node = None
        if drive is not None:
            node = self.nodes.get(drive)
            if node is None:
                raise NotFound(f"Property '{kind}.drive' can't find value '{drive}'")
            if node.user is not None:
                raise InUse(f"Property '{kind}.drive' can't take value '{drive}', it's in use")
        elif kind == "hd":
            raise InvalidArgument("No drive specified")
        device = Device(id, kind, node, workers=self.workers, bus=self.bus,
                        rerror=rerror, werror=werror, stats=stats or self.stats_class(),
                        control=self.run_control, max_in_flight=self.device_max_in_flight,
                        limit_hit=self.limit_hit)
        self.devices[id] = device
        return device

    def del_device(self, id: str) -> None:
        """device_del: remove a device; its medium node stays, free again."""
        device = self.find_device(id=id)
        for export in self.exports.values():
            if export.device is device:
                raise InUse(f"Device '{id}' is in use by export '{export.id}'")
        del self.devices[device.id]
        device.detach()
        self.bus.publish(DeviceDeleted(device=device.id, path=device.qom_path))

    def find_device(self, *, id: str | None = None, device: str | None = None) -> Device:
        """Look a device up by ``id`` (or QOM path) or by legacy ``device`` name.

        Exactly one must be given (QEMU's rule for the tray commands).
        """
        if (id is None) == (device is None):
            raise InvalidArgument("Need exactly one of 'device' and 'id'")
        name = id if id is not None else device
        assert name is not None
        key = name[len(_QOM_PREFIX):] if id is not None and name.startswith(_QOM_PREFIX) else name
        found = self.devices.get(key)
        if found is None:
            raise DeviceNotFound(f"Device '{name}' not found")
        return found

    # -- exports ------------------------------------------------------------------

    def add_export(
        self,
        id: str,
        node_name: str,
        *,
        name: str | None = None,
        description: str = "",
        writable: bool = False,
        writethrough: bool = False,
        nbd_running: bool = True,
    ) -> Export:
        """block-export-add (type nbd), with QEMU's checks in QEMU's order."""
        if not check_export_id(id):
            raise InvalidArgument("Invalid block export id")
        if id in self.exports:
            raise InUse(f"Block export id '{id}' is already in use")
        node = self.nodes.get(node_name)
        if node is None:
            raise NotFound(f"Cannot find device='' nor node-name='{node_name}'")
        if writable and node.read_only:
            raise ReadOnly("Cannot export read-only node as writable")
        if not nbd_running:
            raise InvalidArgument("NBD server not running")
        export_name = node_name if name is None else name
        if len(export_name.encode()) > MAX_NBD_STRING:
            raise InvalidArgument(f"export name '{export_name}' too long")
        if len(description.encode()) > MAX_NBD_STRING:
            raise InvalidArgument(f"description '{description}' too long")
        if any(e.name == export_name for e in self.exports.values()):
            raise InUse(f"NBD server already has export named '{export_name}'")
        holder = self.devices.get(node.user) if node.user is not None else None
        implicit = holder is None
        if holder is None:
            if node.user is not None:  # held by something that is not a device
                raise InUse(f"Node {node_name} is in use")
            if id in self.devices:  # the implicit device takes the export's id
                raise InUse(f"Duplicate device ID '{id}'")
            holder = Device(id, "hd", node, workers=self.workers, bus=self.bus,
                            stats=self.stats_class(), control=self.run_control,
                            writes=writable, max_in_flight=self.device_max_in_flight,
                            limit_hit=self.limit_hit)
            self.devices[id] = holder
        export = Export(id, export_name, description, holder, node_name, writable,
                        writethrough, implicit_device=implicit)
        self.exports[id] = export
        return export

    def find_export(self, id: str) -> Export:
        export = self.exports.get(id)
        if export is None:
            raise NotFound(f"Export '{id}' is not found")
        return export

    def export_by_name(self, name: str) -> Export | None:
        """The export an NBD client asks for by name (shutting-down ones are gone)."""
        for export in self.exports.values():
            if export.name == name and not export.shutting_down:
                return export
        return None

    def remove_export(self, export: Export, *, announce: bool = True) -> None:
        """Forget a shut-down export and its implicit device; announce BLOCK_EXPORT_DELETED."""
        if self.exports.get(export.id) is not export:
            return
        del self.exports[export.id]
        if export.implicit_device:
            device = export.device
            self.devices.pop(device.id, None)
            device.detach()
        if announce:
            self.bus.publish(BlockExportDeleted(export.id))

    # -- shutdown -------------------------------------------------------------------

    async def close_all(self, timeout: float = QUIESCE_TIMEOUT) -> list[str]:
        """Detach every device and close every node (used at exit), within ``timeout``.

        A node whose requests are still in its driver when the time is up is left
        open (closing it under a running call could hand its descriptor number to
        another open); the names of those nodes are returned, deleted nodes still
        waiting for their last requests (:attr:`closing`) among them.
        """
        for device in self.devices.values():
            device.detach()
        self.devices.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        nodes, self.nodes = list(self.nodes.values()), {}
        closing = list(self._closing.values())
        left_open: list[str] = []
        for node in nodes:
            if not await node.wait_idle(max(0.0, deadline - loop.time())):
                left_open.append(node.name)
                continue
            try:
                await asyncio.wait_for(
                    loop.run_in_executor(self.executor, node.driver.close),
                    max(0.1, deadline - loop.time()))
            except TimeoutError:
                left_open.append(node.name)
            except OSError:
                pass
        for node, task in closing:  # deleted, and closed by their task once idle
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - loop.time()))
            except TimeoutError:
                task.cancel()
                self._closing.pop(id(node), None)
                left_open.append(node.name)
        return left_open


def _close_node(node: Node) -> None:
    """Undo an open that finished too late (runs in the open's thread)."""
    node.driver.close()


def _open_node(options: NodeOptions, monitor_owned: bool,
               resolve: Callable[[str], str] | None = None) -> Node:
    """Resolve the path, open a driver and read its size and info (in an open's thread)."""
    if resolve is not None and options.filename is not None:
        options = replace(options, filename=resolve(options.filename))
    driver: BlockDriver = open_driver(options)
    try:
        size = driver.getlength()
        info = driver.get_info()
    except OSError as err:
        driver.close()
        raise BlockdError(
            f"Could not open '{options.filename}': {os.strerror(err.errno or errno.EIO)}",
            err.errno,
        ) from err
    return Node(options.node_name, driver, options, size, info, monitor_owned=monitor_owned)
