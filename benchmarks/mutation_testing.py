"""Mutation testing of the security and privacy core: which small changes to the code do the tests NOT notice?

Why our own small AST mutator and not mutmut: mutmut 3 rewrites every module of the package into a
``mutants/`` tree and runs the whole suite through its own trampoline, which on this project's shared
2-core machines costs far more than the few modules at stake; here each mutant is one edit of one
module, checked against the tests that cover that module only, in a throw-away copy of the tree (the
working tree is never edited, so a killed run leaves nothing mutated behind).

Mutations (one per mutant), inside function bodies only (docstrings, messages and module constants are
left alone - changing a message is an equivalent mutant by construction):

* comparisons: ``== <-> !=``, ``< <-> <=``, ``> <-> >=``, ``in <-> not in``, ``is <-> is not``
* arithmetic: ``+ <-> -``, ``* -> //``, ``// -> *``, ``% -> *``, ``<< <-> >>``, ``^ -> |``, ``& -> |``, ``| -> &``
* boolean operators: ``and <-> or``; ``not x -> x``
* constants: integers ``n -> n + 1`` (and ``1 -> 0``), ``True <-> False``
* statements: an expression statement (a call whose result is ignored) -> ``pass``; ``return x -> return None``
* slices: ``a[i:j] -> a[i:]`` (the check that a value has the expected length, truncation)

A mutant is *killed* when its tests fail (or time out), *survives* when they pass. Results are written
after every mutant to ``benchmarks/results/mutation/<module>.json`` (resumable: a rerun skips mutants
already decided for the same source), and a summary to ``summary.md``.

Usage::

    python benchmarks/mutation_testing.py                       # every target
    python benchmarks/mutation_testing.py shamir masks          # targets whose name contains these words
    python benchmarks/mutation_testing.py --list                # the targets and their tests
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutation"
COPY = ("fl_common", "fl_server", "fl_client", "tests", "pyproject.toml", "conftest.py")


@dataclass(frozen=True)
class Target:
    """One module (optionally only some of its functions) and the tests that must notice a change to it."""

    name: str
    module: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()  # empty: every function and method
    timeout_s: float = 120.0


TARGETS = (
    Target("shamir", "fl_common/secagg/shamir.py", ("tests/common/test_secagg_shamir.py",)),
    Target("masks", "fl_common/secagg/masks.py", ("tests/common/test_secagg_masks.py",)),
    Target("signing_secagg", "fl_common/secagg/auth.py", ("tests/common/test_crypto_tags.py",
                                                          "tests/common/test_secagg_protocol.py")),
    Target("signing_requests", "fl_common/crypto/signing.py", ("tests/common/test_crypto_signing.py",
                                                               "tests/common/test_crypto_tags.py")),
    Target("nonce_memory", "fl_common/crypto/nonce_cache.py", ("tests/common/test_crypto_signing.py",)),
    Target("nonce_sqlite", "fl_server/store/sqlite.py", ("tests/e2e/test_replay_across_restart.py",),
           functions=("seen_or_add",), timeout_s=240.0),
    Target("accountant", "fl_common/privacy/accountant.py", ("tests/common/test_privacy_accountant.py",
                                                             "tests/common/test_privacy_rdp.py")),
    Target("clipping", "fl_common/privacy/mechanisms.py", ("tests/common/test_privacy_mechanisms.py",),
           functions=("clip_l2",)),
)


# --------------------------------------------------------------------------- mutation points
_CMP_SWAP: dict[type, type] = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
                               ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN_SWAP: dict[type, type] = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
                               ast.Mod: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitXor: ast.BitOr,
                               ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.Div: ast.Mult}


@dataclass(frozen=True)
class Mutant:
    id: str
    line: int
    kind: str
    description: str


def _is_docstring(node: ast.AST, parent: ast.AST | None) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            and parent is not None and getattr(parent, "body", [None])[0] is node)


def _functions(tree: ast.Module, wanted: tuple[str, ...]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (not wanted or node.name in wanted):
            yield node


def _points(func: ast.AST) -> Iterator[tuple[ast.AST, str, str, object]]:
    """(node, kind, description, variant) for every mutation inside ``func`` (nested functions included once)."""
    parents: dict[ast.AST, ast.AST] = {}
    for parent in ast.walk(func):
        for child in ast.iter_child_nodes(parent):
            parents[child] = parent
    for node in ast.walk(func):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is not func:
            continue  # a nested def's body is still walked (ast.walk), its own node needs nothing
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMP_SWAP:
                    yield node, "compare", f"{type(op).__name__} -> {_CMP_SWAP[type(op)].__name__}", i
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            yield node, "arith", f"{type(node.op).__name__} -> {_BIN_SWAP[type(node.op)].__name__}", None
        elif isinstance(node, ast.AugAssign) and type(node.op) in _BIN_SWAP:
            yield node, "arith", f"{type(node.op).__name__}= -> {_BIN_SWAP[type(node.op)].__name__}=", None
        elif isinstance(node, ast.BoolOp):
            yield node, "boolop", f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}", None
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "not", "not x -> x", None
        elif isinstance(node, ast.Constant) and not isinstance(parents.get(node), ast.JoinedStr):
            if isinstance(node.value, bool):
                yield node, "const", f"{node.value} -> {not node.value}", None
            elif isinstance(node.value, int):
                yield node, "const", f"{node.value} -> {node.value + 1}", node.value + 1
                if node.value == 1:
                    yield node, "const", "1 -> 0", 0
        elif isinstance(node, ast.Expr) and not _is_docstring(node, parents.get(node)) and isinstance(node.value, ast.Call):
            yield node, "statement", "call statement -> pass", None
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            yield node, "return", "return x -> return None", None
        elif isinstance(node, ast.Slice) and node.upper is not None:
            yield node, "slice", "a[i:j] -> a[i:]", None


def _apply(node: ast.AST, kind: str, variant: object) -> ast.AST | None:
    """The replacement for ``node`` (None: remove it from its list, as for a statement)."""
    new = copy.copy(node)
    if kind == "compare":
        assert isinstance(new, ast.Compare) and isinstance(variant, int)
        ops = list(new.ops)
        ops[variant] = _CMP_SWAP[type(ops[variant])]()
        new.ops = ops
    elif kind == "arith":
        assert isinstance(new, (ast.BinOp, ast.AugAssign))
        new.op = _BIN_SWAP[type(new.op)]()
    elif kind == "boolop":
        assert isinstance(new, ast.BoolOp)
        new.op = ast.Or() if isinstance(new.op, ast.And) else ast.And()
    elif kind == "not":
        assert isinstance(node, ast.UnaryOp)
        return node.operand
    elif kind == "const":
        assert isinstance(new, ast.Constant)
        new.value = (not new.value) if isinstance(new.value, bool) else variant
    elif kind == "statement":
        return ast.copy_location(ast.Pass(), node)
    elif kind == "return":
        assert isinstance(new, ast.Return)
        new.value = ast.Constant(None)
    elif kind == "slice":
        assert isinstance(new, ast.Slice)
        new.upper = None
    return new


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return self.replacement
        return super().visit(node)


def enumerate_mutants(source: str, functions: tuple[str, ...]) -> list[tuple[Mutant, str]]:
    """All mutants, each made from a fresh parse of ``source`` (the k-th mutation point of the module)."""
    out: list[tuple[Mutant, str]] = []
    total = sum(1 for f in _functions(ast.parse(source), functions) for _ in _points(f))
    seen: set[str] = set()
    for k in range(total):
        tree = ast.parse(source)
        points = [(f, p) for f in _functions(tree, functions) for p in _points(f)]
        func, (node, kind, description, variant) = points[k]
        replacement = _apply(node, kind, variant)
        if replacement is None:
            continue
        text = ast.unparse(ast.fix_missing_locations(_Replace(node, replacement).visit(tree)))
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        if digest in seen:
            continue
        seen.add(digest)
        line = getattr(node, "lineno", 0)
        out.append((Mutant(f"{line}:{kind}:{k}:{digest}", line, kind, f"{func.name}: {description}"), text))
    return out


# --------------------------------------------------------------------------- running
def _sandbox() -> Path:
    """A copy of the tree the mutants are written into (the working tree is never touched)."""
    tmp = Path(tempfile.mkdtemp(prefix="fl-mutation-"))
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    return tmp


_OWN_PACKAGES = ("fl_common", "fl_server", "fl_client", "tests")


def _preload() -> None:
    """Import the heavy third-party modules once, in the parent: every mutant's test run is a fork of it, so only
    the project's own (mutated) modules are imported per mutant. None of the project's modules is imported here."""
    import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401

    with_torch = os.environ.get("MUTATION_PRELOAD_TORCH", "1") == "1"
    if with_torch:
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401


def _child(sandbox: Path, tests: tuple[str, ...]) -> int:
    import pytest

    os.chdir(sandbox)
    sys.path.insert(0, str(sandbox))
    for name in [m for m in sys.modules if m.split(".")[0] in _OWN_PACKAGES]:
        del sys.modules[name]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    return int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-n0", "--no-header", *tests]))


def _run_tests(sandbox: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[str, float]:
    """Run ``tests`` against the sandbox in a forked child; (status, seconds)."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child never returns
        code = 3
        try:
            code = _child(sandbox, tests)
        finally:
            os._exit(code)
    deadline = t0 + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "killed (timeout)", time.monotonic() - t0
        time.sleep(0.02)
    code = os.waitstatus_to_exitcode(status)
    return {0: "survived", 5: "no tests"}.get(code, "killed"), time.monotonic() - t0


