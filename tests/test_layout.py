"""The shape of the package: no import cycles inside lamina, and each layer of it imports only downwards.

Imports are read from the source with ``ast`` (module level and inside functions alike: a lazy import is
still a dependency); imports under ``if TYPE_CHECKING:`` are annotations only and do not count. The
package ``lamina`` itself re-exports ``ImageService`` lazily for users; that is its public face, not a
dependency of the modules below it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina

PKG_DIR = Path(lamina.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        rel = path.relative_to(PKG_DIR).with_suffix("")
        parts = ["lamina", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        if mod == "lamina":
            continue  # the lazy public face (see the module docstring)
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_inside_lamina() -> None:
    graph = _graph()
    assert "lamina.store.kernel" in graph and graph["lamina.service"], "the import graph was not read"
    assert _cycles(graph) == []


# Each package and the packages it may import, besides the leaf modules (errors, digest, config, contract,
# timespec, and two primitives the tar-split record uses to read payloads back: the directory-fd operations of
# lamina.fs.ops and the kernel copy of lamina.fs.kcopy).
ALLOWED = {
    "lamina.tar": set(),
    "lamina.fs": {"lamina.tar"},
    "lamina.formats": {"lamina.tar", "lamina.fs"},
    "lamina.plugins": {"lamina.tar"},
    "lamina.store": {"lamina.tar", "lamina.plugins", "lamina.fs"},
    "lamina.images": {"lamina.tar", "lamina.formats", "lamina.store", "lamina.fs"},
    "lamina.registry": {"lamina.tar", "lamina.formats", "lamina.store", "lamina.images"},
}
LEAVES = {"lamina", "lamina.errors", "lamina.digest", "lamina.config", "lamina.contract", "lamina.timespec",
          "lamina.fs.ops", "lamina.fs.kcopy"}


def test_leaf_modules_import_only_leaves_and_the_bottom_package() -> None:
    graph = _graph()
    assert all(leaf in graph for leaf in LEAVES - {"lamina"}), "a leaf module is missing from the graph"
    wrong = sorted(f"{leaf} imports {dep}" for leaf in LEAVES for dep in graph.get(leaf, ())
                   if dep not in LEAVES and _package(dep) != "lamina.tar")
    assert wrong == []


def _package(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_packages_import_only_downwards(pkg: str) -> None:
    graph = _graph()
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in graph.items() if _package(mod) == pkg
        for dep in deps
        if dep not in LEAVES and _package(dep) != pkg and _package(dep) not in ALLOWED[pkg]
    )
    assert wrong == []


def test_lamina_driver_is_a_face_for_drivers_only() -> None:
    """``lamina.driver`` gathers what driver authors use; nothing inside lamina but the kit leans on it."""
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "lamina.driver" in deps and not m.startswith("lamina.testing"))
    assert users == []
    assert {"lamina.contract", "lamina.fs.apply", "lamina.plugins.hookspecs"} <= graph["lamina.driver"]
