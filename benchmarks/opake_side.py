"""The Opake half of ``benchmarks/vs_opake.py``: one mode per process, one JSON line out.

Runs under the peer's own interpreter (``.venv-opake/bin/python``, built by
``make opake-venv``), never the project's: it imports only torch, transformers, peft,
datasets and opake, not dpalign. ``vs_opake.py`` writes the fixture folder it reads:
``model/`` (a random ``LlamaForCausalLM`` and its word-level tokenizer), ``adapter/`` (the
LoRA adapter both sides start from, r 8 on q/k/v/o, lora_B nonzero) and ``pairs.json``
(the token ids of every pair: ``prompt``, ``chosen``, ``rejected``), so both sides see the
same weights and the same token ids.

Modes
    ``plain``: a non-DP step of the same model written with Opake's own DPO primitives
    (``opake.alignment.dpo.loss.sequence_logp`` and ``sigmoid_loss``): one forward over the
    2B chosen+rejected rows, the mean sigmoid DPO loss against reference log-probs computed
    once before timing (the base model, adapter disabled), backward, ``torch.optim.AdamW``.
    ``dp``: Opake's ``opake.transformers.trl.DPOTrainer`` (the pair is its unit: one
    per-example loss of the chosen and the rejected sequence, per-example gradients by
    ``torch.func`` ``vmap(grad)``, fixed clipping at C, Gaussian noise sigma C, its
    functional AdamW). The trainer precomputes the reference log-probs at construction
    (timed apart as ``construct_s``); its training context is set up once
    (``_setup_training``, what ``train()`` does first) and each timed step is its own
    ``training_step`` on the same fixed batch of B pairs: Opake's ``train()`` would draw
    Poisson batches of varying size, which could not be compared step for step.
    Accounting is off (``privacy_accounting=False``): neither side accounts inside a step.

Before the warm-up, at the starting weights, the DP mode also takes Opake's per-pair
gradient norms of the batch (``aux.grad_norms`` of its clipped-gradient function: the
norms before clipping, so C and sigma do not change them), which ``vs_opake.py`` compares
with dpalign's.

    .venv-opake/bin/python benchmarks/opake_side.py --fixture DIR --mode plain|dp \\
        [--warmup 2] [--repeats 7] [--threads 1] [--sigma 1] [--clip 1] [--fast-digest]

Memory: the peak resident memory added during the timed steps, measured as the project's
``trl_peer.PeakRSS`` does (``/proc/self/clear_refs`` resets VmHWM; VmHWM - VmRSS), copied
here because this interpreter cannot import the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LR, BETA = 1e-4, 0.1


def backport_dataclass_slots() -> None:
    """On Python < 3.12, teach ``dataclasses`` that a base class without ``__slots__``
    already gives ``__weakref__`` (CPython's own later fix, as in 3.12+ ``_get_slots``).

    Opake 0.16.1's ``CachedProcess`` is ``dataclass(slots=True, weakref_slot=True)`` over a
    plain ABC; Python 3.11 then asks for a second ``__weakref__`` slot and ``import
    opake.accounting`` / ``opake.transformers`` fail with ``TypeError: __weakref__ slot
    disallowed``. The only CPU torch 2.13 wheel on the package indexes here is cp311, so the
    peer runs on 3.11 with this shim (on 3.12+ it does nothing)."""
    if sys.version_info >= (3, 12):
        return

    def get_slots(cls: type) -> Iterator[str]:
        match cls.__dict__.get("__slots__"):
            case None:
                if getattr(cls, "__weakrefoffset__", -1) != 0:
                    yield "__weakref__"
            case str(slot):
                yield slot
            case iterable if not hasattr(iterable, "__next__"):
                yield from iterable
            case _:
                raise TypeError(f"Slots of '{cls.__name__}' cannot be determined")

    dataclasses._get_slots = get_slots  # type: ignore[attr-defined]


backport_dataclass_slots()

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# --- memory (as benchmarks/trl_peer.PeakRSS) -----------------------------------------------


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident memory since ``start()`` minus the RSS at ``start()``, in MiB."""

    def start(self) -> None:
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            self.exact = _status_mb("VmHWM") is not None
        except OSError:
            self.exact = False
        self.base = (_status_mb("VmRSS") or 0.0) if self.exact else self._maxrss()

    @staticmethod
    def _maxrss() -> float:
        scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def delta(self) -> float:
        peak = (_status_mb("VmHWM") or 0.0) if self.exact else self._maxrss()
        return max(0.0, peak - self.base)


def timed(step: Callable[[], Any], warmup: int, repeats: int) -> dict[str, Any]:
    """Median wall and process-CPU seconds of ``step()`` over ``repeats`` after ``warmup``;
    peak RSS added (as ``vs_opake.timed``)."""
    for _ in range(warmup):
        step()
    memory = PeakRSS()
    memory.start()
    times, cpu = [], []
    for _ in range(repeats):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - cpu_tick)
    return {"median_s": statistics.median(times), "step_seconds": times,
            "cpu_median_s": statistics.median(cpu), "peak_rss_mb": memory.delta()}


# --- fixture ---------------------------------------------------------------------------------


