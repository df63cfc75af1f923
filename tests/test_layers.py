"""The package's shape, read from its source with `ast` (nothing is imported): no circle of imports, no
import from a lower layer to a higher one, modules under 300 lines and functions under 60.

Every import counts, a function's own included; `from pkg import name` is an import of `pkg.name` where
that is a module, else of `pkg`; imports under `if TYPE_CHECKING:` are type hints and do not count.

Layers, bottom to top (README, "Layers"): a module may import its own package and the layers below it; of
the packages sharing a layer, only those in SAME_LAYER may import each other, one way.

`EXCEPTIONS` (sizes) and `KNOWN_VIOLATIONS` (import edges, left out of both the layer and the cycle check)
name what is allowed today, each with its reason; anything new fails.
"""

from __future__ import annotations

import ast
import warnings
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prefopt"

LAYERS = [
    [
        "prefopt",
        "prefopt.errors",
        "prefopt.files",
        "prefopt.progress",
        "prefopt.schema",
        "prefopt.optimizers",
        "prefopt.registry",
    ],  # leaves
    ["prefopt.objectives", "prefopt.models"],
    ["prefopt.data", "prefopt.rewards"],
    ["prefopt.config"],  # the typed config: imports the parts' registries
    ["prefopt.engine"],  # prepared run, step, reference cache and fit, KL estimators, distributed helpers
    ["prefopt.evaluation"],
    ["prefopt.training"],
    ["prefopt.research"],
    ["prefopt.cli", "prefopt.__main__"],
]
SAME_LAYER = {  # (importer, imported) between different parts of one layer
    ("prefopt.schema", "prefopt.errors"),  # a schema's errors name the field
    ("prefopt.data", "prefopt.models"),
    ("prefopt.rewards", "prefopt.models"),
    ("prefopt.rewards", "prefopt.data"),
    ("prefopt.__main__", "prefopt.cli"),  # `python -m prefopt` is the CLI
}
MAX_MODULE_LINES = 300  # a module has fewer lines than this
MAX_FUNCTION_LINES = 60  # a function (its `def` line to its last line) has fewer lines than this

