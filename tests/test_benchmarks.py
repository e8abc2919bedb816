"""Every script in ``benchmarks/`` runs and reports well-formed figures (not a timing test).

Scripts are found by a glob (a ``.py`` file with an ``if __name__ == "__main__":`` entry),
so a new script is covered without editing this file. Each runs in a subprocess with the
smallest settings (1 warm-up step, 1 timed step, 2 pairs a batch, 1 thread, ``--json``)
on the benchmarks' own tiny world and model, built once here (``common.fixtures``). The
last line of its output must be a JSON object; every number whose key names a ratio must
be finite and > 0, and a script must report at least one ratio unless ``FIGURES`` lists
what it reports instead (``FIGURES`` also pins each known script's headline figures, so
dropping one fails here).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MAIN = re.compile(r"""^if __name__ == ["']__main__["']:""", re.MULTILINE)
SMALLEST = ["--warmup", "1", "--repeats", "1", "--batch-size", "2", "--threads", "1"]
# Dotted paths to the figures each known script prints (each finite and > 0).
FIGURES: dict[str, list[str]] = {
    "dp_overhead.py": [f"{mode}.{key}" for mode in ("lora", "full")
                       for key in ("time_ratio", "memory_ratio", "opacus_time_ratio",
                                   "opacus_memory_ratio")],
    "throughput.py": ["dp_tokens_per_s_ratio", "non_dp.tokens_per_s", "dp.tokens_per_s"],
    "vs_trl.py": ["ratio", "dpalign_median_s", "trl_median_s"],
    "trl_peer.py": ["full.median_s", "lora.median_s", "full.first_loss", "lora.first_loss"],
    # dpalign's side alone (--no-peer): Opake's needs its own venv, which CI does not build
    # (~100 s from the package indexes, then ~2 min to construct Opake's trainer);
    # tests/test_vs_opake.py runs both sides where .venv-opake exists.
    "vs_opake.py": ["dpalign_dp_over_plain", "dpalign_dp_over_plain_cpu",
                    "dpalign.dp.median_s", "dpalign.plain.median_s"],
}
# Extra arguments of a script's smoke run.
EXTRA_ARGS: dict[str, list[str]] = {"vs_opake.py": ["--no-peer"]}
# Scripts another benchmark runs under a peer's own interpreter (not this Python), by runner.
PEER_SCRIPTS: dict[str, str] = {"opake_side.py": "vs_opake.py"}


def scripts() -> list[Path]:
    return sorted(p for p in BENCHMARKS.glob("*.py")
                  if MAIN.search(p.read_text()) and p.name not in PEER_SCRIPTS)


def numbers(report: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of ``report``."""
    if isinstance(report, dict):
        for key, value in report.items():
            yield from numbers(value, f"{prefix}{key}.")
    elif not isinstance(report, list):
        yield prefix.rstrip("."), report


def lookup(report: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        report = report[key]
    return report


def positive(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmarks' world and tiny model, built once for all scripts."""
    root = tmp_path_factory.mktemp("bench")
    build = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
             "from common import fixtures; fixtures(Path(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", build, str(BENCHMARKS), str(root)], check=True,
                   env=_env(), capture_output=True, timeout=600)
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "DPALIGN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def test_scripts_are_found() -> None:
    found = {p.name for p in scripts()}
    assert set(FIGURES) <= found, f"scripts without a __main__ entry: {set(FIGURES) - found}"
    # The rest are libraries: each must be imported by some script, or it is a script that
    # lost its entry point (and would silently leave the smoke test).
    sources = "\n".join(p.read_text() for p in BENCHMARKS.glob("*.py"))
    for peer, runner in PEER_SCRIPTS.items():
        assert peer in (BENCHMARKS / runner).read_text(), f"{runner} no longer runs {peer}"
    for library in set(p.name for p in BENCHMARKS.glob("*.py")) - found - set(PEER_SCRIPTS):
        name = library.removesuffix(".py")
        assert re.search(rf"^\s*(from {name} import|import {name}\b)", sources, re.MULTILINE), \
            f"benchmarks/{library} has no __main__ entry and nothing imports it"


@pytest.mark.parametrize("script", scripts(), ids=lambda p: p.name)
def test_benchmark_runs(script: Path, cache: Path) -> None:
    command = [sys.executable, str(script), *SMALLEST, "--cache", str(cache), "--json",
               *EXTRA_ARGS.get(script.name, [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(),
                          cwd=BENCHMARKS.parent)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stderr[-4000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script.name} printed nothing"
    report = json.loads(lines[-1])
    assert isinstance(report, dict)
    ratios = {key: value for key, value in numbers(report)
              if "ratio" in key.rsplit(".", 1)[-1]}
    bad = {key: value for key, value in ratios.items() if not positive(value)}
    assert not bad, f"{script.name}: ratios not finite and > 0: {bad}"
    expected = FIGURES.get(script.name)
    if expected is None:
        assert ratios, f"{script.name} reports no ratio; list its figures in FIGURES"
        return
    figures = {path: lookup(report, path) for path in expected}
    bad = {path: value for path, value in figures.items() if not positive(value)}
    assert not bad, f"{script.name}: figures not finite and > 0: {bad}"
    if script.name == "vs_opake.py":
        assert report["opake"] == "not run" and report["opake_build"] == "make opake-venv"
    if script.name == "trl_peer.py":
        assert report["prompt_ids_match"] is True
        for mode in ("full", "lora"):  # policy == reference at step 1
            assert report[mode]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