def load(fixture: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The LoRA model (trainable adapter, dropout off), its tokenizer and the pairs."""
    base = AutoModelForCausalLM.from_pretrained(fixture / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, fixture / "adapter", is_trainable=True)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(fixture / "model")
    return model, tokenizer, json.loads((fixture / "pairs.json").read_text())


def rows(pairs: dict[str, Any]) -> dict[str, list[list[int]]]:
    """Opake's tokenised preference columns: prompt + response ids and completion masks."""
    out: dict[str, list[list[int]]] = {}
    for side in ("chosen", "rejected"):
        out[f"{side}_input_ids"] = [p + r for p, r in zip(pairs["prompt"], pairs[side],
                                                          strict=True)]
        out[f"{side}_completion_mask"] = [[0] * len(p) + [1] * len(r) for p, r
                                          in zip(pairs["prompt"], pairs[side], strict=True)]
    return out


# --- plain step ------------------------------------------------------------------------------


def plain(model: Any, pairs: dict[str, Any], warmup: int, repeats: int) -> dict[str, Any]:
    """A non-DP DPO step with Opake's primitives, batched over the 2B rows."""
    from opake.alignment.dpo.loss import sequence_logp, sigmoid_loss

    cols = rows(pairs)
    ids = torch.tensor(cols["chosen_input_ids"] + cols["rejected_input_ids"])
    cmask = torch.tensor(cols["chosen_completion_mask"] + cols["rejected_completion_mask"])
    attention = torch.ones_like(ids)
    b = len(pairs["prompt"])
    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logp(model(input_ids=ids, attention_mask=attention).logits, ids, cmask)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses: list[float] = []

    def step() -> None:
        logp = sequence_logp(model(input_ids=ids, attention_mask=attention).logits, ids, cmask)
        loss = sigmoid_loss(logp[:b] - ref[:b], logp[b:] - ref[b:], beta=BETA).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    return {**timed(step, warmup, repeats), "first_loss": losses[0] if losses else None}


def use_fast_digest() -> None:
    """Make Opake's reference-cache fingerprint (``_tensor_state_digest``: sha256 over each
    state tensor's name, dtype, shape and bytes) read each tensor's bytes in one buffer copy
    instead of ``bytes(untyped_storage()[a:b])``, which walks them one Python object at a
    time (most of ``DPOTrainer``'s construction time). The same bytes in the same order, so
    the same digest (``tests/test_vs_opake.py`` checks); construction only, never a step."""
    import hashlib

    from opake.api.transformers.trl import _dpo_trainer as trainer_module

    def digest(model: Any, *, exclude_adapter: bool = False) -> str:
        hasher = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            if exclude_adapter and trainer_module._is_adapter_state_name(name):
                continue
            value = tensor.detach().cpu().contiguous()
            hasher.update(name.encode("utf-8"))
            hasher.update(str(value.dtype).encode("ascii"))
            hasher.update(json.dumps(list(value.shape)).encode("ascii"))
            hasher.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        return hasher.hexdigest()

    trainer_module._tensor_state_digest = digest


# --- DP step ---------------------------------------------------------------------------------


def dp(model: Any, tokenizer: Any, pairs: dict[str, Any], *, warmup: int, repeats: int,
       sigma: float, clip: float, out_dir: str) -> dict[str, Any]:
    """Opake's DPOTrainer: construction, per-pair norms at the start, timed DP steps."""
    from datasets import Dataset
    from opake.transformers.trl import DPOConfig, DPOTrainer

    b = len(pairs["prompt"])
    dataset = Dataset.from_dict(rows(pairs))
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=b, learning_rate=LR, beta=BETA,
        loss_type="sigmoid", max_steps=warmup + repeats + 1, lr_scheduler="constant",
        privacy_noise_multiplier=sigma, clipping_norm=clip, privacy_accounting=False,
        save_strategy="no", logging_steps=10**6, report_to=[], use_cpu=True, seed=0,
        max_length=None, disable_tqdm=True, log_completion_metrics=False)
    tick = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    construct_s = time.perf_counter() - tick
    tick = time.perf_counter()
    ctx = trainer._setup_training()
    trainer._ctx = ctx
    setup_s = time.perf_counter() - tick
    batch = trainer._prepare_input(ctx.collate_fn([trainer._train_dataset[i]
                                                   for i in range(b)]))
    batch_args = tuple(batch[k] for k in ctx.batch_keys)
    (_, aux), _ = ctx.grad_fn(ctx.trainable_params, *batch_args, state=ctx.clip_state)
    norms = [float(x) for x in aux.grad_norms]
    ref = {k: [float(x) for x in batch[k]] for k in ("ref_chosen_logps", "ref_rejected_logps")}
    metrics: list[dict[str, Any]] = []

    def step() -> None:
        metrics.append(trainer.training_step(trainer.model, batch))

    times = timed(step, warmup, repeats)
    return {**times, "construct_s": construct_s, "setup_s": setup_s,
            "per_pair_grad_norms": norms, "first_loss": float(aux.loss_values.mean()),
            "ref_logps": ref, "noise_std": metrics[-1].get("noise_std") if metrics else None,
            "clipping_norm": metrics[-1].get("clipping_norm") if metrics else None,
            "batch_keys": list(ctx.batch_keys)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", type=Path, required=True)
    parser.add_argument("--mode", choices=("plain", "dp"), required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--fast-digest", action="store_true",
                        help="construct the trainer with use_fast_digest (tests)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer, pairs = load(args.fixture)
    if args.fast_digest:
        use_fast_digest()
    if args.mode == "plain":
        report = plain(model, pairs, args.warmup, args.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = dp(model, tokenizer, pairs, warmup=args.warmup, repeats=args.repeats,
                        sigma=args.sigma, clip=args.clip, out_dir=tmp)
    from importlib.metadata import version

    report.update(mode=args.mode, threads=torch.get_num_threads(),
                  batch_size=len(pairs["prompt"]), python=sys.version.split()[0],
                  torch=torch.__version__, opake=version("opake"),
                  fast_digest=args.fast_digest)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
