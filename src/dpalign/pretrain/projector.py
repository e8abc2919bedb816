"""Pretraining stages for a VLM whose vision tower is frozen and pretrained (the ``smol`` preset).

LLaVA's recipe on a CPU budget. The tower never changes, so each image's features are
computed once, on first use, and reused (``FeatureBank``): the language model then reads
projected features spliced into its input embeddings, exactly where ``<image>`` tokens
stand, which is what the model computes from pixels (``response_loss`` equals the pixel
path's loss). Stages, each skipped at 0 steps:

- ``ground``: the projector alone, without the language model: every image token that
  lies wholly inside a cell of the world's grid learns to score its object's name and
  colour highest among SmolLM2's input embeddings (cheap: no transformer pass);
- ``projector``: only the projector trains; the language model is frozen (LLaVA stage 1),
  on the world's pretraining captions and question answers, loss on response tokens;
- ``lm``: LoRA adapters on the language model (``lora``; full fine-tuning of the language
  model when ``lora.enabled`` is false) train together with the projector; the adapters
  are merged before saving, so the result is a plain model folder.

The stages as the ``smol`` preset runs them (``ground_stage``, ``projector_stage``,
``lm_stage``) close the module.

A batch is a few images, each with all its rows packed into one sequence behind their
shared prefix (system turn + image tokens): ``[prefix | prompt_1 response_1 | prompt_2
response_2 | ...]``, where each row attends to the prefix and to itself only and its
positions continue from the prefix, so every row computes exactly what it computes alone
(``pack_image_rows``). The 69-token prefix (20 of system turn, 49 image tokens) is then
paid once per image instead of once per row: ~2.5x fewer tokens for the world's ~6.5
rows per image. Logits are computed only where a response token is predicted.
Shapes: ``B`` images (packed sequences), ``L`` tokens, features (B, P, D).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from transformers import ProcessorMixin

from dpalign.io import read_jsonl
from dpalign.models.encode import IGNORE, PromptEncoder, pixel_values, response_ids
from dpalign.models.lora import LoraConfig, merged, prepare_trainable
from dpalign.pretrain.loop import PretrainRun, shuffled_batches, supervised
from dpalign.pretrain.vision_warmup import (
    cell_labels,
    ground_image_tokens,
    token_labels,
    word_token_ids,
)
from dpalign.progress import make_progress
from dpalign.world.load import World
from dpalign.world.vocab import CATEGORY_NAMES, COLOUR_NAMES

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ProjectorPretrainConfig(BaseModel):
    """Settings of the frozen-tower recipe (``smol``): grounding, projector, language model.

    Defaults measured on 2 CPU cores: see the README's "The smol preset"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = "smol"
    images: int | None = Field(1500, ge=1, description="use the first N pretraining images "
                                                        "(and their rows); None = all")
    ground_steps: int = Field(200, ge=0)
    ground_batch_size: int = Field(16, ge=1)
    ground_lr: float = Field(3e-3, gt=0)
    projector_steps: int = Field(30, ge=0)
    projector_lr: float = Field(1e-3, gt=0)
    lm_steps: int = Field(140, ge=0)
    lm_lr: float = Field(5e-4, gt=0)
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(
        r=16, alpha=32, target_modules=LM_TARGETS, scope="language_model"))
    batch_images: int = Field(4, ge=1, description="images per step, all their rows packed")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    feature_batch_size: int = Field(32, ge=1)
    seed: int = 0
    log_every: int = Field(5, ge=1)
    threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_training(self) -> ProjectorPretrainConfig:
        if self.ground_steps + self.projector_steps + self.lm_steps == 0:
            raise ValueError("ground_steps, projector_steps and lm_steps are all 0: nothing "
                             "would train")
        return self


