"""Configuration: the dataclass schema, strict YAML loading with overrides, and validation."""

from .loader import ConfigError, config_to_dict, config_to_yaml, load_config, shards_dir_of
from .schema import Config
from .validate import Layout, check, derive_layout, validate

__all__ = ["Config", "ConfigError", "Layout", "check", "config_to_dict", "config_to_yaml",
           "derive_layout", "load_config", "shards_dir_of", "validate"]
