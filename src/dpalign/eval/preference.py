"""Held-out preference metrics from policy and reference log-probs (pure functions)."""

from __future__ import annotations

import torch

from dpalign.losses.base import PairLogps, reward_metrics


def preference_metrics(policy: PairLogps, ref: PairLogps, beta: float) -> dict[str, float]:
    """Means over N pairs (all inputs (N,)):

    pref_accuracy:      log pi(chosen) > log pi(rejected) (summed log-probs): how often the
                        model itself prefers the chosen answer; defined for the base model.
    pref_accuracy_mean: the same with per-token mean log-probs (length-neutral).
    reward_accuracy, reward_margin, reward_chosen, reward_rejected: DPO's implicit rewards
                        beta * (log pi - log ref); all 0 for the base model itself. A pair
                        whose margin is within rounding of 0 (``losses.reward_ties``) is a
                        tie and counts 0 in reward_accuracy.
    """
    with torch.no_grad():
        rewards = reward_metrics(policy, ref, beta)
        chosen_mean = policy.chosen / policy.chosen_tokens.clamp(min=1)
        rejected_mean = policy.rejected / policy.rejected_tokens.clamp(min=1)
        values = {
            "pref_accuracy": (policy.chosen > policy.rejected).float().mean(),
            "pref_accuracy_mean": (chosen_mean > rejected_mean).float().mean(),
            **{k: v.float().mean() for k, v in rewards.items()},
        }
        return {k: float(v) for k, v in values.items()}
