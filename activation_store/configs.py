"""Typed configurations: one dataclass per component, built from defaults, a TOML/YAML file and
command-line flags, in that order. The dataclass is the single place where a setting, its default
and its help text are written: `add_arguments` derives the CLI flags from the fields, `from_dict`
builds (nested) configs from plain values and refuses unknown keys, and every config checks its
own values in `__post_init__`, raising ConfigError.

A field's metadata (set with `option`) holds its help text and, where the flag is not simply
`--field-name`, its flag; `parse` turns the flag's string into the field's value; nested configs
take a flag `prefix` and are flattened into the same parser."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path

from activation_store.errors import ConfigError


def option(default=dataclasses.MISSING, *, help: str, flag: str | None = None, parse=None, choices=None,
           positional: bool = False, cli: bool = True, prefix: str = "", default_factory=dataclasses.MISSING):
    """A dataclass field with what the CLI needs to offer it as a flag."""
    meta = {"help": help, "flag": flag, "parse": parse, "choices": choices, "positional": positional, "cli": cli,
            "prefix": prefix}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def comma_list(kind):
    """A parser for 'a,b,c' flags."""
    return lambda text: [kind(x) for x in str(text).split(",") if x.strip()]


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _nested_type(tp):
    """The dataclass a field holds (also inside `X | None`), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _scalar_type(tp):
    """int, float, str or bool for plain and optional fields; None for anything else."""
    if tp in (int, float, str, bool):
        return tp
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):  # list[int] is no int
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and args[0] in (int, float, str, bool):
        return args[0]
    return None


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# ---------------------------------------------------------------------------- building
def from_dict(cls, values, where: str = ""):
    """`cls` from a dict of (possibly nested) values; unknown keys and missing required fields are
    ConfigErrors that name them. An instance of `cls` is returned as it is."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table of settings, got {values!r}")
    if hasattr(cls, "upgrade_legacy"):  # an older layout of the same settings
        values = cls.upgrade_legacy(values)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown keys {unknown}; known: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        nested = _nested_type(hints[name])
        if nested is not None and value is not None:
            base = _default_of(fields[name])
            if isinstance(value, dict) and dataclasses.is_dataclass(base):  # a nested default keeps the rest
                value = deep_merge(as_dict(base), value)
            value = from_dict(nested, value, f"{where + '.' if where else ''}{name}")
        else:
            value = _coerce(fields[name], hints[name], value, f"{where + '.' if where else ''}{name}")
        kwargs[name] = value
    missing = [n for n, f in fields.items() if n not in kwargs and _default_of(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or cls.__name__} needs {', '.join(missing)} (as arguments or in --config)")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad {where or cls.__name__} configuration: {exc}") from exc


def _coerce(f: dataclasses.Field, tp, value, where: str):
    """A file's value as the field's type: strings through the field's parser (as its flag would
    be), ints where floats are wanted; anything else of the wrong type is a ConfigError."""
    if value is None:
        return None
    parse = f.metadata.get("parse")
    scalar = _scalar_type(tp)
    try:
        if isinstance(value, str) and parse is not None:
            return parse(value)
        if scalar is None:
            return value
        if isinstance(value, str) and scalar in (int, float):  # YAML reads 1e-3 as a string
            return scalar(value)
        if scalar is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, scalar) and not (scalar is int and isinstance(value, bool)):
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {value!r} ({exc})") from exc
    raise ConfigError(f"{where} must be {scalar.__name__}, got {value!r}")


def as_dict(cfg) -> dict:
    """A config as plain nested values (what `from_dict` takes back)."""
    return dataclasses.asdict(cfg)


# settings that may hold credentials; only their names are ever written or logged
SECRET_FIELDS = ("storage_options",)
_SECRET_WORDS = ("secret", "password", "token", "key", "credential", "auth")


def redacted(values):
    """A config's values (a dataclass or nested dicts) safe to save or log: `storage_options`
    keep only their key names, and any other value under a key that names a secret is replaced.
    The one redaction for store attributes, checkpoints, reports and wandb."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = as_dict(values)
    if isinstance(values, dict):
        out = {}
        for k, v in values.items():
            if k in SECRET_FIELDS and isinstance(v, dict):
                out[k] = sorted(v)
            elif isinstance(k, str) and any(w in k.lower() for w in _SECRET_WORDS) and isinstance(v, str):
                out[k] = "<redacted>"
            else:
                out[k] = redacted(v)
        return out
    if isinstance(values, (list, tuple)):
        return [redacted(v) for v in values]
    return values


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str, section: str) -> dict:
    """A TOML or YAML file's values: the top level, or the `[section]` table when there is one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if p.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {path}: use .toml, .yaml or .yml")
    try:
        text = p.read_text()
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # not UTF-8, TOML's and yaml's own error types
        raise ConfigError(f"config file {path} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return data[section] if isinstance(data.get(section), dict) else data


def load(cls, config_file: str | None = None, section: str = "", overrides: dict | None = None):
    """Defaults, then the config file's values, then the overrides (nested dicts, None = not given)."""
    values = read_config_file(config_file, section) if config_file else {}
    try:
        values = deep_merge(values, overrides or {})
        return from_dict(cls, values)
    except ConfigError as exc:
        raise ConfigError(f"config file {config_file}: {exc}" if config_file else str(exc)) from exc


