"""Peer check: our losses against TRL's own DPO loss code on the same random log-probs.

TRL 1.16 has no standalone loss function: the loss is computed inside
``DPOTrainer._compute_loss(model, inputs, return_outputs)``, which runs the model, sums the
per-token log-probs it returns, takes the reference log-probs from the batch
(``precompute_ref_logps``), and then applies the configured ``loss_type``. Building a real
trainer needs a model, a tokenizer and a dataset, so we make an empty instance with
``object.__new__(DPOTrainer)`` and set only the attributes ``_compute_loss`` reads (listed in
``bare_trainer``). The "model" is a stub returning fixed per-token log-probs whose sum over
the completion tokens is the sequence log-prob we want, so TRL's own code does the summing,
the ratios and the loss.

``_compute_loss`` returns the batch mean, so per-pair values are checked one pair at a time
(B = 1) and the batch mean on a whole batch. cDPO has no loss_type of its own in TRL 1.16
(``sigmoid`` no longer smooths labels); ``aot`` is label-smoothed DPO on batch-sorted
log-ratios, which for a single pair is exactly cDPO, so cDPO is checked against ``aot`` at B = 1.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from dpalign.losses import (
    PairLogps,
    apo_down,
    apo_zero,
    bco_pair,
    cdpo,
    discopop,
    dpo,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    robust,
    sft_nll,
    sppo_hard,
    token_means,
)

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

BETA = 0.1
DISCOPOP_TAU = 0.05


class StubModel:
    """Stands in for a model with TRL's fused LM head: returns per-token log-probs (2B, T)."""

    training = True

    def __init__(self, per_token_logps: torch.Tensor):
        self.per_token_logps = per_token_logps

    def __call__(self, **_: object) -> SimpleNamespace:
        shape = self.per_token_logps.shape
        return SimpleNamespace(log_probs=self.per_token_logps, entropy=torch.zeros(shape),
                               mean_logits=torch.zeros(shape),
                               is_top1=torch.zeros(shape, dtype=torch.bool))


def bare_trainer(loss_type: str, label_smoothing: float = 0.0) -> trl_dpo.DPOTrainer:
    trainer = object.__new__(trl_dpo.DPOTrainer)
    trainer.beta = BETA
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.label_smoothing = label_smoothing
    trainer.args = SimpleNamespace(discopop_tau=DISCOPOP_TAU)  # discopop's temperature
    trainer.f_divergence_type = "reverse_kl"  # plain DPO log-ratios
    trainer.precompute_ref_logps = True  # reference log-probs come from the batch
    trainer.ld_alpha = None  # no length desensitisation
    trainer.use_weighting = False  # no WPO weights
    trainer.aux_loss_enabled = False  # no MoE router loss
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"),
                                          gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    return trainer


