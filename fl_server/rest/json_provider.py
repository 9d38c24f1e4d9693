"""JSON that is JSON: no ``NaN`` or ``Infinity`` ever leaves the server.

Python's ``json`` writes ``NaN`` for a float nan, which is not JSON: a browser's ``JSON.parse``
throws on it, and the dashboard then showed "server unreachable" for as long as one diverged
round stayed in ``/status``'s history. Every non-finite float becomes ``null``; a top-level
object also gets ``non_finite``, the JSON paths that were replaced, so the reason is visible
instead of silently missing.
"""

from __future__ import annotations

import json
import math
from typing import Any

from flask.json.provider import DefaultJSONProvider

#: the key naming what was replaced (only present when something was)
NON_FINITE_KEY = "non_finite"


def finite_json(value: Any, path: str = "$", replaced: list[str] | None = None) -> Any:
    """``value`` with every nan/inf float replaced by None; the replaced paths go to ``replaced``."""
    if isinstance(value, float) and not math.isfinite(value):
        if replaced is not None:
            replaced.append(path)
        return None
    if isinstance(value, dict):
        return {k: finite_json(v, f"{path}.{k}", replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f"{path}[{i}]", replaced) for i, v in enumerate(value)]
    return value


class FiniteJSONProvider(DefaultJSONProvider):
    """Flask's provider, with non-finite numbers turned into null plus a ``non_finite`` list."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        replaced: list[str] = []
        clean = finite_json(obj, "$", replaced)
        if replaced and isinstance(clean, dict) and NON_FINITE_KEY not in clean:
            clean[NON_FINITE_KEY] = replaced[:50]
        kwargs.setdefault("allow_nan", False)
        kwargs.setdefault("sort_keys", self.sort_keys)
        kwargs.setdefault("ensure_ascii", self.ensure_ascii)
        kwargs.setdefault("default", self.default)
        return json.dumps(clean, **kwargs)


__all__ = ["FiniteJSONProvider", "NON_FINITE_KEY", "finite_json"]
