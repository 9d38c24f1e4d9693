"""Typed, validated configuration shared by the simulation and the REST deployment."""

from fl_common.config.loading import config_from_dict, dump_config, load_config, parse_overrides, replace_config
from fl_common.config.schema import ConfigError, FLConfig

__all__ = ["FLConfig", "ConfigError", "load_config", "parse_overrides", "config_from_dict", "dump_config",
           "replace_config"]
