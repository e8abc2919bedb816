"""Peer check: SimPO and ORPO against TRL 1.16's own trainers on the same random log-probs.

TRL 1.16 has SimPO as ``loss_type="simpo"`` of ``trl.experimental.cpo.CPOTrainer`` and ORPO
as ``trl.experimental.orpo.ORPOTrainer``. Neither has a standalone loss function: their
``compute_loss`` runs the model on a tokenized batch (``concatenated_forward``), averages
the per-token log-probs of the completion from the logits (``get_batch_logps``) and takes
the NLL of the chosen rows by cross-entropy on those logits, then applies the loss
(``cpo_loss`` / ``odds_ratio_loss``). So, as in ``test_trl_peer.py``, each trainer is an
empty instance (``object.__new__``) with only the attributes ``compute_loss`` reads, and
the "model" is a stub returning logits over a two-token vocabulary whose log-softmax at
each completion position is the per-token log-prob we want (a pair's summed log-prob spread
evenly over its tokens). TRL's own code then does the averaging, the NLL, the odds and the
loss, and autograd flows from its loss back to our log-probs.

Each row is one prompt token followed by the completion, so TRL's shift drops the prompt
token from every target: ORPO's NLL (which TRL takes over prompt and completion tokens) is
the chosen completion's NLL, as in the ORPO paper and in ``orpo`` here. TRL averages that
NLL over all chosen tokens of the batch at once; ``orpo`` takes it per pair (the DP step
needs one loss per pair), so batch means are compared on batches whose chosen responses
share one length, where the two are equal.

Tolerances: SimPO runs in float64 throughout and matches to 1e-12 (measured: <= 4.4e-16 on
values, 1.7e-18 on gradients). ORPO's ``odds_ratio_loss`` casts the mean log-probs to
float32 first (``.float()``), so its odds-ratio term carries float32 rounding (beta times a
few float32 ulps of log-odds of size ~1): measured 1.9e-8 on per-pair values, 7e-10 on the
batch mean and 9e-10 on gradients; checked with atol 1e-7 (values) and 1e-8 (gradients).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from dpalign.losses import PairLogps, get_loss, orpo, simpo, with_sft
from dpalign.losses.config import LossConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_cpo = pytest.importorskip("trl.experimental.cpo")
trl_orpo = pytest.importorskip("trl.experimental.orpo")

BETA = 0.1
GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma default
ORPO_ATOL = {"values": 1e-7, "grads": 1e-8}


class StubModel:
    """Stands in for a causal LM over a vocabulary {0, 1}: the completion tokens are all 0, and
    the logits at the position before each one are (0, o) with o = log(expm1(-lp)), so that
    log softmax picks log p(0) = -log(1 + e^o) = lp, that row's per-token log-prob."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        assert input_ids.shape == self.logits.shape[:2]
        return SimpleNamespace(logits=self.logits)


def trl_batch(policy: PairLogps) -> tuple[dict[str, torch.Tensor], StubModel]:
    """Tokenized batch (chosen_*/rejected_* input ids, attention masks, labels) and the stub
    model for these summed log-probs."""
    n = torch.cat([policy.chosen_tokens, policy.rejected_tokens]).long()  # (2B,)
    width = int(n.max()) + 1  # one prompt token, then the completion
    position = torch.arange(width).expand(len(n), width)
    attention = (position <= n[:, None]).long()  # prompt + completion, then padding
    labels = torch.where((position >= 1) & (attention == 1), 0, -100)  # completion only
    per_token = torch.cat([policy.chosen, policy.rejected]) / n  # (2B,), sums back to seq
    other = torch.log(torch.expm1(-per_token))  # the logit of token 1
    predicts = (position < n[:, None])[..., None]  # positions 0..n-1 predict the completion
    logits = torch.where(predicts, torch.stack([torch.zeros_like(other), other], -1)[:, None],
                         torch.zeros(()).double())  # (2B, T, 2)
    ids = torch.zeros_like(attention)
    b = len(policy.chosen)
    batch = {}
    for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
        batch |= {f"{side}_input_ids": ids[rows], f"{side}_attention_mask": attention[rows],
                  f"{side}_labels": labels[rows]}
    return batch, StubModel(logits)


