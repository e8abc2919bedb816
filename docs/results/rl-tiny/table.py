"""The tables of this folder's README from a study's runs.parquet: mean and the 95 % t
half-width over seeds per (epsilon, method) for the RL study; per epsilon for the reward-model
study (``--reward``).

    .venv/bin/python docs/results/rl-tiny/table.py docs/results/rl-tiny/runs.parquet
    .venv/bin/python docs/results/rl-tiny/table.py docs/results/rl-tiny/reward/runs.parquet --reward
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy import stats

RL = {"rl_judge_final": "judge (end)", "rl_reward_final": "RM score (end)",
      "rl_kl_final": "KL (nats)", "rl_entropy_ratio": "entropy end/start",
      "final_pope_adversarial_f1": "POPE-adv F1", "final_chair_s": "CHAIR_s",
      "final_recall": "recall", "mean_noise_to_signal": "noise/signal",
      "mean_clip_fraction": "clipped"}
REWARD = {"final_heldout_reward_accuracy": "held-out reward acc", "epsilon": "ε spent"}
ORDER = {"offline": 0, "rloo": 1, "grpo": 2}


def mean_ci(values: pd.Series) -> str:
    x = np.asarray(values, float)
    if np.isnan(x).all():
        return "–"
    if np.isinf(x).all():
        return "∞"
    if len(x) < 2:
        return f"{x.mean():.3f}"
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return f"{x.mean():.3f} ± {half:.3f}"


def rate(values: pd.Series) -> str:
    x = np.asarray(values, float)
    return "–" if np.isnan(x).all() else f"{int(np.nansum(x))}/{len(x)}"


def rl_table(df: pd.DataFrame) -> None:
    print("| ε | method | n | " + " | ".join(RL.values())
          + " | total ε | wall s | diverged | hacking | entropy collapse |")
    print("|" + "---|" * (len(RL) + 8))
    groups = sorted(df.groupby(["epsilon_target", "method"]),
                    key=lambda item: (-item[0][0], ORDER[item[0][1]]))
    for (eps, method), g in groups:
        total = g.total_epsilon.mean() if g.total_epsilon.notna().any() else g.epsilon.mean()
        cells = ["∞" if np.isinf(eps) else f"{eps:g}", method, str(len(g)),
                 *(mean_ci(g[c]) for c in RL), f"{total:.2f}", f"{g.wall_seconds.mean():.0f}",
                 rate(g.diverged), rate(g.rl_hacking), rate(g.rl_entropy_collapse)]
        print("| " + " | ".join(cells) + " |")
    base = df.iloc[0]
    print(f"\nbase model: POPE-adv F1 {base.base_pope_adversarial_f1:.3f}, CHAIR_s "
          f"{base.base_chair_s:.3f}, recall {base.base_recall:.3f}")


def reward_table(df: pd.DataFrame) -> None:
    print("| ε | n | " + " | ".join(REWARD.values()) + " | wall s | diverged |")
    print("|" + "---|" * (len(REWARD) + 4))
    for eps, g in sorted(df.groupby("epsilon_target"), key=lambda item: -item[0]):
        cells = ["∞" if np.isinf(eps) else f"{eps:g}", str(len(g)),
                 *(mean_ci(g[c]) for c in REWARD), f"{g.wall_seconds.mean():.0f}",
                 rate(g.diverged)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    frame = pd.read_parquet(sys.argv[1])
    (reward_table if "--reward" in sys.argv[2:] else rl_table)(frame)
