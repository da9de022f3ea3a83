"""Typed run configuration: a dataclass filled from a TOML file, then from command-line flags.

Every field becomes a flag (`lora_rank` -> `--lora-rank`); its `help` metadata is the flag's help.
Unknown TOML keys and badly typed values are refused with the field named, before any model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path, PurePath

from drm.files import read_utf8_text


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field."""


def field(default, help: str, **kwargs):
    """A dataclass field with help text for --help and the docs."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(name: str, kind, value):
    """Coerce a TOML or CLI value to the field's type, or raise ConfigError naming the field."""
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        (item,) = typing.get_args(kind)[:1]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_convert(name, item, v) for v in value]
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return _convert(name, options[0], value)
    expected = getattr(kind, "__name__", kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        # TOML gives typed values: true is not a number, and a table or an array is not a path
        if isinstance(value, bool) or isinstance(value, dict | list) or (kind is str and not isinstance(value, str)):
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        converted = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}: expected {expected}, got {value!r}") from None
    if kind is float and not math.isfinite(converted):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if kind is int and abs(converted) >= 2 ** 63:
        raise ConfigError(f"{name}: {value!r} is too large (at most 2**63 - 1)")
    return converted


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """--config FILE plus one flag per field; unset flags stay None so the TOML value wins."""
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file with any of the fields below")
    kinds = _field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if "(default:" not in help_text:  # a help that explains its empty default says it already
            help_text += f" (default: {default!r})"
        if kinds[f.name] is bool:  # `--resume` alone means true; `--resume false` is accepted too
            parser.add_argument(flag, dest=f.name, default=None, nargs="?", const="true", metavar="BOOL",
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def load_config(cls, args: argparse.Namespace):
    """The dataclass from args.config (TOML) overridden by the flags given on the command line."""
    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config: file {path} does not exist")
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the nodes and flags work, TOML files need 3.11
            raise ConfigError("config: reading a TOML file needs Python 3.11 or newer; pass the settings as "
                              "flags instead") from None
        try:
            values = tomllib.loads(read_utf8_text(path, "config: file", ConfigError))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path} is not valid TOML ({e})") from None
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"config: unknown field(s) {unknown}; known fields: {sorted(types_)}")
    for name in types_:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    config = cls(**{name: _convert(name, types_[name], v) for name, v in values.items()})
    config.validate()
    return config


def check_ranges(config, rules: dict[str, tuple]) -> None:
    """Raise ConfigError for the first field outside its range. rules: {field: (test, what it must be)}."""
    for name, (ok, expected) in rules.items():
        if not ok(getattr(config, name)):
            raise ConfigError(f"{name}: expected {expected}, got {getattr(config, name)!r}")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def shareable_dict(config) -> dict:
    """to_dict for metadata of files that get shared (DRMs, LoRAs): every path keeps only its file name,
    so a published file does not reveal the trainer's local folders."""
    def name_only(value):
        if isinstance(value, str) and ("/" in value or "\\" in value):
            return PurePath(value.replace("\\", "/")).name
        return [name_only(v) for v in value] if isinstance(value, list) else value

    return {k: name_only(v) for k, v in to_dict(config).items()}