# Named exceptions, each with its reason (none today):
EXCEPTIONS: dict[str, str] = {}  # "path" (module size) or "path:qualified.function" (function size)
KNOWN_VIOLATIONS: dict[str, str] = {}  # "importer -> imported": an upward import or a cycle's edge


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(), str(modules()[name]))


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Every Import / ImportFrom under `node`, at any depth, except the body of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _type_checking(child):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _absolute(name: str, node: ast.ImportFrom) -> str:
    """The module a `from ... import` reads from, relative imports resolved against `name`."""
    if not node.level:
        return node.module or ""
    is_package = modules()[name].name == "__init__.py"
    base = name.split(".")[: len(name.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> set[str]:
    """The prefopt modules that module `name` imports."""
    found = set()
    for node in _import_nodes(tree(name)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
            continue
        source = _absolute(name, node)
        for alias in node.names:
            found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules() else source)
    return {target for target in found if target in modules() and target != name}


@cache
def graph() -> dict[str, set[str]]:
    return {name: imports(name) for name in modules()}


def part(name: str) -> tuple[int, str]:
    """(layer, part): the layer's entry that is `name` or holds it."""
    for layer, entries in enumerate(LAYERS):
        for entry in entries:
            if name == entry or (entry != "prefopt" and name.startswith(f"{entry}.")):
                return layer, entry
    raise AssertionError(f"{name} is in no layer: add it to LAYERS (and to the README's layer table)")


def edges() -> set[str]:
    return {f"{source} -> {target}" for source, targets in graph().items() for target in targets}


def layer_violations() -> list[str]:
    """Edges to a higher layer, or to another part of the same layer that SAME_LAYER does not allow."""
    found = []
    for source, targets in graph().items():
        layer, owner = part(source)
        for target in targets:
            target_layer, target_owner = part(target)
            allowed = owner == target_owner or (owner, target_owner) in SAME_LAYER
            if target_layer > layer or (target_layer == layer and not allowed):
                found.append(f"{source} -> {target}")
    return sorted(found)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle of imports per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle(graph, component) for component in components]


def _circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path that starts and ends at the component's first module, through the component."""
    start = min(component)
    paths, seen = {start: [start]}, {start}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for target in sorted(graph[node] & component):
            if target == start:
                return [*paths[node], start]
            if target not in seen:
                seen.add(target)
                paths[target] = [*paths[node], target]
                frontier.append(target)
    raise AssertionError(f"no circle through {start}")


def sizes() -> dict[str, int]:
    """Line counts: "path" of each module, "path:qualified.name" of each function."""
    found = {}
    for name, path in modules().items():
        relative = path.relative_to(ROOT).as_posix()
        found[relative] = len(path.read_text().splitlines())
        for qualified, node in _functions(tree(name)):
            found[f"{relative}:{qualified}"] = node.end_lineno - node.lineno + 1
    return found


def _functions(node: ast.AST, prefix: str = ""):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qualified = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield qualified, child
            yield from _functions(child, f"{qualified}.")
        else:
            yield from _functions(child, prefix)


def too_large() -> list[str]:
    return sorted(
        f"{key}: {lines} lines"
        for key, lines in sizes().items()
        if lines >= (MAX_FUNCTION_LINES if ":" in key else MAX_MODULE_LINES) and key not in EXCEPTIONS
    )


def _warn_stale(kind: str, stale: set[str]) -> None:
    if stale:  # fixed: the entry can go (a warning, so that fixing it never breaks the suite)
        warnings.warn(f"{kind} entries no longer needed: {sorted(stale)}", stacklevel=2)


def test_every_module_is_in_a_layer():
    assert all(part(name) for name in modules())


def test_no_import_goes_up_a_layer_or_sideways():
    found = layer_violations()
    _warn_stale("KNOWN_VIOLATIONS", {key for key in KNOWN_VIOLATIONS if key not in edges()})
    new = [edge for edge in found if edge not in KNOWN_VIOLATIONS]
    assert not new, "imports against the layers (LAYERS, SAME_LAYER in this file):\n" + "\n".join(new)


def test_no_circle_of_imports():
    allowed = {tuple(key.split(" -> ")) for key in KNOWN_VIOLATIONS}
    kept = {source: {t for t in targets if (source, t) not in allowed} for source, targets in graph().items()}
    found = cycles(kept)
    assert not found, "circles of imports:\n" + "\n".join(" -> ".join(circle) for circle in found)


def test_modules_and_functions_stay_small():
    _warn_stale("EXCEPTIONS", {key for key, lines in sizes().items() if key in EXCEPTIONS} ^ set(EXCEPTIONS))
    found = too_large()
    limits = f"modules < {MAX_MODULE_LINES} lines, functions < {MAX_FUNCTION_LINES}"
    hint = "split it, or name it in EXCEPTIONS with a reason"
    assert not found, f"too large ({limits}; {hint}):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["c", "d", "c"], ["a", "b", "a"]]),
    ],
)
def test_cycles_finds_each_circle(graph, expected):
    assert sorted(cycles(graph)) == sorted(expected)


def test_imports_are_read_as_python_reads_them(tmp_path, monkeypatch):
    """`from pkg import submodule` is the submodule, `from pkg import name` the package, relative imports
    resolve against the importer, a function's imports count and TYPE_CHECKING's do not."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from prefopt.data import source, SourceConfig\n"
        "from . import files\n"
        "from .engine.kl import x\n"
        "if TYPE_CHECKING:\n"
        "    from prefopt.research import report\n"
        "else:\n"
        "    import prefopt.errors\n"
        "def f():\n"
        "    import prefopt.models.tiny as tiny\n"
    )
    (tmp_path / "probe.py").write_text(source)
    monkeypatch.setitem(modules(), "prefopt.probe", tmp_path / "probe.py")
    tree.cache_clear()
    try:
        found = imports("prefopt.probe")
    finally:
        tree.cache_clear()
    assert found == {
        "prefopt.data.source",
        "prefopt.data",
        "prefopt.files",
        "prefopt.engine.kl",
        "prefopt.errors",
        "prefopt.models.tiny",
    }
