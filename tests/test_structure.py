"""The package's shape: imports go one way, and task-specific behaviour lives in the task registry.

Both read the source as text (ast), so they hold for code no other test runs."""

from __future__ import annotations

import ast
from pathlib import Path

from chimle import tasks
from chimle.config import WIRINGS

PACKAGE = Path(tasks.__file__).resolve().parent
TASK_OWNERS = {"tasks.py", "generator.py"}  # the registry, and the generator's wiring


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("chimle", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The chimle modules a module imports, at its top or inside functions (not under `if TYPE_CHECKING`)."""
    found = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name in known)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module in known:
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)

    Visitor().visit(tree)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    trees = modules()
    known = set(trees) - {"chimle"}
    graph = {name: imported(tree, known) - {name} for name, tree in trees.items() if name != "chimle"}
    assert cycles(graph) == [], "modules that import each other (directly, or around a circle)"


def _task_names_in(node: ast.AST, names: set[str]) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in names]


def test_task_specific_behaviour_lives_in_the_registry():
    """No comparison with a task's or wiring's name, and no table keyed by task names, outside tasks.py and the
    generator: a new task is one registry entry."""
    names = set(tasks.TASKS) | set(WIRINGS)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in TASK_OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                hits = _task_names_in(node, names)
            elif isinstance(node, ast.Dict):
                hits = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            else:
                continue
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {name}" for name in hits]
    assert found == []
