"""Run one QMP command: validate arguments, call the handler, map errors.

This is the one place where exceptions become QMP error classes (DESIGN.md
section 4): ``DeviceNotFound`` keeps its class, every other blockd error and
every argument error is a ``GenericError`` carrying QEMU's text.  A bug in a
handler becomes a GenericError too (and a log entry), never a dead session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from blockd.errors import BlockdError, DeviceNotFound
from blockd.qmp.commands import CommandContext, CommandTable
from blockd.qmp.schema import SchemaError

__all__ = ["CommandError", "Dispatcher", "error_class"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CommandError(Exception):
    """A command failed: the QMP error class and description to send."""

    error_class: str
    desc: str


def error_class(err: BaseException) -> str:
    """The QMP error class for an exception raised by a handler."""
    return "DeviceNotFound" if isinstance(err, DeviceNotFound) else "GenericError"


class Dispatcher:
    """Executes commands from the table against a context."""

    def __init__(self, table: CommandTable, context: CommandContext) -> None:
        self.table = table
        self.context = context
        # Told of every command executed: (name, "success" or the QMP error class).
        # The daemon counts them for the metrics (blockd_qmp_commands_total).
        self.on_command: Callable[[str, str], None] | None = None

    def is_command(self, name: str) -> bool:
        return name in self.table

    async def execute(self, name: str, arguments: dict[str, object]) -> object:
        """Run ``name``; return its result or raise :class:`CommandError`."""
        command = self.table.get(name)
        if command is None:
            # Not counted: the name is the client's, and would make a new series each time.
            raise CommandError("CommandNotFound", f"The command {name} has not been found")
        try:
            args = command.check_args(arguments)
            result = await command.handler(self.context, args)
        except SchemaError as err:
            self._count(name, "GenericError")
            raise CommandError("GenericError", str(err)) from None
        except BlockdError as err:
            cls = error_class(err)
            self._count(name, cls)
            raise CommandError(cls, err.message) from None
        except OSError as err:
            self._count(name, "GenericError")
            raise CommandError("GenericError", f"{err.strerror or err}") from None
        except Exception as err:
            log.exception("command %s failed unexpectedly", name)
            self._count(name, "GenericError")
            raise CommandError("GenericError", f"internal error: {err}") from None
        self._count(name, "success")
        return result

    def _count(self, name: str, result: str) -> None:
        if self.on_command is not None:
            self.on_command(name, result)
