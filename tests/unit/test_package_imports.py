"""The import graph between kforcing_dist's packages: no cycles, and the shared layers stay low.

Read from the source with ``ast`` (nothing is imported), counting function-level imports too:
a cycle dodged by importing inside a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kforcing_dist"


def _unit(module: str) -> str:
    """The package (``model``) or top-level module (``cli``) that ``kforcing_dist.X...`` belongs to."""
    return module.split(".")[1]


def package_edges(root: Path = PACKAGE) -> dict[tuple[str, str], set[str]]:
    """{(importer unit, imported unit): importing modules} over every .py file under ``root``."""
    edges: dict[tuple[str, str], set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
        if len(parts) == 2:  # kforcing_dist/<file>.py: a top-level module is its own unit
            source = "__init__" if parts[-1] == "__init__" else parts[-1]
        else:
            source = parts[1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # ``from kforcing_dist import X``: X is a submodule or a name of the package itself
                targets = [f"{target}.{a.name}" for a in node.names] if target == "kforcing_dist" else [target]
            else:
                continue
            for target in targets:
                if target.startswith("kforcing_dist."):
                    dest = _unit(target)  # skip names that are no module (``__version__``)
                    if dest != source and ((root / dest).is_dir() or (root / f"{dest}.py").exists()):
                        edges.setdefault((source, dest), set()).add(module)
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one unit (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_packages():
    edges = package_edges()
    found = cycles(edges)
    detail = {c: sorted(m for (a, b), mods in edges.items() if a in c and b in c for m in mods)
              for c in map(tuple, found)}
    assert not found, f"import cycles between kforcing_dist packages: {detail}"


def test_nn_imports_no_other_package_and_decode_no_training_code():
    edges = package_edges()
    assert not [e for e in edges if e[0] == "nn"], "kforcing_dist.nn must import no other kforcing_dist package"
    training_side = {"model", "distill", "training", "parallel", "convert", "app", "eval", "cli"}
    bad = {b: sorted(mods) for (a, b), mods in edges.items() if a == "decode" and b in training_side}
    assert not bad, f"kforcing_dist.decode imports training-side packages: {bad}"


def test_cycle_finder_sees_a_function_level_cycle(tmp_path):
    """The checker itself: a cycle made by an import inside a function is found."""
    root = tmp_path / "kforcing_dist"
    for pkg in ("a", "b"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "a" / "x.py").write_text("from ..b import y\n")
    (root / "b" / "y.py").write_text("def f():\n    from ..a.x import g\n")
    assert cycles(package_edges(root)) == [["a", "b"]]