class FeatureBank:
    """Vision-tower outputs per image, (P, D) each, computed once on first use.

    Valid only while the tower is frozen (its outputs never change)."""

    def __init__(self, model: nn.Module, processor: ProcessorMixin, paths: Sequence[Path],
                 batch_size: int = 32) -> None:
        self.model, self.processor, self.paths = model, processor, list(paths)
        self.batch_size = batch_size
        self._features: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def missing(self, indices: Sequence[int] | Tensor) -> list[int]:
        """The image indices among ``indices`` without features yet, sorted, once each."""
        return sorted({int(i) for i in indices} - self._features.keys())

    def ensure(self, indices: Sequence[int] | Tensor,
               on_batch: Callable[[int], None] | None = None) -> None:
        """Compute the features of every image in ``indices`` not computed yet."""
        todo = self.missing(indices)
        tower = self.model.model.vision_tower  # type: ignore[union-attr]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            images = [Image.open(self.paths[i]).convert("RGB") for i in chunk]
            with torch.no_grad():
                pixels = pixel_values(self.processor, images).to(self.model.dtype)  # type: ignore[union-attr]
                features = select_features(self.model, tower(pixel_values=pixels,
                                                             output_hidden_states=True))
            self._features.update(zip(chunk, features, strict=True))
            if on_batch:
                on_batch(len(chunk))

    def __getitem__(self, indices: Tensor) -> Tensor:
        """Stacked features of ``indices`` (all computed before): (B, P, D)."""
        return torch.stack([self._features[int(i)] for i in indices])


def select_features(model: nn.Module, tower_out: Any) -> Tensor:
    """The tower layer the LLaVA projector reads (``get_image_features``' selection)."""
    config = model.config
    hidden = tower_out.hidden_states[config.vision_feature_layer]
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


@dataclass(frozen=True)
class PackedBatch:
    """Packed sequences, one per image: input_ids, position_ids, labels (B, L); attention
    (B, 1, L, L) boolean, True where a query may attend a key; images (B,) their indices."""

    input_ids: Tensor
    position_ids: Tensor
    labels: Tensor
    attention: Tensor
    images: Tensor


def prefix_length(prompt: list[int], image_token_id: int) -> int:
    """Length of the part every prompt of an image shares: through its last image token."""
    return max(i for i, t in enumerate(prompt) if t == image_token_id) + 1


