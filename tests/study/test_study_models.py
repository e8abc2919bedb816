"""``dpalign study --model``: a folder is used as it is, a pretrain preset's name means that
preset pretrained on the study's world (world built when missing); and the packaged
study presets load and expand to the grids their comments promise."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dpalign.config import ConfigError
from dpalign.pretrain import PretrainResult, default_config
from dpalign.study import expand, load_study, preset_path, train_config
from dpalign.study import models as study_models
from dpalign.study.models import resolve_model, with_model
from dpalign.world.config import WorldConfig


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Calls to build_world and pretrain, which do nothing but record."""
    calls: list[tuple] = []

    def build_world(out: Path, cfg: WorldConfig) -> tuple[Path, bool]:
        calls.append(("world", out, cfg))
        return out, True

    def pretrain(world: Path, out: Path, cfg: object) -> PretrainResult:
        calls.append(("pretrain", world, out, cfg))
        return PretrainResult(out, True, 1.0, 0.5, 2.0)

    monkeypatch.setattr(study_models, "build_world", build_world)
    monkeypatch.setattr(study_models, "pretrain", pretrain)
    return calls


def test_a_model_folder_is_used_as_it_is(tmp_path: Path, recorded: list[tuple]) -> None:
    (tmp_path / "smol").mkdir()  # a folder named like a preset wins over the preset
    (tmp_path / "smol" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "smol", tmp_path / "world", tmp_path / "study") == (
        tmp_path / "smol")
    assert recorded == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"without config\.json"):
        resolve_model(tmp_path / "empty", tmp_path / "world", tmp_path / "study")


def test_a_preset_name_is_pretrained_on_the_study_world(tmp_path: Path,
                                                        recorded: list[tuple]) -> None:
    world, out = tmp_path / "world", tmp_path / "study"
    path = resolve_model("smol", world, out)
    assert path == out / "base-smol"
    assert recorded == [("world", world, WorldConfig(seed=0)),
                        ("pretrain", world, path, default_config("smol"))]
    recorded.clear()
    world.mkdir()
    (world / "world.json").write_text("{}")  # a world is there: not rebuilt
    assert resolve_model("tiny", world, out) == out / "base-tiny"
    assert recorded == [("pretrain", world, out / "base-tiny", default_config("tiny"))]


def test_an_unknown_name_lists_the_presets(tmp_path: Path, recorded: list[tuple]) -> None:
    with pytest.raises(ConfigError, match=r"neither a model folder nor a pretrain preset "
                                          r"\(smol, smollm2, tiny\)"):
        resolve_model("huge", tmp_path / "world", tmp_path / "study")
    assert recorded == []


def _pretrained(folder: Path, preset: str) -> Path:
    """A folder as ``dpalign pretrain --preset PRESET`` leaves it (the parts read here)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "pretrain.json").write_text(json.dumps({"config": {"preset": preset}}))
    return folder


def test_with_model_adds_the_presets_align_settings(tmp_path: Path, small_world: Path,
                                                    recorded: list[tuple]) -> None:
    """smol's ``Preset.align`` (micro-batches of 4 pairs) goes under the study's base, for the
    preset's name and for a folder pretrained from it; the rest of the study is unchanged
    and a setting the study makes itself wins. A tiny model gets nothing."""
    study = load_study(preset_path("quickstart"), [f"world={small_world}"])
    _pretrained(tmp_path / "base-smol", "smol")
    changed = with_model(study, "smol", tmp_path)
    assert changed.model == tmp_path / "base-smol"
    assert changed.base["train"] == {**study.base["train"], "micro_batch_size": 4}
    assert changed.model_dump(exclude={"model", "base"}) == study.model_dump(
        exclude={"model", "base"})
    assert {k: v for k, v in changed.base.items() if k != "train"} == {
        k: v for k, v in study.base.items() if k != "train"}
    assert train_config(changed, expand(changed)[0]).train.micro_batch_size == 4

    folder = _pretrained(tmp_path / "elsewhere", "smol")
    assert with_model(study, folder, tmp_path).base["train"]["micro_batch_size"] == 4
    own = load_study(preset_path("quickstart"),
                     [f"world={small_world}", "base.train.micro_batch_size=2"])
    assert with_model(own, folder, tmp_path).base["train"]["micro_batch_size"] == 2
    tiny = _pretrained(tmp_path / "tiny-base", "tiny")
    assert with_model(study, tiny, tmp_path).base == study.base


def test_packaged_presets_load_and_expand(small_world: Path) -> None:
    quick = load_study(preset_path("quickstart"), [f"world={small_world}"])
    assert len(expand(quick)) == 24
    full = load_study(preset_path("full"), [f"world={small_world}"])
    points = expand(full)
    # none: 4 K x 2 losses x 5 seeds; dp_sgd and label_dp: 5 finite eps x 4 K x 2 x 5 each
    assert len(points) == 440
    assert Counter(p.mechanism for p in points) == {"none": 40, "dp_sgd": 200, "label_dp": 200}
    assert {p.k for p in points} == {16, 32, 64, 128} and {p.seed for p in points} == set(
        range(5))
    configs = [train_config(full, p) for p in points]  # every run's config validates
    assert {c.loss.name for c in configs} == {"dpo", "ipo", "robust"}
