"""``run_audit`` end to end on the tiny model: the bound against the claim for the correct
DP step and for each broken one, canary scores against a direct recomputation, the trained
model untouched by gradient canaries, resume, and the CLI.

The broken-mechanism setting is where a one-run audit can see a factor of two: the sample
rate q = 1 (batch = all 8 pairs, every included canary in every step), 4 steps at sigma 4,
so each canary's summed score is Gaussian with mean shift sqrt(4) / 4 = 0.5 standard
deviations (0.5-GDP: claimed epsilon 1.993 at delta 1e-5). Halved noise and rows clipped
apart both double the shift; skipped clipping multiplies it by the canary norm (10 C).
With m = 10^4 canaries the correct step's bound is 0.89 and the broken ones' 2.22 (both
factor-two faults) and 5.9: above the claim by 0.23 and 3.9. A factor two is about the
smallest fault this audit resolves (simulated with Gaussian scores: the bound at shift
2 mu is within ~10 % of the claim at mu for any mu; see the module doc of
``dpalign.audit.bound`` for the candidates)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import CrashError, MakeConfig, crash_at, without_time
from dpalign.audit.bound import membership_inference, one_run_bound
from dpalign.audit.canaries import canary_batch, inclusion
from dpalign.audit.config import AuditConfig
from dpalign.audit.faults import FAULTS
from dpalign.audit.run import run_audit
from dpalign.cli import app
from dpalign.rundir import RunDir
from dpalign.train.config import TrainConfig
from dpalign.train.loop import train


def _cfg(make_config: MakeConfig, **sections: Any) -> TrainConfig:
    """The fixture's config without held-out evaluation (the audit does not need it)."""
    return make_config(**{"eval": {"every": None}, **sections,
                          "data": {"heldout": None, **sections.get("data", {})}})


def _q1(make_config: MakeConfig, **privacy: Any) -> TrainConfig:
    return _cfg(make_config, train={"steps": 4, "batch_size": 8}, data={"k": 8},
                privacy={"enabled": True, "max_grad_norm": 1.0, **privacy})


GRADIENT = AuditConfig(kind="gradient", canaries=10_000)


@pytest.fixture(scope="module")
def correct_audit(make_config: MakeConfig, tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("audit") / "ok"
    return run_audit(_q1(make_config, noise_multiplier=4.0), out, GRADIENT)


def test_correct_step_stays_below_its_claim(correct_audit: dict[str, Any]) -> None:
    report = correct_audit
    assert report["claimed_epsilon"] == pytest.approx(1.993, abs=2e-3)  # 0.5-GDP, PLD
    assert 0 < report["epsilon_lower_bound"] < report["claimed_epsilon"]
    assert report["consistent"] and report["fault"] is None
    assert report["sample_rate"] == 1.0 and report["steps"] == 4


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_broken_step_is_caught(fault: str, make_config: MakeConfig, tmp_path: Path,
                                    correct_audit: dict[str, Any]) -> None:
    report = run_audit(_q1(make_config, noise_multiplier=4.0), tmp_path / fault, GRADIENT,
                       fault=fault)
    assert report["claimed_epsilon"] == correct_audit["claimed_epsilon"]
    assert report["epsilon_lower_bound"] > report["claimed_epsilon"] + 0.1
    assert not report["consistent"] and report["fault"] == fault


def test_epsilon_one_run_gives_a_bound_at_most_one(make_config: MakeConfig,
                                                   tmp_path: Path) -> None:
    cfg = _cfg(make_config, privacy={"enabled": True, "target_epsilon": 1.0,
                                     "max_grad_norm": 1.0})
    report = run_audit(cfg, tmp_path / "eps1", GRADIENT)
    assert report["claimed_epsilon"] <= 1.0
    assert report["epsilon_lower_bound"] <= 1.0


def test_non_private_run_scores_are_the_counts_of_its_batches(make_config: MakeConfig,
                                                              tmp_path: Path) -> None:
    """sigma 0, C inf: a canary's score is exactly norm x (steps it was sampled) / B; the
    bound is clearly positive and the claim infinite (null)."""
    cfg = _cfg(make_config)  # 6 steps of 4 of 16 pairs: q = 1/4
    audit = AuditConfig(kind="gradient", canaries=2000, seed=3)
    out = tmp_path / "nodp"
    report = run_audit(cfg, out, audit)
    included = inclusion(2000, 3)
    counts = np.zeros(2000)
    for step in range(1, 7):
        counts[canary_batch(included, 0.25, 3, step)] += 1
    want = audit.canary_norm * counts / 4  # norm x 1 (C inf), over the expected batch
    table = pd.read_parquet(RunDir(out).audit_dir / "canaries.parquet")
    np.testing.assert_allclose(table["score"], want, rtol=1e-6, atol=1e-9)
    assert (table["included"].to_numpy() == included).all()
    assert report["claimed_epsilon"] is None and report["noise_multiplier"] == 0.0
    assert report["epsilon_lower_bound"] > 3.0
    assert report["audited"].startswith("a non-private config")


def test_audit_json_is_the_bound_of_its_canary_table(correct_audit: dict[str, Any],
                                                     make_config: MakeConfig,
                                                     tmp_path: Path) -> None:
    cfg = _q1(make_config, noise_multiplier=4.0)
    out = tmp_path / "again"
    report = run_audit(cfg, out, GRADIENT)
    table = pd.read_parquet(RunDir(out).audit_dir / "canaries.parquet")
    bound = one_run_bound(table["score"].to_numpy(), table["included"].to_numpy(), 1e-5)
    mia = membership_inference(table["score"].to_numpy(), table["included"].to_numpy())
    assert report["epsilon_lower_bound"] == bound.epsilon
    assert (report["k_plus"], report["k_minus"], report["correct"]) == (
        bound.k_plus, bound.k_minus, bound.correct)
    assert report["auc"] == mia.auc
    assert {k: v for k, v in report.items() if k != "wall_seconds"} == {
        k: v for k, v in correct_audit.items() if k != "wall_seconds"}  # deterministic
    assert json.loads(RunDir(out).audit.read_text()) == report
    assert (RunDir(out).audit_dir / "scores.png").read_bytes()[:4] == b"\x89PNG"


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(out).final / "model.safetensors"))


