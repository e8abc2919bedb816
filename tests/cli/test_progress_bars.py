"""One progress-bar system: a command that loads a model from a folder shows dpalign's rich
bars only, never the tqdm bars of transformers / huggingface_hub / datasets ("Loading
weights", "Map", ...); DPALIGN_NO_PROGRESS=1 silences the rich bars too. Run as a real
process (``dpalign eval``), as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TQDM = re.compile(r"/s\]|s/it\]|\d+%\||Loading weights|\r")  # it/s], examples/s]
RICH_BAR = re.compile(r"^POPE ━+ \d+/\d+ ", re.MULTILINE)  # dpalign.progress's POPE bar
QUIET_ENV = ("DPALIGN_NO_PROGRESS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS",
             "HF_DATASETS_DISABLE_PROGRESS_BARS")


def _environ(**env: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in QUIET_ENV} | {
        "OMP_NUM_THREADS": "1", **env}


def _eval(model: Path, world: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [f"{sys.prefix}/bin/dpalign", "eval", "--model", str(model), "--world", str(world),
         "--limit", "2", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=_environ(**env), timeout=300, check=False)


def test_loading_the_model_outside_the_cli_shows_tqdm(tiny_model: Path) -> None:
    """The control: the same model folder loaded by the library in a plain process does
    show transformers' "Loading weights" bar (so the test below can see one)."""
    code = ("from dpalign.models.load import load_model; "
            f"load_model({str(tiny_model)!r}, device='cpu')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_environ(), timeout=300, check=True)
    assert "Loading weights" in done.stderr and TQDM.search(done.stderr)


def test_eval_shows_no_tqdm_bars(tiny_model: Path, small_world: Path, tmp_path: Path) -> None:
    shown = _eval(tiny_model, small_world, tmp_path / "a.json")
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == ""
    assert not TQDM.search(shown.stdout), shown.stdout
    assert RICH_BAR.search(shown.stdout), shown.stdout  # dpalign's own bars remain

    quiet = _eval(tiny_model, small_world, tmp_path / "b.json", DPALIGN_NO_PROGRESS="1")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and not TQDM.search(quiet.stdout)
    assert not RICH_BAR.search(quiet.stdout) and "POPE on the world" in quiet.stdout


MAP = ("import datasets, huggingface_hub.utils as hub, transformers.utils.logging as tf; "
       "datasets.Dataset.from_list([{'a': i} for i in range(5)]).map(lambda r: r); "
       "print(datasets.is_progress_bar_enabled(), hub.are_progress_bars_disabled(), "
       "tf.is_progress_bar_enabled())")
QUIET = "from dpalign.progress import quiet_other_bars; quiet_other_bars(); "


@pytest.mark.parametrize(("code", "bars"), [
    (MAP, True),  # the control: datasets' "Map" bar, everything on
    (QUIET + MAP, False),  # quieted before the libraries are imported (the environment)
    ("import datasets, transformers; " + QUIET + MAP, False),  # after: their own switches
], ids=["control", "before-import", "after-import"])
def test_quiet_other_bars(code: str, bars: bool) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_environ(), timeout=300, check=True)
    assert bool(TQDM.search(done.stderr)) is bars and ("Map" in done.stderr) is bars
    assert done.stdout == ("True False True\n" if bars else "False True False\n")
