"""The TRL half of ``benchmarks/vs_trl.py``: time single DPO optimizer steps of TRL's DPOTrainer.

``trl_dpo_step_times(model_dir, records, batch_size=8)`` builds a ``trl.DPOTrainer`` on a
dpalign model folder (a real ``LlavaForConditionalGeneration`` + ``LlavaProcessor``) and the
given preference records, runs ``warmup + repeats`` optimizer steps through TRL's own
``trainer.train()`` and returns the wall time of each timed step.

What one timed step is
    A ``TrainerCallback`` takes ``perf_counter`` at ``on_step_begin`` and at ``on_step_end``.
    In transformers' training loop the batch is fetched and collated (``get_batch_samples``)
    *before* ``on_step_begin``; between the two callbacks run exactly: ``training_step``
    (policy forward with TRL's fused LM head, reference forward under ``no_grad``, DPO loss,
    TRL's per-step metric bookkeeping and its ``.item()`` syncs, backward), gradient clipping
    (``max_grad_norm=1``), ``optimizer.step()``, ``lr_scheduler.step()`` and ``zero_grad``.
    Logging runs after ``on_step_end`` and is not timed. So a step is TRL's real per-step
    compute, measured inside its real loop, not a re-implementation of it. With CUDA the
    callbacks synchronise the device before reading the clock.

    TRL stacks a batch as ``2 * batch_size`` rows (chosen rows, then rejected rows; prompts
    left-padded, then flushed left), so a step is one policy forward + backward over those
    rows and one reference forward over the same rows (none with ``precompute_ref``).

    TRL does not pre-tokenise vision datasets: ``DataCollatorForVisionPreference`` applies the
    chat template, tokenises and processes the images on the fly for every batch. That cost
    is excluded from ``step_seconds`` (it happens before ``on_step_begin``) and reported
    separately as ``collate_seconds`` (the collator's own time per batch; image decoding by
    ``datasets`` is in neither).

Data and batches
    Step ``k`` trains on ``records[(k * batch_size + j) % len(records)]`` for
    ``j < batch_size`` (sequential sampler, no shuffling), so every step sees exactly
    ``batch_size`` pairs and a peer benchmark can feed the same pairs in the same order.
    Records become TRL's conversational vision format: ``images=[path]``,
    ``prompt=[{"role": "user", "content": prompt}]``,
    ``chosen=[{"role": "assistant", "content": chosen}]`` (same for rejected). TRL's
    ``prepare_multimodal_messages`` turns the user turn into ``[{"type": "image"},
    {"type": "text", "text": prompt}]`` and the processor's chat template renders it, so the
    model sees the same token ids as dpalign's ``PromptEncoder`` prompt followed by
    ``response_ids`` (response + ``<|end|>``); ``prompt_matches_dpalign`` checks this.

Threads
    The function leaves ``torch.set_num_threads`` to the caller (``torch_threads`` in the
    result). On a small machine shared with other busy processes, oversubscribed intra-op
    threads make CPU step times erratic (seen here: 0.1 s steps becoming 0.3-7 s with 2
    threads on 2 busy cores); use 1 thread, or an idle machine, for numbers worth comparing.

Settings (DPOConfig)
    ``per_device_train_batch_size=batch_size``, ``gradient_accumulation_steps=1``,
    ``max_steps=warmup+repeats``, ``beta``, ``loss_type=["sigmoid"]`` (TRL default),
    ``learning_rate=1e-6`` (TRL default; irrelevant to timing), optimizer = transformers'
    default ``adamw_torch_fused``, linear schedule, ``max_grad_norm=1.0``,
    ``max_length=None``, ``padding_free=False``, ``gradient_checkpointing=False`` (TRL's
    default is True; off here so both sides do one forward per model; pass
    ``gradient_checkpointing=True`` for TRL's default), ``disable_dropout=True``,
    fp32 (``bf16=fp16=False``), ``use_cpu`` unless ``device="cuda"``,
    ``train_sampling_strategy="sequential"``, ``dataloader_num_workers=0``,
    ``remove_unused_columns=False``, ``eval_strategy="no"``, ``save_strategy="no"``,
    ``logging_steps=1`` (read by a callback after each step), ``report_to="none"``,
    ``disable_tqdm=True``, ``seed=0``.

    Policy: ``AutoModelForImageTextToText.from_pretrained(model_dir, dtype=float32)``; all
    parameters trainable (vision tower, projector, language model) as TRL does for full
    fine-tuning. Reference: TRL's default, a second copy loaded from ``model_dir``. With
    ``lora=True``: ``peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0,
    target_modules=<regex on the language model's q/k/v/o_proj>)`` given to the trainer, so
    TRL wraps the policy itself and the reference is the base model with the adapter
    disabled (no second model in memory).

Memory
    CPU: resident set size read from ``/proc/self/status``. At entry the kernel's peak-RSS
    mark (VmHWM) is reset by writing ``5`` to ``/proc/self/clear_refs``;
    ``peak_rss_mb`` = VmHWM at the end minus VmRSS at entry (models, optimizer state,
    activations, datasets overhead, allocator slack). ``step_peak_rss_mb`` = VmHWM over the
    timed steps minus VmRSS just before them (transient per-step memory; optimizer state
    already exists after warm-up). Where ``clear_refs`` cannot be written the fallback is the
    ``resource.getrusage`` ``ru_maxrss`` delta, which under-reports when the process has
    peaked higher before (``memory_measure`` says which was used). RSS deltas include
    allocator slack; compare them only with the same measure (``PeakRSS``) on the peer.
    Before each baseline reading ``gc.collect()`` and glibc ``malloc_trim(0)`` hand freed
    memory back to the OS, so memory a previous run freed (e.g. pretraining, or the other
    half of a benchmark) is not silently reused and hidden from the delta (without the trim
    a call made after pretraining read 38 MiB instead of ~75). The first call in a process
    still reads ~50 MiB more than later ones (lazy imports and first-use caches): for a fair
    memory comparison, do one untimed call of each side first or run each in a subprocess.
    (tracemalloc is not used: it does not see torch's tensor allocations.)
    CUDA: ``torch.cuda.max_memory_allocated`` over the call, as ``peak_cuda_mb``.

Workarounds for this model with TRL 1.16 / transformers 5.23
    1. ``precompute_ref=True``: TRL refuses ``precompute_ref_log_probs`` for vision datasets
       (ValueError in ``DPOTrainer.__init__``). Emulated with TRL's own pieces: the trainer is
       built without it, then (untimed) ``trainer.compute_ref_log_probs`` is run over the
       training batches in training order, the results are added as ``ref_chosen_logps`` /
       ``ref_rejected_logps`` columns, a collator wrapper passes them into the batch, the
       trainer's ``precompute_ref_logps`` flag is set (so ``_compute_loss`` reads them
       instead of running the reference forward) and the reference model copy is released,
       as TRL does for text datasets. Losses match the non-precomputed run to 1e-6. The
       copy was loaded by the constructor, so ``peak_rss_mb`` still includes it once.
    2. ``max_length=None``: TRL's default 1024 is harmless for these short sequences, but
       set to None so truncation can never cut image tokens or completions.
    3. ``remove_unused_columns=False``: needed for workaround 1 (the ref columns are not in
       TRL's vision signature columns); the dataset holds only the columns TRL reads.
    4. LoRA ``target_modules`` is a regex limited to ``language_model``: the CLIP vision
       tower also has ``q_proj``/``k_proj``/``v_proj``, which a plain name list would hit.
    5. ``activation_checkpointing=`` is passed instead of ``gradient_checkpointing=``
       (transformers 5.23 renamed it; TRL 1.16's config defaults the old name to True and
       its trainer calls the old methods, so their FutureWarnings are silenced in the call).
    No other workaround was needed: the LlavaProcessor, its ``<image>`` expansion, the chat
    template with list content, the pad token and TRL's fused LM head all work as they are.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpalign.data.records import PreferenceRecord

LM_ATTENTION_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so RSS starts honest."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_mb() -> float:
    """Lifetime peak RSS from getrusage (kB on Linux, bytes on macOS)."""
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """Peak resident memory since ``start()``, minus the RSS at ``start()``, in MiB.

    Public so the dpalign half of a benchmark can measure itself the same way: ``start()``
    resets the process-wide peak mark, which also lowers what ``ru_maxrss`` reports after it.
    """

    def __init__(self) -> None:
        self.exact = False
        self.base = 0.0
        self.earlier_peak = 0.0  # peak seen before someone else reset the mark

    def start(self) -> None:
        gc.collect()
        _trim_heap()
        self.exact = _reset_peak_rss()
        self.base = _status_mb("VmRSS") if self.exact else _maxrss_mb()
        self.earlier_peak = self.base

    def peak(self) -> float:
        """Absolute peak RSS (MiB) since ``start()``."""
        now = (_status_mb("VmHWM") or 0.0) if self.exact else _maxrss_mb()
        return max(now, self.earlier_peak)

    def before_reset(self) -> None:
        """Call before a nested ``start()`` resets the process-wide mark."""
        self.earlier_peak = self.peak()

    def delta(self) -> float:
        return max(0.0, self.peak() - self.base)

    @property
    def measure(self) -> str:
        if self.exact:
            return "VmHWM - VmRSS (/proc/self/status, peak reset via /proc/self/clear_refs)"
        return "getrusage ru_maxrss delta (lifetime peak; under-reports after a higher peak)"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _rows(records: Sequence[PreferenceRecord], n: int) -> dict[str, list[Any]]:
    """``n`` rows cycling through ``records`` in order, in TRL's conversational vision format."""
    picked = [records[i % len(records)] for i in range(n)]
    return {
        "images": [list(r.images) for r in picked],
        "prompt": [[{"role": "user", "content": r.prompt}] for r in picked],
        "chosen": [[{"role": "assistant", "content": r.chosen}] for r in picked],
        "rejected": [[{"role": "assistant", "content": r.rejected}] for r in picked],
    }


