"""The import graph of the two packages, read from their source (imports inside function
bodies included): it has no cycle, mergekit_expo never imports expo_eval, and only the compat
module names mergekit's private (underscored) members."""

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"mergekit_expo": REPO / "mergekit_expo", "expo_eval": REPO / "eval" / "expo_eval"}


def modules() -> Dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(module: str, path: Path) -> List[tuple]:
    """(node, absolute module name, imported member names) for every import in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [(node, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.append((node, base, [alias.name for alias in node.names]))
    return names


def graph() -> Dict[str, Set[str]]:
    """Module -> the project modules it imports. A package's own __init__ counts only where a name
    is taken from it (`from pkg import name`, name no submodule): importing pkg.sub runs it too,
    but that is no dependency of pkg.sub's design."""
    found = modules()

    def owner(name: str):
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for module, path in found.items():
        targets = set()
        for _, base, members in imported_names(module, path):
            for target in [f"{base}.{m}" if f"{base}.{m}" in found else base for m in members] or [base]:
                resolved = owner(target)
                # a name taken from a package's __init__ (not a submodule) depends on that __init__
                from_init = bool(members) and resolved == base and base in found
                if resolved and resolved != module and (from_init or not module.startswith(resolved + ".")):
                    targets.add(resolved)
        edges[module] = targets
    return edges


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_in_function_bodies():
    edges = graph()
    assert "expo_eval.sweep" in edges["expo_eval.demo.pipeline"]  # imported inside make_sweep
    assert "mergekit_expo.card" in edges["mergekit_expo.adapter"]  # imported inside a function


def test_no_import_cycle():
    edges = graph()
    assert cycles(edges) == [], "\n".join(
        " <-> ".join(component) + ": " + "; ".join(f"{m} -> {sorted(edges[m] & set(component))}" for m in component)
        for component in cycles(edges)
    )


def test_a_name_taken_from_a_package_init_is_an_edge_to_it(tmp_path, monkeypatch):
    """pkg/__init__ imports pkg.core, and core takes a name from pkg: a real cycle (`import pkg`
    fails with a partially initialized module)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg.core import f\ng = 1\n")
    (package / "core.py").write_text("from pkg import g\n\ndef f():\n    return g\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGES", {"pkg": package})
    assert cycles(graph()) == [["pkg", "pkg.core"]]


def test_cycles_are_found():
    """The check itself: a planted two-module and three-module cycle are reported."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(cycles(edges)) == [["a", "b"], ["c", "d", "e"]]


def test_mergekit_expo_never_imports_expo_eval():
    """Imports go one way: recipes -> mergekit_expo -> expo_eval."""
    edges = graph()
    upward = {m: sorted(t for t in targets if t.startswith("expo_eval")) for m, targets in edges.items()}
    assert {m: t for m, t in upward.items() if m.startswith("mergekit_expo") and t} == {}


def test_only_compat_names_mergekit_private_members():
    found = modules()
    private = [
        f"{path.relative_to(REPO)}:{node.lineno} {base}: {name}"
        for module, path in found.items()
        if module != "mergekit_expo.compat"
        for node, base, members in imported_names(module, path)
        if base.split(".")[0] == "mergekit"
        for name in [*members, *base.split(".")[1:]]
        if name.startswith("_")
    ]
    assert private == []
