"""The clipping rules (``dpalign.privacy.clipping``): adaptive C tracks the target quantile
and its accounting is dp_accounting's composition of the two releases; automatic clipping
bounds every unit by C in every dtype and equals g C / (||g|| + gamma); fixed is
``clip_per_unit``."""

from __future__ import annotations

import math
from statistics import NormalDist

import dp_accounting as dpa
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from dpalign.privacy.accounting import PLD_DISCRETIZATION, Ledger
from dpalign.privacy.clipping import (
    CLIPPING,
    clip_automatic,
    default_count_noise,
    next_clip_norm,
    noisy_unclipped_fraction,
    split_sigma,
)
from dpalign.privacy.config import PrivacyConfig
from dpalign.privacy.dp_sgd import clip_margin, clip_per_unit, per_unit_norms
from dpalign.privacy.plan import COUNT_STREAM, plan_privacy, spent_epsilon, step_seed

DELTA = 1e-5


# --- adaptive clipping: the update rule and its convergence --------------------------------

def test_unclipped_fraction_and_update_follow_the_formulas() -> None:
    """norms (0.5, 1, 2, 1.0000001) at C = 1, B = 4, sigma_b = 0: centred count
    (1/2 + 1/2 - 1/2 - 1/2) = 0, b = 0/4 + 1/2; with sigma_b = 3 the one normal drawn from
    the generator enters as 3 z / 4. C' = C exp(-0.2 (b - 0.5))."""
    norms = torch.tensor([0.5, 1.0, 2.0, 1.0000001], dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    assert noisy_unclipped_fraction(norms, 1.0, 0.0, 4.0, gen) == 0.5
    z = float(torch.randn((), generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    b = noisy_unclipped_fraction(norms, 1.0, 3.0, 4.0, torch.Generator().manual_seed(7))
    assert b == pytest.approx(3 * z / 4 + 0.5, rel=1e-15)
    assert noisy_unclipped_fraction(norms[:3], 1.5, 0.0, 4.0, gen) == (0.5 + 0.5 - 0.5) / 4 + 0.5
    assert next_clip_norm(2.0, 0.625, 0.5, 0.2) == 2.0 * math.exp(-0.2 * 0.125)
    assert next_clip_norm(2.0, 0.5, 0.5, 0.2) == 2.0
    assert noisy_unclipped_fraction(torch.zeros(0, dtype=torch.float64), 1.0, 0.0, 4.0,
                                    gen) == 0.5  # an empty Poisson batch moves nothing


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_adaptive_clip_norm_converges_to_the_target_quantile(gamma: float) -> None:
    """Unit norms ~ lognormal(0, 0.5), B = 200 per step, sigma_b = B / 20 = 10, eta_C = 0.2,
    C_0 = 0.05 (far below). The gamma-quantile is exp(0.5 z_gamma) (1 and 1.898). After
    300 burn-in steps the geometric mean of C over the next 300 is within 3 % of it and
    every C within 15 % (linearised, log C is an AR(1) around log q with stationary std
    ~0.03: eta f(q) ~ 0.08 / 0.035 per step, noise eta sqrt(gamma (1 - gamma) / B + 1/400))."""
    quantile = math.exp(0.5 * NormalDist().inv_cdf(gamma))
    draws = torch.Generator().manual_seed(1)
    count = torch.Generator().manual_seed(2)
    batch = 200
    clip, logs = 0.05, []
    for step in range(600):
        norms = torch.exp(0.5 * torch.randn(batch, generator=draws, dtype=torch.float64))
        b = noisy_unclipped_fraction(norms, clip, default_count_noise(batch), batch, count)
        clip = next_clip_norm(clip, b, gamma, 0.2)
        if step >= 300:
            logs.append(math.log(clip))
    assert math.exp(sum(logs) / len(logs)) == pytest.approx(quantile, rel=0.03)
    assert max(abs(v - math.log(quantile)) for v in logs) < math.log(1.15)


def test_count_noise_stream_differs_from_the_gradient_stream() -> None:
    """The count's generator seed is a function of (noise seed, step) but not the gradient's,
    and stream 0 is the seed the gradient noise always had."""
    assert step_seed(0, 3) == step_seed(0, 3, 0)
    assert step_seed(0, 3, COUNT_STREAM) != step_seed(0, 3)
    assert step_seed(0, 3, COUNT_STREAM) == step_seed(0, 3, COUNT_STREAM)


# --- adaptive clipping: accounting --------------------------------------------------------

def _rdp(event: dpa.DpEvent) -> float:
    acc = RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def _pld(event: dpa.DpEvent) -> float:
    acc = PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                        value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def _pair(grad_sigma: float, count_sigma: float) -> dpa.DpEvent:
    """The two releases of one adaptive step: the sum (multiplier sigma_g) and the centred
    count (sensitivity 1/2, noise sigma_b: multiplier 2 sigma_b)."""
    return dpa.ComposedDpEvent([dpa.GaussianDpEvent(grad_sigma),
                                dpa.GaussianDpEvent(2 * count_sigma)])


@pytest.mark.parametrize("sigma,count", [(1.2, 1.0), (2.0, 5.0), (0.8, 0.45)])
def test_split_sigma_composes_to_the_configured_sigma(sigma: float, count: float) -> None:
    """sigma_g^-2 + (2 sigma_b)^-2 = sigma^-2 (to float rounding), sigma_g > sigma."""
    grad = split_sigma(sigma, count)
    assert grad > sigma
    assert grad ** -2 + (2 * count) ** -2 == pytest.approx(sigma ** -2, rel=1e-13)
    assert split_sigma(0.0, count) == 0.0
    with pytest.raises(ValueError, match="must exceed"):
        split_sigma(sigma, sigma / 2)


def test_adaptive_ledger_epsilon_equals_dp_accounting_of_both_releases() -> None:
    """A 40-step adaptive run's ledger (it records sigma) against dp_accounting composing
    the two releases directly. RDP: T steps of PoissonSampled(q, Composed([G(sigma_g),
    G(2 sigma_b)])) — dp_accounting supports this nesting — equal the ledger's RDP epsilon to
    1e-9 relative (an identity: Gaussian RDP is alpha / (2 s^2), additive in s^-2). PLD does
    not support Poisson over a composed event; at q = 1 the composed pair's PLD equals the
    single G(sigma) PLD to 1e-6 relative (both discretised at 1e-4; measured ~1e-10), and the
    Poisson ledger's PLD epsilon is that of G(sigma) by construction."""
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.3, clipping="adaptive",
                        count_noise=1.0, accountant="rdp", delta=DELTA)
    plan = plan_privacy(cfg, n_units=64, batch_size=16, steps=40)
    assert plan.sigma == 1.3 and plan.count_sigma == 1.0
    assert plan.grad_sigma == pytest.approx((1.3 ** -2 - 2.0 ** -2) ** -0.5, rel=1e-13)
    ledger = Ledger()
    for _ in range(40):
        ledger = ledger.append(plan.entry(cfg))
    pair = _pair(plan.grad_sigma, plan.count_sigma)  # type: ignore[arg-type]
    direct = _rdp(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.25, pair), 40))
    assert spent_epsilon(ledger, cfg) == pytest.approx(direct, rel=1e-9)

    single = _pld(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(1.3), 40))
    assert _pld(dpa.SelfComposedDpEvent(pair, 40)) == pytest.approx(single, rel=1e-6)
    pld_cfg = cfg.model_copy(update={"accountant": "pld"})
    poisson = _pld(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(0.25, dpa.GaussianDpEvent(1.3)), 40))
    assert spent_epsilon(ledger, pld_cfg) == pytest.approx(poisson, rel=1e-9)


