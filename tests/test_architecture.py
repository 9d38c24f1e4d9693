"""The layout's rules, checked on the real source tree (scripts/check_architecture.py does the work).

A finding names the file and line: a new import circle, a ``from x import _private`` of another
module's name, or a reach into another class's private member from a different file.
"""

from __future__ import annotations

import ast
import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("check_architecture", ROOT / "scripts" / "check_architecture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_source_tree_keeps_the_architecture_rules() -> None:
    assert _checker().findings() == []


def test_the_checker_finds_a_cycle_and_a_private_reach() -> None:
    check = _checker()
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert check.cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse(textwrap.dedent("""
        class Other:
            def __init__(self):
                self._secret = 1
    """))
    assert "_secret" in check._defined_private_names(tree)
