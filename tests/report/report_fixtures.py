"""Synthetic study and run directories for the report tests (no training). Not a
``conftest.py``: a second one would shadow ``tests/conftest.py`` for ``from conftest import``.

Each run's logs are made up from a closed form (a decaying loss plus seeded noise whose size
grows as epsilon shrinks); the study tables are then computed from those logs with the real
diagnostics, as a study runner would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpalign.diagnostics import aggregate, diagnose_run_dir
from dpalign.rundir import read_log
from dpalign.study.online import online_figures

INF = math.inf


@dataclass(frozen=True)
class Recipe:
    """How the synthetic runs behave.

    ``diverge_below``: runs with epsilon < this diverge (loss jumps to 50 halfway) for the
    first ``diverging_seeds`` seeds; ``noisy``: loss noise grows as 0.3 / epsilon (else a
    constant 0.01 for every point). ``methods``: alignment methods (``grid.method``); other
    than the default, the tables get a ``method`` column, and runs of a method other than
    offline log online fields, a longer wall time and better figures (:data:`ONLINE_GAIN`
    per method after the first).
    """

    epsilons: tuple[float, ...] = (INF, 8.0, 2.0, 0.5)
    ks: tuple[int, ...] = (4, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    mechanisms: tuple[str, ...] = ("dp_sgd",)
    losses: tuple[str, ...] = ("dpo",)
    steps: int = 40
    diverge_below: float = 0.0
    diverging_seeds: int = 3
    noisy: bool = False
    methods: tuple[str, ...] = ("offline",)


ONLINE_GAIN = 0.02
"""How much a method's final held-out reward accuracy and POPE accuracy rise per position
in ``Recipe.methods`` (the first method gains nothing)."""


def _online_fields(step: int, seed: int, rng: np.random.Generator) -> dict[str, Any]:
    """A step's online fields as ``dpalign.online.source`` logs them (8 prompts)."""
    pairs = 4 + (step + seed) % 5
    return {"online_prompts": 8, "online_pairs": pairs, "online_ties": 8 - pairs,
            "online_share": 1.0, "online_score_mean": -0.3 + 0.005 * step,
            "online_score_best": 0.1 + 0.01 * step + rng.uniform(0, 0.01),
            "online_score_worst": -0.6, "online_seconds": 0.02 + 0.001 * (step % 3)}


def _noise_size(recipe: Recipe, epsilon: float) -> float:
    return 0.3 / epsilon if recipe.noisy and math.isfinite(epsilon) else 0.01


def _metrics(recipe: Recipe, epsilon: float, k: int, seed: int, method: str = "offline"
             ) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, k, int(1000 * min(epsilon, 1e6))])
    diverges = epsilon < recipe.diverge_below and seed < recipe.diverging_seeds
    rows = []
    for step in range(1, recipe.steps + 1):
        loss = 0.69 * math.exp(-step / 20) + 0.1 + rng.normal(0, _noise_size(recipe, epsilon))
        if diverges and step > recipe.steps // 2:
            loss = 50.0 if step < recipe.steps else math.nan
        row: dict[str, Any] = {"step": step, "loss": loss,
                               "reward_margin": 0.05 * step + rng.normal(0, 0.05),
                               "reward_accuracy": min(1.0, 0.5 + step / 60), "lr": 1e-3,
                               "step_seconds": 0.01}
        if math.isfinite(epsilon):
            row |= {"dp_clip_fraction": 0.2 + rng.uniform(0, 0.1),
                    "dp_noise_to_signal": 2.0 / epsilon * (1 + rng.uniform(0, 0.2)),
                    "epsilon": epsilon * 0.99 if step == recipe.steps else None}
        else:
            row["kl_proxy"] = 0.01 * step
        if method != "offline":
            row |= _online_fields(step, seed, rng)
        rows.append(row)
    return rows


def _gain(recipe: Recipe, method: str) -> float:
    return ONLINE_GAIN * recipe.methods.index(method) if method in recipe.methods else 0.0


