"""The preference-training loop: the only place that holds state.

It writes a run directory, whose files :class:`dpalign.rundir.RunDir` names: the resolved
config, one metrics line per step, one evaluation line per evaluation, cached reference
log-probs, checkpoints, ``final/`` (the trained model, adapters merged, loadable with the
Auto classes) and ``result.json``, written last (its presence means the run finished).

``resume=True`` continues from the newest checkpoint: metrics and evaluations after it are
dropped and recomputed, so the finished run equals an uninterrupted one. A torn last line of
``metrics.jsonl`` or ``eval.jsonl`` (a kill or a full disk mid-append) is dropped with a
warning; an unreadable earlier line is an error naming the file and line.

Bad input fails before the first step and leaves the directory as it was found (a fresh
start into an empty ``out`` leaves it empty, into a new one removes it). The data and the
settings are checked before anything is written or the model loads (``check_run``: data.k
against the pool, train.batch_size against the training pairs and privacy units, a privacy
budget that allows at least one step); token lengths are checked once the processor is
loaded, before the model runs: a pair longer than the model's maximum positions (or
``data.max_length``) is refused, never cut. A run the privacy budget stops early reports
the steps it took (``result.json`` ``steps``; ``planned_steps`` the configured ones).
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml

from dpalign.data.schema import PreferenceRecord
from dpalign.eval.preference import preference_metrics
from dpalign.io import (
    append_jsonl,
    atomic_directory,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_log_jsonl,
)
from dpalign.losses.base import PairLogps
from dpalign.losses.objective import Objective
from dpalign.models.load import load_model, resolve_device, resolve_dtype
from dpalign.models.lora import merged
from dpalign.models.pairs import EncodedPair, encode_pairs
from dpalign.online.source import PairSource
from dpalign.privacy.label_dp import flip_probability
from dpalign.privacy.per_pair import make_engine
from dpalign.privacy.plan import PrivacyPlan, rank_and_world, spent_epsilon
from dpalign.progress import make_progress
from dpalign.rl.privacy import composed
from dpalign.rundir import RunDir, RunDirError
from dpalign.track import Tracker, check_installed, open_tracker, run_info
from dpalign.train.checkpoint import latest_checkpoint, restore, save_checkpoint
from dpalign.train.checks import (
    RunData,
    check_lengths,
    check_run,
    length_limit,
)
from dpalign.train.config import TrainConfig
from dpalign.train.dp_step import Canaries, DPStep
from dpalign.train.methods import bdhs_records, pair_source, rl_rollouts
from dpalign.train.optim import build_optimizer, set_noise_variance
from dpalign.train.reference import cached_reference, compute_reference
from dpalign.train.rl_step import RLDPStep, RLPlainStep, Rollouts
from dpalign.train.state import GradStep, LoopState
from dpalign.train.step import PlainStep
from dpalign.train.tasks import (
    eval_beta,
    save_task_info,
    task_model,
    task_records,
    task_reference,
    task_trainable,
)

StepHook = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    """``steps``: the steps taken (fewer than ``planned_steps`` when the privacy budget
    stopped the run; ``stopped`` then says why)."""

    out: Path
    steps: int
    final_metrics: dict[str, Any]
    evaluations: list[dict[str, Any]]
    wall_seconds: float
    planned_steps: int = 0
    stopped: str | None = None


def _same_config(saved: Any, cfg: TrainConfig) -> bool:
    """Whether a run's saved config is ``cfg`` (settings added since it was written take
    their defaults)."""
    wanted = cfg.model_dump(mode="json")
    if saved == wanted:
        return True
    try:
        return TrainConfig.model_validate(saved).model_dump(mode="json") == wanted
    except ValueError:
        return False


def _check_dir(out: Path, cfg: TrainConfig, resume: bool, allowed: frozenset[str] = frozenset()
               ) -> None:
    """Refuse a resume of no run or of another config, and a fresh start into a directory
    holding anything but the entries ``allowed`` (an audit's canaries) and the datasets
    ``dpalign.train`` wrote (``RunDir.data_dir``); writes nothing."""
    saved = RunDir(out).config
    allowed = allowed | {RunDir(out).data_dir.name}
    if resume:
        if not saved.is_file():
            raise RunDirError(f"{out}: no run to resume ({saved.name} missing)")
        if not _same_config(yaml.safe_load(saved.read_text()), cfg):
            raise RunDirError(f"{out}: --resume with a config that differs from the run's "
                              f"{saved}; resume with the same config")
    elif out.is_dir() and any(p.name not in allowed for p in out.iterdir()):
        raise RunDirError(f"{out}: not empty; pass --resume to continue it or choose another "
                          "--out")


def _start_dir(out: Path, cfg: TrainConfig) -> None:
    """Create ``out`` with the resolved config and the environment's versions."""
    out.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir(out)
    atomic_write_text(run_dir.config,
                      yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    atomic_write_json(run_dir.env, {
        "python": platform.python_version(), "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        **{p: version(p) for p in ("torch", "transformers", "peft", "dpalign")}})


@contextmanager
def _undone_on_failure(out: Path) -> Iterator[None]:
    """On an error inside, put ``out`` back as it was found: remove it (and the parents
    made for it) when it did not exist, empty it when it existed (empty, as checked)."""
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif out.is_dir():
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def _truncate(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the rows of a JSONL log with ``step <= step`` (rewritten atomically); a torn
    last line is dropped (``read_log_jsonl``)."""
    if not path.is_file():
        return []
    rows = read_log_jsonl(path)
    bad = next((n for n, r in enumerate(rows, start=1) if not isinstance(r.get("step"), int)),
               None)
    if bad is not None:
        raise RunDirError(f"{path}: row {bad} has no integer 'step'")
    kept = [r for r in rows if r["step"] <= step]
    atomic_write_jsonl(path, kept)
    return kept


def _check_history(path: Path, rows: list[dict[str, Any]], start: int) -> None:
    """The metrics kept on resume must be one row for each step 1..start (the checkpoint's)."""
    steps = [r["step"] for r in rows]
    if steps != list(range(1, start + 1)):
        missing = sorted(set(range(1, start + 1)) - set(steps))
        problem = (f"no row for step(s) {missing[:5]}" if missing
                   else f"{len(steps)} rows for steps 1..{start}, out of order or repeated")
        raise RunDirError(f"{path}: {problem}, though the newest checkpoint is at step "
                          f"{start}; resume needs one row per step up to it")


def _check_inputs(cfg: TrainConfig, objective: Objective, pairs: list[EncodedPair]) -> None:
    if objective.spec.needs_hardness:
        missing = [p.id for p in pairs if p.hardness is None]
        if missing:
            raise ValueError(f"{cfg.data.train}: loss {cfg.loss.name!r} needs metadata."
                             f"{cfg.data.hardness_field} but record {missing[0]!r} has none "
                             f"({len(missing)} records lack it)")


class Evaluator:
    """Held-out preference metrics (and POPE/CHAIR on a world) at a given step.

    ``parts`` maps a metric prefix to its pairs and their cached reference log-probs:
    ``heldout`` (the test part when a validation part is split off) and ``val``."""

    def __init__(self, cfg: TrainConfig, processor: Any,
                 parts: dict[str, tuple[list[EncodedPair], PairLogps]], pad_id: int) -> None:
        self.cfg, self.processor, self.parts, self.pad_id = cfg, processor, parts, pad_id

    def __call__(self, model: torch.nn.Module, step: int, final: bool = True) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        for prefix, (pairs, ref) in self.parts.items():
            # At step 0 no parameter has moved (adapters start at B = 0): the policy IS the
            # reference, so its log-probs are reused, not recomputed. A recomputation differs
            # only by rounding (~1e-8 on some CPUs), which is no measurement of the policy.
            policy = ref if step == 0 else compute_reference(
                model, pairs, self.pad_id, with_corrupt=False,
                batch_size=self.cfg.eval.batch_size)
            row |= {f"{prefix}_{k}": v for k, v in
                    preference_metrics(policy, ref, eval_beta(self.cfg)).items()}
        world = self.cfg.eval.world
        if (self.cfg.world is not None and not self.cfg.reward.enabled
                and (world is True or (world == "end" and final))):
            row |= world_figures(model, self.processor, self.cfg)
        return row


def world_figures(model: torch.nn.Module, processor: Any, cfg: TrainConfig) -> dict[str, Any]:
    """POPE (``pope_<split>_<accuracy|f1|yes_ratio|n>``) and CHAIR figures of ``model`` on
    the run's world, with the run's evaluation settings (the keys of an eval row)."""
    from dpalign.eval.world_eval import EvalSettings, evaluate_world
    from dpalign.world.load import World

    res = evaluate_world(model, processor, World.load(cfg.world),  # type: ignore[arg-type]
                         EvalSettings(batch_size=cfg.eval.batch_size, limit=cfg.eval.limit,
                                splits=tuple(cfg.eval.pope_splits)))
    figures = {f"pope_{s}_{m}": v[m] for s, v in res["pope"].items()
               for m in ("accuracy", "f1", "yes_ratio", "n")}
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


@dataclass
class Session:
    """A run's model, data and optimizer, ready to step; ``step`` does one update.

    ``grad_step`` (a ``PlainStep``, or a ``DPStep`` when ``plan`` is set) sets the
    gradients; ``units`` holds the pair indices of each privacy unit."""

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
    grad_step: GradStep
    records: list[PreferenceRecord] = field(default_factory=list)
    reward_info: dict[str, Any] | None = None
    tracker: Tracker = field(default_factory=Tracker)

    def step(self, step: int, state: LoopState) -> tuple[dict[str, Any], LoopState]:
        """One optimizer update on batch ``step`` (1-based): the step's metrics row and the
        state after it (``state`` itself is a value and stays as it was). The DP step's
        noise variance (``dp_noise_variance``; 0 without DP) is handed to the optimizer
        first, for the optimizers that correct for it (``dpadam_bc``)."""
        tick = time.perf_counter()
        row, state = self.grad_step(step, state)
        set_noise_variance(self.optimizer, row.get("dp_noise_variance", 0.0))
        lr = self.schedule.get_last_lr()[0]
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step, **row, "lr": lr, "step_seconds": time.perf_counter() - tick}, state


def initial_state() -> LoopState:
    """The loop state before step 1 (saved in every checkpoint): no loss state (DAMA's
    running reward-gap mean starts unset) and an empty privacy ledger."""
    return LoopState()


def build_grad_step(cfg: TrainConfig, model: torch.nn.Module, pairs: list[EncodedPair],
                    ref: PairLogps, objective: Objective, pad_id: int, units: list[list[int]],
                    plan: PrivacyPlan | None, total: int,
                    canaries: Canaries | None = None,
                    source: PairSource | None = None,
                    rollouts: Rollouts | None = None) -> GradStep:
    """The run's gradient step over the parameters of ``model`` that require grad: the DP
    step when ``plan`` is set (its per-pair engine ``privacy.engine``; with an audit's
    ``canaries``, their ``dp_step`` class fed with them), else the plain one. ``source``
    makes the step's pairs (online / mixed DPO; None: the recorded ``pairs``); with
    ``rollouts`` (RL) the steps are RL's, the prompt with its answers the unit."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if rollouts is not None:
        if canaries is not None:
            raise ValueError("audit canaries are not supported in RL runs")
        if plan is None:
            return RLPlainStep(cfg, rollouts, list(named.values()))
        return RLDPStep(cfg, make_engine(cfg.privacy.engine, model, named), pairs, ref,
                        objective, units, plan, pad_id, total, rollouts=rollouts)
    if plan is None:
        if canaries is not None:
            raise ValueError("audit canaries need a DP run (privacy.enabled: true)")
        return PlainStep(cfg, model, pairs, ref, objective, list(named.values()), pad_id,
                         source)
    step_type = DPStep if canaries is None else canaries.dp_step
    return step_type(cfg, make_engine(cfg.privacy.engine, model, named), pairs, ref, objective,
                     units, plan, pad_id, total, canaries, source)


def prepare(cfg: TrainConfig, out: Path, data: RunData | None = None,
            canaries: Canaries | None = None) -> Session:
    """Load the model and data (``data``: from ``check_run``, read now when None), refuse
    over-long pairs, cache reference log-probs in ``out/reference``, add LoRA and build the
    optimizer: everything before the first step. An audit's input ``canaries`` are encoded
    after the training pairs (their reference log-probs cached with them); they are no
    privacy unit of the plan (``data.units``), only the DP step's canary draws use them."""
    data = data if data is not None else check_run(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    loaded = load_model(cfg.model, device=str(device), dtype=resolve_dtype(cfg.train.dtype, device),
                      trust_remote_code=cfg.trust_remote_code)
    model, processor = task_model(cfg, loaded.model), loaded.processor
    pad_id = processor.tokenizer.pad_token_id  # type: ignore[attr-defined]
    objective = Objective.from_config(cfg.loss)
    with_corrupt = objective.spec.needs_corrupt
    extra = list(canaries.records) if canaries is not None else []
    bdhs = (bdhs_records(cfg, model, processor, data.records, RunDir(out).bdhs)
            if cfg.method == "bdhs" else None)
    records = task_records(cfg, bdhs.records if bdhs else data.records, cfg.data.train)
    pairs = encode_pairs(records + extra, processor,
                         corrupt_seed=cfg.data.seed if with_corrupt else None,
                         hardness_field=cfg.data.hardness_field)
    _check_inputs(cfg, objective, pairs)
    held = (encode_pairs(task_records(cfg, data.held, cfg.data.heldout), processor,
                         hardness_field=cfg.data.hardness_field)
            if cfg.data.heldout else [])
    limit = length_limit(cfg, model)
    check_lengths(cfg.data.train, pairs, limit)
    check_lengths(cfg.data.heldout, held, limit)

    run_dir = RunDir(out)
    reference = task_reference(cfg, cached_reference)
    ref = reference(run_dir.reference("train"), model, pairs, pad_id,
                    model_dir=cfg.model, with_corrupt=with_corrupt).to(device)
    val = encode_pairs(task_records(cfg, data.val, cfg.eval.validation or cfg.data.heldout),
                       processor, hardness_field=cfg.data.hardness_field)
    check_lengths(cfg.eval.validation or cfg.data.heldout, val, limit)
    parts = {prefix: (part, reference(
        run_dir.reference(prefix), model, part, pad_id, model_dir=cfg.model,
        with_corrupt=False, batch_size=cfg.eval.batch_size).to(device))
        for prefix, part in (("heldout", held), ("val", val)) if part}
    model = task_trainable(cfg, model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = build_optimizer(params, cfg.optim, data.total)
    source = pair_source(cfg, model, processor, data.records, pairs, ref, pad_id,
                         bdhs.skip if bdhs else frozenset())
    rollouts = rl_rollouts(cfg, model, processor, data.records, pad_id)
    grad_step = build_grad_step(cfg, model, pairs, ref, objective, pad_id, data.units,
                                data.plan, data.total, canaries, source, rollouts)
    return Session(cfg, model, processor, pairs, ref, objective, optimizer, schedule, params,
                   Evaluator(cfg, processor, parts, pad_id), pad_id, data.total,
                   data.units, data.plan, grad_step, data.records,
                   rollouts.reward.info if rollouts else None)


def _open_run(cfg: TrainConfig, out: Path, resume: bool,
              canaries: Canaries | None = None) -> Session:
    """Check the data, settings and directory, then start (or reopen) ``out`` and prepare
    the run; a failed fresh start leaves ``out`` as it was found."""
    data = check_run(cfg)
    _check_dir(out, cfg, resume,
               frozenset({RunDir(out).audit_dir.name}) if canaries else frozenset())
    if resume:
        return prepare(cfg, out, data, canaries)
    with _undone_on_failure(out):
        _start_dir(out, cfg)
        return prepare(cfg, out, data, canaries)


def _evaluate(run: Session, out: Path, evaluations: list[dict[str, Any]], step: int,
              final: bool = True) -> None:
    evaluations.append(run.evaluate(run.model, step, final=final))
    append_jsonl(RunDir(out).evals, evaluations[-1])
    run.tracker.evaluation(evaluations[-1])


def _run_steps(run: Session, out: Path, start: int, state: LoopState,
               history: list[dict[str, Any]], evaluations: list[dict[str, Any]],
               on_step: StepHook | None) -> tuple[LoopState, str | None]:
    """Steps ``start + 1 .. last`` (logs, evaluations, checkpoints), ``last`` the planned
    total or the last step the privacy budget allows; the step where training ends is
    always evaluated (with ``eval.every``) and checkpointed. Returns the state after the
    last step and the reason when the budget stopped the run early, else None."""
    cfg, total = run.cfg, run.total
    last = total if run.plan is None else min(total, run.plan.budget_steps)
    run_dir = RunDir(out)
    with make_progress() as bar:
        task = bar.add_task("train", total=last, completed=start, info="")
        for step in range(start + 1, last + 1):
            row, state = run.step(step, state)
            history.append(row)
            append_jsonl(run_dir.metrics, row)
            run.tracker.metrics(row)
            if on_step:
                on_step(row)
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == last):
                _evaluate(run, out, evaluations, step, final=step == last)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == last:
                save_checkpoint(run_dir.checkpoints, step, run.model, run.optimizer,
                                run.schedule, state, cfg.checkpoint.keep)
            bar.update(task, advance=1, info=_progress_info(row))
        if last == total:
            return state, None
        stopped = (f"stopped before step {last + 1}: one more step would take epsilon "
                   f"above privacy.target_epsilon={cfg.privacy.target_epsilon}")
        bar.console.print(stopped)
        return state, stopped


def _privacy_summary(run: Session, state: LoopState, taken: int) -> dict[str, Any] | None:
    cfg = run.cfg
    privacy = None
    if run.plan is not None:
        privacy = {**run.plan.to_dict(cfg.privacy), "steps_taken": taken,
                   "epsilon": spent_epsilon(state.ledger, cfg.privacy)}
        if state.clip_norm is not None:  # adaptive clipping: C after the last step
            privacy["final_clip_norm"] = state.clip_norm
    if run.reward_info is not None:  # RL: the reward model's cost composed with the policy's
        privacy = {**(privacy or {}),  # without DP: no policy epsilon, total inf
                   **composed(state.ledger if run.plan is not None else None,
                              run.reward_info, cfg.rl.composition, cfg.privacy.delta,
                              cfg.privacy.accountant)}
    if cfg.privacy.label_epsilon is not None:
        privacy = {**(privacy or {}), "label_epsilon": cfg.privacy.label_epsilon,
                   "label_flip_rate": flip_probability(cfg.privacy.label_epsilon),
                   "label_guarantee": "label-level DP: protects which answer was preferred, "
                                      "not the images or texts"}
    return privacy


def _tracker(cfg: TrainConfig, out: Path, metrics: list[dict[str, Any]],
             evals: list[dict[str, Any]]) -> Tracker:
    """The run's tracker (``log.to``, on rank 0 only; none: one that does nothing), its
    backends brought to hold the logs' rows kept so far (``dpalign.track``)."""
    if not cfg.log.to or rank_and_world()[0] != 0:
        return Tracker()
    tags = {"dpalign.run_dir": str(out.resolve()), "dpalign.method": cfg.method,
            "dpalign.loss": cfg.loss.name, "dpalign.model": str(cfg.model),
            "dpalign.dp": str(cfg.privacy.enabled).lower(), **cfg.log.mlflow.tags}
    return open_tracker(cfg.log, run_info(out, cfg.model_dump(mode="json"), tags, metrics,
                                          evals))


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False,
          on_step: StepHook | None = None, canaries: Canaries | None = None) -> TrainResult:
    """Train ``cfg.model`` on the preference pairs of ``cfg.data``; see the module doc.
    ``canaries``: an audit's (``dpalign.audit.run``), None in every other run."""
    out = _rank_dir(Path(out), cfg)
    check_installed(cfg.log)
    started = time.perf_counter()
    run = _open_run(cfg, out, resume, canaries)
    model, total = run.model, run.total
    state = initial_state()
    run_dir = RunDir(out)
    if run.plan is not None:
        atomic_write_json(run_dir.privacy, run.plan.to_dict(cfg.privacy))
    start = 0
    if resume and (ck := latest_checkpoint(run_dir.checkpoints)) is not None:
        restore(ck, model, run.optimizer, run.schedule)
        start, state = ck.step, ck.state
    history = _truncate(run_dir.metrics, start)
    _check_history(run_dir.metrics, history, start)
    evaluations = _truncate(run_dir.evals, start)
    run.tracker = _tracker(cfg, out, history, evaluations)
    with run.tracker:  # closed as failed if anything below raises
        if start == 0 and (cfg.eval.every or cfg.data.heldout) and not evaluations:
            _evaluate(run, out, evaluations, 0, final=total == 0)

        state, stopped = _run_steps(run, out, start, state, history, evaluations, on_step)
        taken = len(history)
        if evaluations and evaluations[-1]["step"] != taken:  # the final model's evaluation
            _evaluate(run, out, evaluations, taken)
        with atomic_directory(run_dir.final) as staging:
            merged(model).save_pretrained(staging)
            run.processor.save_pretrained(staging)
            save_task_info(cfg, staging, model, state, run.records)
        wall = time.perf_counter() - started
        final = history[-1] if history else {}
        summary = _privacy_summary(run, state, taken)
        if run.reward_info is not None:
            atomic_write_json(run_dir.privacy, summary)
        atomic_write_json(run_dir.result, {
            "steps": taken, "planned_steps": total, "n_pairs": sum(len(unit) for unit in run.units),
            "final_step": final, "evaluations": evaluations,
            "privacy": summary, "stopped": stopped,
            "wall_seconds": round(wall, 2)})
    return TrainResult(out, taken, final, evaluations, wall, total, stopped)
