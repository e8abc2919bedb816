"""What DP-SGD costs per step: dpalign non-DP vs dpalign DP vs a correct Opacus step.

On the same tiny VLM (a real ``LlavaForConditionalGeneration``, built and briefly
pretrained by ``common.fixtures``) and the same preference pairs, in one process:

(a) ``Session.step`` with privacy disabled (sigmoid DPO, beta 0.1, AdamW);
(b) ``Session.step`` with ``privacy: {enabled, noise_multiplier: 1, sampling: shuffle}``
    (exactly ``batch_size`` pairs per step); per-pair engine "hooks" for LoRA and "loop"
    for full fine-tuning (hooks only covers ``nn.Linear``; full fine-tuning also trains the
    tied embedding, norms and the vision patch conv); its epsilon accounting is kept out of
    the timed steps (``common.session_config``), as (c) does none;
(c) Opacus ``GradSampleModule`` per-row gradients summed per pair, then the same clip,
    noise and AdamW step (``opacus_peer.py``).

Each does ``--warmup`` untimed steps and ``--repeats`` timed ones; figures are medians and
the peak RSS added during the timed steps (``trl_peer.PeakRSS``). After Opacus' warm-up, its
per-pair gradients of one batch are asserted equal to dpalign's (``per_pair_grads``, same
engine as (b)) to 1e-5 (relative to the largest entry when above 1), so (b) and (c) do the
same work.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dp_overhead.py [--batch-size 8]
        [--repeats 7] [--threads 1] [--only lora|full] [--model tiny|smollm2-135m|all] [--json]

With ``--json`` the last line is ``{"lora": {"time_ratio", "memory_ratio",
"opacus_time_ratio", ...}, "full": {...}}``; ratios are against (a).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DPALIGN_NO_PROGRESS", "1")

from common import (
    add_common_args,
    fixtures,
    session_config,
    session_times,
    smollm2_fixture,
    start,
    timed,
)
from opacus_peer import opacus_dp_step, opacus_per_pair, wrap

from dpalign.models.pairs import collate
from dpalign.privacy.per_pair import per_pair_grads
from dpalign.privacy.sampling import shuffled_batch
from dpalign.train.config import TrainConfig
from dpalign.train.loop import Session, build_grad_step, prepare
from dpalign.train.optim import build_optimizer

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

SIGMA, MAX_NORM = 1.0, 1.0
# Full fine-tuning trains everything except these (in all three variants): Opacus 1.6 has no
# per-sample gradient for CLIPVisionEmbeddings' class token (its functorch fallback refuses
# modules with buffers) nor for its position table (called on a (1, P) index, batch dim 1).
OPACUS_UNSUPPORTED = ("vision_tower.embeddings.class_embedding",
                      "vision_tower.embeddings.position_embedding.weight")


def freeze_unsupported(session: Session) -> tuple[Session, list[str]]:
    """``session`` with ``OPACUS_UNSUPPORTED`` frozen, and the names frozen.

    ``prepare`` builds the gradient step (with its per-pair engine) and the optimizer over
    the parameters trainable at that time, so both are rebuilt here over the ones left
    trainable (an engine keeping a frozen parameter asks autograd for its gradient and
    fails)."""
    frozen = [name for name, p in session.model.named_parameters()
              if name.endswith(OPACUS_UNSUPPORTED) and p.requires_grad]
    if not frozen:
        return session, frozen
    for name, p in session.model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    named = {k: p for k, p in session.model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer, schedule = build_optimizer(params, session.cfg.optim, session.total)
    grad_step = build_grad_step(session.cfg, session.model, session.pairs, session.ref,
                                session.objective, session.pad_id, session.units, session.plan,
                                session.total)
    return replace(session, params=params, optimizer=optimizer, schedule=schedule,
                   grad_step=grad_step), frozen


def config(model_dir: Path, pool: Path, *, lora: bool, dp: bool, batch_size: int,
           steps: int) -> TrainConfig:
    privacy = ({"enabled": True, "noise_multiplier": SIGMA, "max_grad_norm": MAX_NORM,
                "sampling": "shuffle", "engine": "hooks" if lora else "loop"}
               if dp else None)
    return session_config(model_dir, pool, lora=lora, batch_size=batch_size, steps=steps,
                          privacy=privacy)


def batch_of(session: Session, step: int) -> tuple:
    """The pairs the DP step would sample at ``step``: collated batch and reference."""
    idx = shuffled_batch(len(session.units), session.cfg.train.batch_size,
                         session.cfg.train.seed, step - 1)
    batch = collate([session.pairs[i] for i in idx], session.pad_id)
    return batch, session.ref.index(torch.tensor(idx))


def opacus_times(session: Session, warmup: int, repeats: int, engine: str) -> dict:
    """Time Opacus DP steps; after the warm-up (LoRA's B is then non-zero, so every
    parameter has a gradient) check Opacus' per-pair gradients against dpalign's."""
    params = {k: p for k, p in session.model.named_parameters() if p.requires_grad}
    wrapped = wrap(session.model)
    generator = torch.Generator().manual_seed(0)
    check: dict = {}

    def step(k: int) -> None:
        batch, ref = batch_of(session, k)
        opacus_dp_step(session.model, batch, ref, session.objective, params,
                       session.optimizer, sigma=SIGMA, max_norm=MAX_NORM, generator=generator)

    def same_work() -> None:
        batch, ref = batch_of(session, warmup + repeats + 1)
        wrapped.disable_hooks()
        ours, _ = per_pair_grads(session.model, batch, ref, session.objective, params=params,
                                 engine=engine)
        wrapped.enable_hooks()
        theirs = opacus_per_pair(session.model, batch, ref, session.objective, params)
        scale = max(float(g.abs().max()) for g in ours.values())
        error = max(float((ours[k] - theirs[k]).abs().max()) for k in params)
        zero = [k for k, g in ours.items() if not g.abs().max() > 0]
        if not error <= 1e-5 * max(1.0, scale):
            raise AssertionError(f"Opacus per-pair gradients differ from dpalign's by "
                                 f"{error:.3g} (largest entry {scale:.3g})")
        check.update(check_max_abs_error=error, check_max_abs_grad=scale,
                     check_zero_grad_params=len(zero))

    out = timed(step, warmup, repeats, after_warmup=same_work)
    wrapped.remove_hooks()
    return {**out, **check, "n_params": sum(p.numel() for p in params.values())}


def compare(model_dir: Path, pool: Path, *, lora: bool, batch_size: int, warmup: int,
            repeats: int) -> dict:
    steps = warmup + repeats
    figures = {}
    for name, dp in (("non_dp", False), ("dpalign_dp", True), ("opacus_dp", True)):
        cfg = config(model_dir, pool, lora=lora, dp=dp, batch_size=batch_size, steps=steps)
        with tempfile.TemporaryDirectory() as tmp:
            session, frozen = freeze_unsupported(prepare(cfg, Path(tmp)))
            figures[name] = (opacus_times(session, warmup, repeats, cfg.privacy.engine)
                             if name == "opacus_dp" else session_times(session, warmup, repeats))
            del session
            gc.collect()
    base = figures["non_dp"]
    return {"time_ratio": figures["dpalign_dp"]["median_s"] / base["median_s"],
            "memory_ratio": (figures["dpalign_dp"]["peak_rss_mb"]
                             / max(base["peak_rss_mb"], 1e-9)),
            "opacus_time_ratio": figures["opacus_dp"]["median_s"] / base["median_s"],
            "opacus_memory_ratio": (figures["opacus_dp"]["peak_rss_mb"]
                                    / max(base["peak_rss_mb"], 1e-9)),
            "dpalign_engine": "hooks" if lora else "loop", "frozen": frozen, **figures}


MODELS = {"tiny": lambda root: fixtures(root), "smollm2-135m": smollm2_fixture}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--only", choices=("lora", "full"), default=None)
    parser.add_argument("--model", choices=(*MODELS, "all"), default="tiny")
    args = parser.parse_args()
    start(args)
    names = list(MODELS) if args.model == "all" else [args.model]
    report: dict = {name: measure(name, args) for name in names}
    if args.json:
        print(json.dumps(report[names[0]] if len(names) == 1 else report))


def measure(name: str, args: argparse.Namespace) -> dict:
    """LoRA and full fine-tuning figures of one model (full only on the tiny model: per-pair
    gradients of every weight of a 135M model are B x 0.5 GB)."""
    model_dir, pool = MODELS[name](args.cache)
    report: dict = {}
    for mode in ("lora", "full"):
        if args.only not in (None, mode) or (mode == "full" and name != "tiny"):
            continue
        r = compare(model_dir, pool, lora=mode == "lora", batch_size=args.batch_size,
                    warmup=args.warmup, repeats=args.repeats)
        r.update(batch_size=args.batch_size, threads=torch.get_num_threads(), model=name)
        report[mode] = r
        mode = f"{name} {mode}"
        print(f"[{mode}] non-DP {r['non_dp']['median_s'] * 1e3:.1f} ms  "
              f"dpalign DP ({r['dpalign_engine']}) {r['dpalign_dp']['median_s'] * 1e3:.1f} ms  "
              f"Opacus DP {r['opacus_dp']['median_s'] * 1e3:.1f} ms  | time x{r['time_ratio']:.2f}"
              f"  Opacus x{r['opacus_time_ratio']:.2f}")
        print(f"[{mode}] peak RSS added: non-DP {r['non_dp']['peak_rss_mb']:.0f} MiB  dpalign DP "
              f"{r['dpalign_dp']['peak_rss_mb']:.0f} MiB  Opacus "
              f"{r['opacus_dp']['peak_rss_mb']:.0f} MiB  | memory x{r['memory_ratio']:.2f}  "
              f"(Opacus-vs-dpalign per-pair grad max error "
              f"{r['opacus_dp']['check_max_abs_error']:.2e})")
    return report


if __name__ == "__main__":
    main()
