"""QMP argument types declared as frozen dataclasses, validated with QEMU's error texts.

A command's arguments are one frozen, slotted dataclass: the dataclass *is* the
declaration.  Each field is a QMP member; its name is the field's with ``_``
turned into ``-`` (``node_name`` is ``node-name``; :func:`qmp_name` overrides
that), its type annotation says what the member holds, and a field with a
default is optional (``None`` when the handler must tell "not given" apart,
else QEMU's default).  Annotations map to QMP types like this:

- ``str``, ``bool``, ``int``, ``float``: string, boolean, int64, number;
  ``object``: any JSON value, unchecked;
- ``Uint16``, ``Uint32``, ``Uint64``, ``Size``: sized integers (``Annotated[int, ...]``);
- ``Literal["a", "b"]``: an enum;
- ``tuple[T, ...]``: an array of T;
- a dataclass: a struct (an object with those members);
- ``Annotated[A | B, Discriminator("tag")]``: a flat union.  ``A`` and ``B`` derive
  from a base dataclass whose ``tag`` field is a ``Literal`` of every tag; each branch
  narrows ``tag`` to its own tags and adds its members.  The result is the branch;
- ``Annotated[A | B, Discriminator("type", legacy=True)]``: the same branches in QEMU's
  legacy form ``{"type": tag, "data": {members}}`` (the base holds only the tag);
- ``T | None``: the same as ``T`` (JSON ``null`` is refused), for fields with a default.

:func:`compile_type` turns an annotation into a :class:`Type` once; :meth:`Type.check`
walks a JSON value against it the way QEMU's QObject input visitor does, visiting
members in declaration order (a union's base first) and reporting the first problem with
the exact text QEMU prints ("Parameter 'x' is missing", "Invalid parameter type for 'x',
expected: string", ...), and returns the dataclass.  Because validation happens before a
handler runs, a rejected command has no side effects, and the handler gets typed values.

Values given on the command line in QEMU's key=value syntax arrive as strings;
``keyval=True`` converts them the way QEMU's keyval visitor does ("on"/"off",
decimal integers, sizes with suffixes).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar, cast, get_args, get_origin, get_type_hints

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
    "Discriminator",
    "Enum",
    "Member",
    "SchemaError",
    "Size",
    "Struct",
    "Type",
    "Uint16",
    "Uint32",
    "Uint64",
    "compile_type",
    "given_members",
    "qmp_name",
    "struct_of",
    "validate",
]

T = TypeVar("T")


class SchemaError(Exception):
    """An argument does not match its declared type; the message is QEMU's text."""


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --------------------------------------------------------------------------------------
# Types: one object per QMP type, checking a JSON value against it


class Type:
    """Base of all QMP types."""

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

# Field annotations for QMP's sized integers (plain ``int`` is int64).
Uint16 = Annotated[int, UINT16]
Uint32 = Annotated[int, UINT32]
Uint64 = Annotated[int, UINT64]
Size = Annotated[int, SIZE]


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
    """A JSON array; the result is a tuple (arguments are immutable)."""

    json_name = "array"

    def __init__(self, element: Type) -> None:
        self.element = element

    def check(self, value: object, path: str, keyval: bool = False) -> tuple[object, ...]:
        if not isinstance(value, list):
            raise self._wrong_type(path)
        return tuple(
            self.element.check(item, f"{path}[{i}]", keyval) for i, item in enumerate(value)
        )


# --------------------------------------------------------------------------------------
# Structs and unions: dataclasses


_QMP_NAME = "qmp_name"


def qmp_name(name: str) -> dict[str, str]:
    """Field metadata naming the QMP member when ``_`` -> ``-`` would not give it.

    Use as ``x_y: str = field(metadata=qmp_name("x_y"))``.
    """
    return {_QMP_NAME: name}


@dataclass(frozen=True, slots=True)
class Member:
    """One struct member: its QMP name, the dataclass field holding it, its type."""

    name: str
    field: str
    type: Type
    optional: bool


@dataclass(frozen=True, slots=True)
class Discriminator:
    """Marks a union of dataclasses: ``Annotated[A | B, Discriminator("tag")]``.

    ``name`` is the field (and member) whose value picks the branch.  ``legacy``
    selects QEMU's legacy form ``{"type": tag, "data": {members}}``, where the tag
    is not among the data's members.
    """

    name: str
    legacy: bool = False


