"""The package's shape, checked on its source (issue 23): layers, cycles, module size, no shims.

Every import of a tagfer module counts, function-level ones included: a cycle hidden inside a
function is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "tagfer"
MAX_LINES = 600

# The pipeline order of the subpackages (tagfer/__init__.py): a module may import from its own
# layer and the layers before it, never from a later one.
LAYERS = ["core", "traces", "au", "models", "data", "integrations", "train", "evaluation", "explainer", "cli"]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Every tagfer module ``path`` imports anywhere in its body (resolved against ``known``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import tagfer.x.y` where y is an attribute
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("tagfer"):
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: imported_modules(path, name, known) for name, path in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), package inits excluded
    as targets: importing ``tagfer.core.x`` runs ``tagfer/core/__init__`` first, which is not a cycle
    of the code's design."""
    edges = {m: {t for t in ts if not (PKG / Path(*t.split(".")[1:]) / "__init__.py").exists()}
             for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sccs


def test_cycle_finder_sees_a_function_level_cycle(tmp_path):
    a = tmp_path / "tagfer" / "a.py"
    a.parent.mkdir()
    a.write_text("def f():\n    from tagfer.b import g\n")
    b = tmp_path / "tagfer" / "b.py"
    b.write_text("from tagfer import a\n")
    known = {"tagfer", "tagfer.a", "tagfer.b"}
    graph = {"tagfer.a": imported_modules(a, "tagfer.a", known), "tagfer.b": imported_modules(b, "tagfer.b", known)}
    assert graph == {"tagfer.a": {"tagfer.b"}, "tagfer.b": {"tagfer.a"}}
    assert find_cycles(graph) == [["tagfer.a", "tagfer.b"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_no_import_from_a_later_layer():
    bad = []
    for mod, targets in import_graph().items():
        parts = mod.split(".")
        if len(parts) < 2 or parts[1] not in LAYERS:
            continue
        for t in targets:
            tp = t.split(".")
            if len(tp) >= 2 and tp[1] in LAYERS and LAYERS.index(tp[1]) > LAYERS.index(parts[1]):
                bad.append(f"{mod} → {t}")
    assert not bad, "imports from a later layer:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines (at most {MAX_LINES}: split it by layer)"


def test_no_meta_path_hook():
    for path in PKG.rglob("*.py"):
        assert "meta_path" not in path.read_text(), f"{path.relative_to(SRC)} touches sys.meta_path"
    import tagfer  # noqa: F401

    assert not [f for f in sys.meta_path if type(f).__module__.startswith("tagfer")]
    with pytest.raises(ImportError):
        __import__("tagfer.analyze")  # an old flat path is gone, not aliased


def test_every_public_module_is_in_the_readme_layout():
    """README's Layout lists each public module (a package of small kind modules, like
    ``tagfer.models.backends``, is listed once); a new module cannot land undocumented."""
    readme = (SRC.parent / "README.md").read_text()
    missing = []
    for name, path in all_modules().items():
        parts = name.split(".")
        if path.name in ("__init__.py", "__main__.py") or any(p.startswith("_") for p in parts):
            continue
        listed = any(f"`{'.'.join(parts[:k])}`" in readme for k in range(len(parts), 2, -1))
        if not listed:
            missing.append(name)
    assert not missing, "modules missing from README's Layout: " + ", ".join(missing)
