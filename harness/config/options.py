"""Typed option blocks: one dataclass per block, validated with key names, ranges and did-you-mean."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from harness.errors import ConfigError

T = TypeVar("T")


def opt(default: Any, *, lo: float | None = None, hi: float | None = None, choices: Iterable[Any] | None = None,
        below: float | None = None) -> Any:
    """A dataclass field with its allowed range (``lo <= x <= hi``, ``x < below``) or choices."""
    meta = {"lo": lo, "hi": hi, "below": below, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def reject_unknown(raw: dict[str, Any], known: Iterable[str], *, key: str, source: str | None) -> None:
    known = list(known)
    for name in raw:
        if name not in known:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(f"unknown key {str(name)!r}{did_you_mean(str(name), known)}; allowed: {', '.join(known)}",
                              key=where, source=source)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return _type_name(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, *, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key=key, source=source)
            except ConfigError:
                continue
        allowed = " or ".join(_describe(o) for o in options if o is not type(None))
        raise ConfigError(f"must be {allowed}, not {value!r}", key=key, source=source)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        allowed = ", ".join(repr(a) for a in typing.get_args(tp))
        raise ConfigError(f"must be one of {allowed}, not {value!r}", key=key, source=source)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"must be a list, not {type(value).__name__}", key=key, source=source)
        return [_coerce(v, item, key=f"{key}[{i}]", source=source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"must be {_type_name(tp)}, not {type(value).__name__} {value!r}", key=key, source=source)


def _check_range(value: Any, meta: typing.Mapping[str, Any], *, key: str, source: str | None) -> None:
    if value is None or isinstance(value, (list, dict)):
        return
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"must be one of {allowed}, not {value!r}{did_you_mean(str(value), map(str, meta['choices']))}",
                          key=key, source=source)
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(f"must be >= {meta['lo']}, not {value!r}", key=key, source=source)
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(f"must be <= {meta['hi']}, not {value!r}", key=key, source=source)
    if meta.get("below") is not None and value >= meta["below"]:
        raise ConfigError(f"must be < {meta['below']}, not {value!r}", key=key, source=source)


def build_options(cls: type[T], raw: dict[str, Any] | None, *, key: str, source: str | None) -> T:
    """Instantiate the option dataclass ``cls`` from a YAML mapping, or raise a ConfigError naming the key."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"must be a mapping, not {type(raw).__name__}", key=key, source=source)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    reject_unknown(raw, fields, key=key, source=source)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else name
        values[name] = _coerce(value, hints[name], key=sub, source=source)
        _check_range(values[name], fields[name].metadata, key=sub, source=source)
    return cls(**values)


def check_call_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], *, key: str, source: str | None,
                      skip: Iterable[str] = (), extra: Iterable[str] = ()) -> None:
    """Reject keyword arguments that ``fn`` does not accept (for torch optimizers and backbone builders);
    ``skip`` are parameters the harness fills itself, ``extra`` further accepted names."""
    params = inspect.signature(fn).parameters
    known = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
             and n not in ("self", "params", *skip)]
    reject_unknown(kwargs, [*known, *extra], key=key, source=source)


def parse_seeds(value: Any, key: str, source: str | None) -> list[int] | None:
    """A non-empty list of distinct integers, or None."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ConfigError(f"must be a non-empty list of integer seeds, not {value!r}", key=key, source=source)
    for i, seed in enumerate(value):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"must be an integer, not {seed!r}", key=f"{key}[{i}]", source=source)
    repeated = sorted({s for s in value if value.count(s) > 1})
    if repeated:
        raise ConfigError(f"lists seed {repeated[0]} more than once", key=key, source=source)
    return list(value)
