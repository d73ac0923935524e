"""The packages of unexrl/ import each other without cycles, and lower layers never import the pipeline.

Every ``import`` of an ``unexrl`` module counts, at module level or inside a function (a deferred import is still a
dependency), except under ``if TYPE_CHECKING:``. A module is grouped by its package (``unexrl/rl/agent.py`` ->
``unexrl.rl``; a top-level module such as ``unexrl/cli.py`` is its own unit).
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unexrl"
BELOW_THE_PIPELINE = (
    "unexrl.train",
    "unexrl.rl",
    "unexrl.policies",
    "unexrl.sim",
    "unexrl.data",
    "unexrl.contracts",
)
"""packages that the pipeline uses and that must not use it"""


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, node.lineno)]
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name == "unexrl" or name.startswith("unexrl.")]


def package_graph() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> where, for every edge between two units."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for name, line in _imports(path):
            here, there = _unit(module), _unit(name)
            known = (PACKAGE / there.removeprefix("unexrl.")).is_dir() or (
                PACKAGE / f"{there.removeprefix('unexrl.')}.py"
            ).is_file()
            if here != there and there != "unexrl" and known:
                edges[(here, there)].append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def _cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages() -> None:
    edges = package_graph()
    cycle = _cycle(edges)
    where = [f"{a} -> {b}: {edges[(a, b)][:3]}" for a, b in itertools.pairwise(cycle)] if cycle else []
    assert cycle is None, "import cycle:\n" + "\n".join(where)


def test_lower_layers_never_import_the_pipeline() -> None:
    upward = {
        edge: where
        for edge, where in package_graph().items()
        if edge[0] in BELOW_THE_PIPELINE and edge[1] == "unexrl.pipeline"
    }
    assert not upward, upward


def test_the_check_finds_a_cycle() -> None:
    """The walker is not vacuous: the graph is non-trivial and a planted cycle is reported."""
    edges = package_graph()
    assert ("unexrl.rl", "unexrl.policies") in edges and len(edges) > 20
    assert "unexrl.train" in BELOW_THE_PIPELINE and "unexrl.pipeline" not in BELOW_THE_PIPELINE
    assert _cycle({**edges, ("unexrl.policies", "unexrl.rl"): ["planted"]}) is not None
