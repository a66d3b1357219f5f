"""Hotplug rules: which host devices blockd attaches when udev reports them, and how.

A rule comes from a ``[[hotplug.rule]]`` table of the configuration file::

    [[hotplug.rule]]
    match = { SUBSYSTEM = "block", DEVNAME = "/dev/loop*" }
    action = "attach"              # or "ignore"
    driver = "auto"                # host_cdrom if ID_CDROM=1, sg for scsi_generic, else host_device
    read-only = true               # the default
    id = "{kernel}"                # device id template
    node-name = "{id}-node"        # node-name template (never the id: QEMU keeps them apart)
    rerror = "report"              # werror too
    export = { name = "{kernel}", writable = false }

``match`` compares udev properties (and ``ATTR{name}``, a sysfs attribute) with
shell-style globs, all of which must match; an empty table matches everything.
Rules are tried in order and the first that matches decides.  Templates take
``{kernel}`` (``loop3``), ``{devname}`` (``/dev/loop3``), ``{id}`` (in
``node-name`` and the export name) and any udev property (``{ID_SERIAL}``); the
result is made a valid QEMU id (other characters become ``_``, a name that does
not start with a letter gets a ``d`` in front, a node-name longer than QEMU
allows is shortened with a hash of the whole).  Sans-IO: a rule looks at a
:class:`Seen` (the properties and attributes of one event), never at sysfs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ACTIONS",
    "DRIVERS",
    "ERROR_ACTIONS",
    "ExportRule",
    "Rule",
    "RuleError",
    "Seen",
    "first_match",
    "parse_rules",
    "render",
]

ACTIONS = ("attach", "ignore")
DRIVERS = ("auto", "host_device", "host_cdrom", "sg")
ERROR_ACTIONS = ("auto", "report", "ignore", "enospc", "stop")
_ATTR = re.compile(r"ATTR\{([^{}]+)\}\Z")
_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
NODE_NAME_MAX = 31  # QEMU's limit (block/node.py checks it too)

Action = Literal["attach", "ignore"]
Driver = Literal["auto", "host_device", "host_cdrom", "sg"]
ErrorAction = Literal["auto", "report", "ignore", "enospc", "stop"]


class RuleError(ValueError):
    """A rule table is wrong; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class Seen:
    """What one udev event (or a rescan) says about a device, as plain strings.

    ``attributes`` reads a sysfs attribute on demand (None when absent): only
    rules that match on ``ATTR{...}`` ask, so most events read none.
    """

    properties: Mapping[str, str]
    kernel: str  # sys_name: loop3, sda1, sg0
    devname: str  # /dev/loop3 ("" when the device has no node)
    attributes: Callable[[str], str | None] = field(default=lambda name: None, compare=False)

    def value(self, key: str) -> str | None:
        attr = _ATTR.match(key)
        if attr is not None:
            return self.attributes(attr.group(1))
        return self.properties.get(key)


