"""Replacing one client's identifiers in stored structures, for erasure (fl_server/rest/erasure.py).

Only exact matches are replaced (a whole string, a dict key, a CSV cell): ``c-1`` inside
``c-10`` or inside free text is left alone, so an erasure never corrupts another client's data.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection
from typing import Any


def replace_exact(obj: Any, targets: Collection[str], placeholder: str) -> Any:
    """A copy of a JSON-like (or checkpoint) structure with every string equal to one of ``targets``, as a value
    or a dict key, replaced by ``placeholder``; tensors and other leaves are returned as they are."""
    if isinstance(obj, str):
        return placeholder if obj in targets else obj
    if isinstance(obj, dict):
        return {replace_exact(k, targets, placeholder): replace_exact(v, targets, placeholder) for k, v in obj.items()}
    if isinstance(obj, list):
        return [replace_exact(v, targets, placeholder) for v in obj]
    if isinstance(obj, tuple):
        return tuple(replace_exact(v, targets, placeholder) for v in obj)
    return obj  # numbers, tensors, None: nothing to replace


def contains_exact(obj: Any, targets: Collection[str]) -> bool:
    """Whether ``replace_exact`` would change anything."""
    if isinstance(obj, str):
        return obj in targets
    if isinstance(obj, dict):
        return any(contains_exact(k, targets) or contains_exact(v, targets) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(contains_exact(v, targets) for v in obj)
    return False


def replace_csv_cells(text: str, targets: Collection[str], placeholder: str) -> str:
    """CSV text with every cell equal to one of ``targets`` replaced (header, quoting and line ends as csv writes them)."""
    rows = list(csv.reader(io.StringIO(text)))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([placeholder if cell in targets else cell for cell in row])
    return buf.getvalue()


__all__ = ["contains_exact", "replace_csv_cells", "replace_exact"]
