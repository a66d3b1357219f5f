"""Pausing and resuming request processing: stop, cont, query-status, blockd-device-resume.

In QEMU these act on the whole virtual machine.  blockd has no machine: a device
pauses by itself when an error policy says ``stop`` (its requests are held, not
failed), ``stop`` pauses every device, ``cont`` resets every device's I/O status
and releases every held request, and the extension ``blockd-device-resume``
does the same for one device.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockd.events import Resume, Stop
from blockd.qmp.commands.base import CommandContext, CommandTable, NoArgs

__all__ = ["DeviceResumeArgs", "register"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceResumeArgs:
    """blockd-device-resume: the device to resume."""

    id: str


def register(table: CommandTable) -> None:
    @table.command("stop")
    async def stop(ctx: CommandContext, args: NoArgs) -> object:
        paused = [d.pause(publish=False) for d in ctx.registry.devices.values()]
        if any(paused):
            ctx.registry.bus.publish(Stop())  # one STOP for the whole daemon, as QEMU
        return {}

    @table.command("cont")
    async def cont(ctx: CommandContext, args: NoArgs) -> object:
        resumed = [d.resume(publish=False) for d in ctx.registry.devices.values()]
        if any(resumed):
            ctx.registry.bus.publish(Resume())
        return {}

    @table.command("blockd-device-resume")
    async def device_resume(ctx: CommandContext, args: DeviceResumeArgs) -> object:
        ctx.registry.find_device(id=args.id).resume()
        return {}

    @table.command("query-status")
    async def query_status(ctx: CommandContext, args: NoArgs) -> object:
        devices = list(ctx.registry.devices.values())
        if any(d.paused and d.iostatus != "ok" for d in devices):
            status = "io-error"
        elif any(d.paused for d in devices):
            status = "paused"
        else:
            status = "running"
        return {"status": status, "singlestep": False, "running": status == "running"}