def bare(trainer_cls: type, **attrs: object) -> object:
    trainer = object.__new__(trainer_cls)
    trainer.is_encoder_decoder = False
    trainer.aux_loss_enabled = False  # no MoE router loss
    trainer._peft_has_been_casted_to_bf16 = False
    trainer._stored_metrics = defaultdict(lambda: defaultdict(list))
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"),
                                          gather_for_metrics=lambda x: x)
    trainer.args = SimpleNamespace(device=torch.device("cpu"))
    for key, value in attrs.items():
        setattr(trainer, key, value)
    return trainer


def trl_simpo(policy: PairLogps, gamma: float = GAMMA, label_smoothing: float = 0.0,
              cpo_alpha: float = 0.0) -> torch.Tensor:
    """CPOTrainer(loss_type="simpo").compute_loss: the batch-mean loss, plus cpo_alpha times
    the chosen completions' NLL (TRL's default cpo_alpha is 1; SimPO itself has none)."""
    trainer = bare(trl_cpo.CPOTrainer, beta=BETA, loss_type="simpo", simpo_gamma=gamma,
                   label_smoothing=label_smoothing, cpo_alpha=cpo_alpha, alpha=0.0,
                   pad_token_id=0)
    batch, model = trl_batch(policy)
    return trainer.compute_loss(model, batch)


def trl_orpo_loss(policy: PairLogps) -> torch.Tensor:
    """ORPOTrainer.compute_loss: chosen NLL minus beta * mean log sigmoid(log odds ratio)."""
    trainer = bare(trl_orpo.ORPOTrainer, beta=BETA, padding_value=0)
    batch, model = trl_batch(policy)
    return trainer.compute_loss(model, batch)


def random_policy(batch: int, seed: int, same_chosen_length: bool = False) -> PairLogps:
    """Summed log-probs with per-token means in [-3.5, -0.5] and 1..11 tokens, float64."""
    g = torch.Generator().manual_seed(seed)
    tokens_c = torch.randint(1, 12, (batch,), generator=g).double()
    if same_chosen_length:
        tokens_c = tokens_c[:1].expand(batch).clone()
    tokens_r = torch.randint(1, 12, (batch,), generator=g).double()

    def means() -> torch.Tensor:
        return -(torch.rand(batch, generator=g, dtype=torch.float64) * 3.0 + 0.5)

    return PairLogps(means() * tokens_c, means() * tokens_r, tokens_c, tokens_r)


def unrelated_ref(policy: PairLogps) -> PairLogps:
    """Any reference: the losses must ignore it (TRL's trainers take none)."""
    return PairLogps(policy.chosen * 0.7 - 1.0, policy.rejected * 1.3 + 2.0,
                     policy.chosen_tokens, policy.rejected_tokens)


def per_pair(trl_fn, policy: PairLogps, **kw: float) -> torch.Tensor:
    return torch.stack([trl_fn(policy.index(slice(i, i + 1)), **kw)
                        for i in range(len(policy.chosen))])


def test_defaults_are_trls():
    """SimPO's gamma and label smoothing, and beta (lambda for ORPO), default as in TRL."""
    cpo_fields = trl_cpo.CPOConfig.__dataclass_fields__
    orpo_fields = trl_orpo.ORPOConfig.__dataclass_fields__
    params = get_loss("simpo").make_params()
    assert params.gamma == cpo_fields["simpo_gamma"].default == GAMMA
    assert params.label_smoothing == cpo_fields["label_smoothing"].default == 0.0
    assert LossConfig().beta == cpo_fields["beta"].default == orpo_fields["beta"].default
    assert get_loss("orpo").make_params().model_dump() == {}


def test_stub_gives_the_wanted_log_probs_through_trl():
    """TRL's get_batch_logps on the stub's logits: summed and per-token means as intended."""
    policy = random_policy(5, seed=1)
    batch, model = trl_batch(policy)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    summed = trl_orpo.ORPOTrainer.get_batch_logps(model.logits, labels)
    mean = trl_orpo.ORPOTrainer.get_batch_logps(model.logits, labels, average_log_prob=True)
    assert_close(summed, torch.cat([policy.chosen, policy.rejected]), rtol=1e-12, atol=1e-12)
    assert_close(mean, torch.cat([policy.chosen / policy.chosen_tokens,
                                  policy.rejected / policy.rejected_tokens]),
                 rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("gamma", "smoothing"), [(GAMMA, 0.0), (1.2, 0.0), (GAMMA, 0.2)])
