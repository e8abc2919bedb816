"""``dpalign settings COMMAND [--json]``: every dotted key a command's config model takes,
with its type, default and help, read from the model (new sections appear by themselves).
The keys, defaults and required flags are checked against the models walked here on their
own, and every key the shipped YAML files use must be listed."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python
from typer.testing import CliRunner

from dpalign.cli import app
from dpalign.pretrain import PRESETS
from dpalign.study.config import PRESETS as STUDY_PRESETS
from dpalign.study.config import StudyConfig, preset_path
from dpalign.train.config import TrainConfig
from dpalign.world.config import WorldConfig

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _models(annotation: Any) -> list[type[BaseModel]]:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def expected(model: type[BaseModel], default: BaseModel | None = None,
             prefix: str = "") -> dict[str, tuple[Any, bool, str]]:
    """``{dotted leaf key: (default, required, description)}``: a key's default is its
    value in the enclosing section's default (TrainConfig's ``train`` is
    ``LoopConfig(steps=50)``), else its model's own field default."""
    out: dict[str, tuple[Any, bool, str]] = {}
    for name, field in model.model_fields.items():
        if default is not None:
            value, required = getattr(default, name), False
        elif field.default is not PydanticUndefined:
            value, required = field.default, False
        elif field.default_factory is not None:
            value, required = field.default_factory(), False  # type: ignore[call-arg]
        else:
            value, required = None, True
        sections = _models(field.annotation)
        if not sections:
            out[prefix + name] = (value, required, field.description or "")
        for section in sections:
            inner = value if isinstance(value, section) else None
            for key, item in expected(section, inner, f"{prefix}{name}.").items():
                out.setdefault(key, item)
    return out


def listing(*args: str) -> dict[str, dict[str, Any]]:
    result = runner.invoke(app, ["settings", *args, "--json"])
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["ok"] is True and last["command"] == args[0]
    return {s["key"]: s for s in last["settings"]}


MODELS = {"train": TrainConfig, "reward": TrainConfig, "audit": TrainConfig,
          "world": WorldConfig, "study": StudyConfig}


@pytest.mark.parametrize("command", sorted(MODELS))
def test_listing_is_the_model(command: str) -> None:
    model = MODELS[command]
    found, wanted = listing(command), expected(model)
    assert list(found) == list(wanted)  # every leaf key, in declaration order
    for key, (default, required, description) in wanted.items():
        assert found[key]["required"] is required, key
        assert found[key]["help"] == description, key
        if not required:
            assert found[key]["default"] == to_jsonable_python(default), key


def test_defaults_follow_the_section_defaults() -> None:
    """train.steps is 50 (TrainConfig's LoopConfig(steps=50)), not LoopConfig's None; keys
    of a study's optional sections show the defaults they take once set."""
    train, study = listing("train"), listing("study")
    assert train["train.steps"]["default"] == TrainConfig.model_fields["train"].default.steps
    assert train["train.steps"]["default"] == 50 and train["train.epochs"]["default"] is None
    assert train["model"]["required"] and train["data.train"]["required"]
    assert train["train.steps"]["type"] == "int | None"
    assert train["train.dtype"]["type"] == "'auto' | 'float32' | 'bfloat16' | 'float16'"
    assert train["lora.target_modules"]["type"] == "list[str]"
    assert train["privacy.target_epsilon"]["help"].startswith("epsilon budget at delta")
    assert train["privacy.max_grad_norm"]["help"] == "per-unit clipping norm C"
    assert study["halving.seeds"]["default"] == 2 and study["audit.kind"]["default"] == "gradient"
    assert study["name"]["required"] and study["grid.epsilon"]["default"] == [float("inf")]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pretrain_listing_follows_the_preset(preset: str) -> None:
    found = listing("pretrain", "--preset", preset)
    wanted = expected(PRESETS[preset].config)
    assert list(found) == list(wanted)
    assert found["preset"]["default"] == wanted["preset"][0]


def _keys_in(data: dict[str, Any], sections: set[str], prefix: str = "") -> list[str]:
    """The dotted keys a YAML mapping sets, descending only into sections."""
    keys = []
    for name, value in data.items():
        key = prefix + name
        if key in sections and isinstance(value, dict):
            keys += _keys_in(value, sections, key + ".")
        else:
            keys.append(key)
    return keys


def _sections(listed: dict[str, Any]) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in listed if "." in key} | {
        ".".join(key.split(".")[:i]) for key in listed for i in range(1, key.count(".") + 1)}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_key_of_the_shipped_configs_is_listed(path: Path) -> None:
    listed = listing("train")
    keys = _keys_in(yaml.safe_load(path.read_text()), _sections(listed))
    assert keys and set(keys) <= set(listed), set(keys) - set(listed)


@pytest.mark.parametrize("name", STUDY_PRESETS)
def test_every_key_of_the_study_presets_is_listed(name: str) -> None:
    """The study's own keys are study settings; the keys in base, in the mechanisms'
    overrides and the grid's dotted axes are train settings."""
    study, train = listing("study"), listing("train")
    data = yaml.safe_load(preset_path(name).read_text())
    grid_axes = [k for k in data.get("grid", {}) if "." in k]
    data["grid"] = {k: v for k, v in data.get("grid", {}).items() if "." not in k}
    data["grid"].pop("sample_rate", None)
    assert set(_keys_in(data, _sections(study))) <= set(study)
    train_keys = _keys_in(data.get("base", {}), _sections(train)) + grid_axes + [
        key for per in data.get("overrides", {}).values() for key in per]
    assert set(train_keys) <= set(train), set(train_keys) - set(train)


def test_table_lists_every_key() -> None:
    result = runner.invoke(app, ["settings", "world"])
    assert result.exit_code == 0, result.output
    for key, (default, _, description) in expected(WorldConfig).items():
        row = next(line for line in result.stdout.splitlines() if f" {key} " in line)
        assert description.split()[0] in row
        if not isinstance(default, tuple):
            assert f" {default} " in row, (key, row)
    assert "hallucination_rate" in result.stdout and "[2, 8]" in result.stdout


def test_unknown_command_fails() -> None:
    result = runner.invoke(app, ["settings", "nope", "--json"])
    assert result.exit_code == 1
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last == {"ok": False, "error": "no settings for 'nope'; choose one of train, reward, "
                                          "audit, world, study, pretrain"}


@pytest.mark.parametrize("command", ["train", "study"])
def test_every_key_has_help(command: str) -> None:
    """Every key ``dpalign settings`` lists for a run or a study says what it does."""
    undocumented = [key for key, setting in listing(command).items()
                    if not setting["help"].strip()]
    assert not undocumented, f"keys without a description: {undocumented}"
