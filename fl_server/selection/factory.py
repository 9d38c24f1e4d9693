"""Selection policies built from the configuration at the edge: a built-in one by ``selection``,
a plug-in by ``custom_selection`` (``package.module:Class`` or an entry point of ``fl_hub.selection``).

A policy's constructor takes ``seed`` and keyword parameters named after the config keys it reads
(``stratify_by``, ``local_epochs``, ...), plus ``model_bytes``, the model's size on the wire, which
only the running driver knows; :func:`build_selection` passes exactly those, built-in or plug-in.
"""

from __future__ import annotations

from fl_common.config import ConfigError, FLConfig
from fl_common.plugins import CUSTOM, SELECTION_GROUP, PluginError, configured_class, instantiate
from fl_server.selection.policies import (
    AdaptiveSelector,
    CapabilitySelector,
    Selector,
    StratifiedSelector,
    UniformSelector,
    WeightedSelector,
)

__all__ = ["CUSTOM", "SELECTORS", "build_selection", "selection_class"]

#: the ``selection`` value that names a plug-in through ``custom_selection``

#: The built-in policies by name; fl_common/config/schema.py's SELECTION_POLICIES lists exactly
#: these plus "custom" (a test checks it).
SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (UniformSelector, WeightedSelector, StratifiedSelector,
                                                                   CapabilitySelector, AdaptiveSelector)}


def _what(cfg: FLConfig) -> str:
    if cfg.selection == CUSTOM:
        return f"config key 'custom_selection' ({cfg.custom_selection!r})"
    return f"selection '{cfg.selection}'"


def selection_class(cfg: FLConfig) -> type[Selector]:
    """The configured policy's class; a plug-in is imported and checked here (ConfigError, one line)."""
    try:
        cls = configured_class("selection", cfg.selection, SELECTORS, custom_key="custom_selection",
                               custom_value=cfg.custom_selection, base=Selector, group=SELECTION_GROUP)
    except PluginError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(getattr(cls, "name", None), str):
        raise ConfigError(f"{_what(cfg)}: {cls.__name__} sets no class attribute 'name' (the policy's name in summary.json)")
    return cls


def build_selection(cfg: FLConfig, *, model_bytes: int) -> Selector:
    """The configured policy; ``model_bytes`` (the model's size on the wire) enters the capability
    policies' transfer time."""
    cls = selection_class(cfg)
    try:
        return instantiate(cls, cfg, what=_what(cfg), provided={"model_bytes": int(model_bytes)})
    except PluginError as exc:
        raise ConfigError(str(exc)) from None