def test_simpo_per_pair_and_batch_mean_match_trl(gamma, smoothing):
    policy = random_policy(6, seed=11)
    ours = simpo(policy, unrelated_ref(policy), beta=BETA, gamma=gamma,
                 label_smoothing=smoothing).per_example
    assert_close(ours, per_pair(trl_simpo, policy, gamma=gamma, label_smoothing=smoothing),
                 rtol=1e-12, atol=1e-12)
    assert_close(ours.mean(), trl_simpo(policy, gamma=gamma, label_smoothing=smoothing),
                 rtol=1e-12, atol=1e-12)


def test_simpo_with_sft_is_trl_cpo_simpo_for_one_pair():
    """TRL's default cpo_alpha = 1 adds the chosen completion's NLL: ``with_sft`` weight 1."""
    policy = random_policy(4, seed=3)
    ours = with_sft(simpo(policy, policy, beta=BETA), policy, 1.0).per_example
    assert_close(ours, per_pair(trl_simpo, policy, cpo_alpha=1.0), rtol=1e-12, atol=1e-12)


def test_orpo_per_pair_matches_trl():
    policy = random_policy(6, seed=12)
    ours = orpo(policy, unrelated_ref(policy), beta=BETA).per_example
    assert_close(ours, per_pair(trl_orpo_loss, policy), rtol=0, atol=ORPO_ATOL["values"])


def test_orpo_batch_mean_matches_trl_when_chosen_lengths_agree():
    policy = random_policy(8, seed=5, same_chosen_length=True)
    ours = orpo(policy, policy, beta=BETA).per_example.mean()
    assert_close(ours, trl_orpo_loss(policy), rtol=0, atol=ORPO_ATOL["values"])


def test_orpo_metrics_match_trl_logs():
    """TRL logs rewards/chosen = beta * mean log-prob, and log_odds_chosen = the mean log odds
    ratio; ``orpo`` reports the same per pair."""
    policy = random_policy(6, seed=8, same_chosen_length=True)
    trainer = bare(trl_orpo.ORPOTrainer, beta=BETA, padding_value=0)
    batch, model = trl_batch(policy)
    _, logged = trainer.get_batch_loss_metrics(model, batch)
    out = orpo(policy, policy, beta=BETA).metrics
    for ours, theirs in (("reward_chosen", "rewards/chosen"),
                         ("reward_rejected", "rewards/rejected"),
                         ("reward_margin", "rewards/margins"),
                         ("reward_accuracy", "rewards/accuracies"),
                         ("log_odds_ratio", "log_odds_chosen"), ("nll_chosen", "nll_loss")):
        assert out[ours].mean().item() == pytest.approx(logged[theirs], abs=1e-6), ours


def gradients(loss_fn, policy: PairLogps) -> tuple[torch.Tensor, ...]:
    """d loss / d (summed chosen, rejected log-probs)."""
    leaves = [policy.chosen.clone().requires_grad_(), policy.rejected.clone().requires_grad_()]
    p = PairLogps(leaves[0], leaves[1], policy.chosen_tokens, policy.rejected_tokens)
    return torch.autograd.grad(loss_fn(p), leaves)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_gradients_match_trl(smoothing):
    policy = random_policy(5, seed=4)
    mine = gradients(lambda p: simpo(p, p, beta=BETA, label_smoothing=smoothing)
                     .per_example.mean(), policy)
    theirs = gradients(lambda p: trl_simpo(p, label_smoothing=smoothing), policy)
    for a, b in zip(mine, theirs, strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_orpo_gradients_match_trl():
    policy = random_policy(5, seed=6, same_chosen_length=True)
    mine = gradients(lambda p: orpo(p, p, beta=BETA).per_example.mean(), policy)
    theirs = gradients(trl_orpo_loss, policy)
    for a, b in zip(mine, theirs, strict=True):
        assert_close(a, b, rtol=0, atol=ORPO_ATOL["grads"])


def test_orpo_odds_ratio_term_matches_trl_log1mexp_across_its_branch():
    """Mean log-probs on both sides of TRL's branch point -log 2 and close to 0."""
    means = torch.tensor([-1e-5, -0.01, -0.69, -0.70, -2.0, -30.0], dtype=torch.float64)
    ones = torch.ones_like(means)
    policy = PairLogps(means, means.flip(0), ones, ones)
    trainer = bare(trl_orpo.ORPOTrainer, beta=BETA)
    theirs, *_ = trainer.odds_ratio_loss(policy.chosen, policy.rejected)  # beta log sigmoid
    ours = orpo(policy, policy, beta=BETA)
    assert_close(ours.per_example - (-means), -theirs.double(), rtol=1e-6, atol=1e-8)
    assert math.isfinite(ours.metrics["log_odds_ratio"].abs().max().item())
