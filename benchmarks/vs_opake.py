"""One DP-DPO step: dpalign vs Opake (JetBrains Research's DP DPO library), text LLM, LoRA.

Both sides train the same small Llama-architecture model (``LlamaForCausalLM``, 4 layers,
hidden 256, 4 heads, MLP 1024, vocab 8000, random init from seed 0) with the same LoRA
adapter (r 8, alpha 16, on q/k/v/o; lora_B drawn nonzero so that the policy differs from its
reference and every adapter matrix has a gradient), on the same B pairs of token ids (a
16-token prompt and two 48-token responses: 64 tokens a sequence), with sigmoid DPO (beta
0.1), the pair as privacy unit, fixed clipping at C = 1, Gaussian noise sigma = 1 and AdamW
(lr 1e-4, no weight decay). This script writes that fixture once (``--cache``/vs_opake/),
so the two sides read identical weights and token ids.

Four measurements, each in a process of its own, one after the other (``--rounds`` times:
medians over the rounds), on ``--threads`` threads; each does ``--warmup`` untimed steps and
``--repeats`` timed ones on the same batch of B pairs; the figure is the median (wall time,
and ``cpu_median_s``: the process's CPU time, which other processes on a busy machine change
less), the memory the peak RSS added during the timed steps (``trl_peer.PeakRSS``):

- dpalign plain: ``pair_logps`` over the 2B rows, the DPO ``Objective``, mean, backward,
  ``torch.optim.AdamW``;
- dpalign DP: the own-loop DP step, ``make_private(...).step`` (``dpalign.train.private``,
  as ``dpalign train`` takes it): per-pair gradients of the same loss from engine ``hooks``
  (one forward and one backward of the batch), fixed clipping, one noise draw, the mean as
  ``.grad``, the same AdamW, the ledger. Every pair is a unit and every step takes all B
  (``sampling: shuffle``, batch = pairs), so the epsilon ``step`` reports after each step is
  the fixed-batch accountant's (~0.3 ms here);
- Opake plain (``opake_side.py --mode plain``, in the peer venv): the same batched step
  with Opake's own ``sequence_logp`` and ``sigmoid_loss``;
- Opake DP (``opake_side.py --mode dp``): ``opake.transformers.trl.DPOTrainer``'s own
  ``training_step`` (``vmap(grad)`` per pair, clip, noise, its functional AdamW) on the
  same fixed batch (its ``train()`` would draw Poisson batches of varying size).

Reference log-probs are computed once, outside the timed steps, on both sides (the base
model with the adapter disabled; Opake does it while its trainer is constructed). Opake's
``training_step`` accounts nothing (its loop does, between steps); dpalign's ``step`` reports
epsilon every ``privacy.account_every`` steps (the trainer's rule; with these fixed
batches an accounting takes 0.3 ms, a PLD accounting of a Poisson ledger ~0.5 s).
Opake's trainer construction (it fingerprints every
weight byte by byte for its reference cache) is timed apart and reported as
``opake_construct_s``. Before any step, at the same weights, each DP side's per-pair
gradient norms (before clipping) of the batch are taken; ``grad_norm_max_rel_diff`` is the
largest relative difference between the two sides' norms (same work on the same pairs).

Figures (``--json``, last line): ``speedup_vs_opake`` (Opake's DP step time / dpalign's),
``dpalign_dp_over_plain`` and ``opake_dp_over_plain`` (each side's DP step over its own plain
step), ``plain_time_ratio`` (Opake plain / dpalign plain: the two venvs' shared stack),
memory ratios (``*_memory_ratio``: DP over plain on each side, and
``dp_memory_ratio_vs_opake``: dpalign DP / Opake DP), ``grad_norm_max_rel_diff``.

Measured here (8 pairs x 64 tokens, batch 8, 1 thread, 2 warm-up + 7 timed steps, 3 rounds;
2-core x86 machine, torch 2.13.0 CPU, Opake 0.16.1 on Python 3.11.7; medians over rounds):

                plain ms   DP ms  DP/plain  plain MiB  DP MiB
    dpalign        440       462     1.05        270      282
    Opake          459       650     1.42        286      220

    speedup_vs_opake 1.41 (CPU time 1.41); plain_time_ratio 1.04
    grad_norm_max_rel_diff 2.8e-6, ref_logp_max_rel_diff 1.4e-7 (float64 vs float32 norms)
    dp_memory_ratio_vs_opake 1.28; opake_construct_s 94 s
    Two runs on the same machine busy with other test runs (load average 4-6; wall ~1.5x
    CPU time): speedup 1.47 and 1.46 (CPU 1.49, 1.45), DP/plain 1.06-1.07 (dpalign) and
    1.45 (Opake), opake_construct_s 117-181 s.

So the goal (>= 1.5x) is missed: 1.41-1.47x. dpalign's DP step is its plain step plus 5-7%
(cProfile of ``step``: 49% forward, 48% backward incl. the per-pair contractions (4%), 2%
clip + noise + AdamW + ledger): at B = 8 x 64 tokens a step is the model's forward and
backward, which the plain steps of both sides share (and which cost the same on both). The
speedup is therefore Opake's DP overhead over a plain step (1.42-1.45x on this machine;
1.55-1.80x when the issue was filed) divided by dpalign's 1.05. Opake's overhead (torch
profiler, one step): its ``vmap`` over pairs computes the full-vocabulary log-softmax of all
64 positions (dpalign only the 49 it needs) and decomposes it under ``vmap`` (exp/sub/max:
~0.2 s on the loaded machine), attention has no ``vmap`` batching rule on CPU (a fallback
loop), and ``clipped_grad`` itself takes ~60 ms. What dpalign could still shed is in the
shared part: log-probs from logits of the labelled positions only, as one contiguous matmul
(``logits_to_keep`` leaves a strided slice that runs as a batched matmul) and the
log-softmax's (rows, positions, vocab) tensor; a patched ``sequence_logps`` doing both took
3.5% off the DP step.

The peer runs in its own venv, ``.venv-opake`` (``make opake-venv``: ~100 s, from a cold or
a warm pip cache alike; Python 3.11 with this machine's CPU torch wheel, every version pinned
in ``benchmarks/opake-constraints.txt``; Opake's import on 3.11 needs the dataclass fix
``opake_side.backport_dataclass_slots``, as no CPU torch 2.13 wheel for 3.13 is on these
package indexes). Without it the script says how to build it and reports dpalign's figures
alone with ``"opake": "not installed"``; ``--build-peer`` runs ``make opake-venv`` first,
``--no-peer`` skips Opake (the smoke test in ``tests/test_benchmarks.py``; CI does not build
the peer: ``tests/test_vs_opake.py`` runs both sides where ``.venv-opake`` exists).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_opake.py [--batch-size 8] [--repeats 7]
        [--warmup 2] [--threads 1] [--rounds 1] [--sigma 1] [--clip 1] [--build-peer]
        [--no-peer] [--opake-fast-digest] [--json]
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
    from dpalign.models.families import ImageInputs, TextProcessor
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
        processor = TextProcessor.from_pretrained(fixture / "model")
        step, norms, first_loss = dpalign_dp_step(model, optimizer, processor, pairs, ref,
                                                  sigma=sigma, clip=clip,
                                                  steps=warmup + repeats + 1)
        report |= {"per_pair_grad_norms": norms, "first_loss": first_loss}
    return {**report, **timed(step, warmup, repeats), "mode": mode,
            "threads": torch.get_num_threads(), "batch_size": len(pairs)}


def dpalign_dp_step(model: Any, optimizer: Any, processor: Any, pairs: list[Any], ref: Any, *,
                    sigma: float, clip: float, steps: int) -> tuple[Any, list[float], float]:
    """dpalign's own-loop DP step, ``make_private(...).step`` (``dpalign.train.private``):
    per-pair gradients (engine ``hooks``), fixed clipping at ``clip``, noise N(0, (sigma C)^2)
    on the sum, the mean over the batch as ``.grad``, ``optimizer.step()``, the ledger.
    Every pair is a unit and every step takes all of them (``sampling: shuffle`` with batch
    = pairs, so the accountant's epsilon after each step, which ``step`` reports, is the
    closed form of fixed batches: ~0.3 ms; Opake's ``training_step`` accounts nothing).
    Returns the step (``step(k)``), the per-pair gradient norms (before clipping) of the
    batch at the current weights, from the step's own engine, and their mean loss."""
    from dpalign.models.pairs import collate
    from dpalign.privacy.clipping import CLIPPING
    from dpalign.train.private import make_private

    private = make_private(model, optimizer, processor=processor, n_pairs=len(pairs),
                           batch_size=len(pairs), steps=steps,
                           loss={"name": "dpo", "beta": BETA},
                           privacy={"noise_multiplier": sigma, "max_grad_norm": clip,
                                    "sampling": "shuffle", "engine": "hooks"})
    batch = collate(pairs, pad_id=LLAMA["pad_token_id"])
    grads, out = private.engine(batch, ref, private.objective, None)  # + its first-batch check
    _, norms = CLIPPING["fixed"].clip(grads, clip, 0.0)

    def step(k: int) -> None:
        del k
        private.step(pairs, ref=ref)

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
                      "(~100 s; or pass --build-peer); reporting dpalign's figures "
                      "alone.")
    return python, None


