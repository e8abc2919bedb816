"""Every loss against numbers worked out by hand, and each variant against DPO at its neutral point.

Three pairs, beta = 0.1 unless stated (log-probs are summed over the response tokens):

    pair  policy c   policy r   ref c   ref r   chosen ratio   rejected ratio   margin
    A     -5.0       -7.0       -5.5    -6.5     0.5           -0.5              1.0
    B     -3.0       -2.0       -4.0    -4.5     1.0            2.5             -1.5
    C    -10.0      -12.0      -11.0    -9.0     1.0           -3.0              4.0

Response tokens (chosen, rejected): A (4, 5), B (2, 3), C (8, 6).
Chosen response under the corrupted image (mDPO), policy / ref:
    A -6.0 / -5.8 (ratio -0.2), B -3.5 / -4.0 (ratio 0.5), C -10.5 / -10.0 (ratio -0.5).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from dpalign.losses import (
    LOSSES,
    TIE_RTOL,
    PairLogps,
    cdpo,
    dama,
    dama_alpha_data,
    dama_alpha_model,
    dama_batch_gap,
    dpo,
    hinge,
    ipo,
    mdpo,
    mmdpo,
    reward_ties,
    robust,
    sft_nll,
    token_means,
    update_running_mean,
    with_sft,
)

BETA = 0.1
MARGINS = [1.0, -1.5, 4.0]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), written out."""
    return math.log(1.0 + math.exp(x))


@pytest.fixture
def pairs() -> tuple[PairLogps, PairLogps]:
    policy = PairLogps(t(-5.0, -3.0, -10.0), t(-7.0, -2.0, -12.0), t(4, 2, 8), t(5, 3, 6),
                       t(-6.0, -3.5, -10.5))
    ref = PairLogps(t(-5.5, -4.0, -11.0), t(-6.5, -4.5, -9.0), t(4, 2, 8), t(5, 3, 6),
                    t(-5.8, -4.0, -10.0))
    return policy, ref


def test_dpo_values_and_reward_metrics(pairs):
    out = dpo(*pairs, beta=BETA)
    # -log sigmoid(0.1 * m) = log(1 + exp(-0.1 m))
    expected = [math.log(1 + math.exp(-0.1 * 1.0)), math.log(1 + math.exp(-0.1 * -1.5)),
                math.log(1 + math.exp(-0.1 * 4.0))]
    assert_close(out.per_example, t(*expected))
    assert_close(out.per_example, t(0.6443966600735709, 0.770957047789532, 0.5130152523999526))
    m = out.metrics
    assert_close(m["reward_chosen"], t(0.1 * 0.5, 0.1 * 1.0, 0.1 * 1.0))
    assert_close(m["reward_rejected"], t(0.1 * -0.5, 0.1 * 2.5, 0.1 * -3.0))
    assert_close(m["reward_margin"], t(0.1, -0.15, 0.4))
    assert_close(m["reward_accuracy"], t(1.0, 0.0, 1.0))


def test_rounding_margins_are_ties_and_count_zero() -> None:
    """A tie is |margin| <= TIE_RTOL (1e-5) x the summed |log-probs|; it counts 0 accuracy.

    Pair A: log-probs -20 / -25 / -20 / -25 (policy c, r, ref c, r) -> scale 90, tolerance
    9e-4. Policy chosen moved by +8e-4 (margin 8e-4): a tie; by +1e-3: a win; by -1e-3: a
    loss. Pair B is the policy equal to its reference up to float32 rounding (2 ulps), as a
    second batch layout or another CPU's kernels give it: a tie, not a coin flip."""
    ref = PairLogps(t(-20.0, -20.0, -20.0, -19.190580), t(-25.0, -25.0, -25.0, -23.5),
                    t(4, 4, 4, 4), t(5, 5, 5, 5))
    ulp = 2 * 1.9073486328125e-06  # two float32 ulps at magnitude 16-32
    policy = PairLogps(t(-20.0 + 8e-4, -20.0 + 1e-3, -20.0 - 1e-3, -19.190580 + ulp),
                       t(-25.0, -25.0, -25.0, -23.5 - ulp), t(4, 4, 4, 4), t(5, 5, 5, 5))
    assert reward_ties(policy, ref).tolist() == [True, False, False, True]
    m = dpo(policy, ref, beta=BETA).metrics
    assert_close(m["reward_accuracy"], t(0.0, 1.0, 0.0, 0.0))
    assert_close(m["reward_margin"], t(8e-5, 1e-4, -1e-4, 0.2 * ulp))  # margins stay as is
    assert TIE_RTOL == 1e-5


