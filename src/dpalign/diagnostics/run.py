"""Per-run convergence-stability diagnostics, computed from a run directory's logs.

Inputs are the rows a run writes (DESIGN.md §4):

- ``metrics``: one dict per training step (``metrics.jsonl``); always ``step`` (1-based) and
  ``loss``; non-DP runs add ``kl_proxy``; DP runs add ``dp_clip_fraction``,
  ``dp_noise_to_signal`` and ``epsilon`` (null on most steps).
- ``evals``: one dict per held-out evaluation (``eval.jsonl``), keyed by ``step``: the
  held-out preference metrics ``heldout_reward_accuracy`` / ``heldout_reward_margin`` (margin =
  beta * (log-ratio chosen - log-ratio rejected), mean over pairs), optionally the same on a
  validation part of the held-out pairs (prefix ``val_``), and on a world run the generation
  figures ``pope_{random,popular,adversarial}_{accuracy,f1,yes_ratio}``, ``chair_s``,
  ``chair_i`` and ``recall`` (object recall of generated captions).
- ``result``: the optional final summary (``result.json``), read for ``privacy.epsilon``.
- ``base``: optionally, the base (untrained) model's final-eval figures under the same keys,
  read for ``recall`` (:func:`silenced`).

Three findings say what the stability numbers alone can hide: a run that did not move at all
(:func:`movement`), a held-out collapse after a peak (:func:`heldout_drop`) and a model that
answers one way or stops naming objects (:func:`silenced`).

Values may be JSON null (read as ``None``: "not measured", always skipped) or, for a diverged
run, NaN/Infinity. Rows are put in step order first; if a step was logged twice (a resumed
run), the later row wins. Every quantity is a small pure function below; :func:`diagnose_run`
collects them into a frozen :class:`RunDiagnostics`, whose :meth:`~RunDiagnostics.as_dict`
is one flat row of a study table. All defaults live in :class:`Thresholds`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpalign.rundir import RunDir, RunDirError
from dpalign.world.build import POPE_SPLITS

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "Divergence",
    "Movement",
    "RunDiagnostics",
    "RunDirError",
    "Silence",
    "Thresholds",
    "best_eval",
    "diagnose_run",
    "diagnose_run_dir",
    "ema",
    "eval_peak",
    "final_epsilon",
    "final_eval",
    "find_divergence",
    "heldout_drop",
    "initial_eval",
    "kl_drift",
    "loss_limit",
    "loss_volatility",
    "mean_finite",
    "movement",
    "silenced",
    "steps_to_target",
]

Row = Mapping[str, Any]

HIGHER_IS_BETTER: frozenset[str] = frozenset(
    {
        "heldout_pref_accuracy",
        "heldout_pref_accuracy_mean",
        "heldout_reward_accuracy",
        "heldout_reward_margin",
        "val_pref_accuracy",
        "val_pref_accuracy_mean",
        "val_reward_accuracy",
        "val_reward_margin",
        "recall",
        *(f"pope_{split}_{name}" for split in POPE_SPLITS
          for name in ("accuracy", "f1", "precision", "recall")),
    }
)
"""Eval keys whose best value over a run is the maximum (accuracy-type)."""

LOWER_IS_BETTER: frozenset[str] = frozenset({"chair_s", "chair_i", "partner_hallucination_rate"})
"""Eval keys whose best value over a run is the minimum (hallucination-type)."""


@dataclass(frozen=True)
class Thresholds:
    """Every default of the per-run diagnostics, in one place.

    - ``loss_limit``: absolute loss above which a run has diverged; ``None`` (default) derives
      it from the run as ``loss_limit_factor * |first finite loss| + loss_limit_floor``
      (10 x 0.693 + 1 = 7.93 for a DPO run starting at ln 2).
    - ``kl_limit`` (20.0): ``kl_proxy`` (k2 estimate of per-token KL to the reference, nats)
      above which a run has diverged; 20 means an RMS per-token log-ratio of about 6.3.
    - ``ema_decay`` (0.9): weight on the previous smoothed value in :func:`ema`
      (TensorBoard's smoothing 0.9); 0 disables smoothing.
    - ``target_key`` / ``target_accuracy`` ("heldout_reward_accuracy" / 0.7): the eval metric
      and level that :func:`steps_to_target` waits for.
    - ``kl_tail_steps`` (10): how many last logged ``kl_proxy`` values :func:`kl_drift`
      averages into the final KL.
    - ``margin_key`` / ``margin_floor`` ("heldout_reward_margin" / 0.01): a held-out reward
      margin (beta x log-ratio gap, nats) smaller than this in size is noise: the final one
      decides :func:`movement`, and :func:`steps_to_target` counts an evaluation only when its
      margin (where logged) is at least this. 0.01 is a log-ratio gap of 0.1 nats at beta 0.1.
    - ``loss_change_floor`` (0.01): the training loss "stayed put" when its EMA at the end is
      within this of the first finite loss (ln 2 = 0.693 for DPO); a run whose final margin is
      noise AND whose loss stayed put did not move (:func:`movement`).
    - ``collapse_key`` / ``collapse_drop`` ("heldout_reward_accuracy" / 0.05): a run
      collapsed (over-optimised) when its final held-out reward accuracy is more than 0.05
      below the best of its evaluations (:func:`heldout_drop`).
    - ``yes_ratio_key`` / ``yes_ratio_low`` / ``yes_ratio_high``
      ("pope_adversarial_yes_ratio" / 0.2 / 0.8): outside [0.2, 0.8] at the end the model
      answers POPE one way (POPE has 50% "yes" questions), :func:`silenced`.
    - ``recall_fraction`` (0.5): final caption object recall below 0.5 x the base model's
      recall counts as a recall collapse (only when a base is given), :func:`silenced`.
    """

    loss_limit: float | None = None
    loss_limit_factor: float = 10.0
    loss_limit_floor: float = 1.0
    kl_limit: float = 20.0
    ema_decay: float = 0.9
    target_key: str = "heldout_reward_accuracy"
    target_accuracy: float = 0.7
    kl_tail_steps: int = 10
    margin_key: str = "heldout_reward_margin"
    margin_floor: float = 0.01
    loss_change_floor: float = 0.01
    collapse_key: str = "heldout_reward_accuracy"
    collapse_drop: float = 0.05
    yes_ratio_key: str = "pope_adversarial_yes_ratio"
    yes_ratio_low: float = 0.2
    yes_ratio_high: float = 0.8
    recall_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.kl_tail_steps < 1:
            raise ValueError(f"kl_tail_steps must be >= 1, got {self.kl_tail_steps}")
        if not 0.0 <= self.yes_ratio_low <= self.yes_ratio_high <= 1.0:
            raise ValueError(f"need 0 <= yes_ratio_low <= yes_ratio_high <= 1, got "
                             f"{self.yes_ratio_low}, {self.yes_ratio_high}")
        for name in ("margin_floor", "loss_change_floor", "collapse_drop", "recall_fraction"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _as_float(value: Any) -> float:
    """``value`` as a float: numbers (bools as 0/1) pass through, null or non-numbers -> NaN."""
    return float(value) if isinstance(value, numbers.Real) else math.nan


def _by_step(rows: Sequence[Row]) -> list[Row]:
    """Rows in increasing ``step``; for a repeated step the later row wins."""
    latest = {row["step"]: row for row in rows}
    return [latest[step] for step in sorted(latest)]


def _logged(rows: Sequence[Row], key: str) -> np.ndarray:
    """Shape (m,): the non-null values of ``key`` over ``rows`` (in their order), as floats."""
    return np.array([_as_float(row[key]) for row in rows if row.get(key) is not None], float)


# ---------------------------------------------------------------- divergence


@dataclass(frozen=True)
class Divergence:
    """Where and why a run diverged: ``step`` and ``reason`` are ``None`` when it did not.

    ``reason`` is one of ``"loss_nonfinite"``, ``"loss_above_limit"``, ``"kl_nonfinite"``,
    ``"kl_above_limit"`` (the first that fires, in that order, at the first diverged step).
    """

    step: int | None = None
    reason: str | None = None

    @property
    def diverged(self) -> bool:
        return self.step is not None


def loss_limit(losses: Sequence[Any], thresholds: Thresholds = Thresholds()) -> float:
    """The loss level above which a run counts as diverged.

    ``thresholds.loss_limit`` when set; otherwise ``factor * |x0| + floor`` where ``x0`` is the
    first finite loss in ``losses`` (null skipped) and factor/floor are
    ``thresholds.loss_limit_factor`` / ``loss_limit_floor``. NaN when no loss is finite
    (nothing is "above" NaN; a non-finite loss is caught on its own).
    """
    if thresholds.loss_limit is not None:
        return float(thresholds.loss_limit)
    first = next((x for x in map(_as_float, losses) if math.isfinite(x)), math.nan)
    return thresholds.loss_limit_factor * abs(first) + thresholds.loss_limit_floor


def _row_divergence(row: Row, limit: float, kl_limit: float) -> str | None:
    """The first divergence criterion ``row`` meets, or ``None`` (null values never fire)."""
    loss, kl = _as_float(row.get("loss")), _as_float(row.get("kl_proxy"))
    checks = (
        ("loss_nonfinite", row.get("loss") is not None and not math.isfinite(loss)),
        ("loss_above_limit", loss > limit),
        ("kl_nonfinite", row.get("kl_proxy") is not None and not math.isfinite(kl)),
        ("kl_above_limit", kl > kl_limit),
    )
    return next((reason for reason, fired in checks if fired), None)


def find_divergence(metrics: Sequence[Row], thresholds: Thresholds = Thresholds()) -> Divergence:
    """The first step (in step order) at which the run diverged, and why.

    A step diverged when its ``loss`` is NaN/±inf, or ``loss > loss_limit(...)``, or its
    ``kl_proxy`` (where logged) is NaN/±inf or ``> thresholds.kl_limit``. Returns
    ``Divergence()`` (``step=None``) when no step did.
    """
    rows = _by_step(metrics)
    limit = loss_limit([row.get("loss") for row in rows], thresholds)
    for row in rows:
        reason = _row_divergence(row, limit, thresholds.kl_limit)
        if reason is not None:
            return Divergence(step=int(row["step"]), reason=reason)
    return Divergence()


# ---------------------------------------------------------------- volatility


def ema(values: Sequence[float] | np.ndarray, decay: float = 0.9) -> np.ndarray:
    """Trend-initialised exponential moving average; shape (n,) -> (n,).

    ``s[t] = decay * s[t-1] + (1 - decay) * x[t]`` for ``t >= 1``, started at
    ``s[0] = x[0] - decay / (1 - decay) * b`` with ``b = (x[n-1] - x[0]) / (n - 1)`` the
    trace's mean slope (``b = 0`` when ``n == 1``). This start is the steady state of an EMA
    tracking a line of slope ``b`` (it lags by ``decay * b / (1 - decay)``), so a linear
    trace comes out as an exactly linear (lagged) line with no start-up transient.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return x.copy()
    slope = (x[-1] - x[0]) / (x.size - 1) if x.size > 1 else 0.0
    out = np.empty_like(x)
    out[0] = x[0] - decay / (1.0 - decay) * slope
    for t in range(1, x.size):
        out[t] = decay * out[t - 1] + (1.0 - decay) * x[t]
    return out


def loss_volatility(losses: Sequence[Any], decay: float = 0.9) -> float:
    """Dispersion of the smoothed loss's step-to-step changes.

    Keep the finite losses in step order (null/NaN/inf dropped) -> ``x`` (n,); smooth
    ``s = ema(x, decay)``; take ``d = diff(s)`` (n-1,); return the population standard
    deviation ``sqrt(mean((d - mean(d))**2))``. 0 for a linear trace (constant ``d``),
    positive for an oscillating one; for white noise of std sigma on a flat loss it tends to
    ``sigma * (1 - decay) * sqrt(2 / (1 + decay))`` (0.103 sigma at decay 0.9).
    NaN when fewer than 3 finite losses.
    """
    x = np.array([v for v in map(_as_float, losses) if math.isfinite(v)], dtype=float)
    if x.size < 3:
        return math.nan
    return float(np.std(np.diff(ema(x, decay))))


# ---------------------------------------------------------------- evaluation


def steps_to_target(evals: Sequence[Row], target: float = 0.7,
                    key: str = "heldout_reward_accuracy", *, min_margin: float = 0.0,
                    margin_key: str = "heldout_reward_margin") -> int | None:
    """The first eval ``step`` (in step order) whose ``key`` value is ``>= target`` and, when
    that evaluation logs ``margin_key``, whose margin is ``>= min_margin`` (an accuracy
    reached with a margin that is noise does not count; a null/NaN margin never counts);
    ``None`` ("never") when no evaluation reaches it (null/NaN accuracies never do)."""
    def hit(row: Row) -> bool:
        margin_ok = margin_key not in row or _as_float(row[margin_key]) >= min_margin
        return _as_float(row.get(key)) >= target and margin_ok

    return next((int(row["step"]) for row in _by_step(evals) if hit(row)), None)


def _eval_keys(evals: Sequence[Row]) -> list[str]:
    """Eval metric names (all keys but ``step``), in first-seen order."""
    return [k for k in dict.fromkeys(k for row in evals for k in row) if k != "step"]


def final_eval(evals: Sequence[Row]) -> dict[str, float]:
    """``{key: value}`` from the last evaluation (in step order) that logged ``key``, for every
    eval key but ``step``; a null or non-numeric value there becomes NaN."""
    rows = _by_step(evals)
    return {key: _as_float([row for row in rows if key in row][-1][key])
            for key in _eval_keys(rows)}


_BEST: tuple[tuple[frozenset[str], Callable[[np.ndarray], float]], ...] = (
    (HIGHER_IS_BETTER, np.max),
    (LOWER_IS_BETTER, np.min),
)


def best_eval(evals: Sequence[Row]) -> dict[str, float]:
    """``{key: best}`` over all evaluations (step 0 included) for the present keys of
    :data:`HIGHER_IS_BETTER` (max) and :data:`LOWER_IS_BETTER` (min); null and NaN values
    are skipped, NaN when none is left. Other keys (e.g. POPE yes-ratio) have no best."""
    present = _eval_keys(evals)
    best: dict[str, float] = {}
    for names, pick in _BEST:
        for key in (k for k in present if k in names):
            values = _logged(evals, key)
            values = values[~np.isnan(values)]
            best[key] = float(pick(values)) if values.size else math.nan
    return best


def initial_eval(evals: Sequence[Row]) -> dict[str, float]:
    """``{key: value}`` of the step-0 evaluation (the model before any update), every key but
    ``step`` (null -> NaN); empty when the run has no step-0 evaluation."""
    start = [row for row in _by_step(evals) if row["step"] == 0]
    return {k: _as_float(v) for k, v in start[0].items() if k != "step"} if start else {}


def eval_peak(evals: Sequence[Row], key: str) -> tuple[float, int | None]:
    """``(best, step)``: the largest finite ``key`` value over the evaluations (step 0
    included) and the first step that logged it; ``(nan, None)`` when none is finite."""
    rows = [(int(row["step"]), _as_float(row.get(key))) for row in _by_step(evals)]
    finite = [(step, x) for step, x in rows if math.isfinite(x)]
    if not finite:
        return math.nan, None
    best = max(x for _, x in finite)
    return best, next(step for step, x in finite if x == best)


def heldout_drop(evals: Sequence[Row], key: str = "heldout_reward_accuracy") -> float:
    """How far ``key`` fell from its peak: ``best - final`` (>= 0), where ``best`` is
    :func:`eval_peak` and ``final`` the value at the last evaluation that logged ``key``
    (:func:`final_eval`). NaN when ``key`` is not logged or its final value is null/NaN/inf
    (a diverged run's collapse is its divergence)."""
    best, _ = eval_peak(evals, key)
    final = final_eval(evals).get(key, math.nan)
    if not (math.isfinite(best) and math.isfinite(final)):
        return math.nan
    return max(0.0, best - final)


# ---------------------------------------------------------------- movement and silence


@dataclass(frozen=True)
class Movement:
    """Whether a run moved away from its reference at all (:func:`movement`).

    ``loss_start``: the first finite training loss; ``loss_end``: the last value of the
    EMA-smoothed finite loss trace (:func:`ema`); ``final_margin``: the held-out reward margin
    at the last evaluation that logged it (NaN when none did).
    """

    moved: bool
    loss_start: float
    loss_end: float
    final_margin: float


def movement(metrics: Sequence[Row], evals: Sequence[Row],
             thresholds: Thresholds = Thresholds()) -> Movement:
    """Did the run move? It did NOT when, of the two signs below, every one that is measured
    says "flat" and at least one is measured:

    - the final held-out reward margin (``thresholds.margin_key``) has
      ``|margin| < thresholds.margin_floor``;
    - the training loss stayed put: ``|loss_end - loss_start| < thresholds.loss_change_floor``
      (``loss_start`` the first finite loss in step order, ``loss_end`` the last value of
      ``ema(finite losses, thresholds.ema_decay)``; needs two finite losses).

    A run with neither measured counts as moved (nothing says otherwise).
    """
    losses = np.array([x for x in (_as_float(row.get("loss")) for row in _by_step(metrics))
                       if math.isfinite(x)], float)
    start = float(losses[0]) if losses.size else math.nan
    end = float(ema(losses, thresholds.ema_decay)[-1]) if losses.size > 1 else math.nan
    margin = final_eval(evals).get(thresholds.margin_key, math.nan)
    flat = []
    if math.isfinite(margin):
        flat.append(abs(margin) < thresholds.margin_floor)
    if math.isfinite(end):
        flat.append(abs(end - start) < thresholds.loss_change_floor)
    return Movement(moved=not (flat and all(flat)), loss_start=start, loss_end=end,
                    final_margin=margin)


@dataclass(frozen=True)
class Silence:
    """Whether the trained model answers one way or stops naming objects (:func:`silenced`).

    ``yes_ratio``: final ``thresholds.yes_ratio_key`` (NaN when not logged);
    ``one_way``: the yes-ratio criterion fired; ``recall_ratio``: final caption ``recall`` /
    the base model's (NaN without both); ``recall_collapsed``:
    ``recall_ratio < thresholds.recall_fraction``, ``None`` when the ratio is not measured.
    """

    silenced: bool
    yes_ratio: float
    one_way: bool
    recall_ratio: float
    recall_collapsed: bool | None


def silenced(evals: Sequence[Row], base: Mapping[str, Any] | None = None,
             thresholds: Thresholds = Thresholds()) -> Silence:
    """A run is silenced when its final POPE-adversarial yes-ratio is below
    ``thresholds.yes_ratio_low`` (0.2: it mostly answers "no") or above ``yes_ratio_high``
    (0.8: mostly "yes"), OR, when ``base`` gives the base model's ``recall``, its final caption
    object recall is below ``thresholds.recall_fraction`` (0.5) x that base recall. Unmeasured
    criteria never fire."""
    final = final_eval(evals)
    yes = final.get(thresholds.yes_ratio_key, math.nan)
    one_way = math.isfinite(yes) and not (thresholds.yes_ratio_low <= yes
                                          <= thresholds.yes_ratio_high)
    base_recall = _as_float((base or {}).get("recall"))
    ratio = final.get("recall", math.nan) / base_recall if base_recall > 0 else math.nan
    collapsed = None if math.isnan(ratio) else bool(ratio < thresholds.recall_fraction)
    return Silence(silenced=bool(one_way or collapsed), yes_ratio=yes, one_way=one_way,
                   recall_ratio=ratio, recall_collapsed=collapsed)


# ---------------------------------------------------------------- privacy and drift


def mean_finite(metrics: Sequence[Row], key: str) -> float:
    """Mean of the finite values of ``key`` over the rows (null, NaN and ±inf skipped);
    NaN when there are none (e.g. ``dp_clip_fraction`` of a non-DP run)."""
    values = _logged(metrics, key)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _is_dp(metrics: Sequence[Row], result: Row | None) -> bool:
    """A DP run logs ``epsilon``/``dp_clip_fraction`` or has a non-null ``result['privacy']``."""
    logged = any("epsilon" in row or "dp_clip_fraction" in row for row in metrics)
    return logged or (result is not None and result.get("privacy") is not None)


def final_epsilon(metrics: Sequence[Row], result: Row | None = None) -> float:
    """Privacy spent by the end of the run.

    ``result["privacy"]["epsilon"]`` when given and non-null; else the last non-null
    ``epsilon`` in step order; else ``inf`` for a non-DP run (no guarantee at all) and NaN
    for a DP run that never logged one.
    """
    privacy = (result or {}).get("privacy") or {}
    if privacy.get("epsilon") is not None:
        return float(privacy["epsilon"])
    logged = _logged(_by_step(metrics), "epsilon")
    if logged.size:
        return float(logged[-1])
    return math.nan if _is_dp(metrics, result) else math.inf


def kl_drift(metrics: Sequence[Row], tail: int = 10) -> tuple[float, float]:
    """``(kl_final, kl_max)`` of ``kl_proxy`` (per-token KL of policy to reference).

    Over the non-null ``kl_proxy`` values in step order: ``kl_final`` is the mean of the last
    ``tail`` of them (all if fewer; a NaN/inf among them propagates), ``kl_max`` their
    maximum ignoring NaN. ``(nan, nan)`` when the run logs no ``kl_proxy``.
    """
    values = _logged(_by_step(metrics), "kl_proxy")
    if values.size == 0:
        return math.nan, math.nan
    finite_or_inf = values[~np.isnan(values)]
    peak = float(finite_or_inf.max()) if finite_or_inf.size else math.nan
    return float(values[-tail:].mean()), peak


# ---------------------------------------------------------------- the summary


def _nan_if_none(step: int | None) -> float | int:
    return math.nan if step is None else step


@dataclass(frozen=True)
class RunDiagnostics:
    """The stability summary of one run (see the function named by each field).

    ``steps_to_target`` and ``divergence.step`` are ``None`` for "never"; ``epsilon`` is
    ``inf`` for a non-DP run; DP-only and KL fields are NaN where the run does not log them.
    ``heldout_drop`` / ``heldout_best_step`` / ``val_drop`` come from :func:`heldout_drop` and
    :func:`eval_peak` of ``Thresholds.collapse_key`` (and its ``val_`` twin), ``collapsed`` is
    ``heldout_drop > Thresholds.collapse_drop``; ``initial_eval`` is :func:`initial_eval`;
    ``base`` the base model's figures the run was compared with (empty when none).
    """

    n_steps: int
    divergence: Divergence
    loss_volatility: float
    steps_to_target: int | None
    mean_clip_fraction: float
    mean_noise_to_signal: float
    epsilon: float
    kl_final: float
    kl_max: float
    final_eval: Mapping[str, float] = field(default_factory=dict)
    best_eval: Mapping[str, float] = field(default_factory=dict)
    movement: Movement = Movement(True, math.nan, math.nan, math.nan)
    heldout_drop: float = math.nan
    heldout_best_step: int | None = None
    collapsed: bool = False
    val_drop: float = math.nan
    silence: Silence = Silence(False, math.nan, False, math.nan, None)
    initial_eval: Mapping[str, float] = field(default_factory=dict)
    base: Mapping[str, float] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.divergence.diverged

    @property
    def moved(self) -> bool:
        return self.movement.moved

    @property
    def silenced(self) -> bool:
        return self.silence.silenced

    def as_dict(self) -> dict[str, float | int | bool | str | None]:
        """One flat row: scalar fields by name, ``None`` steps as NaN, ``diverged`` (bool),
        ``diverged_step``, ``diverged_reason`` (str or None); the findings ``moved`` (bool),
        ``loss_start``, ``loss_end`` (:class:`Movement`), ``collapsed`` (bool),
        ``heldout_drop``, ``heldout_best_step``, ``val_drop``, ``silenced`` (bool),
        ``pope_one_way`` (bool), ``recall_ratio``, ``recall_collapsed`` (bool, None without a
        base) (:class:`Silence`);
        then ``final_<key>``, ``best_<key>``, ``initial_<key>`` (step-0 eval) and
        ``base_<key>`` (the base model's figures, when given)."""
        return {
            "n_steps": self.n_steps,
            "diverged": self.diverged,
            "diverged_step": _nan_if_none(self.divergence.step),
            "diverged_reason": self.divergence.reason,
            "loss_volatility": self.loss_volatility,
            "steps_to_target": _nan_if_none(self.steps_to_target),
            "mean_clip_fraction": self.mean_clip_fraction,
            "mean_noise_to_signal": self.mean_noise_to_signal,
            "epsilon": self.epsilon,
            "kl_final": self.kl_final,
            "kl_max": self.kl_max,
            "moved": self.moved,
            "loss_start": self.movement.loss_start,
            "loss_end": self.movement.loss_end,
            "collapsed": self.collapsed,
            "heldout_drop": self.heldout_drop,
            "heldout_best_step": _nan_if_none(self.heldout_best_step),
            "val_drop": self.val_drop,
            "silenced": self.silenced,
            "pope_one_way": self.silence.one_way,
            "recall_ratio": self.silence.recall_ratio,
            "recall_collapsed": self.silence.recall_collapsed,
            **{f"final_{key}": value for key, value in self.final_eval.items()},
            **{f"best_{key}": value for key, value in self.best_eval.items()},
            **{f"initial_{key}": value for key, value in self.initial_eval.items()},
            **{f"base_{key}": value for key, value in self.base.items()},
        }


def _val_key(key: str) -> str:
    """``heldout_reward_accuracy`` -> ``val_reward_accuracy`` (the validation part's name)."""
    return "val_" + key.removeprefix("heldout_")


def diagnose_run(metrics: Sequence[Row], evals: Sequence[Row], *, result: Row | None = None,
                 base: Mapping[str, Any] | None = None,
                 thresholds: Thresholds = Thresholds()) -> RunDiagnostics:
    """All per-run diagnostics of one run's metric rows, eval rows, optional result and
    optional ``base`` (the base model's final-eval figures, same keys as an eval row)."""
    rows = _by_step(metrics)
    kl_final, kl_max = kl_drift(rows, thresholds.kl_tail_steps)
    drop = heldout_drop(evals, thresholds.collapse_key)
    return RunDiagnostics(
        n_steps=len(rows),
        divergence=find_divergence(rows, thresholds),
        loss_volatility=loss_volatility([row.get("loss") for row in rows], thresholds.ema_decay),
        steps_to_target=steps_to_target(evals, thresholds.target_accuracy, thresholds.target_key,
                                        min_margin=thresholds.margin_floor,
                                        margin_key=thresholds.margin_key),
        mean_clip_fraction=mean_finite(rows, "dp_clip_fraction"),
        mean_noise_to_signal=mean_finite(rows, "dp_noise_to_signal"),
        epsilon=final_epsilon(rows, result),
        kl_final=kl_final,
        kl_max=kl_max,
        final_eval=final_eval(evals),
        best_eval=best_eval(evals),
        movement=movement(rows, evals, thresholds),
        heldout_drop=drop,
        heldout_best_step=eval_peak(evals, thresholds.collapse_key)[1],
        collapsed=bool(drop > thresholds.collapse_drop),
        val_drop=heldout_drop(evals, _val_key(thresholds.collapse_key)),
        silence=silenced(evals, base, thresholds),
        initial_eval=initial_eval(evals),
        base={k: _as_float(v) for k, v in (base or {}).items()},
    )


# ---------------------------------------------------------------- reading a run directory


def diagnose_run_dir(path: str | Path, *, base: Mapping[str, Any] | None = None,
                     thresholds: Thresholds = Thresholds()) -> RunDiagnostics:
    """:func:`diagnose_run` of a run directory: ``metrics.jsonl`` (required), ``eval.jsonl``
    (no evaluations when absent) and ``result.json`` (optional), compared with ``base`` (the
    base model's final-eval figures) when given; :class:`RunDirError` naming the file and
    line when one is missing or malformed."""
    run = RunDir(Path(path))
    return diagnose_run(run.read_metrics(), run.read_evals(), result=run.read_result(),
                        base=base, thresholds=thresholds)
