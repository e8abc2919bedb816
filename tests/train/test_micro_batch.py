"""``train.micro_batch_size``: a batch run in chunks of pairs gives the same update as the
whole batch at once, with and without DP, for a loss that reads a corrupted image (mDPO)
and for DAMA, whose model-aware factor needs the whole batch's reward gap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpalign.io import read_jsonl
from dpalign.losses.objective import pair_logps
from dpalign.models.pairs import collate
from dpalign.train.config import TrainConfig
from dpalign.train.dp_step import DPStep, chunked_grads
from dpalign.train.loop import prepare, train
from dpalign.train.step import chunks

MakeConfig = Callable[..., TrainConfig]  # the make_config fixture (tests/conftest.py)


def test_chunks_cover_the_batch_in_order() -> None:
    assert chunks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert chunks(7, None) == [slice(0, 7)]
    assert chunks(4, 8) == [slice(0, 4)]
    assert chunks(0, 3) == []


@pytest.mark.parametrize(("loss", "engine"), [("dpo", "hooks"), ("mdpo", "hooks"),
                                              ("dpo", "loop")])
def test_chunked_per_pair_grads_equal_one_pair_at_a_time(make_config: MakeConfig,
                                                         tmp_path: Path, loss: str,
                                                         engine: str) -> None:
    """Seven pairs in chunks of 3, 3, 1: each per-pair gradient row equals that pair's own
    forward and autograd.grad, and the losses equal the whole batch's."""
    cfg = make_config(data={"heldout": None}, eval={"every": None}, loss={"name": loss},
                      privacy={"enabled": True, "noise_multiplier": 1.0, "engine": engine})
    run = prepare(cfg, tmp_path / "run")
    assert isinstance(run.grad_step, DPStep)
    engine = run.grad_step.engine
    gen = torch.Generator().manual_seed(0)
    params = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # adapters off B = 0, so that no gradient is trivially zero
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    idx = [5, 0, 9, 2, 14, 7, 11]
    grads, out = chunked_grads(engine, run.pairs, idx, run.ref, run.objective, run.pad_id,
                               micro_batch=3)
    _, whole = chunked_grads(engine, run.pairs, idx, run.ref, run.objective, run.pad_id,
                             micro_batch=None)
    torch.testing.assert_close(out.per_example, whole.per_example, rtol=1e-5, atol=1e-6)
    with_corrupt = run.objective.spec.needs_corrupt
    for row, i in enumerate(idx):
        alone = run.objective(pair_logps(run.model, collate([run.pairs[i]], run.pad_id,
                                                            with_corrupt=with_corrupt)),
                              run.ref.index(slice(i, i + 1)))
        want = torch.autograd.grad(alone.per_example.sum(), list(params.values()))
        for name, w in zip(params, want, strict=True):
            torch.testing.assert_close(grads[name][row], w, rtol=1e-4, atol=1e-6,
                                       msg=f"pair {i} {name}")


@pytest.mark.parametrize("privacy", [False, True])
@pytest.mark.parametrize("loss", ["dpo", "dama"])
def test_micro_batched_run_equals_the_whole_batch_run(make_config: MakeConfig, tmp_path: Path,
                                                      loss: str, privacy: bool) -> None:
    """Three steps of batch 8 with micro_batch_size 3 against the same run without it: the
    same metrics (DAMA's beta_i included) and the same final (merged) weights, up to float
    summation order."""
    def run(micro: int | None, name: str) -> Path:
        cfg = make_config(data={"heldout": None}, eval={"every": None},
                          checkpoint={"every": None}, loss={"name": loss},
                          train={"steps": 3, "batch_size": 8, "micro_batch_size": micro},
                          privacy={"enabled": True, "noise_multiplier": 1.0} if privacy else {})
        return train(cfg, tmp_path / name).out

    chunked, whole = run(3, "chunked"), run(None, "whole")
    rows, want = read_jsonl(chunked / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl")
    assert len(rows) == len(want) == 3
    for got, ref in zip(rows, want, strict=True):
        assert got.keys() == ref.keys()
        # at step 1 policy == reference: rewards are float noise (~1e-8, padding-dependent)
        # and the share of pairs with a positive one is meaningless
        noise = abs(ref["reward_margin"]) < 1e-5
        for key, value in ref.items():
            if noise and key == "reward_accuracy":
                continue
            if key == "step_seconds" or not isinstance(value, float):
                assert got[key] == value or key == "step_seconds", key
                continue
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    a = load_file(str(chunked / "final" / "model.safetensors"))
    b = load_file(str(whole / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
