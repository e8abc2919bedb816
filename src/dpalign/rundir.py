"""The names of every file in a run directory and a study directory, and their readers.

A training run (``dpalign train --out RUN``, DESIGN.md §4)::

    config.yaml          the resolved config          env.json       versions, threads
    metrics.jsonl        one line per step            eval.jsonl     one line per evaluation
    privacy.json         the DP plan (DP runs)        reference/     cached reference log-probs
    checkpoints/         step_NNNNNN folders          final/         the trained model
    result.json          summary, written last (its presence means the run finished)
    error.json           why a study's run failed     diagnostics.json  its stability summary
    bdhs.jsonl           method bdhs: the training pairs with their BDHS rejected answers

An audit (``dpalign audit --out RUN``) is a run directory with canaries besides::

    audit/               settings.json, canaries.jsonl + images (input canaries),
                         canaries.parquet (each canary's inclusion, score, guess), scores.png
    audit.json           claimed epsilon vs the audit's lower bound, written last

A study (``dpalign study --out STUDY``)::

    study.yaml  study.json  runs.parquet  points.parquet  runs/<run>/  (each a run directory)
    base.json   the base model's figures      halving.json  successive halving's decision

Writers build paths with :class:`RunDir` / :class:`StudyDir`; readers of finished runs
(diagnostics, study tables, reports) use :meth:`RunDir.read_metrics`,
:meth:`RunDir.read_evals` and :meth:`RunDir.read_result`, which raise :class:`RunDirError`
naming the file (and the line) when something is missing or malformed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT_PREFIX", "RunDir", "RunDirError", "StudyDir", "checkpoint_name",
           "read_log"]

CHECKPOINT_PREFIX = "step_"
"""Every checkpoint folder's name starts with it (``step_NNNNNN``)."""


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step``: ``step_000042``."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


class RunDirError(ValueError):
    """A run directory cannot be used: it holds another run, has nothing to resume, or one of
    its files is missing or malformed; the message names the directory or the file (and
    line)."""


def _parse_row(path: Path, lineno: int, line: str) -> dict[str, Any]:
    """One JSONL line -> a dict with an integer ``step``, or a :class:`RunDirError`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})"
                          ) from exc
    step = row.get("step") if isinstance(row, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise RunDirError(f"{path}:{lineno}: expected a JSON object with an integer 'step', "
                          f"got {line.strip()[:80]!r}")
    return row


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a finished run's step log (``metrics.jsonl``, ``eval.jsonl``); blank lines
    skipped, NaN/Infinity tokens accepted.

    Strict: raises :class:`RunDirError` naming the file when it is missing, and ``file:line``
    when any line (the last one too) is not a JSON object with an integer ``step``. (Resuming
    a run reads its logs with :func:`dpalign.io.read_log_jsonl`, which drops a torn last
    line and then rewrites the file.)
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RunDirError(f"{path}: file not found") from exc
    return [_parse_row(path, lineno, line)
            for lineno, line in enumerate(text.splitlines(), start=1) if line.strip()]


@dataclass(frozen=True)
class RunDir:
    """The files of one training run under ``path`` (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def evals(self) -> Path:
        return self.path / "eval.jsonl"

    @property
    def privacy(self) -> Path:
        return self.path / "privacy.json"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def error(self) -> Path:
        return self.path / "error.json"

    @property
    def diagnostics(self) -> Path:
        return self.path / "diagnostics.json"

    @property
    def reference_dir(self) -> Path:
        return self.path / "reference"

    def reference(self, split: str) -> Path:
        """The cached reference log-probs of ``split`` ("train", "heldout")."""
        return self.reference_dir / f"{split}.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def bdhs(self) -> Path:
        return self.path / "bdhs.jsonl"

    @property
    def data_dir(self) -> Path:
        """Datasets given to ``dpalign.train`` as objects, written here as JSONL before the
        run starts (the resolved config names these files)."""
        return self.path / "data"

    @property
    def audit_dir(self) -> Path:
        return self.path / "audit"

    @property
    def audit(self) -> Path:
        return self.path / "audit.json"

    @property
    def final(self) -> Path:
        return self.path / "final"

    def is_finished(self) -> bool:
        """Whether the run wrote ``result.json`` (written last)."""
        return self.result.is_file()

    def read_metrics(self) -> list[dict[str, Any]]:
        """``metrics.jsonl`` (required) via :func:`read_log`."""
        return read_log(self.metrics)

    def read_evals(self) -> list[dict[str, Any]]:
        """``eval.jsonl`` via :func:`read_log`; no rows when the file is absent."""
        return read_log(self.evals) if self.evals.exists() else []

    def read_result(self) -> dict[str, Any] | None:
        """``result.json`` as a dict, ``None`` when absent; :class:`RunDirError` when
        malformed."""
        path = self.result
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(result, dict):
            raise RunDirError(f"{path}: expected a JSON object")
        return result


@dataclass(frozen=True)
class StudyDir:
    """The files of one study under ``path`` (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "study.yaml"

    @property
    def meta(self) -> Path:
        return self.path / "study.json"

    @property
    def runs_table(self) -> Path:
        return self.path / "runs.parquet"

    @property
    def points_table(self) -> Path:
        return self.path / "points.parquet"

    @property
    def base(self) -> Path:
        return self.path / "base.json"

    @property
    def halving(self) -> Path:
        return self.path / "halving.json"

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    def run(self, name: str) -> RunDir:
        """The run directory of the run called ``name``."""
        return RunDir(self.runs / name)
