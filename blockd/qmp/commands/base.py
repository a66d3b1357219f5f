"""The command table: what a command is and how handlers see the daemon.

A command is an async handler registered under its QMP name; the annotation of
its ``args`` parameter, a frozen dataclass (see :mod:`blockd.qmp.schema`), is
the declaration of its arguments::

    @dataclass(frozen=True, slots=True, kw_only=True)
    class BlockdevDelArgs:
        node_name: str                      # QMP member "node-name", required

    @table.command("blockdev-del")
    async def blockdev_del(ctx: CommandContext, args: BlockdevDelArgs) -> object:
        await ctx.registry.del_node(args.node_name)
        return {}

Registration turns that annotation into a validator, so what the client is
checked against and what mypy checks the handler against are one declaration.
A command without arguments takes :class:`NoArgs`.  A command whose arguments
need a check the schema cannot express before the usual one (device_add names
unknown properties after the device model) adds a ``precheck``.

Handlers also get a :class:`CommandContext` giving them the registry and the
few daemon-level hooks they need.  They return the QMP ``return`` value or
raise :class:`~blockd.errors.BlockdError` with QEMU's text.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, get_type_hints

from blockd.aio.tls import TlsCredentials
from blockd.block.exports import ExportService
from blockd.block.registry import Registry
from blockd.qmp.paths import PathPolicy
from blockd.qmp.schema import Type, compile_type

__all__ = [
    "Command", "CommandContext", "CommandTable", "Handler", "HotplugControl", "NoArgs",
    "Precheck",
]


class HotplugControl(Protocol):
    """What the hotplug commands see of hotplug (the daemon passes the real one)."""

    def query(self) -> dict[str, object]: ...

    async def rescan(self) -> None: ...

    def recheck_udevd(self) -> None: ...


@dataclass
class CommandContext:
    """What handlers may touch: the registry and daemon-level hooks."""

    registry: Registry
    nbd: ExportService
    version: dict[str, object]
    request_quit: Callable[[], None]
    command_names: Callable[[], Iterable[str]] = lambda: ()
    # blockd-scsi-command's allowlist: opcodes, "all", or None for the safe default.
    scsi_allowed_opcodes: frozenset[int] | Literal["all"] | None = None
    hotplug: HotplugControl | None = None
    # The daemon's limits and how often they were hit (blockd-query-limits).
    limits: Callable[[], dict[str, object]] = lambda: {"limits": {}, "hits": {}}
    # What QMP clients may open (None: anything; the command line is never checked).
    path_policy: PathPolicy | None = None
    # object-add's objects by id (TLS credentials), and the ids listeners use now.
    objects: dict[str, TlsCredentials] = field(default_factory=dict)
    objects_in_use: Callable[[], set[str]] = set

    async def allowed_path(self, filename: str) -> str:
        """The path to open for ``filename`` named by a QMP client (resolved when a
        policy applies); raises PathRefused."""
        if self.path_policy is None:
            return filename
        return await self.registry.run_open(filename, self.path_policy.resolve, filename)


@dataclass(frozen=True, slots=True)
class NoArgs:
    """The arguments of a command that takes none (any member is unexpected)."""


# A handler's second parameter is its own arguments dataclass; the table only
# knows that it gets what the validator built from that parameter's annotation.
Handler = Callable[[CommandContext, Any], Awaitable[object]]
H = TypeVar("H", bound=Handler)
# Checks the raw arguments before the schema does; raises SchemaError.
Precheck = Callable[[Mapping[str, object]], None]


@dataclass(frozen=True)
class Command:
    """One QMP command: its name, handler and the argument type the handler declares."""

    name: str
    handler: Handler
    arguments: Type
    precheck: Precheck | None = None
    deprecated: bool = False

    def check_args(self, arguments: Mapping[str, object], keyval: bool = False) -> object:
        """The handler's arguments dataclass for ``arguments``; raises SchemaError
        with QEMU's text.  ``keyval``: the values are strings from key=value syntax."""
        if self.precheck is not None:
            self.precheck(arguments)
        return self.arguments.check(arguments, "", keyval)


def argument_type(handler: Handler) -> Type:
    """The validator for the annotation of ``handler``'s second parameter (``args``)."""
    parameters = list(inspect.signature(handler).parameters)
    if len(parameters) != 2:
        raise TypeError(f"handler {handler.__name__} must take (ctx, args)")
    hints = get_type_hints(handler, include_extras=True)
    if parameters[1] not in hints:
        raise TypeError(f"handler {handler.__name__}: annotate its arguments")
    return compile_type(hints[parameters[1]])


@dataclass
class CommandTable:
    """Commands by name; modules register theirs with :meth:`command`."""

    commands: dict[str, Command] = field(default_factory=dict)

    def command(
        self, name: str, *, precheck: Precheck | None = None, deprecated: bool = False
    ) -> Callable[[H], H]:
        """Decorator registering ``handler`` as QMP command ``name``."""

        def register(handler: H) -> H:
            if name in self.commands:
                raise ValueError(f"command {name} registered twice")
            self.commands[name] = Command(
                name, handler, argument_type(handler), precheck, deprecated
            )
            return handler

        return register

    def __contains__(self, name: object) -> bool:
        return name in self.commands

    def get(self, name: str) -> Command | None:
        return self.commands.get(name)

    def names(self) -> list[str]:
        return list(self.commands)
