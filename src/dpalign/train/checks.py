"""Everything a run checks before it writes a file or runs the model.

``check_run`` reads the data files and checks the settings against them: data.k against the
pool, train.batch_size against the training pairs (with DP or without), the privacy units
and a budget that allows at least one step. ``check_lengths`` refuses, once the processor
has tokenised the pairs, a pair longer than the model's maximum positions (or
``data.max_length``): over-long pairs are refused, never cut, since a cut pair may no longer
say which answer was preferred.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpalign.data.fewshot import few_shot, validation_split
from dpalign.data.hf import read_records
from dpalign.data.sampling import steps_per_epoch
from dpalign.data.schema import PreferenceRecord
from dpalign.models.encode import max_positions
from dpalign.models.load import check_model_folder
from dpalign.models.pairs import EncodedPair
from dpalign.privacy.accounting import Ledger, epsilon
from dpalign.privacy.label_dp import randomized_response
from dpalign.privacy.plan import PrivacyPlan, plan_privacy, privacy_units
from dpalign.train.config import TrainConfig


class SequenceLengthError(ValueError):
    """A pair's tokens do not fit the model's positions (or ``data.max_length``)."""


class PrivacyBudgetError(ValueError):
    """The target epsilon allows not even one step."""


def _check_sizes(cfg: TrainConfig, pool: int) -> None:
    """Refuse data.k above the ``pool`` of pairs and train.batch_size above the training
    pairs (with DP or without: a batch cannot hold more pairs than there are)."""
    k, batch = cfg.data.k, cfg.train.batch_size
    if k is not None and k > pool:
        raise ValueError(f"data.k={k} but {cfg.data.train} holds {pool} pairs; set "
                         f"data.k <= {pool}")
    n = pool if k is None else k
    if batch > n:
        source = (f"data.k={k}" if k is not None
                  else f"data.k unset: all {n} pairs of {cfg.data.train}")
        raise ValueError(f"train.batch_size={batch} exceeds the {n} training pairs ({source}); "
                         f"a step cannot take more pairs than there are: set "
                         f"train.batch_size <= {n}" + (f" or data.k >= {batch}"
                                                       if k is not None and batch <= pool
                                                       else ""))


def _privacy_plan(cfg: TrainConfig, n_units: int, total: int) -> PrivacyPlan | None:
    """The DP plan (None without DP); refuses a target epsilon the first step would exceed."""
    if not cfg.privacy.enabled:
        return None
    p = cfg.privacy
    plan = plan_privacy(p, n_units, cfg.train.batch_size, total)
    if plan.budget_steps == 0:
        first = epsilon(Ledger().append(plan.entry(p)), p.delta, p.accountant)
        raise PrivacyBudgetError(
            f"privacy.target_epsilon={p.target_epsilon:g} allows no step: the first step "
            f"alone (sigma {plan.sigma:g}, sample rate {plan.sample_rate:g}) costs epsilon "
            f"{first:.4g} at delta {p.delta:g}; raise privacy.target_epsilon or "
            "privacy.noise_multiplier")
    return plan


@dataclass(frozen=True)
class RunData:
    """The run's training records (few-shot split, label noise applied), held-out records,
    planned steps, privacy units and DP plan: everything ``check_run`` derives from the data
    and the settings."""

    records: list[PreferenceRecord]
    held: list[PreferenceRecord]
    total: int
    units: list[list[int]]
    plan: PrivacyPlan | None
    val: list[PreferenceRecord] = field(default_factory=list)


def check_run(cfg: TrainConfig) -> RunData:
    """Read the data files and check the settings against them (``_check_sizes``, the
    privacy units and budget) before anything is written or the model loads. The model
    folder is checked first: calibrating sigma to a target epsilon can take a while."""
    check_model_folder(cfg.model)
    pool = read_records(cfg.data.train)
    _check_sizes(cfg, len(pool))
    records = few_shot(pool, cfg.data.k, cfg.data.seed)
    if cfg.privacy.label_epsilon is not None:
        records = list(randomized_response(records, cfg.privacy.label_epsilon,
                                           cfg.data.seed).records)
    held = (read_records(cfg.data.heldout)[:cfg.eval.heldout_pairs]
            if cfg.data.heldout else [])
    val = read_records(cfg.eval.validation) if cfg.eval.validation else []
    if cfg.eval.validation_fraction is not None:
        if not cfg.data.heldout:
            raise ValueError("eval.validation_fraction splits the held-out pairs: set "
                             "data.heldout")
        val, held = validation_split(held, cfg.eval.validation_fraction)
    total = total_steps(cfg, len(records))
    units = privacy_units(records, [r.user_id for r in records],  # type: ignore[arg-type]
                          cfg.privacy.unit)
    return RunData(records, held, total, units, _privacy_plan(cfg, len(units), total), val)


def length_limit(cfg: TrainConfig, model: torch.nn.Module) -> tuple[int, str] | None:
    """The most tokens a row may have and where that limit comes from, or None."""
    limits = []
    most = max_positions(model.config)  # type: ignore[arg-type]
    if most is not None:
        limits.append((most, f"the model's maximum positions, {cfg.model}/config.json"))
    if cfg.data.max_length is not None:
        limits.append((cfg.data.max_length, "data.max_length"))
    return min(limits) if limits else None


def check_lengths(path: Path | None, pairs: list[EncodedPair],
                   limit: tuple[int, str] | None) -> None:
    """Refuse pairs whose prompt (image tokens included) + longer response exceed ``limit``
    (they would be cut or run out of positions); the error names the first one."""
    if limit is None:
        return
    most, source = limit
    over = [p for p in pairs if len(p.prompt) + max(len(p.chosen), len(p.rejected)) > most]
    if over:
        p = over[0]
        response = max(len(p.chosen), len(p.rejected))
        raise SequenceLengthError(
            f"{path}: record {p.id!r} is {len(p.prompt) + response} tokens long (prompt "
            f"{len(p.prompt)} with its image tokens + longer response {response}), above the "
            f"limit of {most} ({source}); {len(over)} of {len(pairs)} pairs are too long. "
            "Over-long pairs are refused, not cut: shorten or drop them")


def total_steps(cfg: TrainConfig, n: int) -> int:
    loop = cfg.train
    return loop.steps if loop.steps is not None else loop.epochs * steps_per_epoch(  # type: ignore[operator]
        n, loop.batch_size)
