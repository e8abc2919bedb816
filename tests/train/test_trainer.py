"""The preference trainer: step maths at policy == reference, per-pair gradients, resume ==
uninterrupted, run-directory rules, learning on the world, and config validation."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import CrashError, crash_at, without_time
from dpalign.config import ConfigError, load_yaml_config
from dpalign.data.fewshot import few_shot
from dpalign.data.records import read_preference_jsonl, write_preference_jsonl
from dpalign.data.schema import PairMetadata
from dpalign.io import read_jsonl
from dpalign.losses.base import PairLogps
from dpalign.losses.config import LossConfig
from dpalign.losses.objective import Objective, kl_proxy, pair_logps
from dpalign.models.load import LoadedModel, load_model
from dpalign.models.lora import LoraConfig, prepare_trainable
from dpalign.models.pairs import EncodedPair, collate, encode_pairs
from dpalign.train.config import TrainConfig
from dpalign.train.loop import RunDirError, TrainResult, train
from dpalign.train.reference import compute_reference
from dpalign.world.load import World

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LOG2 = math.log(2.0)
MakeConfig = Callable[..., TrainConfig]  # the make_config fixture (tests/conftest.py)


def _lora_model(tiny_model: Path) -> tuple[torch.nn.Module, LoadedModel]:
    """A fresh tiny model with LoRA adapters (B = 0: equal to the base), in train mode."""
    vlm = load_model(tiny_model)
    model = prepare_trainable(vlm.model, LoraConfig())
    model.train()
    return model, vlm


def _pool_pairs(vlm: LoadedModel, world: Path, k: int) -> list[EncodedPair]:
    records = few_shot(read_preference_jsonl(World.load(world).pool_file), k, seed=0)
    return encode_pairs(records, vlm.processor)


def _pad(vlm: LoadedModel) -> int:
    return int(vlm.processor.tokenizer.pad_token_id)  # type: ignore[attr-defined]


def _fields(logps: PairLogps) -> list[torch.Tensor]:
    return [logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens]


# --- step maths ----------------------------------------------------------------------------

def test_step_zero_is_log2_with_zero_kl(tiny_model: Path, small_world: Path) -> None:
    """With fresh adapters the policy is the reference: every pair's DPO loss is log 2, the
    KL proxy is 0, and compute_reference (eval, no grad, batches of 3) equals pair_logps of
    one batch of all pairs."""
    model, vlm = _lora_model(tiny_model)
    pairs = _pool_pairs(vlm, small_world, 6)
    batch = collate(pairs, _pad(vlm))
    ref = compute_reference(model, pairs, _pad(vlm), with_corrupt=False, batch_size=3)
    assert model.training  # compute_reference restores the mode it found
    policy = pair_logps(model, batch)
    assert policy.chosen.requires_grad
    out = Objective.from_config(LossConfig(name="dpo", beta=0.1))(policy, ref)
    torch.testing.assert_close(out.per_example.detach(), torch.full((6,), LOG2), atol=1e-5,
                               rtol=0)
    assert float(kl_proxy(policy, ref).detach().max()) < 1e-10
    with torch.no_grad():
        again = pair_logps(model, batch)
    for a, b in zip(_fields(ref), _fields(again), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert ref.chosen_tokens.tolist() == [len(p.chosen) for p in pairs]


def test_batch_gradient_is_mean_of_per_pair_gradients(tiny_model: Path,
                                                      small_world: Path) -> None:
    """d(mean DPO loss over a padded batch of 4)/d(LoRA) == mean over pairs of the gradient
    of each pair's loss computed alone (one pair per forward, no cross-pair padding)."""
    model, vlm = _lora_model(tiny_model)
    pairs = _pool_pairs(vlm, small_world, 4)
    ref = compute_reference(model, pairs, _pad(vlm), with_corrupt=False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move away from policy == reference so every term is non-trivial
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    objective = Objective.from_config(LossConfig(name="dpo", beta=0.5))

    loss = objective(pair_logps(model, collate(pairs, _pad(vlm))), ref).per_example.mean()
    batch_grads = torch.autograd.grad(loss, list(params.values()))
    per_pair = []
    for i, pair in enumerate(pairs):
        one = objective(pair_logps(model, collate([pair], _pad(vlm))), ref.index(slice(i, i + 1)))
        per_pair.append(torch.autograd.grad(one.per_example.sum(), list(params.values())))
    assert abs(float(loss.detach()) - LOG2) > 1e-3
    for name, got, *each in zip(params, batch_grads, *per_pair, strict=True):
        expected = torch.stack(each).mean(dim=0)
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7, msg=name)


