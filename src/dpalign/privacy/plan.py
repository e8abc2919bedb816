"""The DP plan of a run and the pieces of a DP step that are not the gradient.

The plan (sigma, sample rate, step budget) is fixed before training from the config and the
number of privacy units (one pair each, or all pairs of one user). Noise is drawn once per
step from a generator seeded by (noise seed, step), so resume is exact. Under
``torch.distributed`` (data parallel) the ranks' clipped sums are all-reduced and rank 0
adds the noise once and broadcasts the update: the same update as one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dpalign.models.pairs import EncodedPair
from dpalign.privacy.accounting import (
    Ledger,
    LedgerEntry,
    account,
    calibrate_sigma,
    steps_within_budget,
)
from dpalign.privacy.config import PrivacyConfig
from dpalign.privacy.dp_sgd import noise_generator, noisy_mean
from dpalign.privacy.sampling import poisson_batch, shuffled_batch

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
        """The ledger entry of one step of this plan."""
        fixed = cfg.sampling == "shuffle"
        return LedgerEntry(self.sigma, self.sample_rate, 1, cfg.sampling,
                           int(self.expected_batch) if fixed else None,
                           self.n_units if fixed else None)

    def sample(self, cfg: PrivacyConfig, seed: int, step: int) -> list[int]:
        """The units of batch ``step`` (1-based): Poisson (possibly none) or a fixed-size
        shuffle, a function of (seed, step)."""
        if cfg.sampling == "poisson":
            return poisson_batch(self.n_units, self.sample_rate, seed, step - 1)
        return shuffled_batch(self.n_units, int(self.expected_batch), seed, step - 1)

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


def step_seed(noise_seed: int, step: int) -> int:
    """The noise generator's seed of step ``step``: a function of (noise seed, step)."""
    return int(np.random.SeedSequence([noise_seed, step]).generate_state(1, np.uint64)[0] >> 1)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_units(clipped: dict[str, torch.Tensor], norms: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sum every rank's clipped units ``{name: (U, *shape)}`` into one (1, *shape) unit per
    parameter and gather all (U,) pre-clip norms (for diagnostics), so each rank holds the
    global clipped sum."""
    summed = {k: g.sum(dim=0, keepdim=True) for k, g in clipped.items()}
    for name in sorted(summed):
        dist.all_reduce(summed[name])
    gathered: list[list[float]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, norms.tolist())
    return summed, torch.tensor([x for part in gathered for x in part], dtype=norms.dtype)


def noisy_once(clipped: dict[str, torch.Tensor], plan: PrivacyPlan, cfg: PrivacyConfig,
               step: int) -> dict[str, torch.Tensor]:
    """The noisy mean ``{name: shape}`` of clipped units ``{name: (U, *shape)}``; with
    several ranks, rank 0 draws the noise once and broadcasts the result, so every rank
    applies the same update (also with secure, unseeded noise)."""
    rank, world = rank_and_world()
    if rank == 0:
        generator = (noise_generator(None, secure=True) if cfg.secure_noise
                     else noise_generator(step_seed(cfg.noise_seed, step)))
        noisy = noisy_mean(clipped, plan.sigma, cfg.max_grad_norm, plan.expected_batch,
                           generator)
    else:
        noisy = {k: torch.empty_like(g[0]) for k, g in clipped.items()}
    if world > 1:
        for name in sorted(noisy):
            dist.broadcast(noisy[name], src=0)
    return noisy


def spent_epsilon(ledger: Ledger, cfg: PrivacyConfig) -> float:
    """Epsilon of ``ledger`` with the configured accountant."""
    return account(ledger, cfg.delta, cfg.accountant).epsilon
