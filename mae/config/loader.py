"""Config machinery shared by every entry point: YAML recipes + dotted overrides -> a typed,
frozen dataclass. Unknown keys and wrong types raise ``ConfigError`` naming the key and what is
allowed. Override values are parsed as YAML 1.2 scalars (``train.max_steps=30`` is an int,
``data.crop_scale=[0.3,1.0]`` a list, ``no`` stays a string); text fields keep the raw text.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mae.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased so that the message alone says how to fix it."""


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (``no`` stays the string "no") and ``1e-4``
    is a float (YAML 1.1 needs a dot)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        # a SafeLoader subclass: no object construction
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{where} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax"
        ) from e


def read_yaml(path: str | Path) -> Any:
    return parse_yaml(Path(path).read_text(), f"config file {str(path)!r}")


def _field_type(schema: type, key: str) -> Any:
    """The schema type at a dotted key, or None when the key does not exist."""
    kind: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(kind) or part not in {
            f.name for f in dataclasses.fields(kind)
        }:
            return None
        kind = typing.get_type_hints(kind)[part]
    return kind


def _is_text(kind: Any) -> bool:
    """str, str | None, or a Literal of strings: an override's raw text is the value."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if kind is str or (
        typing.get_origin(kind) in (typing.Union, types.UnionType) and args == [str]
    ):
        return True
    return typing.get_origin(kind) is Literal and all(isinstance(a, str) for a in args)


def load_raw(path: str | Path | None, overrides: list[str] | tuple[str, ...], schema: type) -> Any:
    """Build ``schema`` from the recipe at ``path`` (if any) with ``overrides`` applied on top."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; pass an existing YAML file to --config"
            )
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of keys, not {type(raw).__name__}"
            )
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form dotted.key=value (e.g. train.max_steps=30)"
            )
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        if value in ("", "null", "~"):
            node[leaf] = None
        # output_dir=2024 stays text
        elif _is_text(_field_type(schema, key)) and not value.startswith(("'", '"')):
            node[leaf] = value
        else:
            node[leaf] = parse_yaml(value, f"the value of {key!r}")
    return build(schema, raw)


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested mapping, checking keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            guess = f"did you mean {prefix + close[0]!r}? " if close else ""
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}; {guess}valid keys here: {sorted(names)}"
            )
    kwargs = {}
    for key, value in raw.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build(kind, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, prefix + key)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{key}={value!r} has the wrong type; expected {_name(kind)}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is invalid; choose one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{key}={value!r} has the wrong type; expected a list ({_name(kind)})"
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must have {len(args)} values ({_name(kind)})")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind)
    if ok is None:
        raise TypeError(f"unsupported config type {kind} for {key}")
    if not ok:
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_name(kind)}")
    if kind is str and value.startswith("~"):  # a path in the user's home, as a shell reads it
        return os.path.expanduser(value)
    if kind is float:
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is invalid; it must be a finite number")
        return float(value)
    return value


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return plain(dataclasses.asdict(cfg))
