"""The broken DP steps of ``dpalign.audit.faults`` audited on the tiny preset:
configs/world_dp.yaml at epsilon 2, gradient canaries (m = 10^4). Run from the repository
root after ``make demo`` (``make audit-table`` runs it)."""
import json
import os
from pathlib import Path

from dpalign.audit.config import AuditConfig
from dpalign.audit.faults import FAULTS
from dpalign.audit.run import run_audit
from dpalign.config import load_yaml_config
from dpalign.train.config import TrainConfig

out = Path(os.environ.get("AUDIT_OUT", "runs/audit-tiny"))
cfg = load_yaml_config(TrainConfig, Path("configs/world_dp.yaml"),
                       ["privacy.target_epsilon=2", "eval.world=false"])
rows = {}
for fault in sorted(FAULTS):
    target = out / f"fault-{fault}"
    if (target / "audit.json").is_file():
        rows[fault] = json.loads((target / "audit.json").read_text())
        continue
    rows[fault] = run_audit(cfg, target, AuditConfig(), fault=fault)
for fault, r in rows.items():
    print(fault, r["claimed_epsilon"], r["epsilon_lower_bound"], r["correct"], r["guesses"],
          r["auc"], r["wall_seconds"])
