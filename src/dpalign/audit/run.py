"""``dpalign audit``: train a configured run with canaries, score them, bound epsilon.

The audit trains the run exactly as configured (its plan: sample rate q, sigma, steps and so
the claimed epsilon) with m canaries beside the training pairs (``canaries``), then scores
every canary (gradient: the summed release of its audit coordinate; input: the trained
policy's implicit-reward margin beta [(log pi - log ref)(chosen) - (log pi - log ref)
(rejected)] on it) and turns scores and coin flips into the one-run lower bound
(``bound.one_run_bound``) and membership-inference figures. A non-private config is audited
as its DP-SGD limit (privacy on, sigma 0, C infinite, Poisson sampling: claimed epsilon
infinite); a DP config must sample Poisson, the sampling the canaries' coin flips and the
theorem assume.

Files, in the run directory (``RunDir``): ``audit/settings.json`` first, then the training
run's files, ``audit/canaries.parquet`` and ``audit/scores.png``, and ``audit.json`` last
(its presence means the audit finished). A failed fresh start leaves OUT as it was found;
``resume=True`` continues the training run (same settings required) and scores it.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from dpalign.audit.bound import AuditBound, guesses, membership_inference, one_run_bound
from dpalign.audit.canaries import GradientCanaries, InputCanaries, inclusion, input_records
from dpalign.audit.config import AuditConfig
from dpalign.audit.faults import FAULTS
from dpalign.data.hf import read_records
from dpalign.data.records import read_preference_jsonl, write_preference_jsonl
from dpalign.io import atomic_write_bytes, atomic_write_json
from dpalign.models.load import load_model, resolve_device, resolve_dtype
from dpalign.models.pairs import encode_pairs
from dpalign.privacy.plan import rank_and_world
from dpalign.rundir import RunDir, RunDirError
from dpalign.train.checkpoint import latest_checkpoint
from dpalign.train.checks import check_run
from dpalign.train.config import TrainConfig
from dpalign.train.dp_step import Canaries, DPStep
from dpalign.train.loop import StepHook, train
from dpalign.train.reference import compute_reference

SCORES = {"gradient": "sum over steps of the released noisy audit coordinate",
          "input": "implicit-reward margin of the trained policy vs the base model"}
NON_PRIVATE = ("a non-private config, audited as its DP-SGD limit: sigma 0, C infinite, "
               "Poisson sampling")


def audited_config(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """The config the audit trains and how it relates to ``cfg``: ``cfg`` itself when it is
    private (Poisson sampling required), else its DP-SGD limit (``NON_PRIVATE``)."""
    if cfg.privacy.enabled:
        if cfg.privacy.sampling != "poisson":
            raise ValueError("dpalign audit needs privacy.sampling=poisson: the one-run "
                             "audit's canaries join each batch independently")
        return cfg, "as configured"
    privacy = cfg.privacy.model_copy(update={
        "enabled": True, "noise_multiplier": 0.0, "target_epsilon": None,
        "max_grad_norm": math.inf, "clipping": "fixed", "sampling": "poisson",
        "label_epsilon": None})
    return cfg.model_copy(update={"privacy": privacy}), NON_PRIVATE


def _settings(audit: AuditConfig, fault: str | None) -> dict[str, Any]:
    return {**audit.model_dump(mode="json"), "canaries": audit.m, "fault": fault}


def _check_settings(run_dir: RunDir, wanted: dict[str, Any], resume: bool) -> None:
    """A fresh audit needs an empty (or new) OUT; a resumed one the same settings."""
    path = run_dir.audit_dir / "settings.json"
    if not resume:
        if run_dir.path.is_dir() and any(run_dir.path.iterdir()):
            raise RunDirError(f"{run_dir.path}: not empty; pass --resume to continue the "
                              "audit or choose another --out")
        return
    if not path.is_file():
        raise RunDirError(f"{run_dir.path}: no audit to resume ({path} missing)")
    if json.loads(path.read_text()) != wanted:
        raise RunDirError(f"{path}: the audit settings differ from these; resume with the "
                          "same settings")


@contextmanager
def _removed_before_training(out: Path, fresh: bool) -> Iterator[None]:
    """A fresh audit that fails before its first step (settings, canaries, the training
    run's own checks and preparation) leaves OUT as it was found; once training has started
    (``config.yaml`` written and kept) the directory stays, so ``--resume`` continues it."""
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        yield
    except BaseException:
        if fresh and not RunDir(out).config.is_file():
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif out.is_dir():
                shutil.rmtree(RunDir(out).audit_dir, ignore_errors=True)
        raise


def make_canaries(cfg: TrainConfig, audit: AuditConfig, run_dir: RunDir, sample_rate: float,
                  dp_step: type[DPStep] = DPStep) -> Canaries:
    """The audit's canaries (input canaries' records written under ``audit/`` when absent,
    read back when present, so a resumed audit trains on the same files)."""
    included = inclusion(audit.m, audit.seed)
    if audit.kind == "gradient":
        return GradientCanaries(included, sample_rate, audit.seed, audit.canary_norm,
                                dp_step=dp_step)
    path = run_dir.audit_dir / "canaries.jsonl"
    if path.is_file():
        records = read_preference_jsonl(path)
    else:
        pool = read_records(cfg.data.train)
        records = input_records(audit.m, pool, run_dir.audit_dir / "images", audit.seed)
        write_preference_jsonl(path, records, relative_to=path.parent)
        records = read_preference_jsonl(path)
    return InputCanaries(records, included, sample_rate, audit.seed, dp_step=dp_step)


@torch.no_grad()
def input_scores(cfg: TrainConfig, run_dir: RunDir, canaries: InputCanaries) -> np.ndarray:
    """(m,) each input canary's implicit-reward margin under the trained model (``final/``)
    against the base model ``cfg.model``: beta [(pi - ref)(chosen) - (pi - ref)(rejected)]
    of summed log-probs."""
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    logps = []
    for folder in (run_dir.final, cfg.model):
        loaded = load_model(folder, device=str(device), dtype=dtype,
                          trust_remote_code=cfg.trust_remote_code)
        pairs = encode_pairs(canaries.records, loaded.processor)
        pad = loaded.processor.tokenizer.pad_token_id  # type: ignore[attr-defined]
        logps.append(compute_reference(loaded.model, pairs, pad, with_corrupt=False,
                                       batch_size=cfg.eval.batch_size))
    policy, ref = logps
    margin = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    return (cfg.loss.beta * margin).double().cpu().numpy()


def gradient_scores(run_dir: RunDir) -> np.ndarray:
    """(m,) the summed releases of the audit vector, from the last checkpoint."""
    last = latest_checkpoint(run_dir.checkpoints)
    if last is None or last.state.audit is None:
        raise RunDirError(f"{run_dir.checkpoints}: no checkpoint with the audit's scores")
    return last.state.audit.numpy()


def score_figure(scores: np.ndarray, included: np.ndarray, bound: AuditBound,
                 claimed: float | None) -> bytes:
    """PNG: histograms of the scores of included and excluded canaries."""
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    bins = np.histogram_bin_edges(scores, bins=60)
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"out ({int((~included).sum())})")
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"in ({int(included.sum())})")
    ax.set_yscale("log")
    ax.set_xlabel("canary score")
    ax.set_ylabel("canaries")
    claim = "inf" if claimed is None else f"{claimed:.3g}"
    ax.set_title(f"claimed epsilon {claim}, audited lower bound {bound.epsilon:.3g}",
                 fontsize=10)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _write_table(path: Path, scores: np.ndarray, included: np.ndarray,
                 guesses: np.ndarray) -> None:
    frame = pd.DataFrame({"canary": np.arange(len(scores)), "included": included,
                          "score": scores, "guess": guesses})
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def run_audit(cfg: TrainConfig, out: str | Path, audit: AuditConfig, *, resume: bool = False,
              on_step: StepHook | None = None, fault: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` with the canaries of ``audit`` into ``out``, score them and write
    ``audit.json`` (returned). ``on_step`` is ``train``'s; ``fault``: a broken DP step of
    ``audit.faults`` (tests only)."""
    if rank_and_world()[1] > 1:
        raise ValueError("dpalign audit runs in one process (not under torch.distributed)")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    started = time.perf_counter()
    trained, audited = audited_config(cfg)
    plan = check_run(trained).plan
    assert plan is not None  # audited_config makes every audited run private
    run_dir = RunDir(Path(out))
    settings = _settings(audit, fault)
    _check_settings(run_dir, settings, resume)
    with _removed_before_training(run_dir.path, fresh=not resume):
        run_dir.audit_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir.audit_dir / "settings.json", settings)
        canaries = make_canaries(trained, audit, run_dir, plan.sample_rate,
                                 FAULTS[fault] if fault else DPStep)
        result = train(trained, run_dir.path, resume=resume, on_step=on_step,
                       canaries=canaries)
    return _score(trained, audit, run_dir, canaries, result.steps, audited, fault, started)


