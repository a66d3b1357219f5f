"""Argument dataclasses: how declarations become validators, and what handlers receive."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from blockd.qmp.commands import CommandContext, CommandTable, NoArgs
from blockd.qmp.schema import (
    Discriminator,
    SchemaError,
    Size,
    Uint16,
    compile_type,
    given_members,
    qmp_name,
    validate,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Cache:
    direct: bool = False
    no_flush: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    node_name: str
    read_only: bool = False
    mode: Literal["fast", "safe"] = "safe"
    cache: Cache | None = None
    sizes: tuple[Size, ...] = ()
    port: Uint16 | None = None
    under_score: str | None = field(default=None, metadata=qmp_name("under_score"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Base:
    kind: Literal["disk", "cdrom", "null"]
    name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk(Base):
    kind: Literal["disk", "cdrom"]
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Null(Base):
    kind: Literal["null"]
    size: int = 0


Device = Annotated[Disk | Null, Discriminator("kind")]


@dataclass(frozen=True, slots=True, kw_only=True)
class Tag:
    type: Literal["unix", "inet"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Unix(Tag):
    type: Literal["unix"]
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Inet(Tag):
    type: Literal["inet"]
    host: str
    port: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Server:
    device: Device
    addr: Annotated[Unix | Inet, Discriminator("type", legacy=True)]
    devices: tuple[Device, ...] = ()


def error(cls: type, value: object, keyval: bool = False) -> str:
    with pytest.raises(SchemaError) as info:
        validate(cls, value, keyval=keyval)
    return str(info.value)


# -- structs ----------------------------------------------------------------------------


def test_members_are_fields_with_dashes_and_defaults() -> None:
    args = validate(Options, {"node-name": "n0", "cache": {"no-flush": True}})
    assert args == Options(node_name="n0", cache=Cache(no_flush=True))
    assert (args.read_only, args.mode, args.sizes, args.port) == (False, "safe", (), None)
    assert args.cache is not None and args.cache.direct is False


def test_qmp_name_overrides_the_dash_rule() -> None:
    assert validate(Options, {"node-name": "n", "under_score": "x"}).under_score == "x"
    assert error(Options, {"node-name": "n", "under-score": "x"}) == (
        "Parameter 'under-score' is unexpected")


def test_arguments_are_frozen() -> None:
    args = validate(Options, {"node-name": "n", "sizes": [1, 2]})
    assert args.sizes == (1, 2)
    with pytest.raises(AttributeError):
        args.node_name = "m"  # type: ignore[misc]


@pytest.mark.parametrize(("value", "desc"), [
    ({}, "Parameter 'node-name' is missing"),
    ({"node-name": None}, "Invalid parameter type for 'node-name', expected: string"),
    ({"node-name": "n", "read-only": None},
     "Invalid parameter type for 'read-only', expected: boolean"),
    ({"node-name": "n", "mode": "slow"}, "Parameter 'mode' does not accept value 'slow'"),
    ({"node-name": "n", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ({"node-name": "n", "cache": {"bogus": 1}}, "Parameter 'cache.bogus' is unexpected"),
    ({"node-name": "n", "cache": "x"}, "Invalid parameter type for 'cache', expected: object"),
    ({"node-name": "n", "sizes": [1, -1]},
     "Invalid parameter type for 'sizes[1]', expected: size"),
    ({"node-name": "n", "port": 1 << 16}, "Parameter 'port' expects uint16_t"),
    ({"node-name": "n", "node_name": "x"}, "Parameter 'node_name' is unexpected"),
    # Declaration order: the first declared member with a problem is reported.
    ({"mode": "slow", "bogus": 1}, "Parameter 'node-name' is missing"),
    ({"node-name": "n", "bogus": 1, "mode": "slow"},
     "Parameter 'mode' does not accept value 'slow'"),
    ("x", "Invalid parameter type for 'null', expected: object"),
])
def test_struct_errors_are_qemus(value: object, desc: str) -> None:
    assert error(Options, value) == desc


def test_keyval_strings_are_coerced_at_every_depth() -> None:
    args = validate(Options, {"node-name": "n", "read-only": "on", "cache": {"direct": "yes"},
                              "sizes": ["4k", "1G"], "port": "8080"}, keyval=True)
    assert args == Options(node_name="n", read_only=True, cache=Cache(direct=True),
                           sizes=(4096, 1 << 30), port=8080)
    assert error(Options, {"node-name": "n", "port": "x"}, keyval=True) == (
        "Parameter 'port' expects integer")
    assert error(Options, {"node-name": "n", "cache": {"direct": "maybe"}}, keyval=True) == (
        "Parameter 'cache.direct' expects 'on' or 'off'")


def test_given_members_are_those_not_none() -> None:
    args = validate(Options, {"node-name": "n", "port": 1})
    # Members with a QEMU default count as given: declare them "| None" to tell.
    assert given_members(args) == {"node-name", "read-only", "mode", "sizes", "port"}
    assert given_members(Cache()) == {"direct"}


# -- unions -----------------------------------------------------------------------------


def test_flat_union_gives_the_branch_dataclass() -> None:
    server = validate(Server, {
        "device": {"kind": "cdrom", "path": "/dev/sr0"},
        "addr": {"type": "unix", "data": {"path": "s"}},
        "devices": [{"kind": "null", "size": 5}, {"kind": "disk", "path": "d", "name": "x"}],
    })
    assert server.device == Disk(kind="cdrom", path="/dev/sr0")
    assert server.devices == (Null(kind="null", size=5), Disk(kind="disk", path="d", name="x"))
    assert server.addr == Unix(type="unix", path="s")


def test_flat_union_keyval() -> None:
    device = compile_type(Device).check({"kind": "null", "size": "12"}, "", keyval=True)
    assert device == Null(kind="null", size=12)


@pytest.mark.parametrize(("device", "desc"), [
    ({}, "Parameter 'device.kind' is missing"),
    ({"kind": "tape"}, "Parameter 'kind' does not accept value 'tape'"),
    # The base's members come first, then the branch's, then unknown ones.
    ({"kind": "disk", "name": 1}, "Invalid parameter type for 'device.name', expected: string"),
    ({"kind": "disk", "bogus": 1}, "Parameter 'device.path' is missing"),
    ({"kind": "disk", "path": "p", "size": 1}, "Parameter 'device.size' is unexpected"),
    ({"kind": "null", "path": "p"}, "Parameter 'device.path' is unexpected"),
    ([], "Invalid parameter type for 'device', expected: object"),
])
def test_flat_union_errors(device: object, desc: str) -> None:
    addr = {"type": "unix", "data": {"path": "s"}}
    assert error(Server, {"device": device, "addr": addr}) == desc


@pytest.mark.parametrize(("addr", "desc"), [
    ({"data": {}}, "Parameter 'addr.type' is missing"),
    ({"type": "vsock", "data": {}}, "Parameter 'type' does not accept value 'vsock'"),
    ({"type": "inet"}, "Parameter 'addr.data' is missing"),
    ({"type": "inet", "data": []}, "Invalid parameter type for 'addr.data', expected: object"),
    ({"type": "inet", "data": {"host": "h"}}, "Parameter 'addr.data.port' is missing"),
    ({"type": "inet", "data": {"host": "h", "port": "1", "type": "inet"}},
     "Parameter 'addr.data.type' is unexpected"),
    ({"type": "unix", "data": {"path": "p"}, "x": 1}, "Parameter 'addr.x' is unexpected"),
])
def test_simple_union_errors(addr: object, desc: str) -> None:
    assert error(Server, {"device": {"kind": "null"}, "addr": addr}) == desc


# -- declarations that mean nothing are refused at once ------------------------------------


@dataclass(frozen=True, slots=True)
class NoneWithoutDefault:
    x: str | None


@dataclass(frozen=True, slots=True)
class BareUnion:
    x: Unix | Inet


@dataclass(frozen=True, slots=True)
class NumericEnum:
    x: Literal[1, 2]


@dataclass(frozen=True, slots=True, kw_only=True)
class Tape(Base):
    kind: Literal["null"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OnlyDisk(Base):
    kind: Literal["disk"]


@pytest.mark.parametrize(("annotation", "message"), [
    (NoneWithoutDefault, "may be None needs a default"),
    (BareUnion, "a union needs Annotated"),
    (NumericEnum, "enum values are strings"),
    (Annotated[OnlyDisk | Null, Discriminator("kind")], "union tags"),
    (Annotated[Disk | Null | Tape, Discriminator("kind")], "has two branches"),
    (Annotated[Unix | Disk, Discriminator("type")], "no common dataclass base"),
    (Annotated[Disk | Null, Discriminator("kind", legacy=True)], "base holds only the tag"),
    (complex, "has no QMP type"),
])
def test_meaningless_declarations(annotation: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        compile_type(annotation)


# -- commands: the handler's annotation is the declaration ---------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoArgs:
    node_name: str
    count: Uint16 = 1


def test_handler_annotation_declares_the_arguments() -> None:
    table = CommandTable()

    @table.command("echo")
    async def echo(ctx: CommandContext, args: EchoArgs) -> object:
        return args.node_name * args.count

    command = table.get("echo")
    assert command is not None
    assert command.check_args({"node-name": "a", "count": "3"}, keyval=True) == EchoArgs(
        node_name="a", count=3)
    with pytest.raises(SchemaError, match=r"^Parameter 'count' expects uint16_t$"):
        command.check_args({"node-name": "a", "count": -1})


def test_no_args_rejects_any_member() -> None:
    table = CommandTable()

    @table.command("ping")
    async def ping(ctx: CommandContext, args: NoArgs) -> object:
        return {}

    command = table.get("ping")
    assert command is not None
    assert command.check_args({}) == NoArgs()
    with pytest.raises(SchemaError, match=r"^Parameter 'x' is unexpected$"):
        command.check_args({"x": 1})


def test_precheck_runs_first() -> None:
    table = CommandTable()

    def precheck(arguments: Mapping[str, object]) -> None:
        if "legacy" in arguments:
            raise SchemaError("legacy is gone")

    @table.command("echo", precheck=precheck)
    async def echo(ctx: CommandContext, args: EchoArgs) -> object:
        return {}

    command = table.get("echo")
    assert command is not None
    with pytest.raises(SchemaError, match=r"^legacy is gone$"):
        command.check_args({"legacy": 1})  # before "node-name is missing"


def test_handler_without_annotated_arguments_is_refused() -> None:
    table = CommandTable()

    async def bare(ctx, args):  # type: ignore[no-untyped-def]
        return {}

    with pytest.raises(TypeError, match="annotate its arguments"):
        table.command("bare")(bare)
