"""Pretrain a base VLM on a world's biased pretraining split (supervised, response tokens).

Each model preset has a recipe (``RECIPES``): its settings class, whose defaults are the
preset's, how the split is loaded, and the stages that run in order:

- ``tiny`` (``PretrainConfig``): every part starts from scratch. Vision warm-up (the tower
  learns to see the world's cells), grounding of the image tokens in word embeddings
  (``vision_warmup``), then full supervised fine-tuning;
- ``smol`` (``ProjectorPretrainConfig``): the tower is pretrained and frozen, the language
  model pretrained. The projector alone, then LoRA on the language model with the
  projector, on cached image features (``projector``).

The result is a model folder loadable with ``AutoModelForImageTextToText`` /
``AutoProcessor``, plus ``pretrain.json`` (config, world fingerprint, wall time, per-stage
summary) and ``metrics.jsonl`` (one line per logged step). The folder is written under a
temporary name and renamed into place; an existing folder built from the same config and
world is reused.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from transformers import ProcessorMixin, get_cosine_schedule_with_warmup

from dpalign.io import atomic_directory, atomic_write_json, atomic_write_jsonl, read_jsonl
from dpalign.models.encode import PromptEncoder, pad_batch, pixel_values, response_ids
from dpalign.models.lora import merged
from dpalign.models.presets import PRESETS
from dpalign.progress import make_progress
from dpalign.train.projector import (
    ProjectorPretrainConfig,
    ground_tokens,
    load_feature_data,
    projector_only,
    shuffled_batches,
    train_stage,
    with_language_model,
)
from dpalign.train.vision_warmup import (
    align_projector,
    cell_labels,
    warm_up_vision,
    word_token_ids,
)
from dpalign.world.load import World
from dpalign.world.vocab import CATEGORY_NAMES, COLOUR_NAMES

FORMAT = "dpalign-pretrain/1"
Log = Callable[[dict[str, float]], None]


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


AnyPretrainConfig = PretrainConfig | ProjectorPretrainConfig


@dataclass(frozen=True)
class PretrainResult:
    out: Path
    built: bool
    first_loss: float
    last_loss: float
    wall_seconds: float


@dataclass
class PretrainRun:
    """What the stages of a recipe share: they train ``model`` (a stage may replace it, e.g.
    by merging adapters), append ``log`` rows and fill ``summary`` (``pretrain.json``)."""

    model: torch.nn.Module
    processor: ProcessorMixin
    world: World
    cfg: Any
    data: Any
    gen: torch.Generator
    start: float
    on_log: Log | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return self.processor.tokenizer.pad_token_id  # type: ignore[attr-defined]


Stage = Callable[[PretrainRun], None]


@dataclass(frozen=True)
class Recipe:
    """A preset's pretraining: settings class (defaults = the preset's), data loader
    ``(world, model, processor, cfg) -> data``, and stages run in order; ``align``: the
    ``TrainConfig`` settings (dotted keys) that aligning the preset's model needs on a
    24 GiB CPU machine, used by a study where it sets none of its own."""

    config: type[BaseModel]
    load: Callable[[World, torch.nn.Module, ProcessorMixin, Any], Any]
    stages: tuple[Stage, ...]
    align: Mapping[str, Any] = field(default_factory=dict)


# --- tiny: the tower learns to see, the image tokens are grounded, then full SFT ----------

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
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(optim, cfg.warmup_steps, cfg.steps)
    running = math.nan
    batches = shuffled_batches(len(data.prompts), cfg.batch_size, cfg.steps, run.gen)
    with make_progress() as bar:
        task = bar.add_task("pretrain", total=cfg.steps, info="")
        for step, idx in enumerate(batches, 1):
            batch = pad_batch([data.prompts[i] for i in idx], [data.responses[i] for i in idx],
                              run.pad_id)
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=data.pixels[data.image_index[idx]],
                         labels=batch.labels).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            value = float(loss.detach())
            running = value if math.isnan(running) else 0.95 * running + 0.05 * value
            if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
                row = {"step": step, "loss": value, "loss_ema": running,
                       "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                       "time": time.perf_counter() - run.start}
                run.log.append(row)
                if run.on_log:
                    run.on_log(row)
            bar.update(task, advance=1, info=f"loss {running:.3f}")
    model.eval()
    run.summary["steps"] = cfg.steps


# --- smol: frozen pretrained tower; grounding, projector, language model (LoRA) --------

def _feature_stage(run: PretrainRun, name: str, trainable: torch.nn.Module, steps: int,
                   lr: float) -> None:
    cfg = run.cfg
    if not steps:
        return
    result = train_stage(
        name, trainable, run.model.model.multi_modal_projector, run.data, steps=steps, lr=lr,
        cfg=cfg, gen=run.gen, image_token_id=run.model.config.image_token_id,
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


RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(PretrainConfig, lambda world, model, processor, cfg:
                   load_sft_data(world, processor), (vision_stage, sft_stage)),
    "smol": Recipe(ProjectorPretrainConfig, lambda world, model, processor, cfg:
                   load_feature_data(world, model, processor, cfg.feature_batch_size,
                                     cfg.images),
                   (ground_stage, projector_stage, lm_stage),
                   # a batch of 16 pairs of ~170 tokens through SmolLM2 holds ~9 GB of
                   # activations for the backward; chunks of 4 keep two runs in 24 GiB
                   align={"train.micro_batch_size": 4}),
}


def default_config(preset: str) -> AnyPretrainConfig:
    """The settings ``dpalign pretrain --preset NAME`` starts from."""
    if preset not in RECIPES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[preset].config(preset=preset)  # type: ignore[return-value]


def recipe_for(cfg: BaseModel) -> Recipe:
    """The recipe of ``cfg.preset``; ``cfg`` must be that recipe's settings class."""
    preset = getattr(cfg, "preset", None)
    if preset not in RECIPES or preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[preset]
    if not isinstance(cfg, recipe.config):
        raise ValueError(f"preset {preset!r} is configured by {recipe.config.__name__}, not "
                         f"{type(cfg).__name__}; start from default_config({preset!r})")
    return recipe