def pack_image_rows(prompts: Sequence[list[int]], responses: Sequence[list[int]],
                    image_token_id: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """One image's rows as ``[prefix | row_1 | row_2 | ...]``: token ids, labels (IGNORE off
    the responses), positions (each row continues from the prefix) and segment ids
    (0 = prefix, k = row k), all of one length."""
    cut = prefix_length(prompts[0], image_token_id)
    prefix = prompts[0][:cut]
    ids, labels = list(prefix), [IGNORE] * cut
    positions, segments = list(range(cut)), [0] * cut
    for k, (prompt, response) in enumerate(zip(prompts, responses, strict=True), 1):
        if prompt[:cut] != prefix:
            raise ValueError("rows of one image must share the prompt up to the image tokens")
        row = prompt[cut:] + response
        ids += row
        labels += [IGNORE] * (len(prompt) - cut) + response
        positions += range(cut, cut + len(row))
        segments += [k] * len(row)
    return ids, labels, positions, segments


def pack_batch(data: FeatureData, images: Tensor, pad_id: int,
               image_token_id: int) -> PackedBatch:
    """The rows of ``images`` packed, one sequence per image, right-padded. A row attends
    to the prefix and to its own earlier tokens; padding attends only to itself."""
    packed = [pack_image_rows([data.prompts[r] for r in data.rows_of[int(i)]],
                              [data.responses[r] for r in data.rows_of[int(i)]],
                              image_token_id) for i in images]
    width = max(len(p[0]) for p in packed)
    ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    positions = torch.zeros_like(ids)
    segments = torch.full_like(ids, -1)
    for b, (i, lab, pos, seg) in enumerate(packed):
        n = len(i)
        ids[b, :n], labels[b, :n] = torch.tensor(i), torch.tensor(lab)
        positions[b, :n], segments[b, :n] = torch.tensor(pos), torch.tensor(seg)
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    attend = causal & ((key == 0) | (key == query)) & (query >= 0)
    attend |= torch.eye(width, dtype=torch.bool) & (query < 0)  # padding: itself only
    return PackedBatch(ids, positions, labels, attend.unsqueeze(1), images)


def response_loss(model: nn.Module, projector: nn.Module, batch: PackedBatch,
                  features: Tensor, image_token_id: int) -> Tensor:
    """Mean cross-entropy over the response tokens of a packed batch, the images given as
    tower features (B, P, D) instead of pixels."""
    embeds = model.get_input_embeddings()(batch.input_ids)
    slots = (batch.input_ids == image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(slots, projector(features).to(embeds.dtype))
    targets = batch.labels[:, 1:]
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()  # positions predicting a label
    logits = model(inputs_embeds=embeds, attention_mask=batch.attention,
                   position_ids=batch.position_ids, logits_to_keep=keep).logits
    return cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(),
                         ignore_index=IGNORE)


@dataclass
class FeatureData:
    """Token ids per row, each row's image index, the rows of each image (file order), the
    images' names (as the world's annotations give them) and the bank of their features."""

    prompts: list[list[int]]
    responses: list[list[int]]
    image_index: Tensor
    rows_of: list[list[int]]
    image_names: list[str]
    bank: FeatureBank


def load_feature_data(world: World, model: nn.Module, processor: ProcessorMixin,
                      feature_batch_size: int = 32, images: int | None = None) -> FeatureData:
    """The pretraining rows of the first ``images`` images (sorted by name; all when None),
    encoded once; image features are left to the bank (computed on demand)."""
    rows = world.pretrain_rows()
    names = sorted({r["image"] for r in rows})[:images]
    position = {p: i for i, p in enumerate(names)}
    rows = [r for r in rows if r["image"] in position]
    folder = world.pretrain_file.parent
    with Image.open(folder / names[0]) as first:
        encode = PromptEncoder(processor, first.size)
    rows_of: list[list[int]] = [[] for _ in names]
    for i, r in enumerate(rows):
        rows_of[position[r["image"]]].append(i)
    return FeatureData(
        prompts=[encode(r["prompt"]) for r in rows],
        responses=[response_ids(processor, r["response"]) for r in rows],
        image_index=torch.tensor([position[r["image"]] for r in rows]),
        rows_of=rows_of,
        image_names=names,
        bank=FeatureBank(model, processor, [folder / p for p in names], feature_batch_size),
    )


@dataclass
class StageResult:
    """Per logged step rows and the summary a stage adds to ``pretrain.json``."""

    rows: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def train_stage(name: str, model: nn.Module, projector: nn.Module, data: FeatureData, *,
                steps: int, lr: float, cfg: ProjectorPretrainConfig, gen: torch.Generator,
                image_token_id: int, pad_id: int,
                on_log: Callable[[dict[str, float]], None] | None = None) -> StageResult:
    """``steps`` AdamW steps (cosine schedule, warm-up) on the parameters of ``model`` that
    require grad, ``cfg.batch_images`` images (all their rows) a step; features of every
    image the stage will see are computed first."""
    plan = list(shuffled_batches(len(data.image_names), cfg.batch_images, steps, gen))
    needed = data.bank.missing(torch.cat(plan))
    start = time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task(f"{name}: image features", total=len(needed), info="")
        data.bank.ensure(needed, on_batch=lambda n: bar.update(task, advance=n))
    feature_seconds = time.perf_counter() - start
    result = supervised(
        model, plan, lambda idx: response_loss(model, projector, pack_batch(
            data, idx, pad_id, image_token_id), data.bank[idx], image_token_id),
        name=name, steps=steps, lr=lr, weight_decay=cfg.weight_decay,
        warmup_steps=min(cfg.warmup_steps, steps), max_grad_norm=cfg.max_grad_norm,
        log_every=cfg.log_every, start=start, tags={"stage": name}, on_log=on_log)
    return StageResult(result.rows, {
        "steps": steps, "first_loss": result.rows[0]["loss"], "last_loss": result.loss_ema,
        "images_encoded": len(needed), "feature_seconds": round(feature_seconds, 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "trainable_parameters": result.trainable_parameters})


def ground_tokens(model: nn.Module, processor: ProcessorMixin, data: FeatureData, world: World,
                  cfg: ProjectorPretrainConfig, gen: torch.Generator) -> StageResult:
    """Ground the projector's image tokens in SmolLM2's word embeddings (the projector only;
    see ``vision_warmup.ground_image_tokens``): each token that lies wholly inside a cell
    of the world's grid learns to score its object's name and colour highest among all
    words. Labels come from the pretraining split's annotations."""
    start = time.perf_counter()
    n, steps = len(data.image_names), cfg.ground_steps
    # the images the stage will draw: the same generator draws, replayed on a copy
    replay = torch.Generator().manual_seed(0)
    replay.set_state(gen.get_state())
    drawn = torch.cat([torch.randint(n, (cfg.ground_batch_size,), generator=replay)
                       for _ in range(steps)])
    needed = data.bank.missing(drawn)
    with make_progress() as bar:
        task = bar.add_task("ground: image features", total=len(needed), info="")
        data.bank.ensure(needed, on_batch=lambda k: bar.update(task, advance=k))
    feature_seconds = time.perf_counter() - start
    by_image = {a["image"]: a for a in read_jsonl(world.pretrain_annotations)}
    cats, cols = cell_labels([by_image[name] for name in data.image_names], world.grid)
    side = math.isqrt(data.bank[drawn[:1]].shape[1])  # tokens form a side x side grid
    cats, cols = token_labels(cats, side, world.grid), token_labels(cols, side, world.grid)
    projector = projector_only(model)
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    with make_progress() as bar:
        task = bar.add_task("ground", total=steps, info="")
        log = ground_image_tokens(
            lambda idx: projector(data.bank[idx]), n, model.get_input_embeddings(),
            list(projector.parameters()), cats, cols, word_token_ids(tokenizer, CATEGORY_NAMES),
            word_token_ids(tokenizer, COLOUR_NAMES), steps=steps,
            batch_size=cfg.ground_batch_size, lr=cfg.ground_lr, gen=gen,
            on_step=lambda r: bar.update(task, advance=1,
                                         info=f"word acc {r['align_accuracy']:.2f}"))
    last = log[-20:]
    return StageResult(rows=[{"stage": "ground", "step": r["align_step"],
                              "loss": r["align_loss"], "accuracy": r["align_accuracy"]}
                             for r in log if r["align_step"] % cfg.log_every == 0
                             or r["align_step"] in (1, steps)],
                       summary={"steps": steps, "first_loss": log[0]["align_loss"],
                                "word_accuracy": sum(r["align_accuracy"] for r in last)
                                / len(last), "images_encoded": len(needed),
                                "feature_seconds": round(feature_seconds, 2),
                                "wall_seconds": round(time.perf_counter() - start, 2)})


def projector_only(model: nn.Module) -> nn.Module:
    """Freeze everything but the projector; returns the projector."""
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector  # type: ignore[union-attr]
    projector.requires_grad_(True)
    return projector


def with_language_model(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """LoRA adapters on the language model (or all its weights when LoRA is off) plus the
    projector trainable; the tower stays frozen. Returns the model to train (a peft model
    with adapters); ``merged`` turns it back into a plain one."""
    trainable = prepare_trainable(model, lora)
    for name, param in trainable.named_parameters():
        if "vision_tower" in name:
            param.requires_grad_(False)
        elif "multi_modal_projector" in name:
            param.requires_grad_(True)
    return trainable


# --- the smol preset's stages ------------------------------------------------------------

def _feature_stage(run: PretrainRun, name: str, trainable: nn.Module, steps: int,
                   lr: float) -> None:
    if not steps:
        return
    result = train_stage(
        name, trainable, run.model.model.multi_modal_projector, run.data, steps=steps, lr=lr,
        cfg=run.cfg, gen=run.gen, image_token_id=run.model.config.image_token_id,
        pad_id=run.pad_id, on_log=run.on_log)
    run.log.extend(result.rows)
    run.summary.setdefault("stages", {})[name] = result.summary
    run.summary["steps"] = run.summary.get("steps", 0) + steps


def ground_stage(run: PretrainRun) -> None:
    """The projector's image tokens learn to lie next to their words (no language model)."""
    if not run.cfg.ground_steps:
        return
    result = ground_tokens(run.model, run.processor, run.data, run.world, run.cfg, run.gen)
    run.log.extend(result.rows)
    run.summary.setdefault("stages", {})["ground"] = result.summary


def projector_stage(run: PretrainRun) -> None:
    """Only the projector trains; tower and language model are frozen."""
    projector_only(run.model)
    _feature_stage(run, "projector", run.model, run.cfg.projector_steps, run.cfg.projector_lr)


def lm_stage(run: PretrainRun) -> None:
    """LoRA on the language model (full weights if ``lora.enabled`` is false) plus the
    projector; adapters merged into the weights afterwards."""
    if not run.cfg.lm_steps:
        return
    trainable = with_language_model(run.model, run.cfg.lora)
    _feature_stage(run, "lm", trainable, run.cfg.lm_steps, run.cfg.lm_lr)
    run.model = merged(trainable)
    run.model.requires_grad_(False)
