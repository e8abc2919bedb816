"""The ``tiny`` preset's pretraining: every part starts from scratch.

Vision warm-up (the tower learns to see the world's cells), grounding of the image tokens in
word embeddings (both ``vision_warmup``), then supervised fine-tuning of every trainable
parameter on the pretraining split's captions and answers (loss on response tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dpalign.io import read_jsonl
from dpalign.models.encode import PromptEncoder, pad_batch, pixel_values, response_ids
from dpalign.pretrain.loop import PretrainRun, shuffled_batches, supervised
from dpalign.pretrain.vision_warmup import (
    align_projector,
    cell_labels,
    warm_up_vision,
    word_token_ids,
)
from dpalign.progress import make_progress
from dpalign.world.load import World
from dpalign.world.vocab import CATEGORY_NAMES, COLOUR_NAMES


class PretrainConfig(BaseModel):
    """Settings of the ``tiny`` recipe (vision warm-up, grounding, full fine-tuning)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = "tiny"
    steps: int = Field(2400, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    vision_steps: int = Field(400, ge=0)
    vision_batch_size: int = Field(64, ge=1)
    vision_lr: float = Field(1e-3, gt=0)
    freeze_vision: bool = True
    align_steps: int = Field(300, ge=0, description="stage 1b: image tokens -> word embeddings")
    align_lr: float = Field(3e-3, gt=0)
    threads: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class SFTData:
    """Token ids per example and processed images, (N_img, C, H, W), indexed per example."""

    prompts: list[list[int]]
    responses: list[list[int]]
    image_index: torch.Tensor
    pixels: torch.Tensor
    image_paths: list[str]


def load_sft_data(world: World, processor: object) -> SFTData:
    """Encode every pretraining row once; each image is processed once."""
    rows = world.pretrain_rows()
    paths = sorted({r["image"] for r in rows})
    position = {p: i for i, p in enumerate(paths)}
    folder = world.pretrain_file.parent
    images = [Image.open(folder / p).convert("RGB") for p in paths]
    pixels = torch.cat([pixel_values(processor, images[i:i + 512])  # type: ignore[arg-type]
                        for i in range(0, len(images), 512)])
    encode = PromptEncoder(processor, images[0].size)  # type: ignore[arg-type]
    return SFTData(
        prompts=[encode(r["prompt"]) for r in rows],
        responses=[response_ids(processor, r["response"]) for r in rows],  # type: ignore[arg-type]
        image_index=torch.tensor([position[r["image"]] for r in rows]),
        pixels=pixels,
        image_paths=paths,
    )


def vision_stage(run: PretrainRun) -> None:
    """Stage 1 (see ``vision_warmup``), then optionally freeze the tower for stage 2."""
    cfg, model, data, world = run.cfg, run.model, run.data, run.world
    run.summary["vision_cell_accuracy"] = 0.0
    if not cfg.vision_steps:
        return
    model.train()
    by_image = {a["image"]: a for a in read_jsonl(world.pretrain_annotations)}
    cats, cols = cell_labels([by_image[p] for p in data.image_paths], world.grid)
    with make_progress() as bar:
        task = bar.add_task("see", total=cfg.vision_steps, info="")
        log = warm_up_vision(
            model, data.pixels, cats, cols, world.grid, steps=cfg.vision_steps,
            batch_size=cfg.vision_batch_size, lr=cfg.vision_lr, gen=run.gen,
            on_step=lambda r: bar.update(task, advance=1,
                                         info=f"cell acc {r['cell_accuracy']:.2f}"))
    run.summary["vision_cell_accuracy"] = sum(r["cell_accuracy"] for r in log[-20:]) / len(
        log[-20:])
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    if cfg.align_steps:
        tokenizer = run.processor.tokenizer  # type: ignore[attr-defined]
        with make_progress() as bar:
            task = bar.add_task("ground", total=cfg.align_steps, info="")
            align_projector(
                model, data.pixels, cats, cols, word_token_ids(tokenizer, CATEGORY_NAMES),
                word_token_ids(tokenizer, COLOUR_NAMES), steps=cfg.align_steps,
                batch_size=cfg.vision_batch_size, lr=cfg.align_lr, gen=run.gen,
                on_step=lambda r: bar.update(task, advance=1,
                                             info=f"word acc {r['align_accuracy']:.2f}"))


def sft_stage(run: PretrainRun) -> None:
    """Supervised fine-tuning of every trainable parameter on the captions and answers."""
    cfg, model, data = run.cfg, run.model, run.data

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        batch = pad_batch([data.prompts[i] for i in idx], [data.responses[i] for i in idx],
                          run.pad_id)
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=data.pixels[data.image_index[idx]], labels=batch.labels).loss

    result = supervised(
        model, shuffled_batches(len(data.prompts), cfg.batch_size, cfg.steps, run.gen), loss_of,
        name="pretrain", steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
        log_every=cfg.log_every, start=run.start, on_log=run.on_log)
    run.log.extend(result.rows)
    run.summary["steps"] = cfg.steps