def _fingerprint(cfg: BaseModel, world: World) -> dict[str, object]:
    return {"format": FORMAT, "config": cfg.model_dump(mode="json"),
            "world_config": world.manifest["config"]}


def read_record(out: Path) -> dict[str, Any] | None:
    """The ``pretrain.json`` of a folder ``pretrain`` wrote (config with its ``preset``,
    fingerprint, losses, timings), or None where there is none."""
    meta = Path(out) / "pretrain.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def _is_complete(saved: dict[str, Any] | None, fingerprint: dict[str, object]) -> bool:
    return saved is not None and {k: saved.get(k) for k in fingerprint} == fingerprint


def pretrain(world_dir: str | Path, out: str | Path, cfg: AnyPretrainConfig, *,
             force: bool = False, on_log: Log | None = None) -> PretrainResult:
    """Build a fresh ``cfg.preset`` model and run its recipe on the world's pretraining split."""
    out = Path(out)
    recipe = recipe_for(cfg)
    world = World.load(world_dir)
    fingerprint = _fingerprint(cfg, world)
    if out.exists() and not force:
        meta = read_record(out)
        if _is_complete(meta, fingerprint):
            return PretrainResult(out, False, meta["first_loss"], meta["last_loss"],
                                  meta["wall_seconds"])
        if any(out.iterdir()):
            raise FileExistsError(f"{out}: exists and holds another model; pass --force "
                                  "to replace it or choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    texts = [t for r in world.pretrain_rows() for t in (r["prompt"], r["response"])]
    built = PRESETS[cfg.preset](texts, cfg.seed)
    data = recipe.load(world, built.model, built.processor, cfg)
    run = PretrainRun(built.model, built.processor, world, cfg, data,
                      torch.Generator().manual_seed(cfg.seed), start, on_log)
    for stage in recipe.stages:
        stage(run)
    wall = time.perf_counter() - start
    model = run.model.eval()
    losses = [r for r in run.log if "loss_ema" in r] or run.log  # language-model stages
    first, last = losses[0]["loss"], losses[-1].get("loss_ema", losses[-1]["loss"])

    with atomic_directory(out) as staging:
        model.save_pretrained(staging)
        run.processor.save_pretrained(staging)
        atomic_write_jsonl(staging / "metrics.jsonl", run.log)
        atomic_write_json(staging / "pretrain.json", {
            **fingerprint, "first_loss": first, "last_loss": last,
            "wall_seconds": round(wall, 2),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), **run.summary,
            **({"provenance": built.provenance} if built.provenance else {}),
        })
    return PretrainResult(out, True, first, last, wall)
