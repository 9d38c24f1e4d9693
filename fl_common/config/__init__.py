"""Typed, validated configuration shared by the simulation and the REST deployment."""

from fl_common.config.schema import FLConfig, ConfigError
from fl_common.config.loading import load_config, parse_overrides, config_from_dict, dump_config, replace_config

__all__ = ["FLConfig", "ConfigError", "load_config", "parse_overrides", "config_from_dict", "dump_config",
           "replace_config"]
