"""The documentation site: `mkdocs build --strict` passes, the API reference renders the
docstrings, a broken reference or link fails the build, and the guides' commands and config
paths are real."""

from __future__ import annotations

import ast
import html
import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

import dpalign.cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted(DOCS.glob("*.md"))
BUILD_TIMEOUT = 180

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="mkdocs and mkdocstrings[python] are not installed (the docs extra)")


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, cwd=config.parent)


def squeeze(text: str) -> str:
    return "".join(text.split())


def text_of(page: Path) -> str:
    """The visible text of an HTML page without whitespace (markup splits words apart)."""
    raw = re.sub(r"<(script|style)\b.*?</\1>", "", page.read_text(encoding="utf-8"), flags=re.S)
    return squeeze(html.unescape(re.sub(r"<[^>]+>", "", raw)))


def docstring(path: Path, name: str) -> str:
    """A top-level function's docstring as the page shows it (code spans unmarked)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    doc = inspect.cleandoc(ast.get_docstring(node) or "")
    return " ".join(doc.replace("``", "").split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = build(ROOT / "mkdocs.yml", out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_site_builds_strict_with_every_guide(site: Path) -> None:
    for guide in GUIDES:
        assert (site / guide.with_suffix(".html").name).is_file(), guide.name
    assert (site / "results" / "answer-tiny" / "index.html").is_file()
    assert not list(site.glob("results/**/*.parquet")), "data files are left out of the site"


@pytest.mark.parametrize(("source", "name"), [
    (ROOT / "src/dpalign/api.py", "train"),
    (ROOT / "src/dpalign/train/private.py", "make_private"),
])
def test_api_page_renders_docstrings(site: Path, source: Path, name: str) -> None:
    page = site / "reference" / "api.html"
    assert f'id="dpalign.api.{name}"' in page.read_text(encoding="utf-8")
    first_sentence = docstring(source, name).split(". ")[0]
    assert len(first_sentence) > 20
    assert squeeze(first_sentence) in text_of(page)


def small_site(tmp: Path, page: str) -> Path:
    """The real mkdocs.yml, with one page of its own."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    config["nav"] = [{"Home": "index.md"}]
    config.pop("exclude_docs", None)
    plugin = next(p for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)
    plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT / "src")]
    (tmp / "docs").mkdir()
    (tmp / "docs" / "index.md").write_text(page, encoding="utf-8")
    (tmp / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return tmp / "mkdocs.yml"


@pytest.mark.parametrize(("page", "named"), [
    ("# Broken\n\n::: dpalign.no_such_module\n", "dpalign.no_such_module"),
    ("# Broken\n\nSee [the missing guide](no-such-page.md).\n", "no-such-page.md"),
])
def test_strict_build_fails_on_a_broken_reference(tmp_path: Path, page: str,
                                                  named: str) -> None:
    done = build(small_site(tmp_path, page), tmp_path / "site")
    assert done.returncode != 0
    assert named in done.stdout + done.stderr


def code_blocks(text: str, langs: tuple[str, ...] = ("", "bash", "sh", "shell")) -> list[str]:
    """Fenced blocks in one of ``langs`` (default: shell commands, or no language)."""
    blocks = re.findall(r"^```([\w-]*)\n(.*?)^```", text, flags=re.S | re.M)
    return [body for lang, body in blocks if lang in langs]


def command_lines(block: str) -> list[list[str]]:
    """The argv after ``dpalign`` (or ``-m dpalign.cli``) of each command in a block."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise AssertionError(f"unparsable command line: {line!r}") from exc
        for i, word in enumerate(words):
            if Path(word).name == "dpalign" or (word == "dpalign.cli" and words[i - 1] == "-m"):
                found.append(words[i + 1:])
                break
    return found


def parse_command(root: Any, argv: list[str]) -> tuple[str, dict[str, Any]]:
    """The subcommand path and parsed parameters of ``dpalign ARGV``, parsed by the CLI's
    own click commands (typer vendors its own click; groups are told by ``commands``):
    an unknown subcommand or option, a missing required option or a bad value fails."""
    command, args, path = root, list(argv), []
    if args in (["--version"], ["--help"]):  # the root's own options
        return "", root.make_context("dpalign", args, resilient_parsing=True).params
    while hasattr(command, "commands"):
        assert args and not args[0].startswith("-"), f"dpalign {' '.join(argv)}: no subcommand"
        path.append(args.pop(0))
        assert path[-1] in command.commands, f"dpalign {' '.join(argv)}: no command {path[-1]!r}"
        command = command.commands[path[-1]]
    try:
        ctx = command.make_context(" ".join(path), args)
    except Exception as exc:  # click's UsageError / BadParameter, from typer's vendored click
        raise AssertionError(f"dpalign {' '.join(argv)}: {exc}") from exc
    return " ".join(path), ctx.params


def check_settings(name: str, params: dict[str, Any]) -> bool:
    """Validate the ``key=value`` overrides of a training or study command against the config
    it names (paths inside the config are not opened); False when there is nothing to check."""
    from dpalign.config import load_yaml_config
    from dpalign.study import load_study, preset_path
    from dpalign.train.config import TrainConfig

    if name in ("train", "audit", "reward train") and (ROOT / params["config"]).is_file():
        load_yaml_config(TrainConfig, ROOT / params["config"], params["overrides"])
    elif name == "study" and (params["preset"] or (ROOT / str(params["config"])).is_file()):
        source = preset_path(params["preset"]) if params["preset"] else ROOT / params["config"]
        load_study(source, params["overrides"])
    else:
        return False
    return True


def test_guide_commands_parse_and_their_settings_validate() -> None:
    root = typer.main.get_command(dpalign.cli.app)
    assert "train" in root.commands
    commands = settings = 0
    for guide in GUIDES:
        for block in code_blocks(guide.read_text(encoding="utf-8")):
            for argv in command_lines(block):
                name, params = parse_command(root, argv)
                commands += 1
                try:
                    settings += check_settings(name, params)
                except ValueError as exc:  # ConfigError, pydantic's ValidationError
                    raise AssertionError(f"{guide.name}: dpalign {' '.join(argv)}: {exc}") from exc
    assert commands >= 30 and settings >= 15


def test_guide_paths_exist() -> None:
    pattern = re.compile(r"(?<![\w/.])((?:configs|src/dpalign|tests|docs/results)/[\w./-]*\w/?)")
    mentioned = {match for guide in GUIDES
                 for match in pattern.findall(guide.read_text(encoding="utf-8"))}
    assert any(path.startswith("configs/") for path in mentioned)
    missing = sorted(path for path in mentioned if not (ROOT / path).exists())
    assert not missing, missing


def test_guide_python_compiles_and_study_yaml_validates(tmp_path: Path) -> None:
    from dpalign.study import load_study

    studies = 0
    for guide in GUIDES:
        text = guide.read_text(encoding="utf-8")
        for i, block in enumerate(code_blocks(text, ("python",))):
            compile(block, f"{guide.name}: python block {i}", "exec")
        for block in code_blocks(text, ("yaml",)):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and {"grid", "base"} <= data.keys():
                (tmp_path / "study.yaml").write_text(block, encoding="utf-8")
                load_study(tmp_path / "study.yaml")
                studies += 1
    assert studies >= 1