# --- resume --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(make_config: MakeConfig, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[TrainConfig, TrainResult]:
    """6 uninterrupted steps, held-out evaluation every 3, checkpoints every 2."""
    cfg = make_config()
    return cfg, train(cfg, tmp_path_factory.mktemp("run") / "whole")


def test_uninterrupted_run_dir(finished: tuple[TrainConfig, TrainResult]) -> None:
    """The run dir holds one metrics line per step, evaluations at 0/3/6, two checkpoints,
    cached reference log-probs (16 train pairs, 24 held-out) and a result summary."""
    cfg, result = finished
    out = result.out
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0, 3, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004",
                                                                       "step_000006"]
    assert yaml.safe_load((out / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    train_ref = load_file(str(out / "reference" / "train.safetensors"))
    held_ref = load_file(str(out / "reference" / "heldout.safetensors"))
    assert train_ref["chosen"].shape == (16,) and held_ref["chosen"].shape == (24,)
    assert "chosen_corrupt" not in train_ref
    summary = json.loads((out / "result.json").read_text())
    assert summary["steps"] == 6 and summary["n_pairs"] == 16
    first = read_jsonl(out / "eval.jsonl")[0]
    assert first["heldout_reward_margin"] == 0.0  # the base model is its own reference


def test_heldout_pairs_evaluates_the_files_first_pairs(
        make_config: MakeConfig, tmp_path: Path,
        finished: tuple[TrainConfig, TrainResult]) -> None:
    """``eval.heldout_pairs: 5`` evaluates the held-out file's first 5 pairs: their reference
    log-probs are the first 5 of the whole file's (same base model)."""
    cfg = make_config(train={"steps": 1}, eval={"every": 1, "heldout_pairs": 5},
                      checkpoint={"every": None})
    out = train(cfg, tmp_path / "run").out
    part = load_file(str(out / "reference" / "heldout.safetensors"))
    whole = load_file(str(finished[1].out / "reference" / "heldout.safetensors"))
    assert part["chosen"].shape == (5,)
    for field in ("chosen", "rejected"):
        torch.testing.assert_close(part[field], whole[field][:5])
    assert json.loads((out / "reference" / "heldout.json").read_text())["ids"] == [
        r.id for r in read_preference_jsonl(cfg.data.heldout)[:5]]


def test_resume_equals_uninterrupted(make_config: MakeConfig, tmp_path: Path,
                                     finished: tuple[TrainConfig, TrainResult]) -> None:
    """Crash inside step 5 (after the step-4 checkpoint, with step 5 already logged), resume:
    metrics (but step_seconds), evaluations and final weights equal the uninterrupted run's;
    the cached reference log-probs are read, not recomputed."""
    cfg, whole = finished
    out = tmp_path / "crashed"

    with pytest.raises(CrashError):
        train(cfg, out, on_step=crash_at(5))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert not (out / "final").exists() and not (out / "result.json").exists()
    cache = out / "reference" / "train.safetensors"
    before = (cache.read_bytes(), cache.stat().st_mtime_ns)

    resumed = train(cfg, out, resume=True)
    assert (cache.read_bytes(), cache.stat().st_mtime_ns) == before
    assert resumed.steps == 6
    assert without_time(read_jsonl(out / "metrics.jsonl")) == without_time(
        read_jsonl(whole.out / "metrics.jsonl"))
    assert read_jsonl(out / "eval.jsonl") == read_jsonl(whole.out / "eval.jsonl")
    final = load_file(str(out / "final" / "model.safetensors"))
    expected = load_file(str(whole.out / "final" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


def test_resume_with_another_config_is_refused(finished: tuple[TrainConfig, TrainResult]
                                               ) -> None:
    cfg, result = finished
    other = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 1e-3})})
    with pytest.raises(RunDirError, match="differs"):
        train(other, result.out, resume=True)


def test_non_empty_dir_without_resume_is_refused(finished: tuple[TrainConfig, TrainResult],
                                                 tmp_path: Path) -> None:
    cfg, result = finished
    with pytest.raises(RunDirError, match="not empty"):
        train(cfg, result.out)
    with pytest.raises(RunDirError, match="no run to resume"):
        train(cfg, tmp_path / "empty", resume=True)


# --- learning ------------------------------------------------------------------------------

