"""The method comparison table of this folder's README from a study's runs.parquet: mean and
the 95 % t half-width over seeds per (epsilon, method); wall seconds per run, the share of it
spent generating and judging, the online pair yield and the diverged runs.

    .venv/bin/python docs/results/online-tiny/table.py docs/results/online-tiny/runs.parquet
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy import stats

COLUMNS = {"final_heldout_reward_accuracy": "held-out reward acc",
           "final_pope_adversarial_accuracy": "POPE-adv acc",
           "final_pope_adversarial_f1": "POPE-adv F1", "final_chair_s": "CHAIR_s",
           "final_chair_i": "CHAIR_i", "final_recall": "recall",
           "loss_volatility": "loss volatility"}
ORDER = {"offline": 0, "online": 1, "mixed": 2, "bdhs": 3}


def mean_ci(values: pd.Series) -> str:
    x = np.asarray(values, float)
    if len(x) < 2:
        return f"{x.mean():.3f}"
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return f"{x.mean():.3f} ± {half:.3f}"


def optional(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.2f}"


def main(path: str) -> None:
    df = pd.read_parquet(path)
    print("| ε | method | n | " + " | ".join(COLUMNS.values())
          + " | wall s | gen. share | pair yield | diverged |")
    print("|" + "---|" * (len(COLUMNS) + 7))
    groups = sorted(df.groupby(["epsilon_target", "method"]),
                    key=lambda item: (-item[0][0], ORDER[item[0][1]]))
    for (eps, method), g in groups:
        cells = ["∞" if np.isinf(eps) else f"{eps:g}", method, str(len(g)),
                 *(mean_ci(g[c]) for c in COLUMNS), f"{g.wall_seconds.mean():.0f}",
                 optional((g.online_seconds / g.wall_seconds).mean()),
                 optional(g.online_pair_yield.mean()), str(int(g.diverged.sum()))]
        print("| " + " | ".join(cells) + " |")
    base = df.iloc[0]
    print(f"\nbase model: POPE-adv acc {base.base_pope_adversarial_accuracy:.3f}, CHAIR_s "
          f"{base.base_chair_s:.3f}, CHAIR_i {base.base_chair_i:.3f}, recall "
          f"{base.base_recall:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
