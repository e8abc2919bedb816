"""Held-out pairs split into validation (tuning) and test parts: disjoint, fixed by the pair
ids, logged as ``val_*`` and ``heldout_*``, and without effect on training."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import without_time
from dpalign.data.fewshot import validation_split
from dpalign.data.records import read_preference_jsonl
from dpalign.io import read_jsonl
from dpalign.train.config import TrainConfig
from dpalign.train.loop import train
from dpalign.world.load import World


def test_split_is_disjoint_complete_and_order_free(small_world: Path) -> None:
    held = read_preference_jsonl(World.load(small_world).heldout_file)
    val, test = validation_split(held, 0.25)
    assert len(val) == round(0.25 * len(held)) and len(val) + len(test) == len(held)
    assert not {r.id for r in val} & {r.id for r in test}
    assert {r.id for r in val} | {r.id for r in test} == {r.id for r in held}
    shuffled = list(held)
    random.Random(1).shuffle(shuffled)
    val2, _ = validation_split(shuffled, 0.25)
    assert {r.id for r in val2} == {r.id for r in val}  # the ids decide, not the file order
    assert [r.id for r in val] == [r.id for r in held if r.id in {v.id for v in val}]
    with pytest.raises(ValueError, match="fraction"):
        validation_split(held, 1.0)


def test_both_validation_sources_refused(make_config) -> None:
    with pytest.raises(ValueError, match="not both"):
        make_config(eval={"validation_fraction": 0.5, "validation": "x.jsonl"})


def test_val_and_test_parts_logged_and_training_unchanged(make_config, tmp_path: Path) -> None:
    plain: TrainConfig = make_config()
    split: TrainConfig = make_config(eval={"validation_fraction": 0.5})
    train(plain, tmp_path / "plain")
    train(split, tmp_path / "split")
    # Evaluation only: the training steps are bit-identical.
    assert (without_time(read_jsonl(tmp_path / "split" / "metrics.jsonl"))
            == without_time(read_jsonl(tmp_path / "plain" / "metrics.jsonl")))
    n_val = len(load_file(str(tmp_path / "split" / "reference" / "val.safetensors"))["chosen"])
    n_test = len(load_file(str(tmp_path / "split" / "reference" / "heldout.safetensors"))
                 ["chosen"])
    n_all = len(load_file(str(tmp_path / "plain" / "reference" / "heldout.safetensors"))
                ["chosen"])
    assert n_val + n_test == n_all and abs(n_val - n_test) <= 1
    for whole, part in zip(read_jsonl(tmp_path / "plain" / "eval.jsonl"),
                           read_jsonl(tmp_path / "split" / "eval.jsonl"), strict=True):
        assert {"val_reward_accuracy", "heldout_reward_accuracy"} <= part.keys()
        # The whole set's mean margin is the size-weighted mean of its parts'. The parts
        # are scored in other batch layouts, so sums differ by rounding (~1e-7 relative).
        combined = (n_val * part["val_reward_margin"]
                    + n_test * part["heldout_reward_margin"]) / n_all
        assert combined == pytest.approx(whole["heldout_reward_margin"], rel=1e-4, abs=1e-7)