def test_adaptive_plan_with_target_epsilon_and_its_refusals() -> None:
    """With a target epsilon the calibrated sigma is split; sigma_b defaults to
    max(B / 20, 1.2 sigma) (at most 10 % more gradient noise); a
    sigma_b too small for the calibrated sigma is refused at planning, naming the settings;
    one too small for a fixed sigma already at config validation."""
    cfg = PrivacyConfig(enabled=True, target_epsilon=2.0, clipping="adaptive")
    plan = plan_privacy(cfg, n_units=200, batch_size=40, steps=20)
    count = max(2.0, 1.2 * plan.sigma)  # 40 / 20, or 1.2 sigma when that is larger
    assert plan.count_sigma == count
    assert plan.grad_sigma ** -2 + (2 * count) ** -2 == pytest.approx(plan.sigma ** -2,
                                                                     rel=1e-12)
    assert plan.grad_sigma <= 1.10004 * plan.sigma  # 1 / sqrt(1 - 1 / 2.4^2)
    assert plan.to_dict(cfg)["grad_sigma"] == plan.grad_sigma
    assert plan.to_dict(cfg)["count_sigma"] == count
    assert plan.to_dict(cfg)["clipping"] == "adaptive"
    small_eps = plan_privacy(PrivacyConfig(enabled=True, target_epsilon=0.5, clipping="adaptive"),
                             n_units=32, batch_size=32, steps=30)  # q = 1: sigma of tens
    assert small_eps.count_sigma == pytest.approx(1.2 * small_eps.sigma)
    assert small_eps.count_sigma > 32 / 20
    assert small_eps.grad_sigma == pytest.approx(small_eps.sigma / (1 - 1 / 2.4 ** 2) ** 0.5)
    tight = PrivacyConfig(enabled=True, target_epsilon=0.5, clipping="adaptive", count_noise=0.3)
    with pytest.raises(ValueError, match=r"privacy\.count_noise.*target_epsilon|"
                                         r"target_epsilon.*privacy\.count_noise"):
        plan_privacy(tight, n_units=200, batch_size=40, steps=20)
    with pytest.raises(ValueError, match=r"privacy\.count_noise"):
        PrivacyConfig(enabled=True, noise_multiplier=1.0, clipping="adaptive", count_noise=0.4)
    with pytest.raises(ValueError, match="finite"):
        PrivacyConfig(enabled=True, noise_multiplier=1.0, clipping="automatic",
                      max_grad_norm=math.inf)
    fixed = plan_privacy(PrivacyConfig(enabled=True, noise_multiplier=1.0), 200, 40, 20)
    assert fixed.gradient_sigma == 1.0 and fixed.count_sigma is None