@dataclass(frozen=True, slots=True)
class ExportRule:
    """The NBD export a rule adds with the device (on the configured NBD server)."""

    name: str = "{id}"
    writable: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[hotplug.rule]]``: a match, an action and how to attach."""

    index: int  # 1-based position in the configuration
    match: tuple[tuple[str, str], ...]
    action: Action = "attach"
    driver: Driver = "auto"
    read_only: bool = True
    id: str = "{kernel}"
    node_name: str = "{id}-node"
    rerror: ErrorAction = "auto"
    werror: ErrorAction = "auto"
    export: ExportRule | None = None
    name: str = ""  # for counters and logs; "rule N" when not given

    @property
    def label(self) -> str:
        return self.name or f"rule {self.index}"

    def matches(self, seen: Seen) -> bool:
        for key, pattern in self.match:
            value = seen.value(key)
            if value is None or not fnmatch.fnmatchcase(value, pattern):
                return False
        return True

    def driver_for(self, seen: Seen) -> str:
        """The block driver to open the device with (``auto`` resolved)."""
        if self.driver != "auto":
            return self.driver
        if seen.properties.get("SUBSYSTEM") == "scsi_generic":
            return "sg"
        if seen.properties.get("ID_CDROM") == "1":
            return "host_cdrom"
        return "host_device"


def first_match(rules: tuple[Rule, ...], seen: Seen) -> Rule | None:
    """The first rule whose match holds (first match wins), or None."""
    for rule in rules:
        if rule.matches(seen):
            return rule
    return None


def _fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise RuleError(f"template {template!r}: {exc}") from None


def render(template: str, seen: Seen, *, id: str | None = None,
           limit: int | None = None) -> str:
    """Fill a template for one device and make it a valid QEMU id.

    Raises KeyError naming a udev property the device does not have.
    """
    values: dict[str, str] = {}
    for name in _fields(template):
        if name == "kernel":
            values[name] = seen.kernel
        elif name == "devname":
            values[name] = seen.devname
        elif name == "id" and id is not None:
            values[name] = id
        elif name in seen.properties:
            values[name] = seen.properties[name]
        else:
            raise KeyError(name)
    text = _ID_CHARS.sub("_", template.format_map(values))
    if not text[:1].isalpha():
        text = "d" + text
    if limit is not None and len(text) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        text = f"{text[:limit - 9]}-{digest}"
    return text


def _template(table: Mapping[str, object], key: str, default: str, forbidden: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise RuleError(f"{key}: expected a non-empty template string")
    names = _fields(value)
    if forbidden in names:
        raise RuleError(f"{key}: {{{forbidden}}} cannot be used here")
    return value


def _choice(table: Mapping[str, object], key: str, default: str,
            choices: tuple[str, ...]) -> str:
    value = table.get(key, default)
    if value not in choices:
        raise RuleError(f"{key}: expected one of {', '.join(choices)}")
    assert isinstance(value, str)
    return value


def _bool(table: Mapping[str, object], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise RuleError(f"{key}: expected true or false")
    return value


_RULE_KEYS = frozenset({"match", "action", "driver", "read-only", "id", "node-name",
                        "rerror", "werror", "export", "name"})


def _node_name_template(table: Mapping[str, object]) -> str:
    value = _template(table, "node-name", "{id}-node", "")
    if value in ("{id}", table.get("id", "{kernel}")):
        raise RuleError("node-name: must differ from the device id (QEMU refuses a node "
                        "name that is also a device id); the default is \"{id}-node\"")
    return value


def parse_rule(table: Mapping[str, object], index: int) -> Rule:
    """One rule from its TOML table; raises RuleError."""
    unknown = sorted(set(table) - _RULE_KEYS)
    if unknown:
        raise RuleError(f"{unknown[0]}: unknown key")
    match = table.get("match", {})
    if not isinstance(match, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in match.items()
    ):
        raise RuleError('match: expected a table of strings, such as { SUBSYSTEM = "block" }')
    for key in match:
        if not (key.isidentifier() or _ATTR.match(key)):
            raise RuleError(f"match: {key!r} is neither a udev property nor ATTR{{name}}")
    name = table.get("name", "")
    if not isinstance(name, str):
        raise RuleError("name: expected a string")
    read_only = _bool(table, "read-only", True)
    export = None
    raw_export = table.get("export")
    if raw_export is not None:
        if not isinstance(raw_export, dict):
            raise RuleError("export: expected a table such as { name = \"{kernel}\" }")
        extra = sorted(set(raw_export) - {"name", "writable"})
        if extra:
            raise RuleError(f"export.{extra[0]}: unknown key")
        export = ExportRule(
            name=_template(raw_export, "name", "{id}", ""),
            writable=_bool(raw_export, "writable", False),
        )
        if export.writable and read_only:
            raise RuleError("export.writable = true needs read-only = false")
    return Rule(
        index=index,
        match=tuple(sorted(match.items())),
        action=_choice(table, "action", "attach", ACTIONS),  # type: ignore[arg-type]
        driver=_choice(table, "driver", "auto", DRIVERS),  # type: ignore[arg-type]
        read_only=read_only,
        id=_template(table, "id", "{kernel}", "id"),
        node_name=_node_name_template(table),
        rerror=_choice(table, "rerror", "auto", ERROR_ACTIONS),  # type: ignore[arg-type]
        werror=_choice(table, "werror", "auto", ERROR_ACTIONS),  # type: ignore[arg-type]
        export=export,
        name=name,
    )


def parse_rules(tables: object) -> tuple[Rule, ...]:
    """Every rule of ``hotplug.rule`` (an array of tables); RuleError says which one."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleError("expected an array of tables ([[hotplug.rule]])")
    rules = []
    for n, table in enumerate(tables, 1):
        try:
            rules.append(parse_rule(table, n))
        except RuleError as exc:
            raise RuleError(f"[[hotplug.rule]] #{n}: {exc}") from None
    return tuple(rules)
