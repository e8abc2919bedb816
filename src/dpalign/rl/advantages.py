"""The RL objective's maths (pure functions of tensors; DESIGN §5 "Reward model").

For a prompt with k sampled answers y_1..y_k, each with reward r_j from the reward model,
summed log-probs log pi(y_j) (and ``tokens`` T_j) under the policy and log ref(y_j) under
the reference:

- KL-shaped reward (both methods): r~_j = r_j - kl_beta * (log pi(y_j) - log ref(y_j)), with
  log pi taken without gradient (the sampling policy's value; one optimisation epoch per
  batch, so it is the current policy's). Its mean over samples is r - kl_beta KL(pi || ref).
- ``rloo`` (Ahmadian et al. 2024): A_j = r~_j - mean_{i != j} r~_i; loss of the prompt
  -(1/k) sum_j A_j log pi(y_j) (the sequence's summed log-prob).
- ``grpo`` (Shao et al. 2024): A_j = (r~_j - mean r~) / (std r~ + eps), std with Bessel's
  correction (as TRL's ``std()``); loss -(1/k) sum_j A_j log pi(y_j) / T_j (per-token mean).

Both have sum_j A_j = 0 (a baseline that does not depend on y_j keeps the gradient unbiased).
With one epoch per sampled batch the PPO ratio pi / pi_old is 1 and its clipping inactive,
so this is PPO's gradient at its first epoch (Wu et al.'s DP-PPO keeps one epoch so that
subsampling amplification holds). Every array is (U, k): U prompts, k samples each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


def rloo_advantages(rewards: Tensor, eps: float = 0.0) -> Tensor:
    """(U, k) -> (U, k): r_j - mean of the other k - 1 rewards of the prompt (k >= 2)."""
    del eps
    k = rewards.shape[-1]
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def grpo_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """(U, k) -> (U, k): (r_j - mean r) / (std r + eps) within each prompt's group (std with
    Bessel's correction; a group of equal rewards gives 0)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    return (rewards - mean) / (rewards.std(dim=-1, keepdim=True) + eps)


def kl_shaped(rewards: Tensor, logp: Tensor, ref_logp: Tensor, kl_beta: float) -> Tensor:
    """(U, k) rewards minus ``kl_beta`` times each sample's log-ratio log pi - log ref (the
    log-probs taken as values: no gradient flows through the penalty)."""
    return rewards - kl_beta * (logp.detach() - ref_logp)


@dataclass(frozen=True)
class RLMethod:
    """An RL method: its advantage rule and whether the policy term is the sequence's
    per-token mean log-prob (``per_token``) or its sum."""

    advantages: Callable[[Tensor, float], Tensor]
    per_token: bool


RL_OBJECTIVES: dict[str, RLMethod] = {
    "rloo": RLMethod(rloo_advantages, per_token=False),
    "grpo": RLMethod(grpo_advantages, per_token=True),
}


@dataclass(frozen=True)
class RLLoss:
    """per_unit: (U,) each prompt's loss; advantages, shaped: (U, k) detached."""

    per_unit: Tensor
    advantages: Tensor
    shaped: Tensor


def rl_loss(method: str, rewards: Tensor, logp: Tensor, tokens: Tensor, ref_logp: Tensor, *,
            kl_beta: float, eps: float = 1e-4) -> RLLoss:
    """Each prompt's loss -(1/k) sum_j A_j s_j, s_j = log pi(y_j) (/ T_j for ``grpo``), from
    (U, k) rewards, policy log-probs (with gradient), token counts and reference log-probs.
    A prompt's entry depends on its own k samples alone (its privacy unit)."""
    spec = RL_OBJECTIVES[method]
    shaped = kl_shaped(rewards, logp, ref_logp, kl_beta)
    adv = spec.advantages(shaped, eps).detach()
    score = logp / tokens.clamp(min=1) if spec.per_token else logp
    return RLLoss(-(adv * score).mean(dim=-1), adv, shaped.detach())
