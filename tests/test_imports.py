"""The import graph of ``seg/``: no cycle, and every import points down the layers of :data:`LAYERS`.

The graph is read from the source (``ast``), nothing is imported. Every import counts, also one inside a
function (a late import that dodges a cycle is still a cycle); only ``if TYPE_CHECKING:`` blocks do not.
Importing ``seg.a.b`` also runs ``seg/a/__init__.py``, so it is an edge to ``seg.a`` too (unless the importer
is itself inside ``seg.a``, whose ``__init__`` has then already run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SEG = Path(__file__).resolve().parents[1] / "seg"

# Lowest first: a module imports only from its own layer and the layers before it (CONTRIBUTING.md).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("seg.errors", "seg.events", "seg.distributed"),  # plain records and facts every layer may use
    ("seg.config", "seg.checkpoint", "seg.media"),  # files: configs, checkpoints, images and videos
    ("seg.nn",),  # the layers that replace BatchNorm
    ("seg.models", "seg.data"),  # models and datasets, independent of each other
    ("seg.inference", "seg.export", "seg.visualize"),  # using a trained model
    ("seg.evaluation",),
    ("seg.tasks",),  # the task seam: data, model, loss, metric of each task
    ("seg.engine",),  # the one training loop over any task
    ("seg.study",),  # many training runs
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(SEG.rglob("*.py")):
        parts = list(path.relative_to(SEG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """The dotted names a module imports (``from a import b`` gives ``a.b`` if that is a module, else ``a``)."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.names: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # annotations only: never executed
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the importer's package, one level up per extra dot
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        self.names.add(base)
        self.names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in self.known)


def import_graph() -> dict[str, set[str]]:
    """module -> the ``seg`` modules whose import it runs (their packages' ``__init__`` included)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        visitor = _Imports(module, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}  # itself and its packages
        edges = set()
        for name in visitor.names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in known and target not in own:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def test_imports_of_every_kind_are_seen() -> None:
    source = """
from typing import TYPE_CHECKING
import seg.errors
from seg.nn import deconv
from . import weights
if TYPE_CHECKING:
    from seg.engine import trainer
def late():
    from seg.tasks import Task
"""
    visitor = _Imports("seg.models.build", False, {"seg.nn.deconv", "seg.models.weights"})
    visitor.visit(ast.parse(source))
    assert visitor.names == {"typing", "seg.errors", "seg.nn", "seg.nn.deconv", "seg.models", "seg.models.weights",
                             "seg.tasks"}
    graph = import_graph()
    assert "seg.nn.deconv" in graph["seg.nn"]  # a package re-exporting its module
    assert {"seg.data.labels", "seg.media"} <= graph["seg.data.cityscapes"]  # not seg.data: its own package
    assert "seg.data" in graph["seg.visualize"]  # seg.data.labels runs seg/data/__init__.py first
    assert "seg.inference" not in graph["seg.visualize"]  # only under TYPE_CHECKING


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_seg_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_point_down_the_layers() -> None:
    graph = import_graph()
    missing = [m for m in graph if m != "seg" and layer_of(m) is None]
    assert not missing, f"modules in no layer of LAYERS (tests/test_imports.py): {missing}"
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if module != "seg"
        for target in sorted(targets)
        if target != "seg" and layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports from a higher layer (LAYERS in tests/test_imports.py): " + "; ".join(upward)


def test_layer_of() -> None:
    assert layer_of("seg.nn.deconv") == layer_of("seg.nn") < layer_of("seg.models.build")
    assert layer_of("seg.tasks.base") < layer_of("seg.engine.writers")
    assert layer_of("seg.nnx") is None  # a prefix is a whole package name
