"""The command table: what a command is and how handlers see the daemon.

A :class:`Command` pairs a QMP name with its declared argument type and an
async handler.  Handlers receive validated arguments (a plain dict keyed by
QMP member names) and a :class:`CommandContext` giving them the registry and
the few daemon-level hooks they need.  They return the QMP ``return`` value or
raise :class:`~blockd.errors.BlockdError` with QEMU's text.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from blockd.block.exports import ExportService
from blockd.block.registry import Registry
from blockd.qmp.schema import Struct, Type, Union

__all__ = ["ArgSpec", "Args", "Command", "CommandContext", "CommandTable", "Handler", "Validator"]

Args = dict[str, object]


@dataclass
class CommandContext:
    """What handlers may touch: the registry and daemon-level hooks."""

    registry: Registry
    nbd: ExportService
    version: dict[str, object]
    request_quit: Callable[[], None]
    command_names: Callable[[], Iterable[str]] = lambda: ()


Handler = Callable[[CommandContext, Args], Awaitable[object]]
Validator = Callable[[dict[str, object], bool], Args]
ArgSpec = Struct | Union | Validator | None


@dataclass(frozen=True)
class Command:
    """One QMP command: name, declared arguments (``None`` = takes none) and handler."""

    name: str
    args: ArgSpec
    handler: Handler
    deprecated: bool = False

    def check_args(self, arguments: dict[str, object], keyval: bool = False) -> Args:
        """Validate ``arguments``; raises SchemaError with QEMU's text.

        ``args`` is a declared type, ``None`` for commands without arguments,
        or a function for commands that validate in their own way (device_add).
        """
        if self.args is None or isinstance(self.args, Type):
            schema: Type = self.args if self.args is not None else Struct({})
            checked = schema.check(arguments, "", keyval)
            assert isinstance(checked, dict)
            return checked
        return self.args(arguments, keyval)


@dataclass
class CommandTable:
    """Commands by name; modules register theirs with :meth:`command`."""

    commands: dict[str, Command] = field(default_factory=dict)

    def command(
        self, name: str, args: ArgSpec = None, *, deprecated: bool = False
    ) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` as QMP command ``name``."""

        def register(handler: Handler) -> Handler:
            if name in self.commands:
                raise ValueError(f"command {name} registered twice")
            self.commands[name] = Command(name, args, handler, deprecated)
            return handler

        return register

    def __contains__(self, name: object) -> bool:
        return name in self.commands

    def get(self, name: str) -> Command | None:
        return self.commands.get(name)

    def names(self) -> list[str]:
        return list(self.commands)