def _dataset(records: Sequence[PreferenceRecord], n: int):
    """A ``datasets.Dataset`` whose ``images`` column decodes the files to PIL images."""
    from datasets import Dataset, Image, List

    dataset = Dataset.from_dict(_rows(records, n))
    return dataset.cast_column("images", List(Image()))


class _TimedCollator:
    """Wrap a collator: time each call; move precomputed reference log-probs into the batch."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner
        self.seconds: list[float] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        refs = {key: torch.tensor([example.pop(key) for example in examples])
                for key in ("ref_chosen_logps", "ref_rejected_logps") if key in examples[0]}
        batch = self.inner(examples)
        batch.update(refs)
        self.seconds.append(time.perf_counter() - start)
        return batch


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _make_step_timer(warmup: int, sync: Callable[[], None], outer: PeakRSS):
    """A TrainerCallback recording step wall times, logs, and memory over the timed steps."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.logs: list[dict[str, float]] = []
            self.step_rss = PeakRSS()
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if len(self.seconds) == warmup:
                outer.before_reset()
                self.step_rss.start()
            sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    return StepTimer()


def _config(out_dir: str, *, batch_size: int, steps: int, beta: float, device: str,
            gradient_checkpointing: bool):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        beta=beta,
        max_length=None,
        padding_free=False,
        activation_checkpointing=gradient_checkpointing,
        bf16=False,
        fp16=False,
        use_cpu=device == "cpu",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