def run_target(target: Target, sandbox: Path, *, limit: int | None = None, recheck: bool = False) -> dict[str, object]:
    path = ROOT / target.module
    source = path.read_text()
    source_sha = hashlib.sha256(source.encode()).hexdigest()
    OUT.mkdir(parents=True, exist_ok=True)
    result_file = OUT / f"{target.name}.json"
    previous = json.loads(result_file.read_text()) if result_file.is_file() else {}
    results: dict[str, dict[str, object]] = previous.get("mutants", {}) if previous.get("source_sha256") == source_sha else {}
    baseline, _ = _run_tests(sandbox, target.tests, target.timeout_s)
    if baseline != "survived":
        raise SystemExit(f"{target.name}: the unmutated tests do not pass ({baseline}); fix that first")
    mutants = enumerate_mutants(source, target.functions)
    if limit is not None:
        mutants = mutants[:limit]
    dest = sandbox / target.module
    try:
        for n, (mutant, text) in enumerate(mutants, start=1):
            if mutant.id in results and not (recheck and results[mutant.id]["status"] == "survived"):
                continue
            dest.write_text(text)
            status, seconds = _run_tests(sandbox, target.tests, target.timeout_s)
            results[mutant.id] = {"line": mutant.line, "kind": mutant.kind, "description": mutant.description,
                                  "status": status, "seconds": round(seconds, 2)}
            print(f"[{target.name} {n}/{len(mutants)}] line {mutant.line} {mutant.description}: {status}", flush=True)
            result_file.write_text(json.dumps({"module": target.module, "tests": list(target.tests),
                                               "functions": list(target.functions), "source_sha256": source_sha,
                                               "mutants": results}, indent=1, sort_keys=True))
    finally:
        dest.write_text(source)
    return {"module": target.module, "mutants": results}


