"""The training side of ``method``: where a run's pairs come from besides the file.

``bdhs_records`` replaces each training record's rejected answer by a BDHS rejection made by
the base model before training (``method: bdhs``); ``online_source`` builds online / mixed
DPO's pair source for the step (``dpalign.online.source``, where the privacy argument is);
``rl_rollouts`` RL's rollout maker (``method: rloo | grpo``; ``dpalign.rl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpalign.data.schema import PreferenceRecord
from dpalign.io import atomic_write_jsonl, read_jsonl
from dpalign.losses.base import PairLogps
from dpalign.losses.objective import Objective
from dpalign.models.pairs import EncodedPair
from dpalign.online.bdhs import BDHSInput, bdhs_rejections, masked_completer
from dpalign.online.embed import sentence_embedder
from dpalign.online.judge import load_judge
from dpalign.online.source import OfflinePairs, OnlinePairs, PairSource
from dpalign.rl.config import RL_METHODS
from dpalign.rl.privacy import check_disjoint
from dpalign.rl.reward import load_reward_model
from dpalign.train.config import TrainConfig
from dpalign.train.reference import compute_reference
from dpalign.train.rl_step import Rollouts


@dataclass(frozen=True)
class BDHSPairs:
    """The training records with BDHS rejections (``records``, in the file's order, one per
    source record so the privacy units are unchanged) and ``skip``: the indices whose BDHS
    answer came out equal to the chosen one (no preference signal: their unit contributes a
    zero gradient, like an online tie)."""

    records: list[PreferenceRecord]
    skip: frozenset[int]


def bdhs_records(cfg: TrainConfig, model: torch.nn.Module, processor: Any,
                 records: list[PreferenceRecord], path: Path) -> BDHSPairs:
    """Each record's rejected answer replaced by a BDHS rejection of its chosen one, made by
    ``model`` (the base model: LoRA is not yet added) with ``cfg.bdhs``. The BDHS results
    (one JSON line per record: ``source_id, rejected, tries, similarity, swapped``) are
    written to ``path`` atomically and read back from there on resume."""
    rows = read_jsonl(path) if path.is_file() else []
    if [r.get("source_id") for r in rows] != [r.id for r in records]:
        items = [BDHSInput(r.id, tuple(r.images), r.prompt, r.chosen, r.metadata)
                 for r in records]
        results = bdhs_rejections(items, masked_completer(model, processor, cfg.bdhs,
                                                          batch_size=cfg.online.batch_size),
                                  sentence_embedder().encode, seed=cfg.bdhs.seed,
                                  max_tries=cfg.bdhs.max_tries, threshold=cfg.bdhs.threshold)
        rows = [{"source_id": r.id, "rejected": res.rejected, "tries": res.tries,
                 "similarity": res.similarity, "swapped": res.swapped}
                for r, res in zip(records, results, strict=True)]
        atomic_write_jsonl(path, rows)
    made = [r.model_copy(update={"rejected": row["rejected"]})
            for r, row in zip(records, rows, strict=True)]
    skip = frozenset(i for i, r in enumerate(made) if r.rejected.strip() == r.chosen.strip())
    return BDHSPairs(made, skip)


def pair_source(cfg: TrainConfig, model: torch.nn.Module, processor: Any,
                records: list[PreferenceRecord], pairs: list[EncodedPair], ref: PairLogps,
                pad_id: int, skip: frozenset[int] = frozenset()) -> PairSource | None:
    """The step's pair source: online / mixed DPO's over the training ``records`` (``pairs``
    and ``ref``: every encoded pair, canaries after the records); the recorded pairs less
    ``skip`` (BDHS pairs without a preference); None: the recorded pairs as they are.
    New pairs' reference log-probs come from ``model`` (a peft model) with its adapters
    off, which is the base model the cached reference log-probs were computed with."""
    if cfg.method not in ("online", "mixed"):
        return OfflinePairs(pairs, ref, skip) if skip else None
    with_corrupt = Objective.from_config(cfg.loss).spec.needs_corrupt
    device = next(model.parameters()).device

    def reference(new: list[EncodedPair]) -> PairLogps:
        with model.disable_adapter():  # type: ignore[operator]
            return compute_reference(model, new, pad_id, with_corrupt=with_corrupt,
                                     batch_size=cfg.eval.batch_size).to(device)

    return OnlinePairs(cfg.online, model, processor, records, OfflinePairs(pairs, ref),
                       load_judge(cfg.online.judge), reference, cfg.train.seed,
                       cfg.online.offline_fraction if cfg.method == "mixed" else 0.0,
                       cfg.data.seed if with_corrupt else None, cfg.data.hardness_field)


def rl_rollouts(cfg: TrainConfig, model: torch.nn.Module, processor: Any,
                records: list[PreferenceRecord], pad_id: int) -> Rollouts | None:
    """RL's rollout maker over the training ``records`` (None unless ``method`` is an RL
    method): the reward model ``rl.reward_model`` loaded on the policy's device and dtype,
    frozen; the judge ``online.judge``. ``rl.composition: parallel`` is refused here when
    the records share an id or an image with the reward model's training records."""
    if cfg.method not in RL_METHODS:
        return None
    param = next(model.parameters())
    reward = load_reward_model(cfg.rl.reward_model,  # type: ignore[arg-type]
                               device=str(param.device), dtype=model.dtype)
    if cfg.rl.composition == "parallel":
        check_disjoint(reward.info, records)
    return Rollouts(cfg, model, processor, reward, load_judge(cfg.online.judge), records,
                    pad_id)