def test_dpo_raises_heldout_preference_accuracy(make_config: MakeConfig, tmp_path: Path) -> None:
    """20 DPO steps (batch 8, the 48 pool pairs, lr 2e-3) make the model prefer the chosen
    answers of the 24 held-out pairs more often than the base model does (per-token mean
    log-probs: length-neutral), and its implicit-reward accuracy is well above chance.

    Seen over seeds 0-7 with an earlier base model: pref_accuracy_mean 0.542 -> 0.875-0.917
    (+8 to +9 pairs); we require +2. The summed-log-prob accuracy is not asserted: the base
    model already ranks the hallucination pairs right by sum (their rejected answers are
    longer), so that figure has almost no room and moved by -1..+3 pairs across base
    models."""
    cfg = make_config(data={"k": 48}, train={"steps": 20, "batch_size": 8},
                      optim={"lr": 2e-3}, eval={"every": None}, checkpoint={"every": None})
    result = train(cfg, tmp_path / "run")
    first, last = result.evaluations[0], result.evaluations[-1]
    assert (first["step"], last["step"]) == (0, 20)
    pair = 1 / 24 - 1e-6
    gain_mean = last["heldout_pref_accuracy_mean"] - first["heldout_pref_accuracy_mean"]
    assert gain_mean >= 2 * pair, (first, last)
    assert last["heldout_reward_accuracy"] >= 0.7 and last["heldout_reward_margin"] > 0
    assert first["heldout_reward_accuracy"] == 0.0  # rewards are 0 for the base model
    assert (tmp_path / "run" / "reference" / "train.safetensors").is_file()


# --- config validation ---------------------------------------------------------------------

def _raw(make_config: MakeConfig) -> dict[str, Any]:
    return make_config().model_dump(mode="json")


@pytest.mark.parametrize(("section", "values", "message"), [
    ("loss", {"name": "dpoo"}, "unknown loss 'dpoo'"),
    ("optim", {"name": "adamx"}, "unknown optimizer 'adamx'"),
    ("optim", {"schedule": "zigzag"}, "unknown schedule 'zigzag'"),
    ("loss", {"name": "cdpo", "params": {"label_smoothing": 0.7}}, "label_smoothing"),
    ("loss", {"name": "dpo", "params": {"label_smoothing": 0.1}}, "label_smoothing"),
    ("train", {"steps": 5, "epochs": 2}, "exactly one of train.steps and train.epochs"),
    ("optim", {"betas": [0.9, 0.99]}, "betas"),
])
def test_bad_config_fails_validation(make_config: MakeConfig, tmp_path: Path, section: str,
                                     values: dict[str, Any], message: str) -> None:
    """Bad names, parameters and lengths fail as a ValidationError when the config is built
    and as a ConfigError naming the YAML file when read from one (no model is loaded)."""
    raw = _raw(make_config)
    raw[section] = {**raw[section], **values}
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message) as info:
        load_yaml_config(TrainConfig, path)
    assert str(path) in str(info.value)


def test_dama_needs_hardness_in_every_record(make_config: MakeConfig, small_world: Path,
                                             tmp_path: Path) -> None:
    """DAMA on a file where one record lacks metadata.hardness_score fails naming the file
    and that record's id."""
    records = read_preference_jsonl(World.load(small_world).pool_file)[:8]
    records[5] = records[5].model_copy(update={"metadata": PairMetadata(user_id="u")})
    path = write_preference_jsonl(tmp_path / "no_hardness.jsonl", records)
    cfg = make_config(data={"train": str(path), "heldout": None, "k": None},
                      loss={"name": "dama"}, eval={"every": None})
    with pytest.raises(ValueError, match="hardness_score") as info:
        train(cfg, tmp_path / "run")
    assert str(path) in str(info.value) and repr(records[5].id) in str(info.value)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    """Every YAML preset in configs/ is a valid TrainConfig."""
    cfg = load_yaml_config(TrainConfig, path)
    assert cfg.train.steps or cfg.train.epochs


def test_configs_folder_has_the_world_presets() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"world_dpo.yaml", "world_mdpo.yaml"} <= names
    dpo = load_yaml_config(TrainConfig, CONFIGS / "world_dpo.yaml")
    mdpo = load_yaml_config(TrainConfig, CONFIGS / "world_mdpo.yaml")
    assert (dpo.loss.name, mdpo.loss.name) == ("dpo", "mdpo")
    assert dpo.model_dump(exclude={"loss"}) == mdpo.model_dump(exclude={"loss"})
