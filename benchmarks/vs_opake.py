"""One DP-DPO step: dpalign vs Opake (JetBrains Research's DP DPO library), text LLM, LoRA.

Both sides train the same small Llama-architecture model (``LlamaForCausalLM``, 4 layers,
hidden 256, 4 heads, MLP 1024, vocab 8000, random init from seed 0) with the same LoRA
adapter (r 8, alpha 16, on q/k/v/o; lora_B drawn nonzero so that the policy differs from its
reference and every adapter matrix has a gradient), on the same B pairs of token ids (a
16-token prompt and two 48-token responses: 64 tokens a sequence), with sigmoid DPO (beta
0.1), the pair as privacy unit, fixed clipping at C = 1, Gaussian noise sigma = 1 and AdamW
(lr 1e-4, no weight decay). This script writes that fixture once (``--cache``/vs_opake/),
so the two sides read identical weights and token ids.

Four measurements, each in a process of its own, one after the other, on ``--threads``
threads; each does ``--warmup`` untimed steps and ``--repeats`` timed ones on the same batch
of B pairs; the figure is the median, the memory the peak RSS added during the timed steps
(``trl_peer.PeakRSS``):

- dpalign plain: ``pair_logps`` over the 2B rows, the DPO ``Objective``, mean, backward,
  ``torch.optim.AdamW``;
- dpalign DP: per-pair gradients of the same loss from engine ``hooks`` (one forward and one
  backward of the batch), fixed clipping (``privacy.clipping``), the noisy mean
  (``privacy.plan.noisy_once``), the same AdamW: the work of ``train.dp_step.DPStep`` less
  its sampling and ledger;
- Opake plain (``opake_side.py --mode plain``, in the peer venv): the same batched step
  with Opake's own ``sequence_logp`` and ``sigmoid_loss``;
- Opake DP (``opake_side.py --mode dp``): ``opake.transformers.trl.DPOTrainer``'s own
  ``training_step`` (``vmap(grad)`` per pair, clip, noise, its functional AdamW) on the
  same fixed batch (its ``train()`` would draw Poisson batches of varying size).

Reference log-probs are computed once, outside the timed steps, on both sides (the base
model with the adapter disabled; Opake does it while its trainer is constructed). Neither
side accounts epsilon inside a step. Opake's trainer construction (it fingerprints every
weight byte by byte for its reference cache) is timed apart and reported as
``opake_construct_s``. Before any step, at the same weights, each DP side's per-pair
gradient norms (before clipping) of the batch are taken; ``grad_norm_max_rel_diff`` is the
largest relative difference between the two sides' norms (same work on the same pairs).

Figures (``--json``, last line): ``speedup_vs_opake`` (Opake's DP step time / dpalign's),
``dpalign_dp_over_plain`` and ``opake_dp_over_plain`` (each side's DP step over its own plain
step), ``plain_time_ratio`` (Opake plain / dpalign plain: the two venvs' shared stack),
memory ratios (``*_memory_ratio``: DP over plain on each side, and
``dp_memory_ratio_vs_opake``: dpalign DP / Opake DP), ``grad_norm_max_rel_diff``.

Measured here (8 pairs x 64 tokens, batch 8, 1 thread, 2 warm-up + 7 timed steps, 2-core
x86 machine, torch 2.13.0 CPU, Opake 0.16.1):

    MEASURED_FIGURES_GO_HERE

The peer runs in its own venv, ``.venv-opake`` (``make opake-venv``, about a minute:
Python 3.11, this machine's CPU torch wheel, ``benchmarks/opake-constraints.txt``). Without
it the script says how to build it and reports dpalign's figures alone with
``"opake": "not installed"``; ``--build-peer`` runs ``make opake-venv`` first.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_opake.py [--batch-size 8] [--repeats 7]
        [--warmup 2] [--threads 1] [--sigma 1] [--clip 1] [--build-peer] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DPALIGN_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = ROOT / ".venv-opake"
OPAKE_SIDE = Path(__file__).with_name("opake_side.py")
BUILD_HINT = "make opake-venv"

LLAMA = {"vocab_size": 8000, "hidden_size": 256, "intermediate_size": 1024,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 128, "tie_word_embeddings": False,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
PROMPT_TOKENS, RESPONSE_TOKENS = 16, 48  # 64 tokens a sequence
LR, BETA, SEED = 1e-4, 0.1, 0
GOAL_SPEEDUP = 1.5


# --- the fixture both sides read -------------------------------------------------------------


def write_fixture(root: Path, n_pairs: int) -> Path:
    """``root``/<key>/ with ``model/`` (LlamaForCausalLM + word-level tokenizer), ``adapter/``
    (the LoRA adapter both sides start from) and ``pairs.json`` (token ids); reused when it
    was written with the same settings."""
    spec = {"llama": LLAMA, "lora": LORA, "pairs": n_pairs, "prompt": PROMPT_TOKENS,
            "response": RESPONSE_TOKENS, "seed": SEED}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    out = root / f"b{n_pairs}-{key}"
    if (out / "pairs.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    model.save_pretrained(out / "model")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2,
             **{f"t{i}": i for i in range(3, LLAMA["vocab_size"])}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out / "model")
    lora = get_peft_model(model, LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    lora.save_pretrained(out / "adapter")
    rng = torch.Generator().manual_seed(SEED + 1)

    def ids(n: int) -> list[list[int]]:
        return torch.randint(3, LLAMA["vocab_size"], (n_pairs, n), generator=rng).tolist()

    pairs = {"prompt": ids(PROMPT_TOKENS), "chosen": ids(RESPONSE_TOKENS),
             "rejected": ids(RESPONSE_TOKENS)}
    (out / "pairs.json").write_text(json.dumps(pairs))
    return out


# --- the dpalign side (a worker process of the project's venv) -------------------------------


def timed(step: Callable[[int], None], warmup: int, repeats: int) -> dict[str, Any]:
    """``common.timed`` (median wall seconds of ``step(k)`` after ``warmup``, peak RSS
    added) plus the median CPU seconds of the process per step (``cpu_median_s``: with one
    thread, what a busy machine's other processes change least), without importing
    ``common`` (the workers skip its imports of the VLM world and pretraining)."""
    from trl_peer import PeakRSS

    for k in range(1, warmup + 1):
        step(k)
    memory = PeakRSS()
    memory.start()
    times, cpu = [], []
    for k in range(warmup + 1, warmup + repeats + 1):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        step(k)
        times.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - cpu_tick)
    return {"median_s": statistics.median(times), "step_seconds": times,
            "cpu_median_s": statistics.median(cpu), "peak_rss_mb": memory.delta()}


def dpalign_side(fixture: Path, mode: str, *, warmup: int, repeats: int, sigma: float,
                 clip: float) -> dict[str, Any]:
    """dpalign's plain or DP step on the fixture; the DP mode also reports the per-pair
    gradient norms (before clipping) of the batch at the starting weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpalign.losses.config import LossConfig
    from dpalign.losses.objective import Objective, pair_logps
    from dpalign.models.families import ImageInputs
    from dpalign.models.pairs import EncodedPair, collate

    base = AutoModelForCausalLM.from_pretrained(fixture / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, fixture / "adapter", is_trainable=True)
    model.train()
    raw = json.loads((fixture / "pairs.json").read_text())
    pairs = [EncodedPair(id=str(i), prompt=p, chosen=c, rejected=r,
                         images=ImageInputs.empty(), corrupt=None, hardness=None)
             for i, (p, c, r) in enumerate(zip(raw["prompt"], raw["chosen"], raw["rejected"],
                                               strict=True))]
    batch = collate(pairs, pad_id=LLAMA["pad_token_id"])
    with torch.no_grad(), model.disable_adapter():
        ref = pair_logps(model, batch)
    objective = Objective.from_config(LossConfig(name="dpo", beta=BETA))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    report: dict[str, Any] = {"ref_logps": {"ref_chosen_logps": ref.chosen.tolist(),
                                            "ref_rejected_logps": ref.rejected.tolist()}}
    if mode == "plain":
        def step(k: int) -> None:
            del k
            loss = objective(pair_logps(model, batch), ref).per_example.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        step, norms, first_loss = dpalign_dp_step(model, params, optimizer, batch, ref,
                                                  objective, sigma=sigma, clip=clip)
        report |= {"per_pair_grad_norms": norms, "first_loss": first_loss}
    return {**report, **timed(step, warmup, repeats), "mode": mode,
            "threads": torch.get_num_threads(), "batch_size": len(pairs)}


def dpalign_dp_step(model: Any, params: dict[str, Any], optimizer: Any, batch: Any, ref: Any,
                    objective: Any, *, sigma: float, clip: float) -> tuple[Any, list[float],
                                                                           float]:
    """dpalign's DP step over ``batch`` (every pair a unit, as ``DPStep`` with fixed-size
    batches): per-pair gradients (engine ``hooks``), fixed clipping at ``clip``, noise
    N(0, (sigma C)^2) on the sum, the mean over the batch as ``.grad``, the optimizer step.
    Returns the step (``step(k)`` for batch k, 1-based: k seeds the noise), the per-pair
    gradient norms of the batch at the current weights and their mean loss."""
    from dpalign.privacy.clipping import CLIPPING
    from dpalign.privacy.config import PrivacyConfig
    from dpalign.privacy.per_pair import make_engine
    from dpalign.privacy.plan import PrivacyPlan, noisy_once

    engine = make_engine("hooks", model, params)
    privacy = PrivacyConfig(enabled=True, noise_multiplier=sigma, max_grad_norm=clip,
                            sampling="shuffle")
    n = batch.n_pairs
    plan = PrivacyPlan(sigma, 1.0, float(n), n, 1)
    clipping = CLIPPING[privacy.clipping]
    grads, out = engine(batch, ref, objective, None)  # the engine's first-batch check too
    _, norms = clipping.clip(grads, clip, privacy.auto_gamma)

    def step(k: int) -> None:
        per_pair, _ = engine(batch, ref, objective, None)
        clipped, _ = clipping.clip(per_pair, clip, privacy.auto_gamma)
        noisy = noisy_once(clipped, plan, privacy, k, clip)
        for name, param in params.items():
            param.grad = noisy[name].to(param.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, [float(x) for x in norms], float(out.per_example.mean())


# --- orchestration ---------------------------------------------------------------------------


def last_json(command: list[str], what: str) -> dict[str, Any]:
    """Run ``command`` and return the JSON object on the last line of its output."""
    env = {**os.environ, "DPALIGN_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_python(venv: Path) -> Path | None:
    python = venv / "bin" / "python"
    return python if python.is_file() else None


def find_peer(venv: Path, *, skip: bool = False) -> tuple[Path | None, str | None]:
    """The peer's interpreter, or None and why (with how to build it)."""
    if skip:
        return None, "Opake's side skipped (--no-peer); reporting dpalign's figures alone."
    python = peer_python(venv)
    if python is None:
        return None, (f"Opake's peer venv {venv} is missing: build it with `{BUILD_HINT}` "
                      "(about a minute; or pass --build-peer); reporting dpalign's figures "
                      "alone.")
    return python, None


def build_peer() -> None:
    subprocess.run(["make", "-C", str(ROOT), "opake-venv"], check=True)


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def compare(ours: dict[str, dict[str, Any]], peer: dict[str, dict[str, Any]] | None
            ) -> dict[str, Any]:
    """The report's top-level figures (ratios left out where a memory figure is 0)."""
    figures: dict[str, Any] = {
        "dpalign_dp_over_plain": ours["dp"]["median_s"] / ours["plain"]["median_s"],
        "dpalign_dp_over_plain_cpu": ours["dp"]["cpu_median_s"] / ours["plain"]["cpu_median_s"],
        "dpalign_dp_memory_ratio": ratio(ours["dp"]["peak_rss_mb"],
                                         ours["plain"]["peak_rss_mb"])}
    if peer is not None:
        figures |= {
            "speedup_vs_opake": peer["dp"]["median_s"] / ours["dp"]["median_s"],
            "speedup_vs_opake_cpu": peer["dp"]["cpu_median_s"] / ours["dp"]["cpu_median_s"],
            "opake_dp_over_plain_cpu": (peer["dp"]["cpu_median_s"]
                                        / peer["plain"]["cpu_median_s"]),
            "opake_dp_over_plain": peer["dp"]["median_s"] / peer["plain"]["median_s"],
            "plain_time_ratio": peer["plain"]["median_s"] / ours["plain"]["median_s"],
            "opake_dp_memory_ratio": ratio(peer["dp"]["peak_rss_mb"],
                                           peer["plain"]["peak_rss_mb"]),
            "dp_memory_ratio_vs_opake": ratio(ours["dp"]["peak_rss_mb"],
                                              peer["dp"]["peak_rss_mb"]),
            "grad_norm_max_rel_diff": rel_diff(ours["dp"]["per_pair_grad_norms"],
                                               peer["dp"]["per_pair_grad_norms"]),
            "ref_logp_max_rel_diff": rel_diff(
                [x for k in sorted(ours["dp"]["ref_logps"]) for x in ours["dp"]["ref_logps"][k]],
                [x for k in sorted(peer["dp"]["ref_logps"]) for x in peer["dp"]["ref_logps"][k]]),
            "opake_construct_s": peer["dp"]["construct_s"]}
        figures["goal_met"] = figures["speedup_vs_opake"] >= GOAL_SPEEDUP
    return {k: v for k, v in figures.items() if v is not None}


def table(ours: dict[str, dict[str, Any]], peer: dict[str, dict[str, Any]] | None,
          figures: dict[str, Any], missing: str = "not installed") -> str:
    lines = [f"{'':<10}{'plain ms':>10}{'DP ms':>10}{'DP/plain':>10}"
             f"{'plain MiB':>11}{'DP MiB':>10}"]
    for name, side in (("dpalign", ours), ("Opake", peer)):
        if side is None:
            lines.append(f"{name:<10}  {missing} (the peer venv: `{BUILD_HINT}`)")
            continue
        lines.append(f"{name:<10}{side['plain']['median_s'] * 1e3:>10.1f}"
                     f"{side['dp']['median_s'] * 1e3:>10.1f}"
                     f"{side['dp']['median_s'] / side['plain']['median_s']:>10.2f}"
                     f"{side['plain']['peak_rss_mb']:>11.0f}{side['dp']['peak_rss_mb']:>10.0f}")
    if peer is not None:
        lines.append(f"speedup vs Opake (Opake DP / dpalign DP): "
                     f"{figures['speedup_vs_opake']:.2f}x (goal {GOAL_SPEEDUP}x)")
        lines.append(f"per-pair gradient norms: max relative difference "
                     f"{figures['grad_norm_max_rel_diff']:.2e}")
        lines.append(f"Opake DPOTrainer construction: {figures['opake_construct_s']:.1f} s "
                     "(not in the step)")
    return "\n".join(lines)


def main() -> None:
    from common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    parser.add_argument("--clip", type=float, default=1.0, help="per-pair clipping norm C")
    parser.add_argument("--peer-venv", type=Path, default=PEER_VENV,
                        help="Opake's venv (default .venv-opake)")
    parser.add_argument("--build-peer", action="store_true",
                        help=f"run `{BUILD_HINT}` first when the peer venv is missing")
    parser.add_argument("--no-peer", action="store_true",
                        help="dpalign's side alone (the smoke test: same on every machine)")
    parser.add_argument("--opake-fast-digest", action="store_true",
                        help="construct Opake's trainer with a byte-identical, vectorised "
                             "weight fingerprint (opake_side.use_fast_digest; for tests: "
                             "opake_construct_s is then not Opake's own)")
    parser.add_argument("--worker", choices=("dpalign",), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("plain", "dp"), help=argparse.SUPPRESS)
    parser.add_argument("--fixture", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.manual_seed(SEED)
        torch.set_num_threads(args.threads)
        print(json.dumps(dpalign_side(args.fixture, args.mode, warmup=args.warmup,
                                      repeats=args.repeats, sigma=args.sigma,
                                      clip=args.clip)))
        return

    fixture = write_fixture(args.cache / "vs_opake", args.batch_size)
    steps = ["--warmup", str(args.warmup), "--repeats", str(args.repeats),
             "--threads", str(args.threads), "--sigma", str(args.sigma),
             "--clip", str(args.clip), "--fixture", str(fixture)]
    if not args.no_peer and peer_python(args.peer_venv) is None and args.build_peer:
        build_peer()
    python, message = find_peer(args.peer_venv, skip=args.no_peer)
    if message:
        print(message, file=sys.stderr)
    ours = {mode: last_json([sys.executable, __file__, "--worker", "dpalign", "--mode", mode,
                             *steps], f"dpalign {mode} step") for mode in ("plain", "dp")}
    peer = None if python is None else {
        mode: last_json([str(python), str(OPAKE_SIDE), "--mode", mode, *steps,
                         *(["--fast-digest"] if args.opake_fast_digest else [])],
                        f"Opake {mode} step") for mode in ("plain", "dp")}
    figures = compare(ours, peer)
    print(table(ours, peer, figures, "not run" if args.no_peer else "not installed"))
    if args.json:
        print(json.dumps({**figures, "batch_size": args.batch_size, "threads": args.threads,
                          "sigma": args.sigma, "clip": args.clip,
                          "tokens_per_sequence": PROMPT_TOKENS + RESPONSE_TOKENS,
                          "goal_speedup": GOAL_SPEEDUP, "dpalign": ours,
                          "opake": peer if peer is not None else (
                              "not run" if args.no_peer else "not installed"),
                          **({} if peer is not None else {"opake_build": BUILD_HINT}),
                          "opake_fast_digest": args.opake_fast_digest}))


if __name__ == "__main__":
    main()
