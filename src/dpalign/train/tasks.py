"""What a run trains: a policy (the default) or a reward model (``reward.enabled``).

A reward run loads the same VLM, wraps it in ``dpalign.rl.reward.RewardModel`` (a scalar
head on the last response token), shows it each record's facts when ``reward.facts`` asks,
takes no reference pass (its 'reference' is zero: the Bradley-Terry loss has none) and
saves ``reward.json`` (facts, privacy ledger, training records) beside the model. Everything
else -- the DP engine with the pair as unit, accounting, checkpoints, resume, held-out
accuracy -- is the policy run's. These functions are the only places the two differ.
A policy trained with a reference-free loss (SimPO, ORPO) takes no reference pass over its
training pairs either (``task_reference``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpalign.data.schema import PreferenceRecord
from dpalign.losses import get_loss
from dpalign.losses.base import PairLogps
from dpalign.models.lora import prepare_trainable
from dpalign.models.pairs import EncodedPair
from dpalign.rl.reward import (
    FactsError,
    RewardModel,
    reward_trainable,
    with_facts,
    write_reward_info,
    zero_reference,
)
from dpalign.train.config import TrainConfig
from dpalign.train.state import LoopState

Reference = Callable[..., PairLogps]
TRAIN_SPLIT = "train"  # RunDir.reference(TRAIN_SPLIT): the training pairs' reference cache


def task_model(cfg: TrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    """The loaded VLM, wrapped in a zero-headed ``RewardModel`` for a reward run."""
    return RewardModel(model) if cfg.reward.enabled else model


def task_records(cfg: TrainConfig, records: list[PreferenceRecord],
                 path: Path | None) -> list[PreferenceRecord]:
    """``records`` as the trained model sees them: with their facts for a reward run with
    ``reward.facts`` (a record without them is an error naming ``path`` and the record)."""
    if not cfg.reward.enabled or cfg.reward.facts == "none":
        return records
    try:
        return [with_facts(r, cfg.reward) for r in records]
    except FactsError as exc:
        raise FactsError(f"{path}: {exc}") from None


def task_reference(cfg: TrainConfig, cached: Reference) -> Reference:
    """How reference log-probs are obtained: ``cached`` (computed once, cached in the run
    directory), or zeros (no forward pass, nothing cached) for a reward model, and for the
    training pairs of a reference-free loss (``LossSpec.reference_free``: SimPO, ORPO).

    A reference-free run still takes ``cached`` for its held-out/validation parts: their
    metrics compare the policy with the policy it started as, for every loss alike (with
    zeros, step 0 -- where the evaluator reuses the reference as the policy -- would read
    as all ties, and later steps as summed log-prob gaps)."""
    def zeros(path: Path, model: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int,
              **_: Any) -> PairLogps:
        return zero_reference(len(pairs))

    if cfg.reward.enabled:
        return zeros
    if not get_loss(cfg.loss.name).reference_free:
        return cached

    def train_zeros(path: Path, model: torch.nn.Module, pairs: Sequence[EncodedPair],
                    pad_id: int, **kwargs: Any) -> PairLogps:
        if path.stem == TRAIN_SPLIT:  # RunDir.reference(TRAIN_SPLIT): the training pairs
            return zeros(path, model, pairs, pad_id)
        return cached(path, model, pairs, pad_id, **kwargs)

    return train_zeros


def eval_beta(cfg: TrainConfig) -> float:
    """The beta of held-out implicit rewards: ``loss.beta``; 1 for a reward model, whose
    'implicit rewards' are its rewards themselves."""
    return 1.0 if cfg.reward.enabled else cfg.loss.beta


def task_trainable(cfg: TrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    """LoRA adapters (or full fine-tuning) as ``cfg.lora`` says; a reward model's head is
    trainable too."""
    if isinstance(model, RewardModel):
        return reward_trainable(model, cfg.lora)
    return prepare_trainable(model, cfg.lora)


def save_task_info(cfg: TrainConfig, folder: Path, model: torch.nn.Module, state: LoopState,
                   records: Sequence[PreferenceRecord]) -> None:
    """A reward run's ``reward.json`` in the saved model's ``folder`` (nothing for a
    policy)."""
    if not isinstance(model, RewardModel):
        return
    privacy = cfg.privacy
    write_reward_info(folder, cfg.reward, ledger=state.ledger.to_json(),
                      privacy={"enabled": privacy.enabled, "delta": privacy.delta,
                               "accountant": privacy.accountant, "unit": privacy.unit},
                      records=records,
                      hidden=model.head.in_features)
