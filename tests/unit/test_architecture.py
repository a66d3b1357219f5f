"""The package layout is the architecture (docs/architecture.md): its rules, checked on the code.

Every import statement of every module counts, wherever it stands: at the top,
under ``if TYPE_CHECKING:`` or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "blockd"

# What each package (or top-level module) may import of blockd, besides itself.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "events": {"errors"},
    "devices": {"errors"},
    "aio": {"devices", "errors"},
    "block": {"aio", "devices", "errors", "events"},
    "qmp": {"aio", "block", "devices", "errors", "events"},
    "nbd": {"aio", "block", "devices", "errors", "events"},
    "monitoring": {"block", "devices", "errors", "events", "__init__"},
    "hotplug": {"block", "devices", "errors", "events"},
    "daemon": {"aio", "block", "devices", "errors", "events", "hotplug", "monitoring", "nbd",
               "qmp", "__init__"},
    "__main__": {"daemon"},
    "__init__": set(),
    # The client imports nothing of the server but the key=value parser it shares.
    "ctl": {"qmp.keyval"},
}
# Modules that turn bytes into events and back, with no I/O of their own.
SANS_IO = {"blockd.nbd.constants", "blockd.nbd.wire", "blockd.nbd.protocol", "blockd.nbd.errors",
           "blockd.qmp.message", "blockd.qmp.protocol", "blockd.qmp.keyval"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules ``name`` imports: blockd's resolved to modules, others by top name."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import module` names a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def area(module: str) -> str:
    """The package (or top-level module) a blockd module belongs to."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_no_import_cycles() -> None:
    deps = {m: {d for d in ds if d.startswith("blockd")} for m, ds in graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in deps.get(m, ()):
            if d not in deps:
                continue
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == m:
                    break
            if len(component) > 1 or m in deps[m]:
                cycles.append(sorted(component))

    for m in sorted(deps):
        if m not in index:
            visit(m)
    assert cycles == []


def test_packages_import_only_the_layers_below() -> None:
    wrong = []
    for module, deps in graph().items():
        own = area(module)
        for dep in deps:
            if not dep.startswith("blockd") or dep == "blockd":
                if dep == "blockd" and own not in ("__init__",) and "__init__" not in ALLOWED[own]:
                    wrong.append(f"{module} -> {dep}")
                continue
            other = area(dep)
            allowed = ALLOWED[own]
            if other == own or other in allowed or dep.removeprefix("blockd.") in allowed:
                continue
            wrong.append(f"{module} -> {dep}")
    assert sorted(wrong) == []


@pytest.mark.parametrize("package", ["devices", "qmp.message", "qmp.protocol", "nbd.protocol"])
def test_no_asyncio_below_the_adapters(package: str) -> None:
    for module, deps in graph().items():
        if module == f"blockd.{package}" or module.startswith(f"blockd.{package}."):
            assert "asyncio" not in deps, module


def test_sans_io_cores_do_no_io() -> None:
    for module in SANS_IO:
        deps = graph()[module]
        assert not deps & {"asyncio", "socket", "selectors", "threading"}, module


def test_top_level_is_small_and_every_package_says_what_it_is_for() -> None:
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 6, top
    for init in ROOT.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 60, init


# A device's and its medium node's state, which only blockd/block/device.py may change.
DEVICE_STATE = {"tray_open", "locked", "iostatus", "paused", "node", "user", "in_flight", "size",
                "has_medium"}


def test_only_the_device_writes_its_state() -> None:
    writes = []
    for module, path in modules().items():
        if module in ("blockd.block.device", "blockd.block.stats"):  # stats: its own counters
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                if (isinstance(target, ast.Attribute) and target.attr in DEVICE_STATE
                        and _root(target) != "self"):  # an object's own fields are its own
                    writes.append(f"{module}:{node.lineno} {ast.unparse(target)}")
    assert writes == []


def _root(expr: ast.expr) -> str | None:
    """The name an attribute or subscript chain starts from (``self`` in ``self.a[k].b``)."""
    while isinstance(expr, (ast.Attribute, ast.Subscript)):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None