def summary_markdown(done: dict[str, dict[str, object]]) -> str:
    lines = ["| target | module | mutants | killed | survived |", "|---|---|---:|---:|---:|"]
    survivors: list[str] = []
    for name, data in done.items():
        mutants = data["mutants"]
        assert isinstance(mutants, dict)
        alive = {k: v for k, v in mutants.items() if v["status"] == "survived"}
        lines.append(f"| {name} | `{data['module']}` | {len(mutants)} | {len(mutants) - len(alive)} | {len(alive)} |")
        for v in sorted(alive.values(), key=lambda v: v["line"]):
            survivors.append(f"- {name} line {v['line']}: {v['description']}")
    return "\n".join([*lines, "", "Surviving mutants:", "", *(survivors or ["- none"])]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help="run only targets whose name contains one of these words")
    ap.add_argument("--list", action="store_true", help="list the targets and their tests, and the mutant counts")
    ap.add_argument("--limit", type=int, default=None, help="at most this many mutants per target (a smoke run)")
    ap.add_argument("--recheck", action="store_true", help="run the surviving mutants again (after adding tests)")
    args = ap.parse_args(argv)
    chosen = [t for t in TARGETS if not args.targets or any(w in t.name for w in args.targets)]
    if args.list:
        for t in chosen:
            count = len(enumerate_mutants((ROOT / t.module).read_text(), t.functions))
            print(f"{t.name}: {t.module} {list(t.functions) or ''} -> {count} mutants; tests {', '.join(t.tests)}")
        return 0
    _preload()
    sandbox = _sandbox()
    try:
        for t in chosen:
            run_target(t, sandbox, limit=args.limit, recheck=args.recheck)
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
    done = {}
    for t in TARGETS:
        f = OUT / f"{t.name}.json"
        if f.is_file():
            done[t.name] = json.loads(f.read_text())
    (OUT / "summary.md").write_text(summary_markdown(done))
    print(summary_markdown(done))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
