"""Building an :class:`FLConfig` from YAML files, Python dicts and ``--set key=value`` overrides.

Precedence, lowest first: the schema's defaults, the YAML file, then each ``--set`` in order.
Everything is validated once, after merging, so an override can fix a file's bad value.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from fl_common.config.recipes import apply_dp_recipe
from fl_common.config.schema import ConfigError, FLConfig, check_consistency, coerce_value, field_names

log = logging.getLogger("fl_common.config")


def config_from_dict(values: Mapping[str, Any], *, check: bool = True) -> FLConfig:
    """The seed's programmatic usage: ``config_from_dict({"num_clients": 10, ...})``."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, not {type(values).__name__}")
    clean = {str(k): coerce_value(str(k), v) for k, v in values.items()}
    cfg = FLConfig(**clean)
    if check:
        check_consistency(cfg)
    return cfg


def replace_config(cfg: FLConfig, **changes: Any) -> FLConfig:
    """A copy of ``cfg`` with ``changes`` applied, coerced and validated as a whole like any other config.

    Why not ``dataclasses.replace``: that would skip the type coercion and the cross-field checks,
    so a changed value could produce a configuration the loader would have refused.
    """
    merged = cfg.to_dict()
    merged.update(changes)
    return config_from_dict(merged)


class NumberLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading every number a person writes as a number.

    YAML 1.1 (PyYAML's dialect) reads ``1e-5`` as the *string* "1e-5": its float pattern needs a
    dot and a signed exponent. ``dp_delta: 1e-5`` was then refused as a bad value. This loader
    takes the YAML 1.2 float forms too: ``1e-5``, ``1E-5``, ``1.0e-5``, ``5e3``, ``.5``, ``-2.``."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
NumberLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list("-+0123456789."):
    NumberLoader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in NumberLoader.yaml_implicit_resolvers.get(_first, []) if tag != _FLOAT_TAG]
NumberLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_value(text: str) -> Any:
    """One YAML document read with :class:`NumberLoader`."""
    return yaml.load(text, Loader=NumberLoader)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        data = yaml_value(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{p}' is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of keys to values at the top level")
    return data


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``["num_rounds=5", "learning_rate=0.05"]`` -> typed dict; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        try:
            value = yaml_value(raw) if raw.strip() != "" else None
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] | Mapping[str, Any] = (),
                *, check: bool = True, defaults: Mapping[str, Any] | None = None) -> FLConfig:
    """Schema defaults <- ``defaults`` (a driver's embedded ones) <- YAML file <- overrides, validated as a whole.

    Under sample-level DP with no model chosen by the user (file or overrides), the DP recipe of
    :mod:`fl_common.config.recipes` fills the training keys the user left open, and the log says so."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    values.update(extra)
    merged = {**(defaults or {}), **values}
    merged, note = apply_dp_recipe(merged, given=set(values))
    cfg = config_from_dict(merged, check=check)
    if note is not None:  # only for a configuration that is used: a refused one says its error alone
        log.info("%s", note)
    return cfg


def dump_config(cfg: FLConfig, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config (every key), so a run folder says exactly what ran."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


__all__ = ["config_from_dict", "replace_config", "read_yaml", "parse_overrides", "load_config", "dump_config", "field_names"]
