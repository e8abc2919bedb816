"""Config errors name their cause: a ``key=value`` override as typed (``override steps=200:
...``) or the YAML file, and an unknown key comes with the nearest valid dotted key(s). Every
command that takes overrides reports them so, before it touches OUT."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from dpalign.cli import app
from dpalign.config import (
    ConfigError,
    apply_overrides,
    load_yaml_config,
    suggest_keys,
    valid_keys,
)
from dpalign.study.config import StudyConfig
from dpalign.train.config import TrainConfig
from dpalign.world.config import WorldConfig

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DPO = str(CONFIGS / "world_dpo.yaml")


def _error(result: Result) -> str:
    """The ``error:`` line of a failed command (stderr), without the prefix."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize(("command", "message"), [
    (["train", "--config", DPO, "--out", "{out}", "steps=200"],
     "override steps=200: unknown key; did you mean train.steps?"),
    (["train", "--config", DPO, "--out", "{out}", "train.steps=200", "optim.weight_decy=0.1"],
     "override optim.weight_decy=0.1: unknown key; did you mean optim.weight_decay?"),
    (["train", "--config", DPO, "--out", "{out}", "trian.steps=3"],
     "override trian.steps=3: trian: unknown key; did you mean train.steps?"),
    (["train", "--config", DPO, "--out", "{out}", "train.stepz=3"],
     "override train.stepz=3: unknown key; did you mean train.steps?"),
    (["train", "--config", DPO, "--out", "{out}", "privacy.delta=2"],
     "override privacy.delta=2: Input should be less than 1"),
    (["train", "--config", DPO, "--out", "{out}", "optim.lr=1", "train.epochs=3"],
     "override train.epochs=3: train: Value error, give exactly one of train.steps and "
     "train.epochs"),
    (["reward", "train", "--config", str(CONFIGS / "world_reward.yaml"), "--out", "{out}",
      "stepz=2"],
     "override stepz=2: unknown key; did you mean train.steps?"),
    (["audit", "--config", DPO, "--out", "{out}", "privacy.target_eps=8"],
     "override privacy.target_eps=8: unknown key; did you mean privacy.target_epsilon?"),
    (["world", "build", "--out", "{out}", "hallucinaton_rate=0.5"],
     "override hallucinaton_rate=0.5: unknown key; did you mean hallucination_rate?"),
    (["world", "build", "--out", "{out}", "hallucination_rate=2"],
     "override hallucination_rate=2: Input should be less than or equal to 1"),
    (["study", "--preset", "quickstart", "--out", "{out}", "workerz=4"],
     "override workerz=4: unknown key; did you mean workers?"),
    (["study", "--preset", "quickstart", "--out", "{out}", "halving.seedz=2"],
     "override halving.seedz=2: unknown key; did you mean halving.seeds?"),
    (["pretrain", "--world", "{out}", "--out", "{out}", "stepz=3"],
     "override stepz=3: unknown key; did you mean steps?"),
    (["pretrain", "--preset", "smol", "--world", "{out}", "--out", "{out}", "lm_step=3"],
     "override lm_step=3: unknown key; did you mean lm_steps?"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_command_names_the_override(command: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, [part.replace("{out}", str(out)) for part in command])
    assert _error(result) == message
    assert not out.exists()


def test_yaml_unknown_keys_name_the_file_with_suggestions(tmp_path: Path) -> None:
    """Problems of the file keep naming the file (an override beside them does not take
    the blame); each unknown key gets its nearest valid key."""
    data = yaml.safe_load(Path(DPO).read_text())
    data["stepz"] = 3
    data["optim"]["betas"] = [0.9, 0.99]
    data["eval"]["wrld"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["train", "--config", str(path), "--out", str(tmp_path / "r"),
                                 "train.steps=4"])
    assert _error(result) == (
        f"{path}: optim.betas: unknown key; did you mean loss.beta?; eval.wrld: unknown key; "
        "did you mean eval.world?; stepz: unknown key; did you mean train.steps?")
    assert not (tmp_path / "r").exists()


def test_file_and_override_problems_are_told_apart(tmp_path: Path) -> None:
    data = yaml.safe_load(Path(DPO).read_text())
    data["optim"]["betas"] = [0.9, 0.99]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_yaml_config(TrainConfig, path, ["lr=0.1", "privacy.delta=2"])
    assert str(info.value) == (
        f"{path}: optim.betas: unknown key; did you mean loss.beta?; override privacy.delta=2: "
        "Input should be less than 1; override lr=0.1: unknown key; did you mean optim.lr?")


def test_a_whole_config_check_blames_the_override_that_causes_it() -> None:
    """reward.enabled on a DPO config fails the model's own check (no field of its own):
    the override that causes it alone is named, not the harmless one beside it."""
    with pytest.raises(ConfigError) as info:
        load_yaml_config(TrainConfig, DPO, ["optim.lr=0.01", "reward.enabled=true"])
    assert str(info.value) == ("override reward.enabled=true: Value error, reward.enabled "
                               "trains with a reward-model loss (bradley_terry), not 'dpo'")


def test_apply_overrides_names_the_override() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(WorldConfig(), ["n_pool_pairs=8", "n_pool=3"])
    assert str(info.value) == "override n_pool=3: unknown key; did you mean n_pool_pairs?"
    assert apply_overrides(WorldConfig(), ["n_pool_pairs=8"]).n_pool_pairs == 8


@pytest.mark.parametrize(("model", "key", "expected"), [
    (TrainConfig, "steps", ["train.steps"]),  # a leaf of another section
    (TrainConfig, "seed", ["data.seed", "train.seed", "bdhs.seed"]),
    (TrainConfig, "max_grad_norm", ["optim.max_grad_norm", "privacy.max_grad_norm"]),
    (TrainConfig, "train.stepz", ["train.steps"]),  # spelled like a key of its section
    (TrainConfig, "stpes", ["train.steps"]),  # spelled like a leaf anywhere
    (TrainConfig, "online.sampling.temprature", ["online.sampling.temperature"]),
    (TrainConfig, "zzz", []),
    (StudyConfig, "audit.knd", ["audit.kind"]),  # inside an Optional section
    (StudyConfig, "halving.keeps", ["halving.keep"]),
    (WorldConfig, "pairs_per_users", ["pairs_per_user"]),
])
def test_suggest_keys(model: type, key: str, expected: list[str]) -> None:
    assert suggest_keys(model, key) == expected


def test_valid_keys_walk_nested_and_optional_sections() -> None:
    keys = valid_keys(StudyConfig)
    assert {"halving", "halving.seeds", "halving.keep", "audit", "audit.kind", "tune.metric",
            "grid.epsilon", "base", "workers"} <= set(keys)
    train = valid_keys(TrainConfig)
    assert {"online.sampling", "online.sampling.max_new_tokens", "privacy.target_epsilon",
            "train.steps", "model"} <= set(train)
    assert "train.steps.x" not in train and len(train) == len(set(train))