# ---------------------------------------------------------------------------- the CLI
def _flag_fields(cls, prefix: str = "", path: tuple = (), exclude=frozenset(), defaults=None):
    """(dest path, flag, field, type, default) of every field offered on the command line, nested
    configs flattened; a nested field's default is that of the config's own default instance (the
    trainer's reader normalises by default, a bare ReaderConfig does not)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        dotted = ".".join((*path, f.name))
        if not f.metadata.get("cli", True) or dotted in exclude:
            continue
        default = getattr(defaults, f.name) if defaults is not None else _default_of(f)
        nested = _nested_type(hints[f.name])
        if nested is not None:
            yield from _flag_fields(nested, prefix + f.metadata.get("prefix", ""), (*path, f.name), exclude,
                                    default if dataclasses.is_dataclass(default) else None)
            continue
        flag = f.metadata.get("flag") or "--" + prefix + f.name.replace("_", "-")
        yield (*path, f.name), flag, f, hints[f.name], default


def _flag_parser(parse):
    """argparse shows the message of ArgumentTypeError only: keep the parser's own explanation."""
    def parse_flag(text: str):
        try:
            return parse(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse_flag


def cli_exclude(cls) -> frozenset:
    """Dotted fields a config keeps off the command line (its `CLI_EXCLUDE` class attribute)."""
    return frozenset(getattr(cls, "CLI_EXCLUDE", ()))


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """A flag (or positional argument) for each field of `cls`, with its help text and default."""
    for dest, flag, f, tp, default in _flag_fields(cls, exclude=cli_exclude(cls)):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{'.'.join(dest)} has no help text: declare it with option()")
        text = f.metadata["help"]
        if default is not dataclasses.MISSING and default is not None and not f.metadata.get("positional"):
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})"
        kwargs = {"help": text.replace("%", "%%"), "default": None, "dest": ".".join(dest)}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        scalar = _scalar_type(tp)
        if f.metadata.get("parse"):
            kwargs["type"] = _flag_parser(f.metadata["parse"])
        elif scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif scalar is not None:
            kwargs["type"] = scalar
        else:
            raise TypeError(f"{cls.__name__}.{'.'.join(dest)}: give option(parse=...) for type {tp}")
        if f.metadata.get("positional"):
            del kwargs["dest"]
            parser.add_argument(".".join(dest), nargs="?", **kwargs)
        else:
            if "action" not in kwargs and "choices" not in kwargs:
                kwargs["metavar"] = dest[-1].upper()
            parser.add_argument(flag, **kwargs)


def overrides_from_args(args: argparse.Namespace, cls) -> dict:
    """The flags that were given, as nested values for `load`."""
    out: dict = {}
    for dest, *_ in _flag_fields(cls, exclude=cli_exclude(cls)):
        value = getattr(args, ".".join(dest), None)
        if value is None:
            continue
        node = out
        for part in dest[:-1]:
            node = node.setdefault(part, {})
        node[dest[-1]] = value
    return out


def check_choice(name: str, value, choices) -> None:
    """The one way configs check an enumerated value."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
