"""The DP-SGD step on tensors: group per unit, clip each unit, sum, add noise, divide.

Every function here is pure: gradients come in as ``{name: Tensor (U, *shape)}`` (one row per
privacy unit: a preference pair, or a user for user-level DP), randomness comes from an
explicit ``torch.Generator``, and nothing is stored on parameters. With sigma = 0 and
C = inf the result is the plain mean ``sum / expected_batch``, i.e. a non-DP step.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

Grads = Mapping[str, Tensor]


def _units(grads: Grads) -> int:
    if not grads:
        raise ValueError("no gradients given")
    counts = {tensor.shape[0] for tensor in grads.values()}
    if len(counts) != 1:
        raise ValueError(f"gradients disagree on the number of units: {sorted(counts)}")
    return counts.pop()


def flatten_units(per_unit_grads: Grads) -> Tensor:
    """``{name: (U, *shape)}`` -> one (U, P) tensor, parameters in key order (a copy)."""
    _units(per_unit_grads)
    return torch.cat([g.detach().flatten(1) for g in per_unit_grads.values()], dim=1)


def unflatten_units(flat: Tensor, like: Grads) -> dict[str, Tensor]:
    """(U, P) -> ``{name: (U, *shape)}`` views, shapes and key order taken from ``like``."""
    sizes = [g.shape[1:].numel() for g in like.values()]
    parts = flat.split(sizes, dim=1)
    return {name: part.view(flat.shape[0], *g.shape[1:])
            for (name, g), part in zip(like.items(), parts, strict=True)}


def per_unit_norms(per_unit_grads: Grads) -> Tensor:
    """L2 norm of each unit's whole gradient (all tensors together), shape (U,), float64.

    The squares are accumulated in float64 one tensor at a time (no float64 copy of the
    whole (U, P) gradient), so the norm is exact to ~1e-16 relative whatever the gradients'
    dtype: a float32 norm of a 1M-parameter gradient is off by ~1e-5 relative, enough to
    let a clipped unit end above C.
    """
    _units(per_unit_grads)
    squares = [g.detach().flatten(1).double().square().sum(dim=1)
               for g in per_unit_grads.values()]
    return torch.stack(squares).sum(dim=0).sqrt()


def _scaled(per_unit_grads: Grads, factor: Tensor) -> dict[str, Tensor]:
    """Each unit's rows times ``factor`` (U,) float64, the product taken in float64 and
    rounded once to each tensor's dtype (a factor of exactly 1 leaves a row bit-identical)."""
    return {name: (g.detach().double() * factor.to(g.device).view(-1, *[1] * (g.dim() - 1))
                   ).to(g.dtype) for name, g in per_unit_grads.items()}


def clip_margin(per_unit_grads: Grads) -> float:
    """The relative shortfall below C that clipping aims for: 2u + (P + 2) u64, where u is
    the unit roundoff of the widest gradient dtype (one rounding of each scaled element) and
    (P + 2) u64 bounds the relative error of a float64 norm over P elements in any order."""
    u = max(torch.finfo(g.dtype).eps for g in per_unit_grads.values()) / 2
    params = sum(g.shape[1:].numel() for g in per_unit_grads.values())
    return 2 * u + (params + 2) * torch.finfo(torch.float64).eps / 2


