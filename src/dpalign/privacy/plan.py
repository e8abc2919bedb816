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
from dpalign.privacy.clipping import (
    CLIPPING,
    default_count_noise,
    noisy_unclipped_fraction,
    split_sigma,
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
    target epsilon allows (``budget_steps``; the planned steps when there is no target).

    sigma is what the ledger records. With adaptive clipping the step spends it on two
    releases (``dpalign.privacy.clipping``): the gradient sum with ``grad_sigma`` and the
    unclipped count with ``count_sigma`` (sigma^-2 = grad_sigma^-2 + (2 count_sigma)^-2);
    otherwise ``grad_sigma`` is sigma and ``count_sigma`` None (None: grad_sigma = sigma)."""

    sigma: float
    sample_rate: float
    expected_batch: float
    n_units: int
    budget_steps: int
    grad_sigma: float | None = None
    count_sigma: float | None = None

    @property
    def gradient_sigma(self) -> float:
        """The noise multiplier of the gradient sum."""
        return self.sigma if self.grad_sigma is None else self.grad_sigma

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
                "clipping": cfg.clipping, "grad_sigma": self.gradient_sigma,
                "count_sigma": self.count_sigma,
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
    return user_units(users)  # type: ignore[arg-type]


def user_units(users: Sequence[str]) -> list[list[int]]:
    """Indices grouped by user, in order of each user's first pair."""
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
    if CLIPPING[cfg.clipping].adapts:
        count = (cfg.count_noise if cfg.count_noise is not None
                 else default_count_noise(float(batch_size), sigma))
        try:
            grad_sigma = split_sigma(sigma, count)
        except ValueError as err:
            given = ("privacy.noise_multiplier" if cfg.noise_multiplier is not None else
                     f"sigma calibrated to privacy.target_epsilon={cfg.target_epsilon}")
            source = ("privacy.count_noise" if cfg.count_noise is not None else
                      f"the default expected batch / 20 = {batch_size}/20")
            raise ValueError(
                f"privacy.clipping=adaptive: {err} ({given}; sigma_b from {source}), so the "
                "gradient's noise multiplier (sigma^-2 - (2 sigma_b)^-2)^-1/2 does not exist; "
                "raise privacy.count_noise above sigma / 2, or lower sigma (a larger "
                "privacy.target_epsilon or smaller privacy.noise_multiplier)") from None
        plan = dataclasses.replace(plan, grad_sigma=grad_sigma, count_sigma=count)
    if cfg.target_epsilon is None:
        return plan
    budget = steps_within_budget(Ledger(), plan.entry(cfg), cfg.target_epsilon, cfg.delta,
                                 cfg.accountant, limit=steps)
    return dataclasses.replace(plan, budget_steps=budget)


COUNT_STREAM = 1  # ``step_seed``'s stream of the adaptive-clipping count noise
AUDIT_STREAM = 2  # ... and of the noise on an audit's gradient canaries (``dpalign.audit``)


def step_seed(noise_seed: int, step: int, stream: int = 0) -> int:
    """The noise generator's seed of step ``step``: a function of (noise seed, step).
    ``stream`` > 0 names another independent stream of the same step (``COUNT_STREAM``);
    stream 0 (the gradient noise) is the seed it always was."""
    entropy = [noise_seed, step] if stream == 0 else [noise_seed, step, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


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


def _step_generator(cfg: PrivacyConfig, step: int, stream: int = 0) -> torch.Generator:
    return (noise_generator(None, secure=True) if cfg.secure_noise
            else noise_generator(step_seed(cfg.noise_seed, step, stream)))


def noisy_once(clipped: dict[str, torch.Tensor], plan: PrivacyPlan, cfg: PrivacyConfig,
               step: int, max_norm: float | None = None, stream: int = 0
               ) -> dict[str, torch.Tensor]:
    """The noisy mean ``{name: shape}`` of clipped units ``{name: (U, *shape)}``, noise
    N(0, (grad_sigma C)^2) with C = ``max_norm`` (default ``privacy.max_grad_norm``) from
    the step's generator ``stream`` (0: the gradient's; ``AUDIT_STREAM``); with
    several ranks, rank 0 draws the noise once and broadcasts the result, so every rank
    applies the same update (also with secure, unseeded noise)."""
    rank, world = rank_and_world()
    if rank == 0:
        noisy = noisy_mean(clipped, plan.gradient_sigma,
                           cfg.max_grad_norm if max_norm is None else max_norm,
                           plan.expected_batch, _step_generator(cfg, step, stream))
    else:
        noisy = {k: torch.empty_like(g[0]) for k, g in clipped.items()}
    if world > 1:
        for name in sorted(noisy):
            dist.broadcast(noisy[name], src=0)
    return noisy


def noisy_count_once(norms: torch.Tensor, clip_norm: float, plan: PrivacyPlan,
                     cfg: PrivacyConfig, step: int) -> float:
    """Adaptive clipping's noisy unclipped fraction b_t of the (global) pre-clip norms (U,)
    at C_t = ``clip_norm``, its noise from the step's ``COUNT_STREAM`` generator (not the
    gradient's); rank 0 draws it and broadcasts, so every rank holds the same C_{t+1}."""
    rank, world = rank_and_world()
    value = torch.zeros(1, dtype=torch.float64)
    if rank == 0:
        value[0] = noisy_unclipped_fraction(norms, clip_norm, plan.count_sigma or 0.0,
                                            plan.expected_batch,
                                            _step_generator(cfg, step, COUNT_STREAM))
    if world > 1:
        dist.broadcast(value, src=0)
    return float(value[0])


def spent_epsilon(ledger: Ledger, cfg: PrivacyConfig) -> float:
    """Epsilon of ``ledger`` with the configured accountant."""
    return account(ledger, cfg.delta, cfg.accountant).epsilon