def build_peer() -> None:
    subprocess.run(["make", "-C", str(ROOT), "opake-venv"], check=True)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds as one entry: the first round's report with the medians over the
    rounds of its step medians and memory, and each round's figures under ``rounds``."""
    keys = ("median_s", "cpu_median_s", "peak_rss_mb")
    merged = {**runs[0], **{k: statistics.median(run[k] for run in runs) for k in keys}}
    if len(runs) > 1:
        merged["rounds"] = {k: [run[k] for run in runs] for k in keys}
    return merged


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
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the four measurements this many times, one after the other, "
                             "and report medians over the rounds (a busy machine's load "
                             "drifts between processes); rounds after the first build "
                             "Opake's trainer with --opake-fast-digest")
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
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        done = {f"dpalign.{mode}": last_json([sys.executable, __file__, "--worker", "dpalign",
                                              "--mode", mode, *steps], f"dpalign {mode} step")
                for mode in ("plain", "dp")}
        if python is not None:
            fast = ["--fast-digest"] if args.opake_fast_digest or r > 0 else []
            done |= {f"opake.{mode}": last_json([str(python), str(OPAKE_SIDE), "--mode", mode,
                                                 *steps, *fast], f"Opake {mode} step")
                     for mode in ("plain", "dp")}
        rounds.append(done)
    ours = {mode: merge([done[f"dpalign.{mode}"] for done in rounds]) for mode in ("plain", "dp")}
    peer = None if python is None else {
        mode: merge([done[f"opake.{mode}"] for done in rounds]) for mode in ("plain", "dp")}
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