def _precompute_reference(trainer, dataset, batch_size: int):
    """Workaround 1: reference log-probs per row with TRL's ``compute_ref_log_probs``."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=trainer.data_collator, num_workers=0)
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    chosen, rejected = [], []
    for batch in loader:
        batch = trainer._prepare_inputs(batch)
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
        chosen.append(ref_chosen.float().cpu())
        rejected.append(ref_rejected.float().cpu())
    dataset = dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
    dataset = dataset.add_column("ref_rejected_logps", torch.cat(rejected).tolist())
    trainer.train_dataset = dataset
    trainer.precompute_ref_logps = True
    trainer.ref_model = None
    gc.collect()


def trl_dpo_step_times(model_dir: Path, records: list[PreferenceRecord], *, batch_size: int,
                       warmup: int = 2, repeats: int = 5, beta: float = 0.1,
                       lora: bool = False, precompute_ref: bool = False,
                       gradient_checkpointing: bool = False, device: str = "cpu",
                       lora_r: int = 8, lora_alpha: int = 16) -> dict[str, Any]:
    """Wall time of ``repeats`` single DPO optimizer steps of TRL's DPOTrainer (see module doc).

    Returns ``step_seconds`` (timed steps), ``median_s``, ``warmup_seconds``,
    ``collate_seconds`` (TRL's on-the-fly batch processing, not in ``step_seconds``),
    ``first_loss`` (TRL's loss at step 1; ~log 2 since policy == reference), ``losses``,
    ``peak_rss_mb``, ``step_peak_rss_mb``, ``memory_measure``, ``peak_cuda_mb`` (CUDA only),
    ``batch_size``, ``lora``, ``precompute_ref``, ``n_trainable``, ``trl_version``,
    ``torch_threads``.
    """
    if batch_size < 1 or warmup < 0 or repeats < 1:
        raise ValueError("need batch_size >= 1, warmup >= 0, repeats >= 1")
    if not records:
        raise ValueError("records is empty")
    # Import everything before the memory baseline, so module code is not counted.
    import datasets  # noqa: F401
    import peft
    import trl
    from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss = PeakRSS()
    rss.start()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    steps = warmup + repeats
    dataset = _dataset(records, steps * batch_size)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(model_dir)
    peft_config = None
    if lora:
        peft_config = peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                      target_modules=LM_ATTENTION_REGEX, bias="none")
    timer = _make_step_timer(warmup, sync, rss)
    with tempfile.TemporaryDirectory(prefix="trl-peer-") as out_dir, warnings.catch_warnings():
        # transformers 5.23 renamed gradient -> activation checkpointing; TRL 1.16 still calls
        # the old names internally and each call warns.
        warnings.filterwarnings("ignore", ".*gradient_checkpointing.*", FutureWarning)
        args = _config(out_dir, batch_size=batch_size, steps=steps, beta=beta, device=device,
                       gradient_checkpointing=gradient_checkpointing)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset,
                                 processing_class=processor, peft_config=peft_config,
                                 callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # logs go to the timer, not stdout
        collator = _TimedCollator(trainer.data_collator)
        trainer.data_collator = collator
        if precompute_ref:
            _precompute_reference(trainer, dataset, batch_size)
            collator.seconds.clear()
        n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    if len(timer.seconds) != steps:
        raise RuntimeError(f"expected {steps} steps, TRL ran {len(timer.seconds)}")
    timed = timer.seconds[warmup:]
    losses = [float(log["loss"]) for log in timer.logs]
    result: dict[str, Any] = {
        "step_seconds": timed,
        "median_s": statistics.median(timed),
        "warmup_seconds": timer.seconds[:warmup],
        "collate_seconds": collator.seconds,
        "first_loss": losses[0] if losses else math.nan,
        "losses": losses,
        "peak_rss_mb": rss.delta(),
        "step_peak_rss_mb": timer.step_rss.delta(),
        "memory_measure": rss.measure,
        "batch_size": batch_size,
        "lora": lora,
        "precompute_ref": precompute_ref,
        "gradient_checkpointing": gradient_checkpointing,
        "n_trainable": n_trainable,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
    }
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del trainer, model
    gc.collect()
    return result


# --------------------------------------------------------------------------------------------
# Check: TRL feeds the model what dpalign does
# --------------------------------------------------------------------------------------------


def prompt_matches_dpalign(model_dir: Path, record: PreferenceRecord) -> bool:
    """True when TRL's collated ids for ``record`` equal dpalign's, chosen and rejected rows."""
    from PIL import Image
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from dpalign.models.encode import PromptEncoder, response_ids

    processor = AutoProcessor.from_pretrained(model_dir)
    row = {key: value[0] for key, value in _rows([record], 1).items()}
    row["images"] = [Image.open(path).convert("RGB") for path in record.images]
    batch = DataCollatorForVisionPreference(processor=processor)([row])
    encode = PromptEncoder(processor, row["images"][0].size)
    prompt = encode(record.prompt, len(record.images))
    for i, response in enumerate((record.chosen, record.rejected)):  # rows: chosen, rejected
        trl_ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        if trl_ids != prompt + response_ids(processor, response):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Smoke entry: python benchmarks/trl_peer.py
# --------------------------------------------------------------------------------------------


def _smoke() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Time TRL DPO steps on a small world.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--precompute-ref", action="store_true")
    parser.add_argument("--cache", type=Path, default=None,
                        help="use the benchmarks' world and model cached here "
                             "(common.fixtures) instead of building a fresh pair in a temp dir")
    parser.add_argument("--json", action="store_true",
                        help="last line: {prompt_ids_match, full: {...}, lora: {...}}")
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    os.environ.setdefault("DPALIGN_NO_PROGRESS", "1")
    from dpalign.data.records import read_preference_jsonl
    from dpalign.pretrain import PretrainConfig, pretrain
    from dpalign.world.build import build_world
    from dpalign.world.config import WorldConfig
    from dpalign.world.load import World

    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="trl-peer-smoke-") as tmp:
        if cli.cache is not None:
            sys.path.insert(0, str(Path(__file__).parent))
            from common import fixtures

            model_dir, pool = fixtures(cli.cache)
        else:
            # The same small world and tiny pretraining as the test fixtures (tests/conftest.py).
            world_cfg = WorldConfig(seed=3, n_pretrain_images=240, n_pool_pairs=48,
                                    n_heldout_pairs=24, n_pope_images=24, n_caption_images=12)
            pretrain_cfg = PretrainConfig(steps=40, batch_size=16, warmup_steps=5, log_every=1,
                                          vision_steps=10, vision_batch_size=16)
            world_dir, model_dir = Path(tmp) / "world", Path(tmp) / "tiny"
            build_world(world_dir, world_cfg)
            pretrain(world_dir, model_dir, pretrain_cfg)
            pool = World.load(world_dir).pool_file
        records = read_preference_jsonl(pool)
        report["prompt_ids_match"] = prompt_matches_dpalign(model_dir, records[0])
        print("prompt ids match dpalign:", report["prompt_ids_match"])
        for lora in (False, True):
            out = trl_dpo_step_times(model_dir, records, batch_size=cli.batch_size,
                                     warmup=cli.warmup, repeats=cli.repeats, lora=lora,
                                     precompute_ref=cli.precompute_ref)
            brief = {k: v for k, v in out.items() if k not in ("losses", "collate_seconds")}
            report["lora" if lora else "full"] = brief
            print(brief)
            print(f"lora={lora}: median step {out['median_s'] * 1e3:.1f} ms, "
                  f"step-1 loss {out['first_loss']:.4f} (log 2 = {math.log(2):.4f})")
    if cli.json:
        print(json.dumps(report))


if __name__ == "__main__":
    _smoke()
