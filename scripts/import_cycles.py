"""Finds import circles between the modules of this project's packages, from the source alone.

Why from the source (``ast``) and not by importing: a circle that today's import order happens to
tolerate still breaks when someone imports the other module first, and a lazy import inside a
function (the usual workaround) hides a circle rather than removing it. So every ``import`` and
``from ... import`` counts, at module level or not, and so do those under ``if TYPE_CHECKING:``
(a circle of types still ties the modules together, and import-linter counts them too);
``--runtime-only`` leaves those out. A submodule importing a sibling (``from .rdp import ...``) is an edge to the
sibling only; importing a *name* from its own package's ``__init__`` is an edge to that
``__init__``, since the name must be bound before the submodule runs.

    python scripts/import_cycles.py                      # fl_common fl_server fl_client
    python scripts/import_cycles.py fl_common fl_server.privacy

Prints each circle as ``a -> b -> ... -> a`` and exits 1 when there is one, 0 otherwise. A
package's ``__init__`` counts as the module named like the package, and importing
``pkg.mod`` from outside ``pkg`` also runs ``pkg/__init__.py``, so that edge is added too. The graph spans every
package named on the command line and everything they import inside the checkout; only circles
that touch a listed prefix are reported.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("fl_common", "fl_server", "fl_client")


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given top-level packages."""
    found: dict[str, Path] = {}
    for package in packages:
        base = root / package
        if not base.is_dir():
            raise SystemExit(f"no package directory {base}")
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, runtime_only: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement; with ``runtime_only``, not those in the body of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if runtime_only and isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``pkg.mod.func`` -> ``pkg.mod``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _with_parents(name: str, importer: str, modules: dict[str, Path]) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and ``a/b/c``: all are edges, except
    the packages that contain the importer (they are already being imported when it runs)."""
    parts = name.split(".")
    parents = [".".join(parts[:i]) for i in range(1, len(parts))]
    return [m for m in parents if m in modules and not importer.startswith(m + ".")] + [name]


def import_graph(modules: dict[str, Path], *, runtime_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree, runtime_only):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    anchor = here.split(".")
                    if node.level > 1:
                        anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # "from pkg import name": name is a submodule (an edge to it) or an attribute of pkg (an
                # edge to pkg itself, even from inside pkg: that name must be bound before this runs)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is None:
                    continue
                for dep in _with_parents(resolved, name, modules):
                    if dep != name:
                        graph[name].add(dep)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module are the circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first), for the message."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return component


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", default=list(TOP_PACKAGES),
                        help="packages or modules whose circles to report (default: %(default)s)")
    parser.add_argument("--runtime-only", action="store_true", help="leave out imports under 'if TYPE_CHECKING:'")
    args = parser.parse_args(argv)
    tops = sorted({p.split(".")[0] for p in args.prefixes} | set(TOP_PACKAGES))
    modules = module_files(ROOT, [t for t in tops if (ROOT / t).is_dir()])
    graph = import_graph(modules, runtime_only=args.runtime_only)

    def listed(module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in args.prefixes)

    circles = [c for c in strongly_connected(graph) if any(listed(m) for m in c)]
    for component in circles:
        print(f"import circle ({len(component)} modules): {' -> '.join(one_cycle(graph, component))}")
        if len(component) > 2:
            print(f"  all modules in it: {', '.join(component)}")
    if not circles:
        print(f"no import circles among {sum(listed(m) for m in modules)} modules under {', '.join(args.prefixes)}")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
