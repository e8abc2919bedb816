"""The clipping rules of DP practice, chosen by ``privacy.clipping`` from ``CLIPPING``.

Gradients come in as ``{name: Tensor (U, *shape)}`` (one row per privacy unit), norms are
float64 and measured as in ``dp_sgd.per_unit_norms``; every rule returns the clipped units
(same shapes and dtypes) and the pre-clip norms (U,), and bounds every unit's float64 norm
by C in every dtype with the margin and guard of ``dp_sgd.clip_per_unit``.

- ``fixed``: ``g_i min(1, C / ||g_i||)`` with C = ``privacy.max_grad_norm`` (DP-SGD).
- ``automatic`` (Bu et al. 2023, "Automatic clipping"): ``g_i C / (||g_i|| + gamma)``
  with C = ``privacy.max_grad_norm`` and gamma = ``privacy.auto_gamma``; every unit is
  rescaled (none is left as it was) and its norm is ``C ||g_i|| / (||g_i|| + gamma) < C``, so
  the sensitivity is C exactly as for fixed clipping and the noise is sigma C.
- ``adaptive`` (Andrew et al. 2021, "Differentially private learning with adaptive
  clipping"): fixed clipping at a C_t that follows a target quantile gamma of the unit
  norms. After clipping at C_t the step releases the noisy fraction of unclipped units

      b_t = (sum_i (1[||g_i|| <= C_t] - 1/2) + N(0, sigma_b^2)) / B + 1/2

  (B the expected batch) and sets C_{t+1} = C_t exp(-eta_C (b_t - gamma)).

Why adaptive clipping costs exactly the configured sigma (their Theorem 1). Under
add/remove-one adjacency one unit changes the clipped gradient sum by a vector of norm <= C_t
and the centred count ``sum_i (1[.] - 1/2)`` by +-1/2. The step releases both, with
independent noise N(0, sigma_g^2 C_t^2 I) and N(0, sigma_b^2). Divide the first output by
C_t and the second by 1/2: the pair is one Gaussian mechanism with unit noise in every
coordinate and a difference vector (Delta_g / C_t, +-1) scaled by (1/sigma_g, 1/(2 sigma_b)),
whose norm is at most sqrt(sigma_g^-2 + (2 sigma_b)^-2). A Gaussian mechanism's privacy loss
distribution depends only on that norm over the noise, so the pair IS a Gaussian mechanism
with noise multiplier sigma where sigma^-2 = sigma_g^-2 + (2 sigma_b)^-2, i.e.

    sigma_g = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)     (needs 2 sigma_b > sigma).

This is an identity of mechanisms, not a bound, so it holds under Poisson subsampling too
(the subsampled step is the same mixture over the same unit). Hence the ledger keeps
recording sigma (accounting, calibration to a target epsilon and budget stops are
unchanged); the gradient gets sigma_g > sigma, the count sigma_b (``split_sigma``), and the
plan reports both (``grad_sigma``, ``count_sigma``). C_{t+1} is a function of released
values only (post-processing), so it costs nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dpalign.privacy.dp_sgd import Grads, clip_margin, clip_per_unit, per_unit_norms, scale_within

COUNT_NOISE_FRACTION = 1 / 20  # sigma_b >= expected batch / 20 when privacy.count_noise unset
COUNT_TO_SIGMA = 1.2  # ... and >= 1.2 sigma: the gradient noise grows by at most ~10 %


def clip_fixed(per_unit_grads: Grads, max_norm: float, gamma: float = 0.0
               ) -> tuple[dict[str, Tensor], Tensor]:
    """``dp_sgd.clip_per_unit`` (gamma unused): (U, *shape) -> clipped, norms (U,)."""
    del gamma
    return clip_per_unit(per_unit_grads, max_norm)


def clip_automatic(per_unit_grads: Grads, max_norm: float, gamma: float
                   ) -> tuple[dict[str, Tensor], Tensor]:
    """Automatic clipping: each unit ``{name: (U, *shape)}`` times C / (||g_i|| + gamma).

    Returns the scaled units (same shapes and dtypes) and the pre-clip float64 norms (U,).
    The factor is computed in float64 and capped at C (1 - m) / ||g_i|| with m =
    ``clip_margin`` (the cap binds only when gamma / ||g_i|| < ~m, so the result is
    g_i C / (||g_i|| + gamma) to within ~2m relative, i.e. dtype rounding), then applied and
    re-checked by ``dp_sgd.scale_within``: every unit's float64 norm is <= C in float64,
    float32 and bfloat16, for huge and tiny norms alike (a zero unit stays zero).
    """
    if not 0 < max_norm < math.inf:
        raise ValueError(f"automatic clipping needs a finite C > 0, got {max_norm}")
    if not gamma > 0:
        raise ValueError(f"automatic clipping needs gamma > 0, got {gamma}")
    norms = per_unit_norms(per_unit_grads)
    if norms.numel() == 0:
        return {name: g.detach() for name, g in per_unit_grads.items()}, norms
    margin = clip_margin(per_unit_grads)
    factor = torch.minimum(max_norm / (norms + gamma), max_norm * (1 - margin) / norms)
    return scale_within(per_unit_grads, factor, max_norm, margin), norms


ClipFn = Callable[[Grads, float, float], tuple[dict[str, Tensor], Tensor]]


@dataclass(frozen=True)
class ClippingRule:
    """``clip(grads (U, *shape), C, gamma) -> (clipped, norms (U,))``; ``adapts``: whether
    C follows the noisy unclipped fraction (``noisy_unclipped_fraction``, ``next_clip_norm``)
    and the count is released with noise (``split_sigma``)."""

    clip: ClipFn
    adapts: bool = False


CLIPPING: dict[str, ClippingRule] = {
    "fixed": ClippingRule(clip_fixed),
    "adaptive": ClippingRule(clip_fixed, adapts=True),
    "automatic": ClippingRule(clip_automatic),
}


def default_count_noise(expected_batch: float, sigma: float = 0.0) -> float:
    """sigma_b when ``privacy.count_noise`` is unset: max(B / 20, 1.2 sigma).

    B / 20 is Andrew et al.'s suggestion for their large batches and sigma ~ 1; at small B
    and small epsilon (sigma of tens) it is far below sigma / 2 and no gradient noise
    multiplier would exist. 1.2 sigma makes sigma_g = sigma / sqrt(1 - 1 / 2.4^2) = 1.10
    sigma: the count costs the gradient at most ~10 % more noise."""
    return max(expected_batch * COUNT_NOISE_FRACTION, COUNT_TO_SIGMA * sigma)


def split_sigma(sigma: float, count_sigma: float) -> float:
    """The gradient's noise multiplier sigma_g = (sigma^-2 - (2 sigma_b)^-2)^(-1/2), so that
    the noisy sum and the noisy count compose to one Gaussian mechanism with ``sigma``
    (module docstring). sigma = 0 (no privacy) gives 0. Raises ValueError when
    2 sigma_b <= sigma (no such sigma_g exists)."""
    if sigma == 0:
        return 0.0
    if not 2 * count_sigma > sigma:
        raise ValueError(f"2 * sigma_b = {2 * count_sigma:g} must exceed sigma = {sigma:g}")
    return (sigma ** -2 - (2 * count_sigma) ** -2) ** -0.5


def noisy_unclipped_fraction(norms: Tensor, clip_norm: float, count_sigma: float,
                             expected_batch: float, generator: torch.Generator) -> float:
    """b_t = (sum_i (1[norm_i <= C_t] - 1/2) + N(0, sigma_b^2)) / B + 1/2.

    Args: ``norms`` (U,) pre-clip norms (U may be 0); ``clip_norm`` C_t; ``count_sigma``
    sigma_b; ``expected_batch`` B. One float64 normal is drawn from ``generator`` when
    sigma_b > 0 (none when it is 0)."""
    centred = float(((norms <= clip_norm).double() - 0.5).sum())
    noise = (float(torch.randn((), generator=generator, dtype=torch.float64,
                               device=generator.device)) * count_sigma
             if count_sigma > 0 else 0.0)
    return (centred + noise) / expected_batch + 0.5


def next_clip_norm(clip_norm: float, unclipped: float, target_quantile: float,
                   clip_lr: float) -> float:
    """C_{t+1} = C_t exp(-eta_C (b_t - gamma)) (geometric update of Andrew et al.)."""
    return clip_norm * math.exp(-clip_lr * (unclipped - target_quantile))