def clip_per_unit(per_unit_grads: Grads, max_norm: float) -> tuple[dict[str, Tensor], Tensor]:
    """Scale each unit's gradient so that its norm, measured in float64, is at most C.

    Args: ``per_unit_grads[name]`` of shape (U, *shape); C > 0, possibly ``inf``.
    Returns: the clipped gradients (same shapes and dtypes) and the pre-clip float64 norms,
    shape (U,). A unit with norm <= C is left untouched (so C = inf is the identity).

    Why the bound holds in every dtype: a unit with norm n > C is scaled by
    f = (C / n) (1 - m), m = ``clip_margin`` = 2u + (P + 2) u64, with u the unit roundoff
    of the widest gradient dtype. Each element x f is computed in float64 and rounded once
    to its dtype, which lengthens it by at most a factor (1 + u); n and any later float64
    measurement of the clipped norm are each within (P + 2) u64 relative of the exact value.
    So the clipped norm, however it is measured in float64, is <= C (1 - m)(1 + u)(1 + ...)
    < C. As a guard the clipped norms are measured again and any unit still above C (none
    seen) is scaled down once more; a unit that cannot be brought under C raises instead of
    leaking sensitivity. Clipped units end within ~2m of C (bf16: 0.8 %, float32: 2.4e-7).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm (C) must be > 0, got {max_norm}")
    norms = per_unit_norms(per_unit_grads)
    if math.isinf(max_norm) or not bool((norms > max_norm).any()):
        return {name: g.detach() for name, g in per_unit_grads.items()}, norms
    margin = clip_margin(per_unit_grads)
    factor = torch.where(norms > max_norm, max_norm / norms * (1 - margin),
                         torch.ones_like(norms))
    return scale_within(per_unit_grads, factor, max_norm, margin), norms


def scale_within(per_unit_grads: Grads, factor: Tensor, max_norm: float,
                 margin: float) -> dict[str, Tensor]:
    """Each unit ``{name: (U, *shape)}`` times ``factor`` (U,) float64 (``_scaled``), then
    the guard of ``clip_per_unit``: the scaled norms are measured again in float64 and any
    unit still above C is scaled down by (C / norm)(1 - 2 ``margin``), at most three times;
    a unit that cannot be brought under C raises instead of leaking sensitivity. Shared by
    every clipping rule (``dpalign.privacy.clipping``) so all keep one bound."""
    clipped = _scaled(per_unit_grads, factor)
    for _ in range(3):
        after = per_unit_norms(clipped)
        over = after > max_norm
        if not bool(over.any()):
            return clipped
        factor = torch.where(over, factor * (max_norm / after) * (1 - 2 * margin), factor)
        clipped = _scaled(per_unit_grads, factor)
    raise RuntimeError(f"could not clip {int(over.sum())} unit(s) to C={max_norm}: "
                       f"norms {after[over].tolist()}")


def empty_units(params: Mapping[str, Tensor], n: int = 0) -> dict[str, Tensor]:
    """``n`` zero units, ``{name: Tensor (n, *p.shape)}``: with n = 0 the gradients of an
    empty Poisson batch; else units that got no example (an online tie)."""
    return {name: p.new_zeros((n, *p.shape)) for name, p in params.items()}


def noisy_mean(clipped: Grads, sigma: float, max_norm: float, expected_batch: float,
               generator: torch.Generator) -> dict[str, Tensor]:
    """(sum over units + N(0, sigma^2 C^2) per coordinate) / expected_batch.

    Args: ``clipped[name]`` of shape (U, *shape), U may be 0 (see ``empty_units``);
    ``expected_batch`` is q * n under Poisson sampling (fixed: the batch size otherwise).
    Returns ``{name: Tensor (*shape)}``. Noise is drawn in the order of ``clipped``'s keys
    on the generator's device, as one vector over all parameters in key order; sigma = 0
    draws nothing.
    """
    _units(clipped)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if not expected_batch > 0:
        raise ValueError(f"expected batch must be > 0, got {expected_batch}")
    if sigma > 0 and math.isinf(max_norm):
        raise ValueError("noise with C = inf is infinite: clip to a finite max_norm")
    total = flatten_units(clipped).sum(dim=0, keepdim=True)
    if sigma > 0:
        dtype = torch.promote_types(total.dtype, torch.float32)
        noise = torch.randn(total.shape, generator=generator, dtype=dtype,
                            device=generator.device)
        total = total + (sigma * max_norm * noise).to(total.device, total.dtype)
    return {name: g[0] for name, g in unflatten_units(total / expected_batch, clipped).items()}


def group_by_unit(per_example_grads: Grads,
                  unit_ids: Sequence[Hashable]) -> tuple[dict[str, Tensor], list[Hashable]]:
    """Sum the gradients of examples that share a unit (user-level DP).

    Args: ``per_example_grads[name]`` of shape (B, *shape); ``unit_ids`` of length B.
    Returns ``{name: Tensor (U, *shape)}`` and the U unit ids in order of first appearance.
    The sum is clipped as one vector afterwards, so a user's whole influence is bounded by C.
    """
    if _units(per_example_grads) != len(unit_ids):
        raise ValueError(f"{len(unit_ids)} unit ids for "
                         f"{_units(per_example_grads)} per-example gradients")
    order: dict[Hashable, int] = {}
    rows = [order.setdefault(uid, len(order)) for uid in unit_ids]
    return sum_into_units(per_example_grads, rows, len(order)), list(order)


def sum_into_units(per_example_grads: Grads, owner: Sequence[int], n_units: int
                   ) -> dict[str, Tensor]:
    """Per-example gradients ``{name: (B, *shape)}`` summed into ``n_units`` units by
    ``owner`` (B,) unit indices: ``{name: (n_units, *shape)}``; a unit owning no example is
    zero."""
    first = next(iter(per_example_grads.values()))
    index = torch.tensor(list(owner), dtype=torch.long, device=first.device)
    return {name: g.new_zeros((n_units, *g.shape[1:])).index_add_(0, index, g)
            for name, g in per_example_grads.items()}


@dataclass(frozen=True)
class StepDiagnostics:
    """What one DP step did; norms are pre-clip per-unit norms (NaN for an empty batch)."""

    units: int
    clip_fraction: float
    norm_p10: float
    norm_p50: float
    norm_p90: float
    norm_max: float
    noise_to_signal: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def clip_fraction(norms: Tensor, max_norm: float) -> float:
    """Fraction of units whose norm exceeded C (0 for an empty batch)."""
    return float((norms > max_norm).float().mean()) if norms.numel() else 0.0


def norm_quantiles(norms: Tensor) -> dict[str, float]:
    """p10/p50/p90/max of the pre-clip norms, shape (U,) -> floats (NaN when U = 0)."""
    if norms.numel() == 0:
        return dict.fromkeys(("p10", "p50", "p90", "max"), math.nan)
    q = torch.quantile(norms.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]),
            "max": float(norms.max())}


def noise_to_signal(clipped: Grads, sigma: float, max_norm: float,
                    expected_batch: float) -> float:
    """Noise std per coordinate, sigma C / B, over the L2 norm of the mean clipped gradient
    ``||sum clipped|| / B`` (inf when that mean is zero and sigma > 0; 0 when sigma = 0).
    """
    if sigma == 0:
        return 0.0
    signal = float(flatten_units(clipped).sum(dim=0).float().norm()) / expected_batch
    noise = sigma * max_norm / expected_batch
    return noise / signal if signal > 0 else math.inf


def step_diagnostics(clipped: Grads, norms: Tensor, sigma: float, max_norm: float,
                     expected_batch: float) -> StepDiagnostics:
    """All of the above for one step (``clipped`` and ``norms`` from ``clip_per_unit``)."""
    q = norm_quantiles(norms)
    return StepDiagnostics(int(norms.numel()), clip_fraction(norms, max_norm), q["p10"],
                           q["p50"], q["p90"], q["max"],
                           noise_to_signal(clipped, sigma, max_norm, expected_batch))


def noise_generator(seed: int | None, secure: bool = False,
                    device: str | torch.device = "cpu") -> torch.Generator:
    """The generator the DP noise is drawn from.

    ``secure=False``: seeded with ``seed`` (reproducible runs, resumable by saving its
    state). ``secure=True``: seeded from OS entropy (``secrets``), so nobody, not even the
    trainer, can replay the noise; not reproducible by design, and ``seed`` must be None.
    (torch's generator is a PRNG; a fresh OS-entropy seed per run keeps the noise unknown.)
    """
    if secure and seed is not None:
        raise ValueError("secure noise takes its seed from the OS; do not pass a seed")
    if not secure and seed is None:
        raise ValueError("give a seed for reproducible noise, or use secure=True")
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if secure else seed)
    return generator