def test_ipo_values(pairs):
    # (m - 1/(2*0.1))^2 = (m - 5)^2
    expected = t((1.0 - 5) ** 2, (-1.5 - 5) ** 2, (4.0 - 5) ** 2)
    assert_close(ipo(*pairs, beta=BETA).per_example, expected)
    assert_close(ipo(*pairs, beta=BETA).per_example, t(16.0, 42.25, 1.0))


def test_ipo_on_token_means(pairs):
    policy, ref = (token_means(p) for p in pairs)
    # A: (-5/4 + 5.5/4) - (-7/5 + 6.5/5) = 0.125 + 0.1 = 0.225;  B: 0.5 - 2.5/3;  C: 1/8 + 3/6
    margins = [0.5 / 4 - -0.5 / 5, 1.0 / 2 - 2.5 / 3, 1.0 / 8 - -3.0 / 6]
    assert_close(ipo(policy, ref, beta=BETA).per_example, t(*[(m - 5) ** 2 for m in margins]))
    assert_close(policy.chosen_corrupt, t(-6.0 / 4, -3.5 / 2, -10.5 / 8))


def test_hinge_values(pairs):
    assert_close(hinge(*pairs, beta=BETA).per_example, t(1 - 0.1, 1 + 0.15, 1 - 0.4))
    # beta 0.5: max(0, 1 - 0.5 m) -> 0.5, 1.75 and 0 (pair C is past the hinge)
    assert_close(hinge(*pairs, beta=0.5).per_example, t(0.5, 1.75, 0.0))


def test_cdpo_values(pairs):
    eps = 0.2
    expected = [(1 - eps) * math.log(1 + math.exp(-0.1 * m)) + eps * math.log(1 + math.exp(0.1 * m))
                for m in MARGINS]
    assert_close(cdpo(*pairs, beta=BETA, label_smoothing=eps).per_example, t(*expected))
    # pair A by hand: 0.8 * 0.6443967 + 0.2 * 0.7443967
    assert cdpo(*pairs, beta=BETA, label_smoothing=eps).per_example[0].item() == pytest.approx(
        0.8 * 0.6443966600735709 + 0.2 * 0.7443966600735709)


def test_robust_values(pairs):
    e = 0.2
    expected = [(0.8 * math.log(1 + math.exp(-0.1 * m))
                 - 0.2 * math.log(1 + math.exp(0.1 * m))) / 0.6 for m in MARGINS]
    assert_close(robust(*pairs, beta=BETA, flip_rate=e).per_example, t(*expected))
    assert robust(*pairs, beta=BETA, flip_rate=e).per_example[0].item() == pytest.approx(
        (0.8 * 0.6443966600735709 - 0.2 * 0.7443966600735709) / 0.6)


def test_robust_rejects_flip_rate_half(pairs):
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        robust(*pairs, beta=BETA, flip_rate=0.5)


def test_sft_nll_and_mixing(pairs):
    policy, ref = pairs
    assert_close(sft_nll(policy), t(5.0 / 4, 3.0 / 2, 10.0 / 8))
    base = dpo(policy, ref, beta=BETA)
    mixed = with_sft(base, policy, weight=0.5)
    assert_close(mixed.per_example, base.per_example + 0.5 * t(1.25, 1.5, 1.25))
    assert_close(mixed.metrics["sft_nll"], t(1.25, 1.5, 1.25))
    assert_close(mixed.metrics["reward_margin"], base.metrics["reward_margin"])


