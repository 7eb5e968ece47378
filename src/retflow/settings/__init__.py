"""The settings spine: a config file becomes a validated dict once (:mod:`.load`), and each stage
gets typed, frozen settings built from it (:mod:`.stages`). The schema is the only place a
default is written."""

from retflow.settings.load import ConfigError, load_config, read_yaml, section_defaults, validate

__all__ = ["ConfigError", "load_config", "read_yaml", "section_defaults", "validate"]