def _mapping(type_: Type, value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise type_._wrong_type(path)
    return value


def _check_members(
    members: tuple[Member, ...], value: Mapping[str, object], path: str, keyval: bool
) -> dict[str, object]:
    """Check ``members`` in order; return the given ones by field name."""
    fields: dict[str, object] = {}
    for member in members:
        full = _join(path, member.name)
        if member.name in value:
            fields[member.field] = member.type.check(value[member.name], full, keyval)
        elif not member.optional:
            raise SchemaError(f"Parameter '{full}' is missing")
    return fields


def _reject_unexpected(value: Mapping[str, object], path: str, known: set[str]) -> None:
    for name in value:
        if name not in known:
            raise SchemaError(f"Parameter '{_join(path, name)}' is unexpected")


class Struct(Type):
    """A JSON object with a dataclass's members; unknown members are errors.

    Members are checked in declaration order; absent optional members take the
    field's default.
    """

    json_name = "object"

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.members = _members_of(cls)
        self.names = {m.name for m in self.members}

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        mapping = _mapping(self, value, path)
        fields = _check_members(self.members, mapping, path, keyval)
        _reject_unexpected(mapping, path, self.names)
        return self.cls(**fields)


@dataclass(frozen=True, slots=True)
class _Branch:
    cls: type
    members: tuple[Member, ...]  # the branch's members beyond the union's base


class _FlatUnion(Type):
    """Base members (one of them the discriminator), then the chosen branch's members."""

    json_name = "object"

    def __init__(self, discriminator: str, branches: tuple[type, ...]) -> None:
        base = _common_base(branches)
        self.base = _members_of(base)
        self.discriminator = discriminator
        self.branches = _branches(discriminator, base, branches)
        _check_tags(self.base, discriminator, self.branches)

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        mapping = _mapping(self, value, path)
        fields = _check_members(self.base, mapping, path, keyval)
        branch = self.branches[cast(str, fields[self.discriminator])]
        fields |= _check_members(branch.members, mapping, path, keyval)
        _reject_unexpected(mapping, path, {m.name for m in (*self.base, *branch.members)})
        return branch.cls(**fields)


class _LegacyUnion(Type):
    """QEMU's legacy union: ``{"type": T, "data": {...}}`` with the branch's members in data."""

    json_name = "object"

    def __init__(self, discriminator: str, branches: tuple[type, ...]) -> None:
        self.discriminator = discriminator
        base = _common_base(branches)
        base_members = _members_of(base)
        if [m.field for m in base_members] != [discriminator]:
            raise TypeError(f"{base.__name__}: a legacy union's base holds only the tag")
        self.branches = _branches(discriminator, base, branches)
        self.tag = Enum(*self.branches)

    def check(self, value: object, path: str, keyval: bool = False) -> object:
        mapping = _mapping(self, value, path)
        type_path, data_path = _join(path, "type"), _join(path, "data")
        if "type" not in mapping:
            raise SchemaError(f"Parameter '{type_path}' is missing")
        tag = cast(str, self.tag.check(mapping["type"], type_path, keyval))
        if "data" not in mapping:
            raise SchemaError(f"Parameter '{data_path}' is missing")
        branch = self.branches[tag]
        data = _mapping(self, mapping["data"], data_path)
        fields = _check_members(branch.members, data, data_path, keyval)
        _reject_unexpected(data, data_path, {m.name for m in branch.members})
        _reject_unexpected(mapping, path, {"type", "data"})
        return branch.cls(**{self.discriminator: tag, **fields})


def _members_of(cls: type) -> tuple[Member, ...]:
    """The members a dataclass declares, in field order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls, include_extras=True)
    members = []
    for field in dataclasses.fields(cls):
        optional = (field.default is not dataclasses.MISSING
                    or field.default_factory is not dataclasses.MISSING)
        annotation = hints[field.name]
        if _is_union(annotation) and type(None) in get_args(annotation):
            annotation = _without_none(annotation, optional, f"{cls.__name__}.{field.name}")
        name = field.metadata.get(_QMP_NAME, field.name.replace("_", "-"))
        members.append(Member(name, field.name, compile_type(annotation), optional))
    return tuple(members)


def _without_none(annotation: object, optional: bool, where: str) -> object:
    """``T`` from ``T | None``: ``None`` only says "may be left out", so a default is due."""
    rest = [arg for arg in get_args(annotation) if arg is not type(None)]
    if not optional:
        raise TypeError(f"{where}: a member that may be None needs a default")
    if len(rest) != 1:
        raise TypeError(f"{where}: a union needs Annotated[..., Discriminator(tag)]")
    return rest[0]


def _common_base(branches: tuple[type, ...]) -> type:
    """The nearest dataclass every branch derives from: the union's base."""
    for candidate in branches[0].__mro__[1:]:
        if dataclasses.is_dataclass(candidate) and all(issubclass(b, candidate) for b in branches):
            return candidate
    raise TypeError(f"union branches {branches} have no common dataclass base")


def _branches(discriminator: str, base: type, classes: tuple[type, ...]) -> dict[str, _Branch]:
    """Branches by tag value, from each class's ``Literal`` for the discriminator."""
    base_fields = {f.name for f in dataclasses.fields(base)} - {discriminator}
    branches: dict[str, _Branch] = {}
    for cls in classes:
        tag_type = get_type_hints(cls)[discriminator]
        if get_origin(tag_type) is not Literal:
            raise TypeError(f"{cls.__name__}.{discriminator} must be a Literal")
        own = tuple(m for m in _members_of(cls)
                    if m.field != discriminator and m.field not in base_fields)
        for tag in get_args(tag_type):
            if tag in branches:
                raise TypeError(f"union tag {tag!r} has two branches")
            branches[tag] = _Branch(cls, own)
    return branches


def _check_tags(base: tuple[Member, ...], discriminator: str, branches: dict[str, _Branch]) -> None:
    """A flat union's base must accept exactly the tags its branches cover."""
    tag = next((m for m in base if m.field == discriminator), None)
    if tag is None or tag.optional or not isinstance(tag.type, Enum):
        raise TypeError(f"union discriminator {discriminator!r} must be a required Literal")
    if tag.type.values != set(branches):
        raise TypeError(f"union tags {sorted(tag.type.values)} != branches {sorted(branches)}")


def _is_union(annotation: object) -> bool:
    return get_origin(annotation) in (types.UnionType, typing.Union)


# --------------------------------------------------------------------------------------
# From annotations to types


_SCALARS: dict[object, Type] = {str: STR, bool: BOOL, int: INT, float: NUMBER, object: ANY}


_compiled: dict[object, Type] = {}


def compile_type(annotation: object) -> Type:
    """The :class:`Type` an annotation declares (see the module docstring); cached.

    :raise TypeError: for an annotation with no QMP meaning (a declaration bug).
    """
    compiled = _compiled.get(annotation)
    if compiled is None:
        compiled = _compiled[annotation] = _compile(annotation)
    return compiled


def _compile(annotation: object) -> Type:
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        inner, *metadata = args
        for item in metadata:
            if isinstance(item, Type):
                return item
            if isinstance(item, Discriminator):
                if not _is_union(inner):
                    raise TypeError(f"{annotation!r}: Discriminator marks a union of dataclasses")
                kind = _LegacyUnion if item.legacy else _FlatUnion
                return kind(item.name, get_args(inner))
        return compile_type(inner)
    if origin is Literal:
        if not all(isinstance(value, str) for value in args):
            raise TypeError(f"{annotation!r}: enum values are strings")
        return Enum(*args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return Array(compile_type(args[0]))
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return Struct(annotation)
    if _is_union(annotation):
        raise TypeError(f"{annotation!r}: a union needs Annotated[..., Discriminator(tag)]")
    raise TypeError(f"{annotation!r} has no QMP type")


def validate(cls: type[T], value: object, *, keyval: bool = False) -> T:
    """Check ``value`` (a JSON object) against dataclass ``cls``; return the instance.

    :raise SchemaError: with QEMU's text for the first problem found.
    """
    return cast(T, compile_type(cls).check(value, "", keyval))


def struct_of(cls: type) -> Struct:
    """The :class:`Struct` a dataclass declares (for its members' QMP names)."""
    struct = compile_type(cls)
    if not isinstance(struct, Struct):
        raise TypeError(f"{cls!r} is not a dataclass")
    return struct


def given_members(args: object) -> frozenset[str]:
    """The QMP names of the members of a checked dataclass that are not ``None``.

    For members declared ``T | None = None`` this is the set the client gave.
    """
    members = struct_of(type(args)).members
    return frozenset(m.name for m in members if getattr(args, m.field) is not None)
