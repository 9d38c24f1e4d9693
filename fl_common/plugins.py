"""Loading user code that a configuration names: ``package.module:Name`` or an installed entry point.

One loader for every plug-in point, so a custom model (``custom_model``), a custom aggregation
strategy (``custom_strategy``) and a custom selection policy (``custom_selection``) are found,
and refused, the same way:

* ``package.module:Name`` imports ``package.module`` (it must be importable: on ``PYTHONPATH`` or
  installed) and takes its attribute ``Name``;
* a bare name (``trimmed_fedavg``) is looked up in a Python entry-point group
  (:data:`STRATEGY_GROUP`, :data:`SELECTION_GROUP`), which an installed package declares in its
  ``pyproject.toml``::

      [project.entry-points."fl_hub.strategies"]
      trimmed_fedavg = "my_package.strategies:TrimmedFedAvg"

Why the constructor convention of :func:`config_kwargs`: a plug-in receives the configuration
keys it names as keyword parameters (``def __init__(self, *, trim_ratio: float)``), never the
whole configuration, so what it depends on is visible in its signature and a misspelled key is
refused at start-up instead of silently taking a default.

Everything here raises :class:`PluginError` with one line meant for the user; the configuration
schema turns it into a ``ConfigError`` naming the key. Nothing is imported from ``fl_server``:
the base class a plug-in must extend is passed in by the caller.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

__all__ = [
    "SELECTION_GROUP",
    "STRATEGY_GROUP",
    "PluginError",
    "check_reference",
    "config_kwargs",
    "instantiate",
    "load_class",
    "load_object",
    "registered",
    "resolve_reference",
]

#: entry-point group under which an installed package registers aggregation strategies
STRATEGY_GROUP = "fl_hub.strategies"
#: entry-point group under which an installed package registers client selection policies
SELECTION_GROUP = "fl_hub.selection"

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class PluginError(ValueError):
    """A plug-in that cannot be found, loaded or used; the message is one line for the user."""


#: the value of aggregation_method / selection that names a plug-in (custom_strategy / custom_selection)
CUSTOM = "custom"


def registered(group: str) -> dict[str, str]:
    """Entry-point names of ``group`` -> their ``module:attr`` value (reads metadata, imports nothing)."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def check_reference(value: str, *, kind: str, group: str | None = None) -> None:
    """Refuse a value that is neither ``package.module:Name`` nor (with ``group``) a registered name.

    Only the form and the registry are checked, nothing is imported: this runs when a
    configuration is loaded, also on machines that will never run the plug-in."""
    form = f"allowed 'package.module:{kind}' (a dotted module path, a colon, a name)"
    if ":" in value:
        module, _, attr = value.partition(":")
        if not (_DOTTED.match(module) and attr.isidentifier()):
            raise PluginError(form)
        return
    if group is None or not _NAME.match(value):
        raise PluginError(form + (f" or a name registered under the entry-point group '{group}'" if group else ""))
    names = registered(group)
    if value not in names:
        close = difflib.get_close_matches(value, names, n=1)
        known = ", ".join(sorted(names)) if names else "none"
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PluginError(f"no installed package registers this name under the entry-point group '{group}'{hint} "
                          f"(registered: {known}); or give 'package.module:{kind}'")


def resolve_reference(value: str, group: str | None = None, *, what: str = "plug-in") -> str:
    """The ``module:attr`` a configured value stands for (a registered name is looked up)."""
    if ":" in value or group is None:
        return value
    names = registered(group)
    if value not in names:
        raise PluginError(f"{what}: no installed package registers {value!r} under the entry-point group '{group}'")
    return names[value]


def load_object(spec: str, *, what: str, kind: str = "Name") -> Any:
    """Import ``package.module`` of ``package.module:attr`` and return ``attr``.

    ``what`` starts every message ("custom model", "config key 'custom_strategy' (...)"), ``kind``
    says what the attribute is ("factory", "Class")."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PluginError(f"{what} must be 'package.module:{kind}', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{what}: module '{module_name}' cannot be imported: {exc}") from None
    if not hasattr(module, attr):
        raise PluginError(f"{what}: module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def load_class(value: str, base: type, *, what: str, group: str | None = None) -> type:
    """The class a configured value names (``package.module:Class`` or a name registered in
    ``group``), checked to be a concrete subclass of ``base``."""
    spec = resolve_reference(value, group, what=what)
    cls = load_object(spec, what=what, kind="Class")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        found = cls.__name__ if isinstance(cls, type) else type(cls).__name__
        raise PluginError(f"{what}: {found} is not a subclass of {base.__module__}.{base.__qualname__}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(f"{what}: {cls.__name__} does not implement {missing}")
    return cls


def configured_class(key: str, value: str, builtins: Mapping[str, type], *, custom_key: str, custom_value: str | None,
                     base: type, group: str) -> type:
    """The class a configuration names: a built-in by name, or for ``custom`` the plug-in ``custom_key`` names
    (imported and checked against ``base``). One rule for every plug-in point (strategies, selection);
    PluginError (a ValueError) with a one-line message otherwise."""
    if value != CUSTOM:
        if value not in builtins:
            raise PluginError(f"config key '{key}' has value {value!r}: allowed {', '.join([*builtins, CUSTOM])}")
        return builtins[value]
    if not custom_value:
        raise PluginError(f"config key '{custom_key}' must name the plug-in when {key} is '{CUSTOM}'")
    return load_class(custom_value, base, what=f"config key '{custom_key}' ({custom_value!r})", group=group)


def config_kwargs(cls: type, cfg: Any, *, what: str, provided: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``cls(**kwargs)``: each constructor parameter named after a
    configuration key gets that key's value, each named in ``provided`` (values only the running
    driver knows, e.g. the model's size) gets that value.

    A parameter that is neither is refused, with a default or not: a misspelled key would
    otherwise be ignored in silence. ``*args`` / ``**kwargs`` receive nothing."""
    extra = dict(provided or {})
    keys = {f.name for f in dataclasses.fields(cfg)}
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{what}: the constructor of {cls.__name__} cannot be inspected: {exc}") from None
    out: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is p.POSITIONAL_ONLY:
            raise PluginError(f"{what}: {cls.__name__}'s constructor parameter '{p.name}' is positional-only; name "
                              f"configuration keys as keyword parameters")
        if p.name in extra:
            out[p.name] = extra[p.name]
        elif p.name in keys:
            out[p.name] = getattr(cfg, p.name)
        else:
            close = difflib.get_close_matches(p.name, sorted(keys | set(extra)), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            allowed = f"a configuration key{' or one of ' + ', '.join(sorted(extra)) if extra else ''}"
            raise PluginError(f"{what}: {cls.__name__}'s constructor parameter '{p.name}' is not {allowed}{hint}")
    return out


def instantiate(cls: type, cfg: Any, *, what: str, provided: Mapping[str, Any] | None = None) -> Any:
    """``cls(**config_kwargs(...))``, with a constructor that refuses its arguments reported in one line."""
    kwargs = config_kwargs(cls, cfg, what=what, provided=provided)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise PluginError(f"{what}: {cls.__name__}({args}) refused its configuration: {exc}") from None
