"""The preference-training loop: the only place that holds state.

Run directory::

    config.yaml          the resolved config          env.json       versions, threads
    metrics.jsonl        one line per step            eval.jsonl     one line per evaluation
    reference/           cached reference log-probs   checkpoints/   step_NNNNNN folders
    final/               the trained model (adapters merged), loadable with the Auto classes
    result.json          summary, written last (its presence means the run finished)

``resume=True`` continues from the newest checkpoint: metrics and evaluations after it are
dropped and recomputed, so the finished run equals an uninterrupted one.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml

from dpalign.data.collate import EncodedPair, PairBatch, encode_pairs
from dpalign.data.fewshot import few_shot
from dpalign.data.records import read_preference_jsonl
from dpalign.data.sampling import batch_indices, steps_per_epoch
from dpalign.eval.preference import preference_metrics
from dpalign.io import (
    append_jsonl,
    atomic_directory,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_jsonl,
)
from dpalign.losses import dama_alpha_model, dama_batch_gap, update_running_mean
from dpalign.losses.base import LossOut, PairLogps
from dpalign.models.load import load_vlm, resolve_device, resolve_dtype
from dpalign.models.lora import merged, prepare_trainable
from dpalign.privacy.accounting import Ledger
from dpalign.privacy.label_dp import flip_probability, randomized_response
from dpalign.privacy.per_pair import Engine, make_engine
from dpalign.progress import make_progress
from dpalign.train.checkpoint import latest_checkpoint, restore, save_checkpoint
from dpalign.train.config import TrainConfig
from dpalign.train.dp_step import (
    PrivacyPlan,
    dp_update,
    plan_privacy,
    privacy_units,
    rank_and_world,
    spent_epsilon,
)
from dpalign.train.optim import build_optimizer
from dpalign.train.reference import cached_reference, compute_reference
from dpalign.train.step import Objective, chunk_batches, pair_logps, step_metrics

StepHook = Callable[[dict[str, Any]], None]


class RunDirError(ValueError):
    """The run directory holds another run, or nothing to resume."""


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int
    final_metrics: dict[str, Any]
    evaluations: list[dict[str, Any]]
    wall_seconds: float


def _prepare_dir(out: Path, cfg: TrainConfig, resume: bool) -> None:
    saved = out / "config.yaml"
    wanted = cfg.model_dump(mode="json")
    if resume:
        if not saved.is_file():
            raise RunDirError(f"{out}: no run to resume (config.yaml missing)")
        if yaml.safe_load(saved.read_text()) != wanted:
            raise RunDirError(f"{out}: --resume with a config that differs from the run's "
                              f"{saved}; resume with the same config")
        return
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: not empty; pass --resume to continue it or choose another "
                          "--out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(wanted, sort_keys=False))
    atomic_write_json(out / "env.json", {
        "python": platform.python_version(), "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        **{p: version(p) for p in ("torch", "transformers", "peft", "dpalign")}})


def _truncate(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the rows of a JSONL log with ``step <= step`` (rewritten atomically)."""
    if not path.is_file():
        return []
    kept = [r for r in read_jsonl(path) if r["step"] <= step]
    atomic_write_jsonl(path, kept)
    return kept


def _check_inputs(cfg: TrainConfig, objective: Objective, pairs: list[EncodedPair]) -> None:
    if objective.spec.needs_hardness:
        missing = [p.id for p in pairs if p.hardness is None]
        if missing:
            raise ValueError(f"{cfg.data.train}: loss {cfg.loss.name!r} needs metadata."
                             f"{cfg.data.hardness_field} but record {missing[0]!r} has none "
                             f"({len(missing)} records lack it)")