def test_mdpo_values(pairs):
    out = mdpo(*pairs, beta=BETA)
    # D_img = chosen ratio - corrupt ratio: A 0.5 + 0.2, B 1.0 - 0.5, C 1.0 + 0.5
    # D_anchor = chosen ratio
    d_img, d_anchor = [0.7, 0.5, 1.5], [0.5, 1.0, 1.0]
    expected = [softplus(-0.1 * m) + softplus(-0.1 * di) + softplus(-0.1 * da)
                for m, di, da in zip(MARGINS, d_img, d_anchor, strict=True)]
    assert_close(out.per_example, t(*expected))
    assert out.per_example[0].item() == pytest.approx(
        math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(-0.07))
        + math.log(1 + math.exp(-0.05)))
    assert_close(out.metrics["image_margin"], t(0.07, 0.05, 0.15))
    assert_close(out.metrics["loss_img"], t(*[softplus(-0.1 * d) for d in d_img]))
    assert_close(out.metrics["loss_anchor"], t(*[softplus(-0.1 * d) for d in d_anchor]))


def test_mdpo_anchor_delta_and_switches(pairs):
    # anchor with delta 0.2: -log sigmoid(0.1 * 0.5 - 0.2) for pair A
    only_anchor = mdpo(*pairs, beta=BETA, image_term=False, anchor_delta=0.2)
    assert only_anchor.per_example[0].item() == pytest.approx(
        math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(0.15)))
    assert "loss_img" not in only_anchor.metrics
    only_image = mdpo(*pairs, beta=BETA, anchor_term=False)
    assert only_image.per_example[0].item() == pytest.approx(
        math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(-0.07)))


def test_mdpo_image_term_needs_corrupt(pairs):
    policy, ref = pairs
    bare = PairLogps(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens)
    with pytest.raises(ValueError, match="chosen_corrupt"):
        mdpo(bare, ref, beta=BETA)
    assert_close(mdpo(bare, ref, beta=BETA, image_term=False, anchor_term=False).per_example,
                 dpo(bare, ref, beta=BETA).per_example)


def test_mmdpo_values(pairs):
    out = mmdpo(*pairs, beta=BETA, w=0.5, k=2.0)
    # delta = max(0, 0.1 m): A 0.1, B 0 (negative margin), C 0.4
    beta_a = 0.1 * (1 + 0.5 * (1 - math.exp(-2.0 * 0.1)))
    beta_b = 0.1 * (1 + 0.5 * (1 - math.exp(-2.0 * 0.0)))  # = 0.1
    beta_c = 0.1 * (1 + 0.5 * (1 - math.exp(-2.0 * 0.4)))
    assert_close(out.metrics["beta_i"], t(beta_a, beta_b, beta_c))
    expected = [math.log(1 + math.exp(-beta_a * 1.0)), math.log(1 + math.exp(-0.1 * -1.5)),
                math.log(1 + math.exp(-beta_c * 4.0))]
    assert_close(out.per_example, t(*expected))
    assert beta_a == pytest.approx(0.10906346234610092)


def test_mmdpo_beta_stays_in_bounds():
    margins = t(-50.0, -1.0, 0.0, 0.3, 5.0, 1e4)
    zeros = torch.zeros_like(margins)
    policy = PairLogps(margins, zeros, zeros + 1, zeros + 1)
    ref = PairLogps(zeros, zeros, zeros + 1, zeros + 1)
    beta_i = mmdpo(policy, ref, beta=0.2, w=0.5, k=1.0).metrics["beta_i"]
    assert torch.all(beta_i >= 0.2) and torch.all(beta_i <= 0.2 * 1.5)
    assert beta_i[0].item() == 0.2 and beta_i[-1].item() == pytest.approx(0.3)


def test_dama_values(pairs):
    hardness = t(0.2, 0.9, 0.5)
    out = dama(*pairs, beta=BETA, hardness=hardness, alpha_model=1.2)
    # alpha_data = sigmoid(1 - h) / sigmoid(1 - 0.5) = (1 + e^-0.5) / (1 + e^-(1-h))
    alpha_data = [(1 + math.exp(-0.5)) / (1 + math.exp(-0.8)),
                  (1 + math.exp(-0.5)) / (1 + math.exp(-0.1)), 1.0]
    beta_i = [0.1 * a * 1.2 for a in alpha_data]
    assert_close(out.metrics["alpha_data"], t(*alpha_data))
    assert_close(out.metrics["beta_i"], t(*beta_i))
    expected = [math.log(1 + math.exp(-b * m)) for b, m in zip(beta_i, MARGINS, strict=True)]
    assert_close(out.per_example, t(*expected))
    assert alpha_data[0] == pytest.approx(1.1084652, rel=1e-6)  # easier than average: beta up


