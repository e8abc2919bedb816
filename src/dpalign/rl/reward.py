"""The reward model: a VLM with a scalar head on the last response token.

``RewardModel`` wraps any VLM dpalign loads (the backbone, LoRA-adapted or fully trainable)
and a linear head ``head: hidden -> 1`` read at each row's last attended token, the
response's end-of-turn token: r(x, y) = w . h_L(x, y) + b, h_L the last layer's (normed)
hidden state. The head starts at zero, so the untrained model scores every answer 0 and
ties on every pair (its held-out accuracy is 0, as the untrained policy's is).

Training is an ordinary dpalign run (``dpalign reward train``: ``reward.enabled``, loss
``bradley_terry``): the model scores a pair (``score_pairs``) where a policy gives log-probs,
so the DP engine, clipping (the pair is the unit), noise, ledger, checkpoints and resume are
the policy's. In the step's logs ``logp_chosen`` / ``logp_rejected`` are then the rewards.

Saved (``save_pretrained``) as the backbone with adapters merged (``transformers`` loads it
with ``AutoModelForImageTextToText``), its processor, ``reward_head.safetensors``
(``weight`` (1, hidden), ``bias`` (1,)) and ``reward.json`` (facts setting, hidden size, the
privacy ledger of its training and its training records' ids and images, for composing its
privacy cost with a policy's: ``dpalign.rl.privacy``). ``load_reward_model`` reads it back.

Factual augmentation (Fact-RLHF): ``with_facts`` appends the record's ground truth (the
world's object list, or a caption field) to the prompt the reward model sees; the policy
never sees it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dpalign.data.schema import PreferenceRecord
from dpalign.io import atomic_write_json
from dpalign.losses.base import PairLogps
from dpalign.models.encode import TokenBatch
from dpalign.models.families import ImageInputs
from dpalign.models.load import load_model
from dpalign.models.logprobs import (
    as_images,
    check_image_tokens,
    features_per_image,
    forward_inputs,
    image_token_id,
)
from dpalign.models.lora import LoraConfig, merged, prepare_trainable
from dpalign.models.pairs import PairBatch
from dpalign.rl.config import RewardConfig

HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "reward.json"


class FactsError(ValueError):
    """A record lacks the ground truth that factual augmentation shows the reward model."""


def facts_text(record: PreferenceRecord, cfg: RewardConfig) -> str | None:
    """The facts line of ``record`` (None with ``facts: none``); raises ``FactsError`` naming
    the record when its metadata lacks them."""
    if cfg.facts == "none":
        return None
    key = "objects" if cfg.facts == "objects" else cfg.facts_field
    value = getattr(record.metadata, key, None)
    if value is None or value == [] or value == "":
        raise FactsError(f"record {record.id!r}: reward.facts={cfg.facts} needs "
                         f"metadata.{key}, which it lacks")
    if cfg.facts == "objects":
        return "Facts: the image shows " + ", ".join(str(v) for v in value) + "."
    return f"Facts: {value}"


def with_facts(record: PreferenceRecord, cfg: RewardConfig) -> PreferenceRecord:
    """``record`` with its facts appended to the prompt (itself with ``facts: none``)."""
    facts = facts_text(record, cfg)
    return record if facts is None else record.model_copy(
        update={"prompt": f"{record.prompt}\n{facts}"})


def last_token(attention_mask: Tensor) -> Tensor:
    """(N,) index of each row's last attended position (left or right padding)."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).argmax(dim=1)


