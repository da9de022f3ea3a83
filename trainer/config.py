"""Typed run configuration: a pydantic model filled from a TOML file, then from command-line flags.

Every field becomes a flag (`lora_rank` -> `--lora-rank`); its description is the flag's help. pydantic
types and range-checks each value; its errors become ConfigError messages that start with the field's
name, before any model loads.
"""

from __future__ import annotations

import argparse
import copy
import typing
from pathlib import Path, PurePath
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticKnownError

from drm.files import read_utf8_text


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field."""


def field(default, help: str, expected: str | None = None, **constraints):
    """A model field: its default, its --help text and pydantic constraints (gt, ge, lt, le).

    expected: how a refused value's message words the rule ("grad_clip: expected >= 0 (0: off), got -1.0"),
    where the constraint alone (">= 0") or the list of choices ("adapter, full or head") says too little.
    """
    return Field(default, description=help, json_schema_extra={"expected": expected} if expected else None,
                 **constraints)


class Settings(BaseModel):
    """A trainer's settings. Making one types and range-checks each field on its own (ConfigError names the
    first bad one) and reads no file; validate() checks the whole run before any model loads."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # unknown TOML keys; nan and inf

    # every trainer's; its flag comes last in --help (add_arguments), after the trainer's own `resume`
    resume_with_new_lr: bool = field(False, "with --resume: continue with the lr given now instead of the run's "
                                            "(e.g. a lower one after the run diverged); without it, --resume "
                                            "refuses an lr other than the run's")

    def __init__(self, /, **values) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(_message(type(self), e)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, value, info: ValidationInfo):
        """TOML values are typed: true is not a number. A list may be given as "a,b" (flags are strings)."""
        kind = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and kind in (int, float):
            raise PydanticKnownError(f"{kind.__name__}_type")
        if isinstance(value, str) and typing.get_origin(kind) is list:
            return [v for v in value.split(",") if v]
        return value

    @field_validator("*")
    @classmethod
    def _fits_64_bits(cls, value, info: ValidationInfo):
        """Seeds and counts go to torch as int64."""
        if type(value) is int and abs(value) >= 2 ** 63:
            raise ConfigError(f"{info.field_name}: {value!r} is too large (at most 2**63 - 1)")
        return value

    def validate(self) -> None:
        """Check every field again, for values assigned since the config was made; ConfigError names the field.
        The trainers' configs extend this with their rules between fields and their files."""
        type(self)(**self.model_dump())


def _resolution(value: int) -> int:
    from .reward.images import check_resolution  # (it imports torch, which --help does not need)

    check_resolution(value)
    return value


Resolution = Annotated[int, AfterValidator(_resolution)]
"""Image size in pixels: a positive multiple of 16 (reward.images.check_resolution says why)."""

_LIMITS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
# pydantic's error type (its first word) -> what the value should have been; a choice that is no string is no str
_TYPES = {"int": "int", "float": "float", "bool": "bool", "string": "str", "literal": "str", "list": "a list"}


def _message(cls: type[Settings], error: ValidationError) -> str:
    """The first of pydantic's errors as this trainer words it: "<field>: expected <rule>, got <value>"."""
    problems = error.errors()
    unknown = sorted(p["loc"][0] for p in problems if p["type"] == "extra_forbidden")
    if unknown:
        return f"config: unknown field(s) {unknown}; known fields: {sorted(cls.model_fields)}"
    problem = problems[0]
    if problem["type"] == "value_error":  # a validator's own message (ConfigError, check_resolution), naming the field
        return str(problem["ctx"]["error"])
    name, kind, value = problem["loc"][0], problem["type"], problem["input"]
    info = cls.model_fields[name]
    expected = (info.json_schema_extra or {}).get("expected")
    if kind in _LIMITS:
        key, sign = _LIMITS[kind]
        rule = expected or f"{sign} {problem['ctx'][key]:g}"
        typed = TypeAdapter(info.annotation).validate_python(value)  # -1 from TOML is -1.0 for a float field
        return f"{name}: expected {rule}, got {typed!r}"
    if kind == "literal_error" and isinstance(value, str):
        *others, last = typing.get_args(info.annotation)
        rule = expected or ", ".join(others) + " or " + last
        return f"{name}: expected {rule}, got {value!r}"
    if kind == "finite_number":
        return f"{name}: expected a finite number, got {value!r}"
    wanted = _TYPES.get(kind.split("_")[0])
    return f"{name}: expected {wanted}, got {value!r}" if wanted else f"{name}: {problem['msg']}, got {value!r}"


def check_files(config: Settings, required: dict[str, str], optional: tuple[str, ...] = ()) -> None:
    """Each named path field (a path, or a list of paths) must name an existing file; `required` ones must be set.

    required: {field: what it is, for the "required" message, or ""}. Raises ConfigError for the first
    field, in the order given, that is empty (and required), a folder or missing.
    """
    for name, what in required.items():
        if not getattr(config, name):
            raise ConfigError(f"{name}: required" + (f" ({what})" if what else ""))
    for name in (*required, *optional):
        value = getattr(config, name)
        for path in value if isinstance(value, list) else [value]:
            if path and not Path(path).is_file():
                raise ConfigError(f"{name}: {path} is a folder; expected a file" if Path(path).is_dir()
                                  else f"{name}: file {path} does not exist")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """--config FILE plus one flag per field; unset flags stay None so the TOML value wins."""
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file with any of the fields below")
    fields = sorted(cls.model_fields.items(), key=lambda item: item[0] in Settings.model_fields)  # shared ones last
    for name, info in fields:
        flag = "--" + name.replace("_", "-")
        help_text = info.description
        if "(default:" not in help_text:  # a help that explains its empty default says it already
            help_text += f" (default: {info.get_default(call_default_factory=True)!r})"
        if info.annotation is bool:  # `--resume` alone means true; `--resume false` is accepted too
            parser.add_argument(flag, dest=name, default=None, nargs="?", const="true", metavar="BOOL",
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def load_config(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """The config from args.config (TOML) overridden by the flags given on the command line, validated."""
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
    values.update({name: getattr(args, name) for name in cls.model_fields if getattr(args, name, None) is not None})
    config = cls(**values)
    config.validate()
    return config


def to_dict(config) -> dict:
    """The settings as plain data, {field: value} in field order (lists copied). config: a Settings model,
    or any dataclass (the tests stand in for a config with one)."""
    return copy.deepcopy(vars(config))


def shareable_dict(config) -> dict:
    """to_dict for metadata of files that get shared (DRMs, LoRAs): every path keeps only its file name,
    so a published file does not reveal the trainer's local folders."""
    def name_only(value):
        if isinstance(value, str) and ("/" in value or "\\" in value):
            return PurePath(value.replace("\\", "/")).name
        return [name_only(v) for v in value] if isinstance(value, list) else value

    return {k: name_only(v) for k, v in to_dict(config).items()}
