"""Turn a plain mapping (a resolved Hydra config) into typed dataclasses, naming the key of any bad value.

OmegaConf's structured configs do not run ``__post_init__``, and their errors are multi-line. This small
builder checks types against the dataclass annotations, rejects unknown keys, recurses into nested
dataclasses, and lets each dataclass's ``__post_init__`` check ranges; every error comes out as one
:class:`ConfigError` carrying the full dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from lora_sweep.errors import ConfigError

T = TypeVar("T")

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def build(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; ``key`` is where ``data`` sits in the whole config."""
    if not isinstance(data, Mapping):
        raise ConfigError(key or "<config>", data, f"expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(_join(key, unknown[0]), data[unknown[0]], f"unknown key (known keys: {known})")
    kwargs = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(_join(key, name), None, "missing required value")
            continue
        kwargs[name] = coerce(hints[name], data[name], _join(key, name))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(key) from None


def coerce(annotation: Any, value: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting where that is lossless (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(key, value, "a value is required here (got null)")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1 and errors[0].key != key:  # Optional[<dataclass>]: the error inside it says more
            raise errors[0]
        raise ConfigError(
            key, value, "expected " + " or ".join(_describe(o) for o in options if o is not type(None))
        )
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(key, value, f"must be one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"expected {_describe(annotation)}")
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        return [coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "expected a mapping")
        args = typing.get_args(annotation)
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else build(annotation, value, key)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(key, value, "expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, value, "expected an integer")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "expected a number")
        return float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "expected a string")
    raise TypeError(f"schema: unsupported annotation {annotation!r} for {key}")


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists, for records and MLflow params."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept whole (one param each)."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        dotted = _join(prefix, str(name))
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(annotation: Any) -> str:
    if annotation in _TYPE_WORDS:
        return _TYPE_WORDS[annotation]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        inner = (
            _TYPE_WORDS.get(args[0], "values").removeprefix("a ").removeprefix("an ") if args else "values"
        )
        return f"a list of {inner}s"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))
