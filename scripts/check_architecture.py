"""Architecture rules that linters do not state: no import circles, no private names across modules.

Run: ``python scripts/check_architecture.py`` (exit 1 and one line per finding), or import
:func:`findings` (tests/test_architecture.py does). Why a script: import-linter checks layers
between packages, ruff checks style, neither sees ``obj._member`` reached from another file or a
cycle between two modules of one package.

Rules, over the packages fl_common, fl_server and fl_client:

1. The import graph of modules has no cycle (imports under ``if TYPE_CHECKING:`` count too: a
   cycle of types is still a design knot).
2. No ``from module import _name`` of an underscore name defined in another module.
3. No ``x._member`` on anything but ``self`` / ``cls`` where ``_member`` is a private name our own
   code defines in *another* file (another class's private member). A class may reach the privates
   of a helper class in its own file; third-party privates (torch's ``_BatchNorm``) are not ours
   to rename and are not counted.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fl_common", "fl_server", "fl_client")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in source_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                # the longest known module that the imported name lives in
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_parent_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its submodules is not a cycle with them: drop the edges
    from a submodule to its own parent packages (``fl_server.store.sqlite`` -> ``fl_server.store``
    is an import of the package's public face, which Python resolves after the submodule)."""
    out: dict[str, set[str]] = {}
    for v, targets in graph.items():
        out[v] = {t for t in targets if not v.startswith(t + ".")}
    return out


def _defined_private_names(tree: ast.AST) -> set[str]:
    """Underscore names a file defines: functions, classes, ``self._x`` / module / class attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and sub.attr.startswith("_"):
                        names.add(sub.attr)
                    elif isinstance(sub, ast.Name) and sub.id.startswith("_"):
                        names.add(sub.id)
    return {n for n in names if not n.startswith("__")}


def private_access() -> list[str]:
    trees = {path: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in source_files()}
    defined = {path: _defined_private_names(tree) for path, tree in trees.items()}
    ours = set().union(*defined.values())
    found: list[str] = []
    for path, tree in trees.items():
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{rel}:{node.lineno}: imports private name {alias.name} from {node.module}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                    continue
                if node.attr in defined[path] or node.attr not in ours:
                    continue
                found.append(f"{rel}:{node.lineno}: reaches private member .{node.attr} of {ast.unparse(owner)}")
    return sorted(found)


def findings() -> list[str]:
    graph = _package_parent_edges(import_graph())
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return out + private_access()


def main() -> int:
    problems = findings()
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
