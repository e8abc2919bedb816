"""``make_private``: the DP step for your own loop equals the trainer's updates.

A ``dpalign train`` DP run (sigma 1, Poisson q = 4/16, C = 1, AdamW with the default
schedule) and a plain PyTorch loop over the same model, optimizer and batches driven by
``make_private`` must give the same metrics rows and the same final weights, bit for bit:
same machine, same batch layout, same ops in the same order, so this is a determinism
check, not a tolerance. Run on the tiny LLaVA and on the tiny text-only Llama.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dpalign.io import read_jsonl
from dpalign.models.load import load_model
from dpalign.models.lora import merged, prepare_trainable
from dpalign.models.pairs import encode_pairs
from dpalign.train.checks import check_run
from dpalign.train.config import TrainConfig
from dpalign.train.loop import train
from dpalign.train.optim import build_optimizer
from dpalign.train.private import BudgetSpentError, make_private
from dpalign.train.reference import compute_reference

COMPARED = ("loss", "reward_margin", "reward_accuracy", "pairs", "dp_units", "dp_norm_max",
            "dp_clip_fraction", "dp_clip_norm", "dp_noise_variance", "epsilon")


def _config(model: Path, pool: Path, **privacy: Any) -> TrainConfig:
    return TrainConfig.model_validate({
        "model": str(model), "data": {"train": str(pool), "k": 16},
        "train": {"steps": 6, "batch_size": 4, "seed": 0},
        "eval": {"world": False},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "account_every": 1, **privacy}})


def _own_loop(cfg: TrainConfig, out: Path, *, given_ref: bool
              ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The run of ``cfg`` as a user's loop: load, LoRA, AdamW + schedule, make_private,
    then for each step the sampled pairs through ``private.step`` and ``schedule.step()``;
    the rows and the merged model's saved tensors (saved to ``out`` as the trainer saves)."""
    torch.manual_seed(cfg.train.seed)  # LoRA's A matrices draw from it, as in the trainer
    loaded = load_model(cfg.model)
    records = check_run(cfg).records
    pairs = encode_pairs(records, loaded.processor)
    pad = int(loaded.processor.tokenizer.pad_token_id)
    ref = compute_reference(loaded.model, pairs, pad, with_corrupt=False)
    model = prepare_trainable(loaded.model, cfg.lora)
    model.train()
    optimizer, schedule = build_optimizer([p for p in model.parameters() if p.requires_grad],
                                          cfg.optim, cfg.train.steps)
    private = make_private(model, optimizer, processor=loaded.processor, n_pairs=len(pairs),
                           batch_size=cfg.train.batch_size, steps=cfg.train.steps,
                           privacy=cfg.privacy, loss=cfg.loss, seed=cfg.train.seed)
    rows = []
    for batch in private.batches(records if not given_ref else pairs):
        if given_ref:
            idx = torch.tensor([pairs.index(p) for p in batch], dtype=torch.long)
            rows.append(private.step(batch, ref.index(idx)))
        else:
            rows.append(private.step(batch))
        schedule.step()
    merged(model).save_pretrained(out)
    return rows, load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(request: pytest.FixtureRequest, small_world: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TrainConfig, Path]]:
    """``{kind: (config, run dir)}`` of the trainer's run, made on first use per kind."""
    return {}


def _trained(kind: str, request: pytest.FixtureRequest, small_world: Path, cache: dict,
             tmp: Path) -> tuple[TrainConfig, Path]:
    from dpalign.world.load import World

    if kind not in cache:
        if kind == "vlm":
            paths = request.getfixturevalue("tiny_model"), World.load(small_world).pool_file
        else:
            paths = (request.getfixturevalue("tiny_text_model"),
                     request.getfixturevalue("text_pool"))
        cfg = _config(*paths)
        cache[kind] = cfg, train(cfg, tmp / kind).out
    return cache[kind]


# float32 log-probs of ~50-token rows round differently in another batch layout by up to
# ~2.3e-7 relative (losses.base.TIE_RTOL), ~1e-5 absolute; beta 0.1 scales that to ~1e-6
# on rewards and margins. With the trainer's own reference the loop is bit-equal.
@pytest.mark.parametrize(("kind", "given_ref"), [("vlm", True), ("text", True),
                                                 ("text", False)])
def test_own_loop_equals_the_trainer(kind: str, given_ref: bool, tmp_path: Path,
                                     request: pytest.FixtureRequest, small_world: Path,
                                     trained: dict) -> None:
    """Given the trainer's reference log-probs the loop is bit-equal to ``dpalign train``;
    computing them itself (the model with its adapters disabled, batch by batch) moves the
    reference only by batch-layout rounding (see above)."""
    cfg, run = _trained(kind, request, small_world, trained,
                        request.getfixturevalue("tmp_path_factory").mktemp("run"))
    expected = read_jsonl(run / "metrics.jsonl")
    rows, weights = _own_loop(cfg, tmp_path / "mine", given_ref=given_ref)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == list(range(1, 7))
    final = load_file(str(run / "final" / "model.safetensors"))
    for got, want in zip(rows, expected, strict=True):
        for key in COMPARED:
            if given_ref:
                assert got[key] == want[key], (got["step"], key)
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=2e-6), key
    assert weights.keys() == final.keys()
    for name, tensor in final.items():
        mine = weights[name]
        if given_ref:
            assert torch.equal(mine, tensor), name
        else:
            torch.testing.assert_close(mine, tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_target_epsilon_stops_the_batches(tiny_text_model: Path, text_pool: Path) -> None:
    """With a target epsilon the plan's budget bounds the steps: ``batches`` ends there and
    one more ``step`` is refused; epsilon stays at or under the target."""
    cfg = _config(tiny_text_model, text_pool, target_epsilon=3.0)
    loaded = load_model(cfg.model)
    model = prepare_trainable(loaded.model, cfg.lora)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    records = check_run(cfg).records
    private = make_private(model, optimizer, processor=loaded.processor,
                           n_pairs=len(records), batch_size=4, steps=40,
                           privacy={"noise_multiplier": 1.0, "target_epsilon": 3.0})
    budget = private.plan.budget_steps
    assert 0 < budget < 40
    taken = [private.step(batch) for batch in private.batches(records)]
    assert len(taken) == budget and private.steps_taken == budget
    assert taken[-1]["epsilon"] <= 3.0 < private.epsilon() + 1  # spent, within the target
    with pytest.raises(BudgetSpentError, match="target_epsilon=3"):
        private.step(records[:4])
