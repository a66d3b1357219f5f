"""Declared argument types for QMP commands, validated with QEMU's error texts.

A command's arguments are described with a handful of type objects (strings,
sized integers, enums, arrays, structs and flat unions).  :func:`Type.check`
walks a JSON value against its type the way QEMU's QObject input visitor does,
visiting members in declaration order and reporting the first problem with the
exact text QEMU prints ("Parameter 'x' is missing", "Invalid parameter type for
'x', expected: string", ...).  Because validation happens before a handler
runs, a rejected command has no side effects.

Values given on the command line in QEMU's key=value syntax arrive as strings;
``keyval=True`` converts them the way QEMU's keyval visitor does ("on"/"off",
decimal integers, sizes with suffixes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ANY",
    "BOOL",
    "INT",
    "NUMBER",
    "SIZE",
    "STR",
    "UINT16",
    "UINT32",
    "UINT64",
    "Array",
    "Enum",
    "Member",
    "SchemaError",
    "SimpleUnion",
    "Struct",
    "Type",
    "Union",
]


class SchemaError(Exception):
    """An argument does not match its declared type; the message is QEMU's text."""


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Type:
    """Base of all declared types."""

    json_name = "any"

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        """Return ``value`` converted to this type or raise :class:`SchemaError`."""
        raise NotImplementedError

    def _wrong_type(self, path: str) -> SchemaError:
        name = path or "null"
        return SchemaError(f"Invalid parameter type for '{name}', expected: {self.json_name}")


class _Any(Type):
    def check(self, value: object, path: str, keyval: bool = False) -> object:
        return value


class _Str(Type):
    json_name = "string"

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        if not isinstance(value, str):
            raise self._wrong_type(path)
        return value


_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


class _Bool(Type):
    json_name = "boolean"

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        if keyval and isinstance(value, str):
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            raise SchemaError(f"Parameter '{path}' expects 'on' or 'off'")
        if not isinstance(value, bool):
            raise self._wrong_type(path)
        return value


