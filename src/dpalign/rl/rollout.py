"""Rollouts: k answers per prompt sampled from the policy, scored, laid out as model rows.

For U prompts (training records) ``make_rollout`` samples k answers each from the current
policy (``dpalign.online.generate.sample``, seeded by the run's seed and the step, so a
resumed run regenerates them exactly), scores every answer with the reward model (shown the
record's facts when it was trained with them) and with the judge (the world's exact judge:
the uncheatable counterpart of the reward model's score), and takes each answer's
reference log-prob (the policy with its LoRA adapters off = the base model). The answers
become R = kU rows in k blocks of U (row j U + i: prompt i, answer j), so the DP engines
take one gradient per prompt over its k rows (``Rollout`` is a ``privacy.per_pair.Units``).

Answers are re-tokenised from their text with the end-of-turn token appended (as every
response in dpalign), so an answer cut at ``max_new_tokens`` is scored as if it ended there.

``rollout_loss`` is a rollout's (U,) RL loss under the policy (``dpalign.rl.advantages``)
with the per-prompt diagnostics the step logs (each (U,), detached): ``rl_reward`` (mean
reward-model score of the prompt's answers), ``rl_judge`` (mean judge score), ``rl_kl``
(mean log pi - log ref of an answer, nats), ``rl_entropy`` (the answers' mean per-token
-log pi: an estimate of the policy's per-token entropy on its own samples), ``rl_length``
(mean tokens), ``rl_advantage_std`` (std of the prompt's advantages), ``rl_reward_std``,
``rl_objective`` (minus the mean KL-shaped reward: the value RL minimises, where the loss
the gradient is taken of is a surrogate whose value means nothing) and ``kl_proxy`` (the
k2 estimate 0.5 mean ((log pi - log ref) / T)^2 per token, as DPO runs log it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import Tensor, nn

from dpalign.data.schema import PreferenceRecord
from dpalign.losses.base import LossOut
from dpalign.models.encode import PromptEncoder, TokenBatch, pad_batch, response_ids
from dpalign.models.families import ImageInputs, process_images
from dpalign.models.logprobs import sequence_logps
from dpalign.models.pairs import select_rows
from dpalign.online.generate import Query, SamplingConfig, sample
from dpalign.online.judge import Judge
from dpalign.rl.advantages import rl_loss
from dpalign.rl.reward import LoadedReward, with_facts


@dataclass(frozen=True)
class Rollout:
    """U prompts' k answers as R = kU rows (row j U + i: prompt i, answer j).

    tokens: (R, L) rows (right-padded); images: the rows' images in row order;
    images_per_row: (R,); rewards, judge, ref: (U, k) reward-model scores, judge scores and
    reference log-probs (float32, on the policy's device); texts: U lists of k answers."""

    tokens: TokenBatch
    images: ImageInputs
    images_per_row: Tensor
    rewards: Tensor
    judge: Tensor
    ref: Tensor
    texts: list[list[str]]

    @property
    def n_units(self) -> int:
        return self.rewards.shape[0]

    @property
    def k(self) -> int:
        return self.rewards.shape[1]

    def part(self, units: Sequence[int]) -> Rollout:
        """Prompts ``units`` alone (their rows, still in k blocks), padding columns
        dropped."""
        n = self.n_units
        tokens, images, per_row = select_rows(
            self.tokens, self.images, self.images_per_row,
            [j * n + i for j in range(self.k) for i in units])
        pick = torch.tensor(list(units), dtype=torch.long, device=self.rewards.device)
        return replace(self, tokens=tokens, images=images, images_per_row=per_row,
                       rewards=self.rewards[pick], judge=self.judge[pick], ref=self.ref[pick],
                       texts=[self.texts[i] for i in units])

    def unit(self, i: int) -> Rollout:
        return self.part([i])


def as_units(values: Tensor, k: int) -> Tensor:
    """(R,) row values in k blocks of U -> (U, k)."""
    return values.view(k, -1).T


def _rows(processor: object, prompts: Sequence[str], pictures: Sequence[list[Image.Image]],
          texts: list[list[str]], pad_id: int) -> tuple[TokenBatch, ImageInputs, Tensor]:
    """The rollout's rows for ``processor``'s model: prompt i (with its images
    ``pictures[i]``) + answer j at row j U + i."""
    encode = PromptEncoder(processor)  # type: ignore[arg-type]
    ids = [encode(p, sizes=[im.size for im in ims]) for p, ims in zip(prompts, pictures,
                                                                      strict=True)]
    images = [process_images(processor, ims) for ims in pictures]  # type: ignore[arg-type]
    k, u = len(texts[0]), len(prompts)
    order = [(i, j) for j in range(k) for i in range(u)]
    tokens = pad_batch([ids[i] for i, _ in order],
                       [response_ids(processor, texts[i][j].strip()) for i, j in order],  # type: ignore[arg-type]
                       pad_id)
    return (tokens, ImageInputs.cat([images[i] for i, _ in order]),
            torch.tensor([len(images[i]) for i, _ in order]))


@torch.no_grad()
def _in_chunks(fn: Callable[[TokenBatch, ImageInputs, Tensor], Tensor], tokens: TokenBatch,
               images: ImageInputs, per_row: Tensor, size: int) -> Tensor:
    """``fn(tokens, images, images_per_row) -> (n,)`` over rows ``size`` at a time."""
    n = len(per_row)
    return torch.cat([fn(*select_rows(tokens, images, per_row, range(a, min(a + size, n))))
                      for a in range(0, n, size)])


@dataclass(frozen=True)
class RolloutSettings:
    """k answers per prompt (``samples``) drawn with ``sampling``, ``batch_size`` prompts per
    generate call and rows per scoring forward; ``seed`` the run's."""

    samples: int
    sampling: SamplingConfig
    batch_size: int
    seed: int


def make_rollout(policy: nn.Module, processor: object, reward: LoadedReward, judge: Judge,
                 records: Sequence[PreferenceRecord], step: int, settings: RolloutSettings,
                 pad_id: int) -> Rollout:
    """The rollout of ``records`` (U >= 1 prompts) at batch ``step`` (see the module doc).
    ``policy`` is a peft model: its reference log-probs are taken with adapters off."""
    queries = [Query(tuple(r.images), r.prompt) for r in records]
    texts = sample(policy, processor, queries, n=settings.samples,  # type: ignore[arg-type]
                   sampling=settings.sampling, seed=settings.seed * 1_000_003 + step,
                   batch_size=settings.batch_size)
    device = next(policy.parameters()).device
    pictures = [[Image.open(p).convert("RGB") for p in r.images] for r in records]
    tokens, images, per_row = _rows(processor, [r.prompt for r in records], pictures, texts,
                                    pad_id)
    was_training = policy.training
    policy.eval()
    with policy.disable_adapter():  # type: ignore[operator]
        ref = _in_chunks(lambda t, im, n: sequence_logps(policy, t, im, n).total, tokens,
                         images, per_row, settings.batch_size)
    policy.train(was_training)
    seen = [with_facts(r, reward.facts).prompt for r in records]
    rm_rows = _rows(reward.processor, seen, pictures, texts,
                    reward.processor.tokenizer.pad_token_id)
    scores = _in_chunks(reward.model.scores, *rm_rows, settings.batch_size)
    judged = torch.tensor([list(judge(r, answers)) for r, answers in zip(records, texts,
                                                                         strict=True)])
    k = settings.samples
    return Rollout(tokens, images, per_row,
                   as_units(scores.float(), k).to(device), judged.float().to(device),
                   as_units(ref.float(), k).to(device), texts)


def rollout_loss(model: nn.Module, method: str, kl_beta: float,
                 eps: float) -> Callable[[Rollout], LossOut]:
    """The ``privacy.per_pair.UnitLoss`` of rollouts under ``model``: (U,) RL losses and the
    per-prompt diagnostics of the module doc."""
    def loss(rollout: Rollout) -> LossOut:
        seq = sequence_logps(model, rollout.tokens, rollout.images, rollout.images_per_row)
        k = rollout.k
        logp, tokens = as_units(seq.total, k), as_units(seq.tokens, k)
        out = rl_loss(method, rollout.rewards, logp, tokens, rollout.ref, kl_beta=kl_beta,
                      eps=eps)
        with torch.no_grad():
            metrics = {
                "rl_reward": rollout.rewards.mean(dim=1),
                "rl_reward_std": rollout.rewards.std(dim=1),
                "rl_judge": rollout.judge.mean(dim=1),
                "rl_kl": (logp - rollout.ref).mean(dim=1),
                "rl_entropy": -logp.sum(dim=1) / tokens.sum(dim=1).clamp(min=1),
                "rl_length": tokens.mean(dim=1),
                "rl_advantage_std": out.advantages.std(dim=1),
                "rl_objective": -out.shaped.mean(dim=1),
                "kl_proxy": 0.5 * ((logp - rollout.ref) / tokens.clamp(min=1)).square().mean(
                    dim=1),
            }
        return LossOut(out.per_unit, {k2: v.detach().float() for k2, v in metrics.items()})
    return loss