def test_dama_data_scale_and_clamp(pairs):
    alpha = dama_alpha_data(t(0.0, 1.0), hardness_mean=0.25, data_scale=3.0)
    # sigmoid(3 (1 - h)) / sigmoid(3 * 0.75)
    assert_close(alpha, t((1 + math.exp(-2.25)) / (1 + math.exp(-3.0)),
                          (1 + math.exp(-2.25)) / (1 + math.exp(0.0))))
    tiny = dama(*pairs, beta=0.001, hardness=t(0.9, 0.9, 0.9), alpha_model=0.5)
    assert_close(tiny.metrics["beta_i"], t(1e-3, 1e-3, 1e-3))
    assert_close(tiny.per_example, t(*[math.log(1 + math.exp(-1e-3 * m)) for m in MARGINS]))


def test_dama_model_state_helpers(pairs):
    assert dama_batch_gap(*pairs).item() == pytest.approx((1.0 - 1.5 + 4.0) / 3)
    assert dama_alpha_model(1.0, 0.5).item() == pytest.approx(
        (1 + math.exp(-0.5)) / (1 + math.exp(-1.0)), rel=1e-6)
    assert dama_alpha_model(torch.tensor(0.7), None).item() == pytest.approx(
        (1 / (1 + math.exp(-0.7))) / 0.5, rel=1e-6)
    assert dama_alpha_model(0.3, 0.3).item() == pytest.approx(1.0)
    assert update_running_mean(None, 2.0) == pytest.approx(0.2)  # starts from 0
    assert update_running_mean(0.2, torch.tensor(1.0), momentum=0.9) == pytest.approx(0.28)
    assert update_running_mean(0.2, 1.0, momentum=0.5) == pytest.approx(0.6)


@pytest.mark.parametrize(("name", "params", "extra"), [
    ("robust", {"flip_rate": 0.0}, {}),
    ("cdpo", {"label_smoothing": 0.0}, {}),
    ("mdpo", {"image_term": False, "anchor_term": False}, {}),
    ("mmdpo", {"w": 0.0}, {}),
    ("dama", {}, {"hardness": t(0.5, 0.5, 0.5), "alpha_model": 1.0}),
    ("dama", {"hardness_mean": 0.3}, {"hardness": t(0.3, 0.3, 0.3),
                                      "alpha_model": dama_alpha_model(0.4, 0.4)}),
])
def test_variants_equal_dpo_at_their_neutral_point(pairs, name, params, extra):
    out = LOSSES[name].fn(*pairs, beta=BETA, **params, **extra)
    assert_close(out.per_example, dpo(*pairs, beta=BETA).per_example, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_reports_reward_metrics_detached_per_pair(pairs, name):
    policy, ref = pairs
    policy = PairLogps(policy.chosen.requires_grad_(), policy.rejected.requires_grad_(),
                       policy.chosen_tokens, policy.rejected_tokens,
                       policy.chosen_corrupt.requires_grad_())
    out = LOSSES[name].call(policy, ref, beta=BETA, hardness=t(0.2, 0.9, 0.5), alpha_model=1.1)
    assert out.per_example.shape == (3,) and out.per_example.requires_grad
    required = {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"}
    assert required <= set(out.metrics)
    for key, value in out.metrics.items():
        assert value.shape == (3,), key
        assert not value.requires_grad, key


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_works_for_one_pair(pairs, name):
    one = [p.index(slice(0, 1)) for p in pairs]
    out = LOSSES[name].call(*one, beta=BETA, hardness=t(0.2), alpha_model=1.0)
    full = LOSSES[name].call(*pairs, beta=BETA, hardness=t(0.2, 0.9, 0.5), alpha_model=1.0)
    assert out.per_example.shape == (1,)
    assert_close(out.per_example, full.per_example[:1])