class Evaluator:
    """Held-out preference metrics (and POPE/CHAIR on a world) at a given step."""

    def __init__(self, cfg: TrainConfig, processor: Any, held: list[EncodedPair],
                 held_ref: PairLogps | None, pad_id: int) -> None:
        self.cfg, self.processor, self.held, self.held_ref = cfg, processor, held, held_ref
        self.pad_id = pad_id

    def __call__(self, model: torch.nn.Module, step: int, final: bool = True) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        if self.held and self.held_ref is not None:
            policy = compute_reference(model, self.held, self.pad_id, with_corrupt=False,
                                       batch_size=self.cfg.eval.batch_size)
            row |= {f"heldout_{k}": v for k, v in
                    preference_metrics(policy, self.held_ref, self.cfg.loss.beta).items()}
        world = self.cfg.eval.world
        if self.cfg.world is not None and (world is True or (world == "end" and final)):
            row |= _world_figures(model, self.processor, self.cfg)
        return row


def _world_figures(model: torch.nn.Module, processor: Any, cfg: TrainConfig) -> dict[str, Any]:
    from dpalign.eval.world_eval import EvalSettings, evaluate_world
    from dpalign.world.load import World

    res = evaluate_world(model, processor, World.load(cfg.world),  # type: ignore[arg-type]
                         EvalSettings(batch_size=cfg.eval.batch_size, limit=cfg.eval.limit))
    figures = {f"pope_{s}_{m}": v[m] for s, v in res["pope"].items()
               for m in ("accuracy", "f1", "yes_ratio")}
    chair = res["chair"]
    return figures | {"chair_s": chair["chair_s"], "chair_i": chair["chair_i"],
                      "recall": chair["recall"],
                      "partner_hallucination_rate": chair["partner_hallucination_rate"]}


def _rank_dir(out: Path, cfg: TrainConfig) -> Path:
    """The run directory of this process: ``out`` on rank 0 (or without torch.distributed);
    ``out.rankR`` on other ranks, which keep their own copy of the (identical) run."""
    rank, world = rank_and_world()
    if world == 1:
        return out
    if not cfg.privacy.enabled:
        raise ValueError("distributed training is implemented for DP runs only "
                         "(privacy.enabled: true)")
    return out if rank == 0 else out.with_name(f"{out.name}.rank{rank}")


def _progress_info(row: dict[str, Any]) -> str:
    parts = [f"{k} {row[k]:.3f}" for k in ("loss", "reward_accuracy", "epsilon")
             if row.get(k) is not None]
    return "  ".join(parts)


def _total_steps(cfg: TrainConfig, n: int) -> int:
    loop = cfg.train
    return loop.steps if loop.steps is not None else loop.epochs * steps_per_epoch(  # type: ignore[operator]
        n, loop.batch_size)


