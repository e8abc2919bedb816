"""The privacy of an RL run: the policy's steps composed with its reward model's training.

The policy's unit is the private prompt (a training record with its image): each step
Poisson-samples prompts, and everything a prompt's term depends on -- its k answers (drawn
from the previous step's policy, itself a DP release, with public randomness), their
reward-model and judge scores, their reference log-probs, the advantages (computed within
the prompt's own group) and the loss -- is a function of that prompt and of public or
already-released state. Adding or removing one prompt changes one clipped term of the sum,
so each step is the subsampled Gaussian mechanism over prompts and the run's ledger is that
of DP-SGD (the same argument as online DPO, ``dpalign.online.source``). One optimisation
step per sampled batch keeps it so (no second pass over the same sample).

The reward model is a released artefact too, trained by DP-SGD with the pair as unit
(its ledger is saved in its ``reward.json``). The total guarantee for a person whose data
may be in both:

- ``sequential`` (the same people's data, e.g. both from one pool; always valid): the two
  ledgers composed by the accountant (``dp_accounting``, PLD by default) at the policy's
  delta -- tighter than adding the two epsilons;
- ``parallel`` (disjoint data, each person in one of the two sets): max(eps_reward,
  eps_policy) at that delta. dpalign checks the record ids and image files of the two sets
  are disjoint; that the *people* are is the user's claim.

A reward model trained without DP has epsilon = inf: the total is then inf either way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpalign.data.schema import PreferenceRecord
from dpalign.privacy.accounting import Ledger, account


class CompositionError(ValueError):
    """``parallel`` composition asked for data that are not disjoint."""


def reward_ledger(info: dict[str, Any]) -> Ledger | None:
    """The reward model's ledger from its ``reward.json`` (None: trained without DP)."""
    if not info.get("privacy", {}).get("enabled", False):
        return None
    return Ledger.from_json(json.dumps(info.get("ledger", {"entries": []})))


def check_disjoint(info: dict[str, Any], records: Sequence[PreferenceRecord]) -> None:
    """Raise ``CompositionError`` when a training record of the RL run shares its id or an
    image file with the reward model's training records."""
    ids = set(info.get("train_ids", []))
    images = set(info.get("train_images", []))
    for r in records:
        shared = [p for p in r.images if str(Path(p).resolve()) in images]
        if r.id in ids or shared:
            what = f"id {r.id!r}" if r.id in ids else f"image {shared[0]}"
            raise CompositionError(
                f"rl.composition: parallel needs data disjoint from the reward model's, but "
                f"{what} is in both; use rl.composition: sequential")


def _eps(ledger: Ledger | None, delta: float, accountant: str) -> float:
    if ledger is None:
        return math.inf
    return account(ledger, delta, accountant).epsilon if ledger.entries else 0.0


def composed(policy: Ledger | None, info: dict[str, Any], composition: str, delta: float,
             accountant: str = "pld") -> dict[str, Any]:
    """``reward_model`` (its epsilon at ``delta``), ``composition`` and ``total_epsilon`` of
    an RL run whose policy spent ``policy`` (None: trained without DP)."""
    rm = reward_ledger(info)
    eps_rm, eps_policy = _eps(rm, delta, accountant), _eps(policy, delta, accountant)
    if composition == "parallel":
        total = max(eps_rm, eps_policy)
    elif rm is None or policy is None:
        total = math.inf
    else:
        total = _eps(Ledger(rm.entries + policy.entries), delta, accountant)
    return {"reward_model": {"epsilon": eps_rm, "delta": delta,
                             "trained_delta": info.get("privacy", {}).get("delta")},
            "composition": composition, "total_epsilon": total}
