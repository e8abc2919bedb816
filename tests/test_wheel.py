"""The wheel: ``python -m build`` from the tracked sources, installed with its dependencies
in a new, empty venv (not this checkout's), then used from outside the checkout.

It must carry the study presets and the CHAIR synonym list (byte for byte the repository's,
with the list's BSD-2 licence beside it and in the wheel's licence files), declare the extras
``ray``, ``track``, ``docs`` and ``dev``, and give a working ``dpalign`` command whose
``epsilon`` equals ``dp_accounting`` run directly in this process.

The install resolves the wheel's own declared ranges, constrained to ``requirements.lock``
(so it checks that the ranges admit the locked versions) with torch from this machine's CPU
wheel; uv takes the packages from the cache ``make setup`` filled, so this costs seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from conftest import pld_epsilon

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).with_name("uv")
WHEELS = Path("/opt/wheels")
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src")

pytestmark = pytest.mark.skipif(not UV.exists(), reason="uv is installed by `make setup`")


def _run(*cmd: str | Path, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the tracked sources (no stale build/ folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    _run(sys.executable, "-m", "build", "--wheel", "--installer", "uv",
         "--outdir", tmp / "dist", source, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("dpalign-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv(built: Path) -> Path:
    """A new venv with the wheel (and its ``track`` extra) installed; its bin/ folder."""
    target = built.parent.parent / "venv"
    _run(UV, "venv", "-q", "--python", sys.executable, target, cwd=target.parent)
    links = ["--find-links", str(WHEELS)] if WHEELS.is_dir() else []
    _run(UV, "pip", "install", "-q", "--python", target / "bin" / "python", *links,
         "-c", ROOT / "constraints.txt", "-c", ROOT / "requirements.lock",
         f"dpalign[track] @ {built.as_uri()}", cwd=target.parent)
    return target / "bin"


def test_wheel_contents(built: Path) -> None:
    with zipfile.ZipFile(built) as wheel:
        names = set(wheel.namelist())
        packaged = wheel.read("dpalign/eval/data/coco_synonyms.txt")
        licence = wheel.read("dpalign/eval/data/LICENSE-coco-synonyms.txt").decode()
        (meta_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(wheel.read(meta_name).decode())
    assert packaged == (ROOT / "src/dpalign/eval/data/coco_synonyms.txt").read_bytes()
    assert "BSD 2-Clause" in licence
    presets = sorted(p.name for p in (ROOT / "src/dpalign/study/presets").glob("*.yaml"))
    assert presets and all(f"dpalign/study/presets/{p}" in names for p in presets)
    licences = {n.split(".dist-info/licenses/", 1)[1] for n in names if "/licenses/" in n}
    assert licences == {"LICENSE", "src/dpalign/eval/data/LICENSE-coco-synonyms.txt"}
    assert {"ray", "track", "docs", "dev"} <= set(meta.get_all("Provides-Extra"))
    assert meta["License-Expression"] == "Apache-2.0"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_wheel_runs_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    assert _run(venv / "dpalign", "--version", cwd=tmp_path).strip() == "dpalign 0.1.0"
    assert "study" in _run(venv / "dpalign", "--help", cwd=tmp_path)
    line = _run(venv / "dpalign", "epsilon", "--sigma", "1.5", "--sample-rate", "0.04",
                "--steps", "2250", "--json", cwd=tmp_path).strip().splitlines()[-1]
    assert json.loads(line)["epsilon"] == pytest.approx(pld_epsilon(1.5, 0.04, 2250), rel=1e-9)
    probe = ("import json, dpalign, tensorboard, mlflow\n"
             "from dpalign.eval.published import default_synonyms_file\n"
             "from dpalign.study.config import PRESETS, preset_path\n"
             "print(json.dumps({'package': dpalign.__file__, 'synonyms': str("
             "default_synonyms_file()), 'presets': [str(preset_path(p)) for p in PRESETS]}))")
    found = json.loads(_run(venv / "python", "-c", probe, cwd=tmp_path))
    site = venv.parent / "lib"
    assert Path(found["package"]).is_relative_to(site)  # the wheel, not this checkout
    synonyms = Path(found["synonyms"])
    assert synonyms.is_relative_to(site)
    assert synonyms.read_bytes() == (ROOT / "src/dpalign/eval/data/coco_synonyms.txt").read_bytes()
    assert all(Path(p).is_file() and Path(p).is_relative_to(site) for p in found["presets"])
