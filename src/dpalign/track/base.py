"""What every sink shares: the run it mirrors (:class:`RunInfo`), the scalars of a log row,
the flattened config, and the error naming the ``track`` extra when a package is missing.

A *point* is one scalar at one step: ``(step, {tag: value})`` groups those of one row.
Metrics rows give their numeric fields under their own names (``loss``, ``epsilon``);
evaluation rows under ``eval/`` (``eval/heldout_reward_accuracy``). ``step`` itself, text,
booleans and ``None`` (epsilon on steps that are not accounted) are no scalars.
"""

from __future__ import annotations

import importlib.util
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

EVAL_PREFIX = "eval/"
EXTRA = "pip install 'dpalign[track]'"

Scalars = dict[str, float]
Points = list[tuple[int, Scalars]]
"""``(step, {tag: value})`` per log row, in step order."""


class TrackerNotInstalledError(RuntimeError):
    """A sink named in ``log.to`` needs a package that is not installed."""


def require(sink: str, module: str, package: str) -> None:
    """Raise :class:`TrackerNotInstalledError` (naming the extra) unless ``module`` imports."""
    if importlib.util.find_spec(module) is None:
        raise TrackerNotInstalledError(f"log.to names {sink!r}, which needs the {package} package; "
                                  f"install it with: {EXTRA}")


def scalars(row: Mapping[str, Any], prefix: str = "") -> Scalars:
    """The numeric fields of a log row but ``step``, as floats, keys with ``prefix``."""
    return {f"{prefix}{k}": float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def points(metrics: Iterable[Mapping[str, Any]], evals: Iterable[Mapping[str, Any]]
           ) -> Points:
    """The points of a run's ``metrics.jsonl`` and ``eval.jsonl`` rows, in step order (an
    evaluation after the step it follows); rows without scalars give none."""
    rows = [(r["step"], 0, scalars(r)) for r in metrics]
    rows += [(r["step"], 1, scalars(r, EVAL_PREFIX)) for r in evals]
    return [(step, values) for step, _, values in sorted(rows, key=lambda x: x[:2]) if values]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``{dotted key: text}``: strings as they are, every other leaf (a
    number, a boolean, None, a list, an empty mapping) as JSON (``0.001``, ``true``,
    ``null``, ``[1, 2]``, ``{}``)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def same_value(a: float, b: float) -> bool:
    """Equal, or both NaN."""
    return a == b or (math.isnan(a) and math.isnan(b))


def first_difference(held: Mapping[str, Mapping[int, list[float]]], wanted: Points,
                     stored: Any = float) -> int | None:
    """The first step at which a backend's points ``held`` (``{tag: {step: [values]}}``)
    differ from ``wanted`` (a point missing, extra, repeated or of another value after
    ``stored``, the backend's rounding), or None when they are the same."""
    expected: dict[tuple[str, int], float] = {
        (tag, step): stored(v) for step, values in wanted for tag, v in values.items()}
    bad = [step for (tag, step), v in expected.items()
           if len(got := held.get(tag, {}).get(step, [])) != 1 or not same_value(got[0], v)]
    bad += [step for tag, steps in held.items() for step in steps
            if (tag, step) not in expected]
    return min(bad, default=None)


@dataclass(frozen=True)
class RunInfo:
    """The run a sink mirrors: its directory, name, resolved config (JSON data), tags, and
    the points its logs already hold (``metrics.jsonl``/``eval.jsonl`` as kept: none on a
    fresh start, those up to the checkpoint on a resume)."""

    out: Path
    name: str
    config: Mapping[str, Any]
    tags: Mapping[str, str] = field(default_factory=dict)
    logged: Points = field(default_factory=list)


class Sink(ABC):
    """One tracking backend, open on one run. ``open`` makes the backend hold exactly the
    run's ``logged`` points (see the package docstring for how each sink knows what it
    holds); ``log`` adds one row's points; ``close`` ends it."""

    extra_module: ClassVar[str]
    """The module the sink needs, and the package that installs it."""
    extra_package: ClassVar[str]

    @classmethod
    def check(cls, name: str, settings: Any) -> None:
        """Raise :class:`TrackerNotInstalledError` unless what the sink needs with these
        settings is installed (checked before a run starts)."""
        require(name, cls.extra_module, cls.extra_package)

    @classmethod
    def setup(cls, settings: Any) -> None:
        """Prepare a store shared by several runs (a study) before they start in parallel;
        nothing by default."""
        return None

    @classmethod
    @abstractmethod
    def open(cls, settings: Any, run: RunInfo) -> Sink:
        """The sink on ``run``, its backend brought to hold ``run.logged``."""

    @abstractmethod
    def log(self, step: int, values: Scalars) -> None:
        """Record the points of one row."""

    @abstractmethod
    def close(self, ok: bool) -> None:
        """Flush and end (``ok`` False: the run failed)."""