@dataclass
class Session:
    """A run's model, data and optimizer, ready to step; ``step`` does one update."""

    cfg: TrainConfig
    model: torch.nn.Module
    processor: Any
    pairs: list[EncodedPair]
    ref: PairLogps
    objective: Objective
    optimizer: torch.optim.Optimizer
    schedule: Any
    params: list[torch.nn.Parameter]
    evaluate: Evaluator
    pad_id: int
    total: int
    units: list[list[int]]
    plan: PrivacyPlan | None
    engine: Engine | None

    def step(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        """One optimizer update on batch ``step`` (1-based); updates ``state`` in place and
        returns the step's metrics row."""
        tick = time.perf_counter()
        row = self._private_grads(step, state) if self.plan else self._plain_grads(step, state)
        lr = self.schedule.get_last_lr()[0]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step, **row, "lr": lr, "step_seconds": time.perf_counter() - tick}

    def _private_grads(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        """Set ``.grad`` to the DP noisy mean (``dp_update``); its metrics and epsilon."""
        cfg = self.cfg
        row = dp_update(self.engine, self.pairs, self.ref, self.units, self.objective,  # type: ignore[arg-type]
                        self.plan, cfg.privacy, step=step, seed=cfg.train.seed,  # type: ignore[arg-type]
                        pad_id=self.pad_id, state=state,
                        micro_batch=cfg.train.micro_batch_size)
        accounted = step % cfg.privacy.account_every == 0 or step == self.total
        return {**row, "epsilon": spent_epsilon(state, cfg.privacy) if accounted else None}

    def _plain_grads(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        """Backward of the batch-mean loss (``train.micro_batch_size`` pairs at a time, the
        gradients summed), clipped to ``optim.max_grad_norm``; metrics."""
        cfg, objective = self.cfg, self.objective
        idx = batch_indices(len(self.pairs), cfg.train.batch_size, cfg.train.seed, step - 1)
        parts = chunk_batches(self.pairs, idx, self.ref, self.pad_id,
                              with_corrupt=objective.spec.needs_corrupt,
                              size=cfg.train.micro_batch_size)
        batch_ref = self.ref.index(torch.tensor(idx))
        first = pair_logps(self.model, parts[0][0])
        alpha = (self._dama_alpha(first, [b for b, _ in parts[1:]], batch_ref, state)
                 if objective.spec.needs_alpha_model else None)
        results, policies = [], []
        for k, (batch, part_ref) in enumerate(parts):
            policy = first if k == 0 else pair_logps(self.model, batch)
            result = objective(policy, part_ref, hardness=batch.hardness, alpha_model=alpha)
            (result.per_example.sum() / len(idx)).backward()
            results.append(LossOut(result.per_example.detach(), result.metrics))
            policies.append(policy.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params,
                                                   cfg.optim.max_grad_norm or math.inf)
        return {"epoch": (step - 1) // steps_per_epoch(len(self.pairs), cfg.train.batch_size),
                **step_metrics(LossOut.cat(results), PairLogps.cat(policies), batch_ref),
                "grad_norm": float(grad_norm)}

    def _dama_alpha(self, first: PairLogps, rest: list[PairBatch], batch_ref: PairLogps,
                    state: dict[str, Any]) -> torch.Tensor:
        """DAMA's model-aware factor from the whole batch's reward gap (``first`` chunk's
        policy log-probs, the ``rest`` taken without a graph; ``batch_ref`` the whole
        batch's), advancing the running mean in ``state``."""
        with torch.no_grad():
            later = [pair_logps(self.model, batch) for batch in rest]
        gap = dama_batch_gap(PairLogps.cat([first.detach(), *later]), batch_ref)
        alpha = dama_alpha_model(gap, state["dama_running_mean"])
        state["dama_running_mean"] = update_running_mean(
            state["dama_running_mean"], gap, self.objective.params.momentum)  # type: ignore[attr-defined]
        return alpha


def initial_state() -> dict[str, Any]:
    """The loop state before step 1 (saved in every checkpoint): DAMA's running reward-gap
    mean and the privacy ledger."""
    return {"dama_running_mean": None, "ledger": Ledger().to_json()}


def prepare(cfg: TrainConfig, out: Path) -> Session:
    """Load the model and data, cache reference log-probs in ``out/reference``, add LoRA and
    build the optimizer: everything before the first step."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    loaded = load_vlm(cfg.model, device=str(device), dtype=resolve_dtype(cfg.train.dtype, device),
                      trust_remote_code=cfg.trust_remote_code)
    model, processor = loaded.model, loaded.processor
    pad_id = processor.tokenizer.pad_token_id  # type: ignore[attr-defined]
    objective = Objective.from_config(cfg.loss)
    with_corrupt = objective.spec.needs_corrupt
    records = few_shot(read_preference_jsonl(cfg.data.train), cfg.data.k, cfg.data.seed)
    if cfg.privacy.label_epsilon is not None:
        noise = randomized_response(records, cfg.privacy.label_epsilon, cfg.data.seed)
        records = list(noise.records)
    pairs = encode_pairs(records, processor, corrupt_seed=cfg.data.seed if with_corrupt else None,
                         hardness_field=cfg.data.hardness_field)
    _check_inputs(cfg, objective, pairs)
    held = (encode_pairs(read_preference_jsonl(cfg.data.heldout)[:cfg.eval.heldout_pairs],
                         processor, hardness_field=cfg.data.hardness_field)
            if cfg.data.heldout else [])

    ref = cached_reference(out / "reference" / "train.safetensors", model, pairs, pad_id,
                           model_dir=cfg.model, with_corrupt=with_corrupt).to(device)
    held_ref = (cached_reference(out / "reference" / "heldout.safetensors", model, held,
                                 pad_id, model_dir=cfg.model, with_corrupt=False).to(device)
                if held else None)
    model = prepare_trainable(model, cfg.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = _total_steps(cfg, len(pairs))
    optimizer, schedule = build_optimizer(params, cfg.optim, total)
    units = privacy_units(pairs, [r.user_id for r in records], cfg.privacy.unit)
    plan = (plan_privacy(cfg.privacy, len(units), cfg.train.batch_size, total)
            if cfg.privacy.enabled else None)
    engine = (make_engine(cfg.privacy.engine, model,
                          {k: p for k, p in model.named_parameters() if p.requires_grad})
              if plan else None)
    return Session(cfg, model, processor, pairs, ref, objective, optimizer, schedule, params,
                   Evaluator(cfg, processor, held, held_ref, pad_id), pad_id, total, units,
                   plan, engine)


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False,
          on_step: StepHook | None = None) -> TrainResult:
    """Train ``cfg.model`` on the preference pairs of ``cfg.data``; see the module doc."""
    out = _rank_dir(Path(out), cfg)
    fresh = not resume and not out.exists()
    _prepare_dir(out, cfg, resume)
    started = time.perf_counter()
    try:
        run = prepare(cfg, out)
    except BaseException:
        if fresh:  # bad input: leave nothing behind, so the same --out works once fixed
            shutil.rmtree(out, ignore_errors=True)
        raise
    model, total = run.model, run.total
    state = initial_state()
    if run.plan is not None:
        atomic_write_json(out / "privacy.json", run.plan.to_dict(cfg.privacy))
    start = 0
    if resume and (ck := latest_checkpoint(out / "checkpoints")) is not None:
        restore(ck, model, run.optimizer, run.schedule)
        start, state = ck.step, ck.state
    history = _truncate(out / "metrics.jsonl", start)
    evaluations = _truncate(out / "eval.jsonl", start)
    if start == 0 and (cfg.eval.every or cfg.data.heldout) and not evaluations:
        evaluations.append(run.evaluate(model, 0, final=total == 0))
        append_jsonl(out / "eval.jsonl", evaluations[-1])

    stopped = None
    with make_progress() as bar:
        task = bar.add_task("train", total=total, completed=start, info="")
        for step in range(start + 1, total + 1):
            if run.plan is not None and step > run.plan.budget_steps:
                stopped = (f"stopped before step {step}: one more step would take epsilon "
                           f"above privacy.target_epsilon={cfg.privacy.target_epsilon}")
                bar.console.print(stopped)
                break
            row = run.step(step, state)
            history.append(row)
            append_jsonl(out / "metrics.jsonl", row)
            if on_step:
                on_step(row)
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == total):
                evaluations.append(run.evaluate(model, step, final=step == total))
                append_jsonl(out / "eval.jsonl", evaluations[-1])
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == total:
                save_checkpoint(out / "checkpoints", step, model, run.optimizer, run.schedule,
                                state, cfg.checkpoint.keep)
            bar.update(task, advance=1, info=_progress_info(row))

    if cfg.data.heldout and not cfg.eval.every and evaluations[-1]["step"] != total:
        evaluations.append(run.evaluate(model, total))
        append_jsonl(out / "eval.jsonl", evaluations[-1])
    with atomic_directory(out / "final") as staging:
        merged(model).save_pretrained(staging)
        run.processor.save_pretrained(staging)
    wall = time.perf_counter() - started
    final = history[-1] if history else {}
    privacy = None
    if run.plan is not None:
        privacy = {**run.plan.to_dict(cfg.privacy), "steps_taken": len(history),
                   "epsilon": spent_epsilon(state, cfg.privacy)}
    if cfg.privacy.label_epsilon is not None:
        privacy = {**(privacy or {}), "label_epsilon": cfg.privacy.label_epsilon,
                   "label_flip_rate": flip_probability(cfg.privacy.label_epsilon),
                   "label_guarantee": "label-level DP: protects which answer was preferred, "
                                      "not the images or texts"}
    atomic_write_json(out / "result.json", {
        "steps": total, "n_pairs": len(run.pairs), "final_step": final,
        "evaluations": evaluations, "privacy": privacy, "stopped": stopped,
        "wall_seconds": round(wall, 2)})
    return TrainResult(out, total, final, evaluations, wall)
