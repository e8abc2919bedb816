"""The DP-SGD update of a run: sample units, per-pair gradients, clip, noise, account.

The plan (sigma, sample rate, step budget) is fixed before training from the config and the
number of privacy units. Each step samples units (Poisson by default, possibly none),
computes each pair's gradient of its own total loss, sums the pairs of one user when the
unit is the user, clips every unit to C, adds N(0, sigma^2 C^2) once, divides by the
expected batch and records the step in the ledger that lives in the loop state (and so in
every checkpoint). Batches and noise are functions of (seed, step), so resume is exact.

Under ``torch.distributed`` (data parallel, e.g. gloo on CPU) every rank draws the same
sample, takes every world-size-th unit, clips its units, the clipped sums are all-reduced,
and rank 0 adds the noise once and broadcasts the update: the same update as one process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dpalign.losses.base import LossOut, PairLogps
from dpalign.losses.objective import Objective
from dpalign.models.pairs import EncodedPair
from dpalign.privacy.accounting import (
    Ledger,
    LedgerEntry,
    account,
    calibrate_sigma,
    steps_within_budget,
)
from dpalign.privacy.config import PrivacyConfig
from dpalign.privacy.dp_sgd import (
    clip_per_unit,
    empty_units,
    group_by_unit,
    noise_generator,
    noisy_mean,
    step_diagnostics,
)
from dpalign.privacy.per_pair import Engine
from dpalign.privacy.sampling import poisson_batch, shuffled_batch
from dpalign.train.step import chunk_batches

SEEDED_NOTICE = ("noise drawn from a seeded generator: reproducible for research, NOT for "
                 "deployment (set privacy.secure_noise=true)")
SECURE_NOTICE = "noise seeded from OS entropy (privacy.secure_noise): not reproducible"


@dataclass(frozen=True)
class PrivacyPlan:
    """sigma, the sample rate q = B / units, the expected batch B and how many steps the
    target epsilon allows (``budget_steps``; the planned steps when there is no target)."""

    sigma: float
    sample_rate: float
    expected_batch: float
    n_units: int
    budget_steps: int

    def entry(self, cfg: PrivacyConfig) -> LedgerEntry:
        fixed = cfg.sampling == "shuffle"
        return LedgerEntry(self.sigma, self.sample_rate, 1, cfg.sampling,
                           int(self.expected_batch) if fixed else None,
                           self.n_units if fixed else None)

    def to_dict(self, cfg: PrivacyConfig) -> dict[str, Any]:
        return {"sigma": self.sigma, "sample_rate": self.sample_rate,
                "expected_batch": self.expected_batch, "units": self.n_units,
                "unit": cfg.unit, "budget_steps": self.budget_steps,
                "max_grad_norm": cfg.max_grad_norm, "delta": cfg.delta,
                "target_epsilon": cfg.target_epsilon, "accountant": cfg.accountant,
                "sampling": cfg.sampling, "engine": cfg.engine,
                "noise": SECURE_NOTICE if cfg.secure_noise else SEEDED_NOTICE}


def privacy_units(pairs: Sequence[EncodedPair], users: Sequence[str | None],
                  unit: str) -> list[list[int]]:
    """Pair indices of each unit: one pair each, or all pairs of one ``user_id``."""
    if unit == "example":
        return [[i] for i in range(len(pairs))]
    missing = [p.id for p, u in zip(pairs, users, strict=True) if u is None]
    if missing:
        raise ValueError(f"privacy.unit=user needs metadata.user_id; record {missing[0]!r} "
                         f"has none ({len(missing)} records lack it)")
    groups: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        groups.setdefault(str(user), []).append(i)
    return list(groups.values())


def plan_privacy(cfg: PrivacyConfig, n_units: int, batch_size: int, steps: int) -> PrivacyPlan:
    """Fix sigma (calibrated when a target epsilon is given) and the step budget."""
    if batch_size > n_units:
        raise ValueError(f"train.batch_size={batch_size} exceeds the {n_units} privacy units; "
                         "the expected batch must be at most the number of units")
    q = batch_size / n_units
    sigma = (cfg.noise_multiplier if cfg.noise_multiplier is not None else calibrate_sigma(
        cfg.target_epsilon, cfg.delta, q, steps, cfg.accountant,  # type: ignore[arg-type]
        sampling=cfg.sampling, n=n_units if cfg.sampling == "shuffle" else None))
    plan = PrivacyPlan(sigma, q, float(batch_size), n_units, steps)
    if cfg.target_epsilon is None:
        return plan
    budget = steps_within_budget(Ledger(), plan.entry(cfg), cfg.target_epsilon, cfg.delta,
                                 cfg.accountant, limit=steps)
    return dataclasses.replace(plan, budget_steps=budget)


def _step_seed(noise_seed: int, step: int) -> int:
    return int(np.random.SeedSequence([noise_seed, step]).generate_state(1, np.uint64)[0] >> 1)


def chunked_grads(engine: Engine, pairs: Sequence[EncodedPair], idx: list[int], ref: PairLogps,
                  objective: Objective, pad_id: int, micro_batch: int | None
                  ) -> tuple[dict[str, torch.Tensor], LossOut]:
    """Per-pair gradients ``{name: (B, *shape)}`` and the ``LossOut`` of pairs ``idx``
    (B = len(idx)), from ``engine`` run on consecutive chunks of at most ``micro_batch``
    pairs. A pair's gradient depends on that pair alone, so the chunks give the same rows as
    one batch; only the memory of one chunk's forward and backward is needed at a time."""
    # DAMA's model-aware factor mixes pairs of one batch; under DP it is held at 1.
    alpha = 1.0 if objective.spec.needs_alpha_model else None
    parts = [engine(batch, batch_ref, objective, batch.hardness, alpha)
             for batch, batch_ref in chunk_batches(pairs, idx, ref, pad_id, size=micro_batch,
                                                   with_corrupt=objective.spec.needs_corrupt)]
    grads = {name: torch.cat([g[name] for g, _ in parts]) for name in engine.params}
    return grads, LossOut.cat([out for _, out in parts])


