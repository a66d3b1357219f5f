"""object-add and object-del, for the one object type blockd has: ``tls-creds-x509``.

The arguments are QEMU's (a flat union on ``qom-type``), so ``--object
tls-creds-x509,id=tls0,dir=/etc/pki/blockd,endpoint=server`` and the same
object-add work as they do with qemu-storage-daemon; the directory's layout is
QEMU's (blockd.aio.tls).  Object types QEMU has and blockd does not are refused
by name; an object an NBD server or a QMP listener uses cannot be deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from blockd.aio.tls import TlsCredentials
from blockd.errors import BlockdError, InUse, NotFound, Unsupported
from blockd.qmp.commands.base import CommandContext, CommandTable

__all__ = ["ObjectDelArgs", "TlsCredsX509Options", "register"]

# QEMU's object types a storage daemon might be given; blockd names them when refusing.
_NOT_IMPLEMENTED = frozenset({
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "iothread", "secret",
    "secret_keyring", "throttle-group", "tls-cipher-suites", "tls-creds-anon",
    "tls-creds-psk",
})  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsCredsX509Options:
    """object-add's branch for ``tls-creds-x509`` (QEMU's TlsCredsX509Properties)."""

    qom_type: Literal["tls-creds-x509"]
    id: str
    verify_peer: bool = True
    dir: str | None = None
    endpoint: Literal["client", "server"] = "client"
    priority: str | None = None
    sanity_check: bool = True
    passwordid: str | None = None
    loaded: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectDelArgs:
    id: str


def check_object_type(arguments: Mapping[str, object]) -> None:
    """Name a known QEMU object type blockd lacks, before the schema's generic error."""
    kind = arguments.get("qom-type")
    if isinstance(kind, str) and kind in _NOT_IMPLEMENTED:
        raise Unsupported(f"object type '{kind}' is not supported by blockd "
                          "(it has tls-creds-x509 only)")


async def add_tls_creds(ctx: CommandContext, args: TlsCredsX509Options) -> None:
    """Load the credentials (off the loop: it reads files) and keep them under their id."""
    if args.id in ctx.objects:
        raise BlockdError(f"attempt to add duplicate property '{args.id}' to object "
                          "(type 'container')")
    if args.dir is None:
        raise BlockdError("Missing 'dir' property value")
    if args.priority is not None or args.passwordid is not None:
        which = "priority" if args.priority is not None else "passwordid"
        raise Unsupported(f"tls-creds-x509 property '{which}' is not supported by blockd")
    directory = args.dir
    ctx.objects[args.id] = await ctx.registry.run_control(
        TlsCredentials.load, args.id, directory, args.endpoint, args.verify_peer)


def register(table: CommandTable) -> None:
    @table.command("object-add", precheck=check_object_type)
    async def object_add(ctx: CommandContext, args: TlsCredsX509Options) -> object:
        await add_tls_creds(ctx, args)
        return {}

    @table.command("object-del")
    async def object_del(ctx: CommandContext, args: ObjectDelArgs) -> object:
        if args.id not in ctx.objects:
            raise NotFound(f"object '{args.id}' not found")
        if args.id in ctx.objects_in_use():
            raise InUse(f"object '{args.id}' is in use, can not be deleted")
        del ctx.objects[args.id]
        return {}