def test_gradient_canaries_leave_the_trained_model_as_without_them(
        make_config: MakeConfig, tmp_path: Path) -> None:
    """Same machine, same config: the audited run's metrics and final weights equal the
    plain run's bit for bit (its canaries live in their own coordinates and noise stream),
    and a plain run holds no trace of an audit."""
    cfg = _cfg(make_config, privacy={"enabled": True, "noise_multiplier": 1.0,
                                     "max_grad_norm": 1.0})
    run_audit(cfg, tmp_path / "audited", AuditConfig(canaries=500))
    plain = train(cfg, tmp_path / "plain")
    audited = RunDir(tmp_path / "audited").read_metrics()
    assert without_time([{k: v for k, v in r.items() if k != "audit_canaries"}
                         for r in audited]) == without_time(
        RunDir(tmp_path / "plain").read_metrics())
    assert all(r["audit_canaries"] >= 0 for r in audited)
    a, b = _weights(tmp_path / "audited"), _weights(tmp_path / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.steps == 6 and json.loads(RunDir(plain.out).result.read_text())["n_pairs"] == 16
    assert not RunDir(plain.out).audit_dir.exists() and not RunDir(plain.out).audit.exists()
    assert not list(RunDir(plain.out).checkpoints.glob("*/audit.safetensors"))


def test_killed_audit_resumes_to_the_same_result(make_config: MakeConfig,
                                                 tmp_path: Path) -> None:
    cfg = _cfg(make_config, privacy={"enabled": True, "noise_multiplier": 1.0,
                                     "max_grad_norm": 1.0})
    audit = AuditConfig(canaries=500)
    whole = run_audit(cfg, tmp_path / "whole", audit)

    out = tmp_path / "killed"
    with pytest.raises(CrashError):
        run_audit(cfg, out, audit, on_step=crash_at(5))
    assert not RunDir(out).audit.exists() and RunDir(out).config.is_file()  # kept to resume
    resumed = run_audit(cfg, out, audit, resume=True)
    drop = {"wall_seconds"}
    assert {k: v for k, v in resumed.items() if k not in drop} == {
        k: v for k, v in whole.items() if k not in drop}
    scores = [pd.read_parquet(RunDir(p).audit_dir / "canaries.parquet")["score"]
              for p in (tmp_path / "whole", out)]
    assert scores[0].equals(scores[1])  # bit for bit


def test_failed_fresh_audit_leaves_out_as_found(make_config: MakeConfig,
                                                tmp_path: Path) -> None:
    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 1.0},
                      data={"max_length": 8})  # every pair is too long: refused in prepare
    out = tmp_path / "new" / "audit"
    with pytest.raises(ValueError, match=r"too long|limit"):
        run_audit(cfg, out, AuditConfig(canaries=100))
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="poisson"):
        run_audit(make_config(privacy={"enabled": True, "noise_multiplier": 1.0,
                                       "sampling": "shuffle"}), out, AuditConfig())


def test_input_canaries_train_as_pairs_and_score_by_margin(make_config: MakeConfig,
                                                           tmp_path: Path) -> None:
    cfg = _cfg(make_config, train={"steps": 3},
               privacy={"enabled": True, "noise_multiplier": 0.5, "max_grad_norm": 1.0})
    out = tmp_path / "input"
    report = run_audit(cfg, out, AuditConfig(kind="input", canaries=24))
    run_dir = RunDir(out)
    table = pd.read_parquet(run_dir.audit_dir / "canaries.parquet")
    assert len(table) == 24 and report["kind"] == "input" and report["canary_norm"] is None
    rows = [json.loads(line) for line in (run_dir.audit_dir / "canaries.jsonl").open()]
    assert len({r["prompt"] for r in rows}) == 24 and all(r["id"].startswith("canary-")
                                                          for r in rows)
    assert all((run_dir.audit_dir / r["images"][0]).is_file() for r in rows)
    metrics = run_dir.read_metrics()
    # the sampled canaries were trained as pairs, beside (not instead of) the 16 pairs
    assert sum(r["audit_canaries"] for r in metrics) > 0
    assert json.loads(run_dir.result.read_text())["n_pairs"] == 16
    assert math.isfinite(report["auc"]) and report["epsilon_lower_bound"] >= 0
    assert table["score"].abs().max() > 0  # the margins moved


def test_cli_audit_writes_audit_json_and_refuses_bad_kind(make_config: MakeConfig,
                                                          tmp_path: Path) -> None:
    cfg = _q1(make_config, noise_multiplier=4.0)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "--config", str(path), "--out", str(tmp_path / "o"),
                              "--canaries", "300", "--json", "train.steps=2"])
    assert res.exit_code == 0, res.output
    last = json.loads(res.output.strip().splitlines()[-1])
    assert last == {"ok": True, **json.loads((tmp_path / "o" / "audit.json").read_text())}
    assert last["canaries"] == 300 and last["steps"] == 2
    assert "audited lower bound" in res.output
    bad = runner.invoke(app, ["audit", "--config", str(path), "--out", str(tmp_path / "b"),
                              "--kind", "bogus"])
    assert bad.exit_code == 1 and "--kind" in bad.output
    assert not (tmp_path / "b").exists()
