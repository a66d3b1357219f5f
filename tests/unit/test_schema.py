"""Argument validation: QEMU's texts for every kind of mistake, and keyval coercion."""

from __future__ import annotations

import pytest

from blockd.qmp.commands import build_table
from blockd.qmp.commands.devices import DeviceAddArgs
from blockd.qmp.commands.nodes import BlockdevCacheOptions, NullOptions, node_options
from blockd.qmp.schema import BOOL, INT, SIZE, STR, UINT32, UINT64, Array, Enum, SchemaError

TABLE = build_table()


def check_args(command: str, args: dict[str, object], keyval: bool = False) -> object:
    cmd = TABLE.get(command)
    assert cmd is not None
    return cmd.check_args(args, keyval)


def check_device_args(args: dict[str, object]) -> object:
    return check_args("device_add", args)


def error_of(command: str, args: dict[str, object], keyval: bool = False) -> str:
    cmd = TABLE.get(command)
    assert cmd is not None
    with pytest.raises(SchemaError) as info:
        cmd.check_args(args, keyval)
    return str(info.value)


@pytest.mark.parametrize(("args", "desc"), [
    ({}, "Parameter 'driver' is missing"),
    ({"driver": 1}, "Invalid parameter type for 'driver', expected: string"),
    ({"driver": "nosuchdrv"}, "Parameter 'driver' does not accept value 'nosuchdrv'"),
    ({"driver": "file", "node-name": "a"}, "Parameter 'filename' is missing"),
    ({"driver": "file", "node-name": "a", "filename": "x", "aio": "bogus"},
     "Parameter 'aio' does not accept value 'bogus'"),
    ({"driver": "null-co", "node-name": "a", "size": "big"},
     "Invalid parameter type for 'size', expected: integer"),
    ({"driver": "null-co", "node-name": "a", "size": 1.5},
     "Invalid parameter type for 'size', expected: integer"),
    ({"driver": "null-co", "node-name": "a", "size": True},
     "Invalid parameter type for 'size', expected: integer"),
    ({"driver": "null-co", "node-name": "a", "cache": {"direct": "yes"}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ({"driver": "null-co", "node-name": "a", "cache": {"bogus": True}},
     "Parameter 'cache.bogus' is unexpected"),
    ({"driver": "null-co", "node-name": "a", "cache": []},
     "Invalid parameter type for 'cache', expected: object"),
    ({"driver": "null-co", "node-name": "a", "filename": "x"},
     "Parameter 'filename' is unexpected"),
    ({"driver": "null-co", "node-name": "a", "latency-ns": -1},
     "Invalid parameter type for 'latency-ns', expected: integer"),
    ({"driver": "null-co", "node-name": None},
     "Invalid parameter type for 'node-name', expected: string"),
])
def test_blockdev_add_errors(args: dict[str, object], desc: str) -> None:
    assert error_of("blockdev-add", args) == desc


def test_blockdev_add_members_in_declaration_order() -> None:
    # Two problems: the first declared member is reported, like QEMU's visitor.
    assert error_of("blockdev-add", {"driver": "null-co", "read-only": 1, "size": "x"}) == (
        "Invalid parameter type for 'read-only', expected: boolean")


def test_keyval_strings_are_converted() -> None:
    args = check_args(
        "blockdev-add",
        {"driver": "null-co", "node-name": "n", "size": "4096", "read-zeroes": "on",
         "cache": {"direct": "off"}}, keyval=True)
    assert args == NullOptions(driver="null-co", node_name="n", size=4096,
                               read_zeroes=True, cache=BlockdevCacheOptions(direct=False))
    assert isinstance(args, NullOptions)
    opts = node_options(args)
    assert (opts.size, opts.read_zeroes, opts.cache_direct) == (4096, True, False)


def test_keyval_errors() -> None:
    assert error_of("blockdev-add", {"driver": "null-co", "node-name": "n", "size": "x"},
                    keyval=True) == "Parameter 'size' expects integer"
    assert error_of("blockdev-add", {"driver": "null-co", "node-name": "n",
                                     "read-zeroes": "maybe"}, keyval=True) == (
        "Parameter 'read-zeroes' expects 'on' or 'off'")


@pytest.mark.parametrize(("type_", "value", "desc"), [
    (UINT32, -1, "Parameter 'p' expects uint32_t"),
    (UINT32, 1 << 32, "Parameter 'p' expects uint32_t"),
    (UINT64, -1, "Invalid parameter type for 'p', expected: integer"),
    (INT, 1 << 63, "Invalid parameter type for 'p', expected: integer"),
    (STR, 1, "Invalid parameter type for 'p', expected: string"),
    (BOOL, 0, "Invalid parameter type for 'p', expected: boolean"),
    (Array(STR), "x", "Invalid parameter type for 'p', expected: array"),
    (SIZE, -1, "Invalid parameter type for 'p', expected: size"),
    (Enum("a", "b"), "c", "Parameter 'p' does not accept value 'c'"),
])
def test_scalar_errors(type_: object, value: object, desc: str) -> None:
    with pytest.raises(SchemaError, match="^" + desc.replace("(", r"\(") + "$"):
        type_.check(value, "p")  # type: ignore[attr-defined]


def test_scalars_accept_their_range() -> None:
    assert UINT32.check((1 << 32) - 1, "p") == (1 << 32) - 1
    assert UINT64.check((1 << 64) - 1, "p") == (1 << 64) - 1
    assert SIZE.check("1G", "p", keyval=True) == 1 << 30
    assert SIZE.check("512k", "p", keyval=True) == 512 << 10


def test_device_add_properties() -> None:
    assert check_device_args({"driver": "cd", "id": "cd0"}) == DeviceAddArgs(driver="cd", id="cd0")
    for args, desc in [
        ({"driver": "floppy", "id": "f"}, "'floppy' is not a valid device model name"),
        ({"driver": "hd", "id": "h", "serial": "x"}, "Property 'hd.serial' not found"),
        ({"driver": "hd"}, "Parameter 'id' is missing"),
        ({"driver": "hd", "id": "h", "werror": "bogus"},
         "Parameter 'werror' does not accept value 'bogus'"),
    ]:
        with pytest.raises(SchemaError) as info:
            check_device_args(args)
        assert str(info.value) == desc


def test_commands_without_arguments_reject_any() -> None:
    assert error_of("query-block", {"x": 1}) == "Parameter 'x' is unexpected"
    assert error_of("block-latency-histogram-set", {"id": "a", "boundaries": [1, "x"]}) == (
        "Invalid parameter type for 'boundaries[1]', expected: integer")
    with pytest.raises(SchemaError, match=r"^Parameter 'null' does not accept value 'x'$"):
        Array(Enum("oob")).check(["x"], "enable")