class _Number(Type):
    json_name = "number"

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        if keyval and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise SchemaError(f"Parameter '{path}' expects number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong_type(path)
        return float(value)


@dataclass(frozen=True)
class _Int(Type):
    """An integer with QEMU's range checks (int64 unless sized)."""

    c_name: str
    low: int
    high: int
    json_name: str = "integer"

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        if keyval and isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise SchemaError(f"Parameter '{path}' expects integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong_type(path)
        if not self.low <= value <= self.high:
            if self.c_name in ("int64", "uint64"):
                # QEMU's JSON parser turns out-of-range integers into doubles.
                raise self._wrong_type(path)
            raise SchemaError(f"Parameter '{path}' expects {self.c_name}")
        return value


_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                  "p": 1 << 50, "e": 1 << 60}


class _Size(Type):
    json_name = "size"

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        if keyval and isinstance(value, str):
            text = value.strip().lower()
            unit = text[-1:] if text[-1:].isalpha() else ""
            try:
                number = float(text[: len(text) - len(unit)]) if unit else int(text, 0)
                result = int(number * _SIZE_SUFFIXES[unit])
            except (ValueError, KeyError):
                result = -1
            if not 0 <= result < 1 << 64:
                raise SchemaError(f"Parameter '{path}' expects a non-negative number below 2^64")
            return result
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise self._wrong_type(path)
        return value


ANY: Type = _Any()
STR: Type = _Str()
BOOL: Type = _Bool()
NUMBER: Type = _Number()
SIZE: Type = _Size()
INT: Type = _Int("int64", -(1 << 63), (1 << 63) - 1)
UINT64: Type = _Int("uint64", 0, (1 << 64) - 1)
UINT32: Type = _Int("uint32_t", 0, (1 << 32) - 1)
UINT16: Type = _Int("uint16_t", 0, (1 << 16) - 1)


class Enum(Type):
    """A string from a fixed set; errors name the bare member, as QEMU does."""

    json_name = "string"

    def __init__(self, *values: str) -> None:
        self.values = frozenset(values)

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        if not isinstance(value, str):
            raise self._wrong_type(path)
        if value not in self.values:
            # QEMU names the bare member here; list elements have no name at all.
            bare = "null" if not path or path.endswith("]") else path.rsplit(".", 1)[-1]
            raise SchemaError(f"Parameter '{bare}' does not accept value '{value}'")
        return value


class Array(Type):
    json_name = "array"

    def __init__(self, element: Type) -> None:
        self.element = element

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        if not isinstance(value, list):
            raise self._wrong_type(path)
        return [self.element.check(item, f"{path}[{i}]", keyval) for i, item in enumerate(value)]


@dataclass(frozen=True)
class Member:
    """One member of a struct: its type, whether it may be omitted, and its default."""

    type: Type
    optional: bool = False
    default: object = None


def opt(type_: Type, default: object = None) -> Member:
    """An optional member (shorthand)."""
    return Member(type_, optional=True, default=default)


def req(type_: Type) -> Member:
    """A required member (shorthand)."""
    return Member(type_)


@dataclass
class Struct(Type):
    """A JSON object with declared members; unknown members are errors.

    Members are checked in declaration order; absent optional members are
    filled with their default unless it is ``None`` (then left out, so a
    handler can tell "not given" apart).
    """

    members: dict[str, Member] = field(default_factory=dict)
    json_name: str = "object"

    def check(self, value: object, path: str, keyval: bool = False) -> dict[str, object]:
        if not isinstance(value, Mapping):
            raise self._wrong_type(path)
        out: dict[str, object] = {}
        self.check_members(value, path, keyval, out)
        self.check_unexpected(value, path, self.members)
        return out

    def check_members(
        self, value: Mapping[str, object], path: str, keyval: bool, out: dict[str, object]
    ) -> None:
        for name, member in self.members.items():
            full = _join(path, name)
            if name in value:
                out[name] = member.type.check(value[name], full, keyval)
            elif not member.optional:
                raise SchemaError(f"Parameter '{full}' is missing")
            elif member.default is not None:
                out[name] = member.default

    @staticmethod
    def check_unexpected(
        value: Mapping[str, object], path: str, known: Mapping[str, Member]
    ) -> None:
        for name in value:
            if name not in known:
                raise SchemaError(f"Parameter '{_join(path, name)}' is unexpected")


@dataclass
class Union(Type):
    """A flat union: base members, one of which picks the branch's extra members."""

    base: Struct
    discriminator: str
    branches: dict[str, Struct]
    json_name: str = "object"

    def check(self, value: object, path: str, keyval: bool = False) -> dict[str, object]:
        if not isinstance(value, Mapping):
            raise self._wrong_type(path)
        out: dict[str, object] = {}
        self.base.check_members(value, path, keyval, out)
        branch = self.branches[str(out[self.discriminator])]
        branch.check_members(value, path, keyval, out)
        Struct.check_unexpected(value, path, {**self.base.members, **branch.members})
        return out


@dataclass
class SimpleUnion(Type):
    """A legacy ("simple") union: ``{"type": T, "data": {...}}`` with one struct per type."""

    branches: dict[str, Struct]
    json_name: str = "object"

    def check(self, value: object, path: str, keyval: bool = False) -> dict[str, object]:
        if not isinstance(value, Mapping):
            raise self._wrong_type(path)
        kind = Enum(*self.branches).check(value.get("type"), _join(path, "type"), keyval) \
            if "type" in value else None
        if kind is None:
            raise SchemaError(f"Parameter '{_join(path, 'type')}' is missing")
        if "data" not in value:
            raise SchemaError(f"Parameter '{_join(path, 'data')}' is missing")
        data = self.branches[str(kind)].check(value["data"], _join(path, "data"), keyval)
        Struct.check_unexpected(value, path, {"type": Member(STR), "data": Member(ANY)})
        return {"type": kind, "data": data}


def struct(**members: Member) -> Struct:
    """Build a :class:`Struct` from keyword members; ``_`` in names becomes ``-``."""
    return Struct({name.replace("_", "-"): m for name, m in members.items()})


def sequence_of_names(value: object) -> Sequence[str]:
    """Narrow a validated array of strings (for handlers)."""
    assert isinstance(value, list)
    return [str(v) for v in value]
