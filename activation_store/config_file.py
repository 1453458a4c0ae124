"""Typed configurations from TOML or YAML files, overridden by command-line flags. Shared by the
harvest and the trainer (each component owns its dataclass; this only reads and checks files)."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from activation_store.errors import ConfigError


def read_config_file(path: str, section: str, config_type: type) -> dict:
    """The file's values for `config_type`: top level, or under a `[section]` table. Unknown keys
    are an error, so a typo never silently falls back to a default."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"config file {path}: use .toml, .yaml or .yml")
    if isinstance(data.get(section), dict):
        data = data[section]
    known = {f.name for f in fields(config_type)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return data


def overridden(file_values: dict, overrides: dict) -> dict:
    """File values with every flag that was given (not None) on top."""
    return {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
