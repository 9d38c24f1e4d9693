"""The one place that imports TenSEAL (the optional ``[he]`` extra), so a missing install is refused
with the install command instead of an ImportError deep in a round.

Why TenSEAL and not OpenFHE's multiparty CKKS (the design the issue prefers): every openfhe wheel on
PyPI (1.2.3 ... 1.6.1) ships a single CPython extension built for 3.10 (1.2.3.0.24.4: 3.12) under a
``py3-none-any`` tag, so ``import openfhe`` fails on Python 3.11, the interpreter of this project's
CI and docker image. TenSEAL 0.3.18 has a cp311 wheel. The measurement behind the choice and the
trust model it leads to are in benchmarks/results/he/README.md.
"""

from __future__ import annotations

import types

from fl_common.config import ConfigError

#: what to run when the backend is missing
INSTALL_COMMAND = "pip install '.[he]'  (or: pip install 'tenseal>=0.3.15,<0.4')"


class HEUnavailable(ConfigError):
    """CKKS was configured but TenSEAL cannot be imported."""


def tenseal() -> types.ModuleType:
    """The tenseal module, or HEUnavailable naming the install command."""
    try:
        import tenseal as ts
    except ImportError as exc:
        raise HEUnavailable(f"secure_aggregation_method 'ckks' needs the optional HE backend TenSEAL, which is not installed "
                            f"({exc}): {INSTALL_COMMAND}; or set secure_aggregation_method: masking") from None
    module: types.ModuleType = ts
    return module


def available() -> bool:
    """Whether the backend imports (tests skip on False)."""
    try:
        tenseal()
    except HEUnavailable:
        return False
    return True


__all__ = ["INSTALL_COMMAND", "HEUnavailable", "available", "tenseal"]
