"""Reading YAML: LibContinual-style ``includes:`` with deep merge, and ``key.path=value`` overrides."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError

PROJECT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2e-4`` as a string; LibContinual files write weight decays that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _unshared(node: object) -> object:
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def parse_yaml(text: str) -> object:
    # Anchors and merge keys (``<<: *recipe``) make arms share one object: give each its own copy, so that
    # an override of one arm's value never reaches another's.
    return _unshared(yaml.load(text, Loader=_Loader))


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML file that must hold a mapping (an empty file is an empty mapping)."""
    if not path.is_file():
        raise ConfigError("file not found", source=str(path))
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"invalid YAML{where}: {problem}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping, not {type(data).__name__}", source=str(path))
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge ``top`` over ``base``: mappings merge key by key, anything else in ``top`` replaces.

    A ``{name, kwargs}`` block whose ``name`` changes is replaced whole: the kwargs of another optimizer or
    scheduler (say MultiStepLR's milestones under a StepLR) would not fit it."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        renamed = both and "name" in value and "name" in merged[key] and value["name"] != merged[key]["name"]
        if both and not renamed:
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _resolve_include(name: str, including: Path) -> Path:
    """An include is looked up next to the including file first, then under the project's ``configs/``."""
    for candidate in (including.parent / name, PROJECT_CONFIGS / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"included file {name!r} not found next to it or under {PROJECT_CONFIGS}",
        key="includes",
        source=str(including),
    )


def load_with_includes(path: Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load ``path`` after its ``includes:`` (in order, each deep-merged; the including file wins)."""
    path = path.resolve()
    if path in _stack:
        cycle = " -> ".join(p.name for p in (*_stack, path))
        raise ConfigError(f"include cycle: {cycle}", key="includes", source=str(path))
    data = read_yaml(path)
    includes = data.pop("includes", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError("must be a list of file names", key="includes", source=str(path))
    merged: dict[str, Any] = {}
    for name in includes:
        merged = deep_merge(merged, load_with_includes(_resolve_include(name, path), (*_stack, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form key.path=value", source="command line")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: value is not valid YAML", source="command line") from None
    return key.split("."), value


def _arms_matching(arms: list[Any], selector: str, text: str) -> list[dict[str, Any]]:
    """Arms are addressed by name (``arms.gem.epoch``), by position, or all at once (``arms.*.epoch``)."""
    if selector == "*":
        return [a for a in arms if isinstance(a, dict)]
    named = [a for a in arms if isinstance(a, dict) and a.get("name") == selector]
    if named:
        return named
    if selector.isdigit() and int(selector) < len(arms):
        return [arms[int(selector)]]
    names = ", ".join(str(a.get("name")) for a in arms if isinstance(a, dict))
    raise ConfigError(f"override {text!r}: no arm named {selector!r} (arms: {names})", source="command line")


def _set_path(node: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if part == "arms" and isinstance(child, list):
            if len(path) <= i + 2:
                raise ConfigError(f"override {text!r}: name a key inside the arm", source="command line")
            for arm in _arms_matching(child, path[i + 1], text):
                _set_path(arm, path[i + 2 :], value, text)
            return
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {part!r} is not a mapping", source="command line")
        node = child
    node[path[-1]] = value


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply command-line overrides in order on a copy of ``config``."""
    result = copy.deepcopy(config)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(result, path, value, text)
    return result
