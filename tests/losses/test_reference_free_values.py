"""SimPO and ORPO against numbers worked out by hand; their log1mexp at its extremes.

The pairs of ``test_values.py`` (beta = 0.1), by per-token mean log-prob m = sum / tokens:

    pair  chosen      m_w      rejected    m_l      m_w - m_l
    A     -5.0 / 4    -1.25    -7.0 / 5    -1.4      0.15
    B     -3.0 / 2    -1.5     -2.0 / 3    -2/3     -5/6
    C    -10.0 / 8    -1.25   -12.0 / 6    -2.0      0.75

SimPO (gamma 0.5): L = -log sigmoid(0.1 (m_w - m_l) - 0.5) = softplus(0.5 - 0.1 (m_w - m_l)):
    A softplus(0.485), B softplus(0.5 + 1/12), C softplus(0.425).
ORPO: log odds(m) = m - log(1 - e^m); L = -m_w + 0.1 softplus(-(log odds_w - log odds_l)).
The reference log-probs of the fixture are ignored (a different ``ref`` changes nothing).
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch
from torch.testing import assert_close

from dpalign.losses import LOSSES, PairLogps, log1mexp, orpo, simpo, with_sft
from dpalign.losses.config import LossConfig
from dpalign.losses.objective import Objective

BETA = 0.1
M_W = [-1.25, -1.5, -1.25]
M_L = [-1.4, -2.0 / 3.0, -2.0]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def log_odds(m: float) -> float:
    return m - math.log(1.0 - math.exp(m))


@pytest.fixture
def policy() -> PairLogps:
    return PairLogps(t(-5.0, -3.0, -10.0), t(-7.0, -2.0, -12.0), t(4, 2, 8), t(5, 3, 6))


@pytest.fixture
def ref() -> PairLogps:
    return PairLogps(t(-5.5, -4.0, -11.0), t(-6.5, -4.5, -9.0), t(4, 2, 8), t(5, 3, 6))


def test_simpo_values(policy, ref):
    out = simpo(policy, ref, beta=BETA)
    assert_close(out.per_example, t(softplus(0.485), softplus(0.5 + 1 / 12), softplus(0.425)))
    # pair A: log(1 + e^0.485) = 0.96476656...
    assert out.per_example[0].item() == pytest.approx(0.96476656, abs=1e-8)
    gamma2 = simpo(policy, ref, beta=BETA, gamma=2.0).per_example
    assert_close(gamma2, t(*[softplus(2.0 - 0.1 * (w - r))
                             for w, r in zip(M_W, M_L, strict=True)]))


def test_simpo_label_smoothing(policy, ref):
    out = simpo(policy, ref, beta=BETA, label_smoothing=0.2).per_example
    h = [0.1 * (w - r) - 0.5 for w, r in zip(M_W, M_L, strict=True)]
    assert_close(out, t(*[0.8 * softplus(-x) + 0.2 * softplus(x) for x in h]))


def test_simpo_rewards_are_beta_times_mean_log_probs(policy, ref):
    m = simpo(policy, ref, beta=BETA).metrics
    assert_close(m["reward_chosen"], t(-0.125, -0.15, -0.125))
    assert_close(m["reward_rejected"], t(-0.14, -0.2 / 3, -0.2))
    assert_close(m["reward_margin"], t(0.015, -1 / 12, 0.075))
    assert_close(m["reward_accuracy"], t(1.0, 0.0, 1.0))


def test_orpo_values_and_metrics(policy, ref):
    out = orpo(policy, ref, beta=BETA)
    ratios = [log_odds(w) - log_odds(r) for w, r in zip(M_W, M_L, strict=True)]
    assert_close(out.per_example,
                 t(*[-w + 0.1 * softplus(-x) for w, x in zip(M_W, ratios, strict=True)]))
    # pair A: log odds(-1.25) = -1.25 - log(1 - e^-1.25) = -0.91242043...,
    #         log odds(-1.4) = -1.4 - log(1 - e^-1.4) = -1.11684505...
    assert ratios[0] == pytest.approx(-0.91242043 + 1.11684505, abs=1e-8)
    assert_close(out.metrics["log_odds_ratio"], t(*ratios))
    assert_close(out.metrics["nll_chosen"], t(1.25, 1.5, 1.25))
    assert_close(out.metrics["reward_chosen"], t(-0.125, -0.15, -0.125))
    assert_close(out.metrics["reward_accuracy"], t(1.0, 0.0, 1.0))


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_is_ignored(policy, ref, name):
    fn = LOSSES[name].fn
    a, b = fn(policy, ref, beta=BETA), fn(policy, PairLogps(*(torch.zeros(3),) * 2,
                                                             policy.chosen_tokens,
                                                             policy.rejected_tokens), beta=BETA)
    assert_close(a.per_example, b.per_example, rtol=0, atol=0)
    for key in a.metrics:
        assert_close(a.metrics[key], b.metrics[key], rtol=0, atol=0)


def test_equal_means_tie_at_the_closed_forms():
    """Chosen -3 over 3 tokens, rejected -5 over 5 (both mean -1), and both mean -log 2
    (P(y) = 1/2, odds 1): margin 0, accuracy 0 (a tie), SimPO softplus(gamma), ORPO
    -m_w + beta log 2."""
    half = -math.log(2.0)
    policy = PairLogps(t(-3.0, 3 * half), t(-5.0, 7 * half), t(3, 3), t(5, 7))
    s, o = simpo(policy, policy, beta=BETA), orpo(policy, policy, beta=BETA)
    assert_close(s.per_example, t(softplus(0.5), softplus(0.5)))
    assert_close(o.per_example, t(1.0 + 0.1 * math.log(2.0), math.log(2.0) * 1.1))
    for out in (s, o):
        assert_close(out.metrics["reward_margin"], t(0.0, 0.0), rtol=0, atol=1e-15)
        assert_close(out.metrics["reward_accuracy"], t(0.0, 0.0), rtol=0, atol=0)


def test_rounding_gap_in_means_is_a_tie():
    """A mean log-prob gap at float32 rounding (same response scored in two layouts) is no
    win; a real gap is."""
    m = torch.tensor([-1.3, -1.3, -1.3])
    chosen = m * 4
    rejected = torch.stack([m[0] * 1.0000001, m[1], m[2] * 0.99]) * 4
    policy = PairLogps(chosen, rejected, torch.full((3,), 4.0), torch.full((3,), 4.0))
    for fn in (simpo, orpo):
        assert fn(policy, policy, beta=BETA).metrics["reward_accuracy"].tolist() == [0, 0, 0]
    flipped = PairLogps(rejected, chosen, policy.chosen_tokens, policy.rejected_tokens)
    for fn in (simpo, orpo):
        assert fn(flipped, flipped, beta=BETA).metrics["reward_accuracy"].tolist() == [0, 0, 1]


def test_objective_applies_them_to_summed_log_probs_with_an_sft_term(policy, ref):
    objective = Objective.from_config(LossConfig(name="simpo", sft_weight=0.5))
    expected = with_sft(simpo(policy, ref, beta=0.1), policy, 0.5)
    assert_close(objective(policy, ref).per_example, expected.per_example)
    assert_close(objective(policy, ref).per_example,
                 simpo(policy, ref, beta=0.1).per_example + 0.5 * t(1.25, 1.5, 1.25))
    orpo_objective = Objective.from_config(LossConfig(name="orpo", beta=0.3))
    assert_close(orpo_objective(policy, ref).per_example,
                 orpo(policy, ref, beta=0.3).per_example)


def test_log1mexp_is_accurate_at_both_ends():
    """Against 40-digit decimal arithmetic, on both sides of the branch at -log 2."""
    x = t(-2e-6, -1e-5, -0.5, -math.log(2.0), -0.7, -5.0, -50.0)
    with localcontext() as ctx:
        ctx.prec = 40
        expected = t(*[float((1 - Decimal(v).exp()).ln()) for v in x.tolist()])
    assert_close(log1mexp(x), expected, rtol=4e-16, atol=0)
    # far from 0, log(1 - e^x) ~ -e^x: a naive log(1 - exp(x)) gives 0 here
    assert log1mexp(t(-50.0)).item() == pytest.approx(-math.exp(-50.0), rel=1e-12)
    assert torch.autograd.gradcheck(log1mexp, (t(-1e-3, -0.6, -0.8, -4.0).requires_grad_(),))


def test_log1mexp_clamps_at_zero_with_finite_gradients():
    """A response scored with probability 1 (mean log-prob 0, or a rounding step above):
    read as the ceiling -1e-6, so ORPO's loss and gradient stay finite."""
    x = t(0.0, 1e-9, -1e-6).requires_grad_()
    y = log1mexp(x)
    assert_close(y.detach(), torch.full((3,), math.log(-math.expm1(-1e-6)), dtype=torch.float64))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()
    chosen = t(0.0, -2.0).requires_grad_()
    rejected = t(-3.0, 0.0).requires_grad_()
    two = t(2, 2)
    out = orpo(PairLogps(chosen, rejected, two, two), PairLogps(chosen, rejected, two, two),
               beta=BETA).per_example
    grads = torch.autograd.grad(out.sum(), (chosen, rejected))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
