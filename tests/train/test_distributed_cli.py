"""``torchrun --nproc-per-node 2 ... dpalign train``: both ranks train (rank 1 into
OUT.rank1), but the run is reported once, by rank 0: one table, one ``run finished`` line
naming OUT, one ``--json`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def test_torchrun_prints_one_summary(make_config, tmp_path: Path) -> None:
    cfg = make_config(train={"steps": 2, "batch_size": 4}, eval={"every": 2},
                      checkpoint={"every": None},
                      privacy={"enabled": True, "noise_multiplier": 0.5, "max_grad_norm": 0.05})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DPALIGN_NO_PROGRESS": "1"}
    done = subprocess.run(
        [f"{sys.prefix}/bin/torchrun", "--standalone", "--nproc-per-node", "2", "-m",
         "dpalign.cli", "train", "--config", str(config), "--out", str(out), "--json"],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line for line in lines if "run finished" in line] == [
        line for line in lines if line.startswith(f"run finished: {out}  2 steps")]
    assert sum("run finished" in line for line in lines) == 1
    assert sum("Held-out evaluation" in line for line in lines) == 1
    assert "rank1" not in done.stdout
    last = json.loads(lines[-1])
    assert last == {"ok": True, **json.loads((out / "result.json").read_text())}
    assert sum(line.startswith("{") for line in lines) == 1
    assert (tmp_path / "run.rank1" / "result.json").is_file()  # rank 1 did run