# --- automatic clipping -------------------------------------------------------------------

def _units(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """8 units over two tensors (3x40 and 17 elements), norms from 1e-30 to 1e30 and 0."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.0, 1e-30, 1e-6, 0.01, 1.0, 3.0, 1e6, 1e30], dtype=torch.float64)
    a = torch.randn(8, 3, 40, generator=gen, dtype=torch.float64)
    b = torch.randn(8, 17, generator=gen, dtype=torch.float64)
    scale = scales / (a.flatten(1).square().sum(1) + b.square().sum(1)).sqrt()
    return {"a": (a * scale.view(-1, 1, 1)).to(dtype), "b": (b * scale.view(-1, 1)).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c,gamma", [(1.0, 0.01), (0.3, 1e-6), (2.5, 0.5)])
def test_automatic_clipping_bounds_every_unit_and_matches_the_formula(
        dtype: torch.dtype, c: float, gamma: float) -> None:
    """Every unit's float64 norm after automatic clipping is <= C (huge, tiny and zero
    units included) and each element equals g C / (||g|| + gamma) to dtype rounding: within
    (m + 2u) of the unit's largest element, u the dtype's unit roundoff and m =
    ``clip_margin`` = 2u + (P + 2) u64 (the float64 factor is capped at C (1 - m) / ||g||,
    binding only when gamma / ||g|| < m, then each element is rounded once)."""
    grads = _units(dtype)
    clipped, norms = clip_automatic(grads, c, gamma)
    after = per_unit_norms(clipped)
    assert bool((after <= c).all()), after.tolist()
    assert torch.equal(norms, per_unit_norms(grads))
    u = torch.finfo(dtype).eps / 2
    m = clip_margin(grads)
    for name, g in grads.items():
        assert clipped[name].dtype == dtype
        want = g.double() * (c / (norms + gamma)).view(-1, *[1] * (g.dim() - 1))
        err = (clipped[name].double() - want).abs().flatten(1).max(1).values
        scale = want.abs().flatten(1).max(1).values
        assert bool((err <= (m + 2 * u) * scale).all()), (name, err.tolist(), scale.tolist())
    assert float(after[0]) == 0.0
    big = after[-1]  # 1e30 / (1e30 + gamma) ~ 1: lands just under C
    assert c * (1 - 2 * m - 2 * u) <= float(big) <= c


def test_automatic_clipping_refuses_bad_settings_and_passes_empty_batches() -> None:
    with pytest.raises(ValueError, match="finite"):
        clip_automatic(_units(torch.float32), math.inf, 0.01)
    with pytest.raises(ValueError, match="gamma"):
        clip_automatic(_units(torch.float32), 1.0, 0.0)
    empty = {"a": torch.zeros(0, 3)}
    clipped, norms = clip_automatic(empty, 1.0, 0.01)
    assert clipped["a"].shape == (0, 3) and norms.shape == (0,)


def test_fixed_rule_is_clip_per_unit_bit_for_bit() -> None:
    grads = _units(torch.float32)
    got, got_norms = CLIPPING["fixed"].clip(grads, 0.7, 0.01)
    want, want_norms = clip_per_unit(grads, 0.7)
    assert torch.equal(got_norms, want_norms)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not CLIPPING["fixed"].adapts and CLIPPING["adaptive"].adapts
    assert CLIPPING["adaptive"].clip is CLIPPING["fixed"].clip
