"""Training throughput, DP-LoRA vs non-DP LoRA, in tokens per second, on any model folder.

For one model (a local ``save_pretrained`` folder, e.g. ``runs/smol/base``, or ``tiny:NAME``
for a toy model of a VLM family from ``dpalign.models.tiny_families``; by default the
benchmarks' own tiny model from ``common.fixtures``) and the benchmark
world's preference pairs, in one process: ``Session.step`` with privacy off, then with
``privacy: {enabled, noise_multiplier: 1, sampling: shuffle}`` (exactly ``--batch-size``
pairs per step, per-pair engine "hooks"). Tokens per step = attended tokens of the batch's
2B rows (prompt with image placeholders + response). The device and dtype come from
``--device`` / ``--dtype`` (``auto``: a CUDA GPU with bfloat16 when visible), so the same
command measures the GPU path on a GPU machine.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/throughput.py [--model runs/smol/base] \
        [--batch-size 8] [--warmup 2] [--repeats 5] [--device auto] [--dtype auto] [--json]

With ``--json`` the last line is ``{"non_dp": {...}, "dp": {...}, "dp_tokens_per_s_ratio",
"device", "dtype"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DPALIGN_NO_PROGRESS", "1")

from common import add_common_args, session_config, session_times, start

from dpalign.models.load import resolve_device, resolve_dtype
from dpalign.models.pairs import collate
from dpalign.models.tiny_families import TINY_FAMILIES
from dpalign.privacy.sampling import shuffled_batch
from dpalign.train.loop import prepare
from dpalign.world.load import World


def model_folder(spec: str, cache: Path, world: Path) -> Path:
    """``spec`` as a folder, or ``tiny:NAME`` built once under ``cache``."""
    if not spec.startswith("tiny:"):
        return Path(spec)
    name = spec.removeprefix("tiny:")
    folder = cache / f"family_{name}"
    if not (folder / "config.json").is_file():
        rows = World.load(world).pretrain_rows()
        built = TINY_FAMILIES[name]([t for r in rows for t in (r["prompt"], r["response"])])
        built.model.save_pretrained(folder)
        built.processor.save_pretrained(folder)
    return folder


def tokens_per_step(session: object, batch_size: int, steps: range) -> float:
    """Mean attended tokens of the batches ``Session.step`` takes at ``steps``."""
    counts = []
    for step in steps:
        idx = shuffled_batch(len(session.pairs), batch_size, session.cfg.train.seed, step - 1)  # type: ignore[attr-defined]
        batch = collate([session.pairs[i] for i in idx], session.pad_id)  # type: ignore[attr-defined]
        counts.append(int(batch.tokens.attention_mask.sum()))
    return sum(counts) / len(counts)


def measure(model: Path, pool: Path, args: argparse.Namespace, dp: bool) -> dict:
    privacy = ({"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                "sampling": "shuffle", "engine": "hooks"} if dp else None)
    cfg = session_config(model, pool, lora=True, batch_size=args.batch_size,
                         steps=args.warmup + args.repeats, privacy=privacy)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"device": args.device, "dtype": args.dtype})})
    with tempfile.TemporaryDirectory() as tmp:
        session = prepare(cfg, Path(tmp))
        times = session_times(session, args.warmup, args.repeats)
        steps = range(args.warmup + 1, args.warmup + args.repeats + 1)
        tokens = tokens_per_step(session, args.batch_size, steps)
    return {"median_s": times["median_s"], "tokens_per_step": tokens,
            "tokens_per_s": tokens / times["median_s"], "peak_rss_mb": times["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--model", default=None,
                        help="model folder or tiny:FAMILY (default: the benchmarks' tiny model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    bench_model, pool = start(args)
    model = (model_folder(args.model, args.cache, pool.parent.parent) if args.model
             else bench_model)
    device = resolve_device(args.device)
    report = {"model": str(model), "device": str(device),
              "dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
              "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    for name, dp in (("non_dp", False), ("dp", True)):
        report[name] = measure(model, pool, args, dp)
    ratio = report["dp"]["tokens_per_s"] / report["non_dp"]["tokens_per_s"]
    report["dp_tokens_per_s_ratio"] = ratio
    print(f"{model} on {report['device']} ({report['dtype']}), batch {args.batch_size} pairs: "
          f"non-DP {report['non_dp']['tokens_per_s']:.0f} tok/s, DP-LoRA "
          f"{report['dp']['tokens_per_s']:.0f} tok/s (x{report['dp_tokens_per_s_ratio']:.2f})")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