def _evals(recipe: Recipe, epsilon: float, seed: int, method: str = "offline"
           ) -> list[dict[str, Any]]:
    quality = (0.9 if math.isinf(epsilon) else 0.9 - 0.1 / epsilon) + _gain(recipe, method)
    rows = []
    for step in (0, recipe.steps // 2, recipe.steps):
        frac = step / recipe.steps
        rows.append({"step": step, "heldout_reward_accuracy": 0.5 + frac * (quality - 0.5),
                     "pope_adversarial_accuracy": 0.66 + 0.01 * seed - 0.02 * frac / min(
                         epsilon, 10) + frac * _gain(recipe, method),
                     "chair_s": 0.5 - 0.3 * frac * quality, "chair_i": 0.1})
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_run(path: Path, recipe: Recipe, *, epsilon: float, k: int, seed: int,
              mechanism: str, loss: str, method: str = "offline") -> None:
    """One synthetic run directory."""
    path.mkdir(parents=True)
    _write_jsonl(path / "metrics.jsonl", _metrics(recipe, epsilon, k, seed, method))
    _write_jsonl(path / "eval.jsonl", _evals(recipe, epsilon, seed, method))
    private = math.isfinite(epsilon)
    privacy = {"accountant": "pld", "delta": 1e-5, "sigma": 4.0 / epsilon,
               "target_epsilon": epsilon, "epsilon": epsilon * 0.99} if private else None
    (path / "config.yaml").write_text(
        f"loss:\n  name: {loss}\ndata:\n  k: {k}\n  seed: {seed}\ntrain:\n  seed: {seed}\n"
        f"privacy:\n  enabled: {str(private).lower()}\n")
    (path / "env.json").write_text(json.dumps({"python": "3.11", "torch": "2.13.0+cpu"}))
    if privacy:
        (path / "privacy.json").write_text(json.dumps(privacy))
    (path / "result.json").write_text(json.dumps({"privacy": privacy, "steps": recipe.steps}))


def _grid(recipe: Recipe) -> list[dict[str, Any]]:
    """Grid points: every DP mechanism x finite epsilon, plus one no-DP point, per K/loss
    (and method, with a ``method`` column, when the recipe names methods)."""
    points = []
    for method in recipe.methods:
        suffix = "" if method == "offline" else f"-{method}"
        extra = {"method": method} if recipe.methods != ("offline",) else {}
        for loss in recipe.losses:
            for k in recipe.ks:
                for epsilon in recipe.epsilons:
                    mechanisms = recipe.mechanisms if math.isfinite(epsilon) else ("none",)
                    for mechanism in mechanisms:
                        eps_name = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
                        points.append({"point": f"{loss}-{mechanism}-eps{eps_name}-k{k}{suffix}",
                                       "mechanism": mechanism, "epsilon_target": epsilon,
                                       "k": k, "loss": loss, "lr": None, **extra})
    return points


def write_study(root: Path, recipe: Recipe, *, points_file: bool = True) -> Path:
    """A study directory with study.json, runs/, runs.parquet and points.parquet."""
    root.mkdir(parents=True)
    rows, point_rows = [], []
    for point in _grid(recipe):
        diagnosed = []
        for seed in recipe.seeds:
            name = f"{point['point']}-s{seed}"
            method = point.get("method", "offline")
            write_run(root / "runs" / name, recipe, epsilon=point["epsilon_target"],
                      k=point["k"], seed=seed, mechanism=point["mechanism"],
                      loss=point["loss"], method=method)
            diag = diagnose_run_dir(root / "runs" / name).as_dict()
            diagnosed.append(diag)
            private = math.isfinite(point["epsilon_target"])
            online = (online_figures(read_log(root / "runs" / name / "metrics.jsonl"))
                      if "method" in point else {})
            wall = 1.5 + (0.5 * recipe.methods.index(method) + 0.1 * seed if online else 0)
            rows.append({"run": name, **point, "status": "ok", "error": None, "seed": seed,
                         "sigma": 4.0 / point["epsilon_target"] if private else math.nan,
                         "wall_seconds": wall, **online, **diag})
        point_rows.append({**point, **aggregate(diagnosed, n_resamples=300),
                           "n_failed": 0})
    runs = pd.DataFrame(rows)
    runs.to_parquet(root / "runs.parquet")
    if points_file:
        pd.DataFrame(point_rows).to_parquet(root / "points.parquet")
    meta = {"name": root.name, "command": ["dpalign", "study", "run", "configs/study.yaml",
                                           "--out", str(root)],
            "created": "2025-01-01T00:00:00", "git_revision": "abc1234",
            "versions": {"torch": "2.13.0+cpu", "dpalign": "0.1.0"},
            "machine": {"platform": "Linux", "python": "3.11.7", "cpu_count": 2,
                        "torch_threads": 1},
            "accountant": "pld",
            "config": {"grid": {"epsilon": [e for e in recipe.epsilons if math.isfinite(e)],
                                "k": list(recipe.ks)}, "seeds": list(recipe.seeds)}}
    (root / "study.json").write_text(json.dumps(meta))
    return root


def audit_record(claimed: float | None, bound: float, *, auc: float = 0.6,
                 tpr: float = 0.03, canaries: int = 1000, kind: str = "gradient"
                 ) -> dict[str, Any]:
    """An ``audit.json`` as ``dpalign.audit.run.run_audit`` writes it (``claimed`` None:
    infinite)."""
    return {"kind": kind, "canaries": canaries, "included": canaries // 2,
            "claimed_epsilon": claimed, "delta": 1e-5, "epsilon_lower_bound": bound,
            "consistent": claimed is None or bound <= claimed, "k_plus": 10, "k_minus": 10,
            "guesses": 20, "correct": 15, "candidates": 5, "level": 0.05, "auc": auc,
            "tpr_at_1pct_fpr": tpr, "tpr_at_01pct_fpr": tpr / 5, "audited": "as configured",
            "fault": None, "sample_rate": 1.0, "noise_multiplier": 4.0, "steps": 4,
            "max_grad_norm": 1.0, "clipping": "fixed", "seed": 0, "canary_norm": 10.0,
            "score": "sum over steps of the released noisy audit coordinate",
            "wall_seconds": 1.0}


def add_audits(root: Path, audits: dict[str, dict[str, Any]]) -> None:
    """Give the runs of the study at ``root`` the ``audit.json`` in ``audits`` (by run name)
    and their ``audit_*`` columns in ``runs.parquet``, as an audited study's store would."""
    from dpalign.study.store import audit_columns

    runs = pd.read_parquet(root / "runs.parquet")
    for name, audit in audits.items():
        (root / "runs" / name / "audit.json").write_text(json.dumps(audit))
    rows = [{**r, **audit_columns(audits.get(r["run"]))} for r in runs.to_dict("records")]
    pd.DataFrame(rows).to_parquet(root / "runs.parquet")