def trl_loss(loss_type: str, policy: PairLogps, ref: PairLogps,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """TRL's batch-mean loss for these log-probs; differentiable w.r.t. ``policy``."""
    n = torch.cat([policy.chosen_tokens, policy.rejected_tokens]).long()  # (2B,)
    width = int(n.max())
    position = torch.arange(width).expand(len(n), width)
    in_completion = (position < n[:, None]).double()  # (2B, T): completion tokens first
    seq = torch.cat([policy.chosen, policy.rejected])  # (2B,)
    per_token = in_completion * (seq / n)[:, None]  # spread evenly: sums back to seq
    # completion_mask covers [prompt token, completion tokens]; TRL shifts it by one position.
    completion_mask = torch.cat([torch.zeros(len(n), 1), in_completion], dim=1).long()
    inputs = {"input_ids": torch.zeros_like(completion_mask),
              "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref.chosen, "ref_rejected_logps": ref.rejected}
    trainer = bare_trainer(loss_type, label_smoothing)
    model = StubModel(per_token)
    trainer.model = model
    return trainer._compute_loss(model, inputs, return_outputs=False)


def random_pairs(batch: int, seed: int) -> tuple[PairLogps, PairLogps]:
    g = torch.Generator().manual_seed(seed)
    tokens_c = torch.randint(1, 12, (batch,), generator=g).double()
    tokens_r = torch.randint(1, 12, (batch,), generator=g).double()

    def logps(scale: float) -> torch.Tensor:
        return -(torch.rand(batch, generator=g, dtype=torch.float64) * scale + 0.5) * tokens_c

    policy = PairLogps(logps(3.0), logps(3.0) * tokens_r / tokens_c, tokens_c, tokens_r)
    ref = PairLogps(logps(3.0), logps(3.0) * tokens_r / tokens_c, tokens_c, tokens_r)
    return policy, ref


def per_pair_trl(loss_type: str, policy: PairLogps, ref: PairLogps,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    rows = [trl_loss(loss_type, policy.index(slice(i, i + 1)), ref.index(slice(i, i + 1)),
                     label_smoothing) for i in range(len(policy.chosen))]
    return torch.stack(rows)


CASES = [
    ("sigmoid", 0.0, lambda p, r: dpo(p, r, beta=BETA)),
    ("hinge", 0.0, lambda p, r: hinge(p, r, beta=BETA)),
    # TRL's IPO divides each log-ratio by its completion length; ours takes per-token means.
    ("ipo", 0.0, lambda p, r: ipo(token_means(p), token_means(r), beta=BETA)),
    ("robust", 0.2, lambda p, r: robust(p, r, beta=BETA, flip_rate=0.2)),
    ("aot", 0.15, lambda p, r: cdpo(p, r, beta=BETA, label_smoothing=0.15)),
    ("apo_zero", 0.0, lambda p, r: apo_zero(p, r, beta=BETA)),
    ("apo_down", 0.0, lambda p, r: apo_down(p, r, beta=BETA)),
    ("bco_pair", 0.0, lambda p, r: bco_pair(p, r, beta=BETA)),
    ("nca_pair", 0.0, lambda p, r: nca_pair(p, r, beta=BETA)),
    ("sppo_hard", 0.0, lambda p, r: sppo_hard(p, r, beta=BETA)),
    # TRL's EXO takes its target weight eps from label_smoothing
    ("exo_pair", 1e-3, lambda p, r: exo_pair(p, r, beta=BETA, epsilon=1e-3)),
    ("discopop", 0.0, lambda p, r: discopop(p, r, beta=BETA, tau=DISCOPOP_TAU)),
]


# TRL builds EXO's eps as ``torch.tensor(label_smoothing)``, a float32 scalar, so its
# log(eps) and log(1 - eps) carry float32 rounding (~3e-8 relative on these losses).
RTOL = {"exo_pair": 1e-7}


@pytest.mark.parametrize(("loss_type", "smoothing", "ours"), CASES, ids=[c[0] for c in CASES])
def test_per_pair_values_match_trl(loss_type, smoothing, ours):
    policy, ref = random_pairs(6, seed=11)
    expected = per_pair_trl(loss_type, policy, ref, smoothing)
    assert_close(ours(policy, ref).per_example, expected, rtol=RTOL.get(loss_type, 1e-10),
                 atol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "apo_zero",
                                       "apo_down", "bco_pair", "nca_pair", "sppo_hard",
                                       "exo_pair", "discopop"])
def test_batch_mean_matches_trl(loss_type):
    ours = {c[0]: c for c in CASES}[loss_type]
    policy, ref = random_pairs(8, seed=5)
    expected = trl_loss(loss_type, policy, ref, ours[1])
    assert_close(ours[2](policy, ref).per_example.mean(), expected,
                 rtol=RTOL.get(loss_type, 1e-10), atol=1e-12)


def test_dpo_gradient_matches_trl():
    policy, ref = random_pairs(5, seed=2)
    leaves = [policy.chosen.clone().requires_grad_(), policy.rejected.clone().requires_grad_()]
    ours_p = PairLogps(leaves[0], leaves[1], policy.chosen_tokens, policy.rejected_tokens)
    ours_grad = torch.autograd.grad(dpo(ours_p, ref, beta=BETA).per_example.mean(), leaves)
    trl_leaves = [policy.chosen.clone().requires_grad_(), policy.rejected.clone().requires_grad_()]
    trl_p = PairLogps(trl_leaves[0], trl_leaves[1], policy.chosen_tokens, policy.rejected_tokens)
    trl_grad = torch.autograd.grad(trl_loss("sigmoid", trl_p, ref), trl_leaves)
    for mine, theirs in zip(ours_grad, trl_grad, strict=True):
        assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_sft_nll_matches_trl_sft_for_one_pair():
    policy, ref = random_pairs(4, seed=9)
    expected = per_pair_trl("sft", policy, ref)
    assert_close(sft_nll(policy), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["apo_zero", "apo_down", "bco_pair", "nca_pair",
                                       "sppo_hard", "exo_pair", "discopop"])
def test_peer_loss_gradients_match_trl(loss_type):
    """d(batch mean) / d(policy log-probs) of the peers' loss heads equals TRL's autograd."""
    smoothing, ours = next((c[1], c[2]) for c in CASES if c[0] == loss_type)
    policy, ref = random_pairs(5, seed=4)

    def grads(loss_fn):
        leaves = [policy.chosen.clone().requires_grad_(),
                  policy.rejected.clone().requires_grad_()]
        p = PairLogps(leaves[0], leaves[1], policy.chosen_tokens, policy.rejected_tokens)
        return torch.autograd.grad(loss_fn(p), leaves)

    mine = grads(lambda p: ours(p, ref).per_example.mean())
    theirs = grads(lambda p: trl_loss(loss_type, p, ref, smoothing))
    for a, b in zip(mine, theirs, strict=True):
        assert_close(a, b, rtol=RTOL.get(loss_type, 1e-10), atol=1e-12)
