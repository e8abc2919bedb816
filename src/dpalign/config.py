"""Configuration helpers: frozen pydantic models, YAML files and dotted ``key=value`` overrides.

All validation happens here, up front, before any work starts.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


class Section(BaseModel):  # a config section: frozen, unknown keys refused
    model_config = ConfigDict(frozen=True, extra="forbid")


def one_of(kind: str, name: str, known: Iterable[str]) -> str:
    """``name`` if it is among ``known``, else a ValueError listing them."""
    known = list(known)
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")
    return name


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": 2}`` -> ``{"a": {"b": 1}, "c": 2}`` (values kept as they are)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _set_dotted(tree, key, value)
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_dicts else value
    return merged


def _validate(model: type[M], data: dict[str, Any], source: str,
              overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> M:
    """``model`` from ``data``; a ConfigError names, for each problem, the override that
    caused it (``override steps=200: ...``) or else ``source``, and suggests a valid key for
    an unknown one. ``base``: the data without the overrides (problems it has as well are
    the source's)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(model, exc, source, overrides, base)) from exc


def _problem_errors(model: type[BaseModel], data: dict[str, Any]) -> set[tuple[Any, ...]]:
    """``(loc, type)`` of each problem of ``data`` as ``model`` (none known when a check
    fails otherwise)."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return {(tuple(str(p) for p in e["loc"]), e["type"]) for e in exc.errors()}
    except (ValueError, TypeError, KeyError):
        pass
    return set()


def _explain(model: type[BaseModel], exc: ValidationError, source: str,
             overrides: Sequence[str], base: dict[str, Any] | None) -> str:
    """The message of a failed validation: problems grouped by what caused them."""
    typed = [(item, tuple(item.partition("=")[0].strip().split("."))) for item in overrides]

    def alone(item: str) -> set[tuple[Any, ...]]:  # the problems of base + this override
        return _problem_errors(model, deep_merge(base or {}, parse_overrides([item])))

    in_base = set() if base is None or not typed else _problem_errors(model, base)
    groups: dict[str, list[str]] = {}
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        blamed = _blame(loc, error["type"], typed, in_base, alone)
        shown = deepest = loc
        if len(blamed) == 1:
            key = next(key for item, key in typed if item == blamed[0])
            shown = () if loc == key else loc  # the override already names the key
            deepest = max(loc, key, key=len)  # key: an unknown section's key, as typed
        where = (f"override{'s' if len(blamed) > 1 else ''} {', '.join(blamed)}" if blamed
                 else source)
        text = error["msg"]
        if error["type"] == "extra_forbidden":
            near = suggest_keys(model, ".".join(deepest))
            text = "unknown key" + (f"; did you mean {_or(near)}?" if near else "")
        groups.setdefault(where, []).append(f"{'.'.join(shown)}: {text}" if shown else text)
    return "; ".join(f"{where}: {'; '.join(problems)}" for where, problems in groups.items())


def _or(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} or {keys[-1]}"


def _blame(loc: tuple[str, ...], kind: str, typed: Sequence[tuple[str, tuple[str, ...]]],
           in_base: set[tuple[Any, ...]], alone: Callable[[str], set[tuple[Any, ...]]]
           ) -> list[str]:
    """The overrides (as typed) that caused the problem at ``loc``: those that set ``loc`` or
    a section above it; else, when the data without overrides is free of it, the overrides
    inside ``loc`` (a section's own check; all of them for a check of the whole config) that
    cause it on their own, or all those if none does alone. Empty: the source's problem."""
    setting = [item for item, key in typed if loc[:len(key)] == key]
    if setting:
        return setting
    if (loc, kind) in in_base or not typed:
        return []
    inside = [item for item, key in typed if key[:len(loc)] == loc]
    return [item for item in inside if (loc, kind) in alone(item)] or inside


def apply_overrides(cfg: M, overrides: Sequence[str]) -> M:
    """A copy of ``cfg`` with dotted overrides applied and validated."""
    if not overrides:
        return cfg
    base = cfg.model_dump(mode="python")
    data = deep_merge(base, parse_overrides(overrides))
    return _validate(type(cfg), data, "overrides", overrides, base)


def load_yaml_config(model: type[M], path: str | Path, overrides: Sequence[str] = ()) -> M:
    """Read a YAML file into ``model``, then apply overrides; errors name the file or the
    override that caused them."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return _validate(model, deep_merge(data, parse_overrides(overrides)), str(path),
                     overrides, data)


# The settings a config model takes, as dotted keys (``dpalign settings``, suggestions).

@dataclass(frozen=True)
class Setting:
    """One leaf key of a config model: its dotted ``key``, ``type`` (as text), ``default``
    (the value the model gives it; meaningless when ``required``) and ``help`` (the field's
    description, or "")."""

    key: str
    type: str
    default: Any
    required: bool
    help: str


def _section_models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's annotation holds directly or in a Union/Optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [arg for arg in typing.get_args(annotation)
                if isinstance(arg, type) and issubclass(arg, BaseModel)]
    return []


def type_text(annotation: Any) -> str:
    """``int | None``, ``'auto' | 'float32'``, ``list[str]``: a field's type as text."""
    if annotation is type(None) or annotation is None:
        return "None"
    if annotation is Any:
        return "Any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_text(arg) for arg in args)}]" if args else name
    return getattr(annotation, "__name__", str(annotation))


def _walk(model: type[BaseModel], prefix: str, default: BaseModel | None,
          sections: list[str]) -> Iterator[Setting]:
    for name, field in model.model_fields.items():
        key = prefix + name
        if default is not None:
            value, required = getattr(default, name), False
        else:
            required = field.is_required()
            value = None if required else field.get_default(call_default_factory=True)
        inner = _section_models(field.annotation)
        if not inner:
            yield Setting(key, type_text(field.annotation), value, required,
                          field.description or "")
            continue
        sections.append(key)
        for sub in inner:
            yield from _walk(sub, key + ".", value if isinstance(value, sub) else None,
                             sections)


def settings_of(model: type[BaseModel]) -> list[Setting]:
    """Every leaf key of ``model`` in declaration order, walking nested models (also those
    in an Optional or a Union). A key inside a section's model takes its default from the
    section's default (``TrainConfig``'s ``train.steps`` is 50); inside a section that
    defaults to None, from its model's own defaults (what setting the key gives)."""
    seen: dict[str, Setting] = {}
    for setting in _walk(model, "", None, []):
        seen.setdefault(setting.key, setting)
    return list(seen.values())


def valid_keys(model: type[BaseModel]) -> list[str]:
    """Every dotted key ``model`` takes: sections and leaves."""
    sections: list[str] = []
    leaves = [s.key for s in _walk(model, "", None, sections)]
    return list(dict.fromkeys([*sections, *leaves]))


def _closest(word: str, candidates: Sequence[str], cutoff: float, n: int) -> list[str]:
    """The candidates spelled most like ``word`` (difflib ratio >= cutoff and within 0.1 of
    the best), best first, at most ``n``."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), -i, c)
                     for i, c in enumerate(candidates)), reverse=True)
    best = scored[0][0] if scored else 0.0
    return [c for score, _, c in scored if score >= max(cutoff, best - 0.1)][:n]


def suggest_keys(model: type[BaseModel], key: str, n: int = 3) -> list[str]:
    """Valid keys of ``model`` that an unknown dotted ``key`` may have meant, the first of:
    keys of other sections ending in its last part (``steps`` -> ``train.steps``); keys of
    its own section spelled like its last part (``train.stepz`` -> ``train.steps``); keys
    anywhere whose last part is spelled much like it (``stpes`` -> ``train.steps``); keys
    spelled like the whole ``key``. At most ``n``."""
    keys = valid_keys(model)
    parent, _, leaf = key.rpartition(".")
    split = [(k.rpartition(".")[0], k.rpartition(".")[2], k) for k in keys]
    same_leaf = [k for _, name, k in split if name == leaf and k != key]
    if same_leaf:
        return same_leaf[:n]
    siblings = {name: k for up, name, k in split if up == parent}
    near = _closest(leaf, list(siblings), 0.6, n)
    if near:
        return [siblings[name] for name in near]
    names = list(dict.fromkeys(name for _, name, _ in split))
    near = _closest(leaf, names, 0.75, n)
    if near:
        return [k for name in near for _, other, k in split if other == name][:n]
    others = [k for k in keys if not key.startswith(k + ".")]  # not the key's own sections
    return _closest(key, others, 0.6, n)