def dp_update(engine: Engine, pairs: Sequence[EncodedPair], ref: PairLogps,
              units: list[list[int]], objective: Objective, plan: PrivacyPlan,
              cfg: PrivacyConfig, *, step: int, seed: int, pad_id: int,
              state: dict[str, Any], micro_batch: int | None = None) -> dict[str, Any]:
    """Set ``.grad`` of the trainable parameters to the noisy clipped mean for batch
    ``step`` (1-based) and extend ``state['ledger']``; returns the step's metrics. The
    batch's per-pair gradients are taken ``micro_batch`` pairs at a time."""
    n = len(units)
    sampled = (poisson_batch(n, plan.sample_rate, seed, step - 1) if cfg.sampling == "poisson"
               else shuffled_batch(n, int(plan.expected_batch), seed, step - 1))
    rank, world = rank_and_world()
    mine = sampled[rank::world]  # data parallel: each rank takes its share of the units
    idx = [i for u in mine for i in units[u]]
    owner = [u for u in mine for _ in units[u]]
    named = engine.params
    metrics: dict[str, Any] = {"loss": None}
    if idx:
        grads, out = chunked_grads(engine, pairs, idx, ref, objective, pad_id, micro_batch)
        if cfg.unit == "user":
            grads, _ = group_by_unit(grads, owner)
        metrics = {"loss": float(out.per_example.mean()),
                   **{k: float(v.float().mean()) for k, v in out.metrics.items()}}
    else:
        grads = empty_units(named)
    clipped, norms = clip_per_unit(grads, cfg.max_grad_norm)
    if world > 1:
        clipped, norms = _all_reduce_units(clipped, norms)
    noisy = _noisy_once(clipped, plan, cfg, step, rank, world)
    for name, param in named.items():
        param.grad = noisy[name].to(param.dtype)
    ledger = Ledger.from_json(state["ledger"]).append(plan.entry(cfg))
    state["ledger"] = ledger.to_json()
    diag = step_diagnostics(clipped, norms, plan.sigma, cfg.max_grad_norm, plan.expected_batch)
    return {**metrics, "pairs": sum(len(units[u]) for u in sampled),
            **{f"dp_{k}": (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in diag.as_dict().items()}}


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_units(clipped: dict[str, torch.Tensor], norms: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sum every rank's clipped units into one (1, *shape) unit per parameter and gather
    all pre-clip norms (for diagnostics), so each rank holds the global clipped sum."""
    summed = {k: g.sum(dim=0, keepdim=True) for k, g in clipped.items()}
    for name in sorted(summed):
        dist.all_reduce(summed[name])
    gathered: list[list[float]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, norms.tolist())
    return summed, torch.tensor([x for part in gathered for x in part], dtype=norms.dtype)


def _noisy_once(clipped: dict[str, torch.Tensor], plan: PrivacyPlan, cfg: PrivacyConfig,
                step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The noisy mean; with several ranks, rank 0 draws the noise once and broadcasts the
    result, so every rank applies the same update (also with secure, unseeded noise)."""
    if rank == 0:
        generator = (noise_generator(None, secure=True) if cfg.secure_noise
                     else noise_generator(_step_seed(cfg.noise_seed, step)))
        noisy = noisy_mean(clipped, plan.sigma, cfg.max_grad_norm, plan.expected_batch,
                           generator)
    else:
        noisy = {k: torch.empty_like(g[0]) for k, g in clipped.items()}
    if world > 1:
        for name in sorted(noisy):
            dist.broadcast(noisy[name], src=0)
    return noisy


def spent_epsilon(state: dict[str, Any], cfg: PrivacyConfig) -> float:
    """Epsilon of the ledger so far with the configured accountant."""
    return account(Ledger.from_json(state["ledger"]), cfg.delta, cfg.accountant).epsilon