def _score(cfg: TrainConfig, audit: AuditConfig, run_dir: RunDir, canaries: Canaries,
           steps: int, audited: str, fault: str | None, started: float) -> dict[str, Any]:
    """Score the canaries of the finished run ``cfg`` (the audited config), bound epsilon,
    write ``audit/canaries.parquet``, ``audit/scores.png`` and, last, ``audit.json``."""
    privacy_run = json.loads(run_dir.result.read_text())["privacy"]
    included: np.ndarray = canaries.included  # type: ignore[attr-defined]
    scores = (gradient_scores(run_dir) if audit.kind == "gradient"
              else input_scores(cfg, run_dir, canaries))  # type: ignore[arg-type]
    bound = one_run_bound(scores, included, cfg.privacy.delta, audit.level)
    mia = membership_inference(scores, included)
    claimed = privacy_run["epsilon"]
    claimed = None if not math.isfinite(claimed) else claimed
    _write_table(run_dir.audit_dir / "canaries.parquet", scores, included,
                 guesses(scores, bound.k_plus, bound.k_minus))
    atomic_write_bytes(run_dir.audit_dir / "scores.png",
                       score_figure(scores, included, bound, claimed))
    privacy = cfg.privacy
    report = {
        "kind": audit.kind, "canaries": audit.m, "included": int(included.sum()),
        "claimed_epsilon": claimed, "delta": privacy.delta,
        "epsilon_lower_bound": bound.epsilon,
        "consistent": claimed is None or bound.epsilon <= claimed,
        **{k: v for k, v in bound.as_dict().items() if k != "epsilon"}, **mia.as_dict(),
        "audited": audited, "fault": fault, "sample_rate": privacy_run["sample_rate"],
        "noise_multiplier": privacy_run["sigma"], "steps": steps,
        "max_grad_norm": privacy.max_grad_norm if math.isfinite(privacy.max_grad_norm) else None,
        "clipping": privacy.clipping, "seed": audit.seed,
        "canary_norm": audit.canary_norm if audit.kind == "gradient" else None,
        "score": SCORES[audit.kind], "wall_seconds": round(time.perf_counter() - started, 2)}
    atomic_write_json(run_dir.audit, report)
    return report
