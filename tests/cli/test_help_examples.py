"""Every command that takes ``key=value`` overrides shows an example in its help that its
own config takes: each example shown is parsed from the help and applied to that command's
config model, and every key it sets holds the value it gave."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from conftest import leaf_commands
from dpalign.cli import app
from dpalign.config import apply_overrides, load_yaml_config
from dpalign.pretrain import default_config
from dpalign.study.config import load_study, preset_path
from dpalign.train.config import TrainConfig
from dpalign.world.config import WorldConfig

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _override_help() -> dict[tuple[str, ...], str]:
    """The help of each command's ``key=value`` argument."""
    helps = {}
    for words, command in leaf_commands(typer.main.get_command(app)).items():
        for param in command.params:
            if param.name == "overrides":
                helps[words] = param.help
    return helps


def _value_at(cfg: BaseModel, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check(cfg: BaseModel, overrides: list[str]) -> None:
    for item in overrides:
        key, _, raw = item.partition("=")
        assert _value_at(cfg, key) == yaml.safe_load(raw), item


HELPS = _override_help()


def test_every_overrides_command_is_covered() -> None:
    assert set(HELPS) == {("world", "build"), ("pretrain",), ("train",), ("audit",),
                          ("reward", "train"), ("study",)}
    for words, text in HELPS.items():
        assert f"every key: dpalign settings {words[0]}" in text


def _example(words: tuple[str, ...]) -> list[str]:
    """The ``key=value`` items of the example in the help of ``words``."""
    match = re.search(r"e\.g\. (.+?); every key", HELPS[words])
    assert match, HELPS[words]
    return match.group(1).split()


@pytest.mark.parametrize(("words", "load"), [
    (("train",), lambda o: load_yaml_config(TrainConfig, CONFIGS / "world_dpo.yaml", o)),
    (("audit",), lambda o: load_yaml_config(TrainConfig, CONFIGS / "world_dp.yaml", o)),
    (("reward", "train"), lambda o: load_yaml_config(
        TrainConfig, CONFIGS / "world_reward.yaml", [*o, "reward.enabled=true"])),
    (("world", "build"), lambda o: apply_overrides(WorldConfig(), o)),
    (("study",), lambda o: load_study(preset_path("quickstart"), o)),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_example_applies_to_the_command_config(words: tuple[str, ...], load: Any) -> None:
    example = _example(words)
    assert example and all("=" in item for item in example)
    _check(load(example), example)


def test_train_example_is_the_documented_one() -> None:
    assert _example(("train",)) == ["train.steps=200", "privacy.target_epsilon=8"]


def test_pretrain_examples_apply_to_their_presets() -> None:
    """pretrain's settings depend on --preset: each example names its preset."""
    pairs = re.findall(r"(\S+=\S+) with --preset (\w+)", HELPS[("pretrain",)])
    assert [preset for _, preset in pairs] == ["tiny", "smol"]
    for item, preset in pairs:
        _check(apply_overrides(default_config(preset), [item]), [item])


@pytest.mark.parametrize("words", sorted(HELPS), ids=" ".join)
def test_help_shows_the_example(words: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.replace("│", " ").split())  # rich panels, wrapped lines
    assert HELPS[words].split("e.g. ")[1].split(";")[0] in shown