class RewardModel(nn.Module):
    """r(x, y) for rows of a batch: ``backbone`` (a transformers VLM, possibly a peft model)
    and ``head`` (``nn.Linear(hidden, 1)``, float32, zero at start)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        if head is None:
            head = nn.Linear(backbone.config.get_text_config().hidden_size, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head.to(device=next(backbone.parameters()).device, dtype=torch.float32)

    @property
    def config(self) -> Any:
        return self.backbone.config

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    def scores(self, tokens: TokenBatch, images: ImageInputs | Tensor,
               images_per_row: Tensor | None = None) -> Tensor:
        """(N,) float32 rewards of rows ``tokens`` (each (N, L)) with their images in row
        order (``images_per_row`` (N,), default one each)."""
        images = as_images(images)
        n = tokens.input_ids.shape[0]
        counts = images_per_row if images_per_row is not None else torch.ones(
            n, dtype=torch.long)
        check_image_tokens(tokens.input_ids, counts, image_token_id(self.backbone),
                           features_per_image(self.backbone, images))
        inputs = forward_inputs(self.backbone, tokens, images)
        out = self.backbone(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        rows = torch.arange(n, device=hidden.device)
        pooled = hidden[rows, last_token(inputs["attention_mask"])]
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    def score_pairs(self, batch: PairBatch) -> PairLogps:
        """The pairs' rewards in a policy's place: ``chosen`` r(x, y_w), ``rejected``
        r(x, y_l), each (B,); token counts 1 (a reward is no per-token sum)."""
        r = self.scores(batch.tokens, batch.images, batch.images_per_row)
        b = batch.n_pairs
        ones = torch.ones(b, dtype=r.dtype, device=r.device)
        return PairLogps(r[:b], r[b:2 * b], ones, ones)

    def save_pretrained(self, path: str | Path) -> None:
        """The backbone (adapters merged) with ``save_pretrained`` and the head beside it."""
        path = Path(path)
        merged(self.backbone).save_pretrained(path)
        save_file({"weight": self.head.weight.detach().cpu().contiguous(),
                   "bias": self.head.bias.detach().cpu().contiguous()}, str(path / HEAD_FILE))


def zero_reference(n: int, device: torch.device | str = "cpu") -> PairLogps:
    """A reward model's 'reference': zeros (B = n), token counts 1."""
    zero, one = torch.zeros(n, device=device), torch.ones(n, device=device)
    return PairLogps(zero, zero, one, one)


def reward_trainable(model: RewardModel, lora: LoraConfig) -> RewardModel:
    """``model`` with LoRA adapters on its backbone (or the whole backbone trainable) and
    its head's weight trainable. The head's bias stays as it is (0): it cancels in
    r(x, y_w) - r(x, y_l), so its per-pair gradient is exactly 0 and under DP it would only
    take noise."""
    backbone = prepare_trainable(model.backbone, lora)
    model.head.weight.requires_grad_(True)
    model.head.bias.requires_grad_(False)
    return RewardModel(backbone, model.head)


def write_reward_info(folder: Path, cfg: RewardConfig, *, ledger: str, privacy: dict[str, Any],
                      records: Sequence[PreferenceRecord], hidden: int) -> None:
    """``folder/reward.json``: the facts setting, the head's size, the training's privacy
    ledger (JSON) and settings (``privacy``: enabled, delta, accountant, unit), and the
    training records' ids and images."""
    atomic_write_json(folder / INFO_FILE, {
        "facts": cfg.facts, "facts_field": cfg.facts_field, "hidden_size": hidden,
        "ledger": json.loads(ledger), "privacy": privacy,
        "train_ids": [r.id for r in records],
        "train_images": sorted({str(Path(p).resolve()) for r in records for p in r.images})})


@dataclass(frozen=True)
class LoadedReward:
    """A saved reward model: ``model`` (eval mode, no gradients), ``processor``, ``facts``
    (the setting it was trained with), ``info`` (``reward.json``) and ``path`` (its folder)."""

    model: RewardModel
    processor: Any
    facts: RewardConfig
    info: dict[str, Any]
    path: Path


def reward_folder(path: str | Path) -> Path:
    """The folder holding a saved reward model: ``path`` itself, or ``path/final`` for a
    reward run directory; raises ``FileNotFoundError`` naming what is missing."""
    path = Path(path)
    for folder in (path, path / "final"):
        if (folder / HEAD_FILE).is_file():
            return folder
    raise FileNotFoundError(f"{path}: no reward model here (no {HEAD_FILE} in it or in "
                            f"{path / 'final'}); train one with `dpalign reward train`")


def load_reward_model(path: str | Path, *, device: str = "cpu",
                      dtype: torch.dtype | None = None) -> LoadedReward:
    """Read a reward model saved by a reward run (``path``: the run or its ``final/``)."""
    folder = reward_folder(path)
    loaded = load_model(folder, device=device, dtype=dtype)
    weights = load_file(str(folder / HEAD_FILE))
    head = nn.Linear(weights["weight"].shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(weights["weight"])
        head.bias.copy_(weights["bias"])
    info = json.loads((folder / INFO_FILE).read_text()) if (folder / INFO_FILE).is_file() else {}
    model = RewardModel(loaded.model, head).eval().requires_grad_(False)
    facts = RewardConfig(enabled=True, facts=info.get("facts", "none"),
                         facts_field=info.get("facts_field", "caption"))
    return LoadedReward(model, loaded.processor, facts, info, folder)
