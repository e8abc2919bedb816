"""Online and mixed DPO in the trainer: the pairs a step makes from the policy's answers, their
per-unit DP gradients against a one-unit-at-a-time autograd loop, the ledger, ties, resume,
and mixed DPO's two ends (all offline = the offline run, bit for bit)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import binom
from typer.testing import CliRunner

from conftest import CrashError, MakeConfig, crash_at, without_time
from dpalign.cli import app
from dpalign.data.records import read_preference_jsonl
from dpalign.data.schema import PreferenceRecord
from dpalign.io import read_jsonl
from dpalign.losses.objective import pair_logps
from dpalign.models.pairs import collate
from dpalign.online.source import OfflinePairs, online_indices
from dpalign.privacy.accounting import Ledger
from dpalign.privacy.plan import spent_epsilon
from dpalign.train.checkpoint import latest_checkpoint
from dpalign.train.config import TrainConfig
from dpalign.train.dp_step import DPStep
from dpalign.train.loop import prepare, train


def length_judge(record: PreferenceRecord, answers: Sequence[str]) -> list[float]:
    """A judge that prefers longer answers: rarely ties, so most prompts make a pair."""
    return [float(len(a)) for a in answers]


def constant_judge(record: PreferenceRecord, answers: Sequence[str]) -> list[float]:
    """A judge that never prefers: every prompt ties."""
    return [0.0 for _ in answers]


ONLINE = {"method": "online",
          "online": {"samples": 3, "judge": f"{__name__}:length_judge",
                     "sampling": {"max_new_tokens": 10}}}
DP = {"enabled": True, "noise_multiplier": 1.0, "account_every": 1}


def _online(make_config: MakeConfig, **sections: object) -> TrainConfig:
    return make_config(**{**ONLINE, **sections})


@pytest.mark.parametrize("unit", ["example", "user"])
def test_online_unit_gradients_equal_a_one_unit_loop(make_config: MakeConfig, tmp_path: Path,
                                                     unit: str) -> None:
    """The DP step's per-unit gradients of pairs made online (hooks engine, batched) equal,
    for each unit, autograd of that unit's pairs' summed loss on its own (float64, so the
    two orders of summation agree to 1e-9); a unit whose prompts all tie is a zero row."""
    cfg = _online(make_config, privacy={**DP, "unit": unit}, train={"steps": 2})
    run = prepare(cfg, tmp_path / "run")
    step = run.grad_step
    assert isinstance(step, DPStep)
    run.model.double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in step.engine.params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    sampled = step.plan.sample(cfg.privacy, cfg.train.seed, 1)
    got = step.pair_source(1, [step.units[u] for u in sampled])
    assert len(got.groups) == len(sampled) and got.metrics["online_pairs"] > 0
    assert got.metrics["online_pairs"] + got.metrics["online_ties"] == sum(
        len(step.units[u]) for u in sampled)
    grads, metrics = step._unit_grads(1, sampled)
    assert metrics["online_pairs"] == got.metrics["online_pairs"]  # regenerated identically

    params = list(step.engine.params.values())
    for u, unit_pairs in enumerate(got.groups):
        if not unit_pairs:
            expected = [torch.zeros_like(p) for p in params]
        else:
            loss = sum(step.objective(pair_logps(run.model, collate([got.pairs[i]], run.pad_id,
                                                                    with_corrupt=False)),
                                      got.ref.index(slice(i, i + 1))).per_example.sum()
                       for i in unit_pairs)
            expected = torch.autograd.grad(loss, params, allow_unused=True)
        for (name, _), e in zip(step.engine.params.items(), expected, strict=True):
            e = torch.zeros_like(grads[name][u]) if e is None else e
            torch.testing.assert_close(grads[name][u], e, atol=1e-9, rtol=0, msg=name)
    assert max(float(g.abs().max()) for g in grads.values()) > 0


def test_online_pairs_are_best_and_worst_answers(make_config: MakeConfig,
                                                 tmp_path: Path) -> None:
    """Each pair made online has the longest sampled answer as chosen and the shortest as
    rejected (the length judge), and its reference log-probs are the base model's: the
    policy with adapters off, which at step 0 is the policy itself."""
    cfg = _online(make_config, train={"steps": 1})
    run = prepare(cfg, tmp_path / "run")
    source = run.grad_step.source  # type: ignore[attr-defined]
    got = source(1, [[i] for i in range(4)])
    made = [p for unit in got.groups for p in unit]
    assert made, "the length judge should make pairs"
    tok = run.processor.tokenizer
    for i in made:
        pair = got.pairs[i]
        assert len(tok.decode(pair.chosen, skip_special_tokens=True)) >= len(
            tok.decode(pair.rejected, skip_special_tokens=True))
    with torch.no_grad():
        policy = pair_logps(run.model, collate([got.pairs[i] for i in made], run.pad_id,
                                               with_corrupt=False))
    torch.testing.assert_close(policy.chosen, got.ref.index(torch.tensor(made)).chosen,
                               atol=1e-4, rtol=1e-5)


def test_online_dp_run_resumes_exactly_and_keeps_the_ledger(make_config: MakeConfig,
                                                            tmp_path: Path) -> None:
    """Crash in step 3 of an online DP run, resume from the step-2 checkpoint: the
    regenerated answers (seeded per step), the metrics and the final weights equal the
    uninterrupted run's; the ledger is the offline plan's (q = 4/16, sigma 1, 4 steps)."""
    cfg = _online(make_config, privacy=DP, train={"steps": 4},
                  checkpoint={"every": 2, "keep": 2}, eval={"every": 4})
    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(CrashError):
        train(cfg, tmp_path / "crashed", on_step=crash_at(3))
    train(cfg, tmp_path / "crashed", resume=True)
    rows = read_jsonl(tmp_path / "crashed" / "metrics.jsonl")
    assert without_time(rows) == without_time(read_jsonl(whole.out / "metrics.jsonl"))
    assert sum(r["online_pairs"] for r in rows) > 0
    final = load_file(str(tmp_path / "crashed" / "final" / "model.safetensors"))
    for name, tensor in load_file(str(whole.out / "final" / "model.safetensors")).items():
        assert torch.equal(final[name], tensor), name
    offline = Ledger().record(1.0, 0.25, 4)  # what the offline run of this plan records
    ck = latest_checkpoint(whole.out / "checkpoints")
    assert ck is not None and ck.state.ledger == offline
    result = json.loads((whole.out / "result.json").read_text())
    assert result["privacy"]["epsilon"] == spent_epsilon(offline, cfg.privacy)


def test_all_ties_give_zero_units_and_noise_only(make_config: MakeConfig,
                                                 tmp_path: Path) -> None:
    """A judge that never prefers makes no pair: every sampled unit is a zero gradient (norm
    0, unclipped), the loss is None, and the step still spends its privacy."""
    cfg = _online(make_config, privacy=DP, train={"steps": 2}, eval={"every": None},
                  online={**ONLINE["online"], "judge": f"{__name__}:constant_judge"})
    result = train(cfg, tmp_path / "ties")
    rows = read_jsonl(tmp_path / "ties" / "metrics.jsonl")
    for r in rows:
        assert r["online_pairs"] == 0 and r["online_ties"] == r["online_prompts"] > 0
        assert r["loss"] is None and r["dp_norm_max"] == 0 and r["dp_clip_fraction"] == 0
    assert result.final_metrics["epsilon"] > 0


def test_mixed_with_every_pair_offline_is_the_offline_run(make_config: MakeConfig,
                                                          tmp_path: Path) -> None:
    """method mixed with online.offline_fraction 1 generates nothing and trains exactly the
    offline run (metrics and final weights bit for bit), DP and not."""
    for name, privacy in (("dp", DP), ("plain", {"enabled": False})):
        common = {"privacy": privacy, "train": {"steps": 2}, "eval": {"every": None}}
        offline = train(make_config(**common), tmp_path / f"{name}-offline")
        mixed = train(make_config(method="mixed", online={"offline_fraction": 1.0}, **common),
                      tmp_path / f"{name}-mixed")
        strip = [{k: v for k, v in r.items() if not k.startswith("online_")}
                 for r in read_jsonl(mixed.out / "metrics.jsonl")]
        assert without_time(strip) == without_time(read_jsonl(offline.out / "metrics.jsonl"))
        assert all(r["online_prompts"] == 0 for r in read_jsonl(mixed.out / "metrics.jsonl"))
        a = load_file(str(mixed.out / "final" / "model.safetensors"))
        for key, tensor in load_file(str(offline.out / "final" / "model.safetensors")).items():
            assert torch.equal(a[key], tensor), key


def test_mixed_coins_are_seeded_independent_and_at_the_configured_rate() -> None:
    """Each record index of a step goes online with probability 1 - offline_fraction, from a
    coin of its own: the same (seed, step, index) decides the same way whatever else is in
    the batch; over 4,000 coins the online count is inside the binomial's 1e-6 interval."""
    indices = list(range(4000))
    online = online_indices(indices, 4000, seed=0, step=3, offline_fraction=0.25)
    low, high = binom.interval(1 - 1e-6, 4000, 0.75)
    assert low <= len(online) <= high
    assert online_indices(indices[::7], 4000, 0, 3, 0.25) == [i for i in online if i % 7 == 0]
    assert online_indices(indices, 4000, 0, 4, 0.25) != online
    assert online_indices(indices, 10, 0, 3, 0.0) == list(range(10))  # canaries: offline
    assert online_indices(indices, 4000, 0, 3, 1.0) == []
    assert np.isclose(len(online_indices(indices, 4000, 1, 3, 0.5)) / 4000, 0.5, atol=0.04)


def test_online_run_from_the_cli_and_config_errors(make_config: MakeConfig,
                                                   tmp_path: Path) -> None:
    """``dpalign train ... method=online`` runs non-private online DPO with the world judge
    and logs the generation figures; settings online DPO cannot take fail before the
    first step with the reason."""
    cfg = make_config(train={"steps": 2}, eval={"every": None})
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--config", str(path), "--out", str(out),
                              "method=online", "online.samples=2",
                              "online.sampling.max_new_tokens=12"])
    assert res.exit_code == 0, res.output
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["online_prompts"] == 4 and r["online_share"] == 1.0 for r in rows)
    for bad, reason in ((["lora.enabled=false"], "needs lora.enabled"),
                        (["loss.name=dama"], "batch context"),
                        (["online.judge=nobody"], "unknown judge"),
                        (["online.samples=1"], "samples")):
        res = runner.invoke(app, ["train", "--config", str(path), "--out",
                                  str(tmp_path / "bad"), "method=online", *bad])
        assert res.exit_code != 0 and reason in res.output, (bad, res.output)
        assert not (tmp_path / "bad").exists()


def test_bdhs_method_trains_on_the_base_models_bdhs_rejections(make_config: MakeConfig,
                                                               tmp_path: Path) -> None:
    """``method: bdhs``: one BDHS result per training record, in order (bdhs.jsonl), the
    encoded pairs are (the record's chosen, its BDHS rejected answer), a BDHS answer equal
    to the chosen one is a unit without a pair, and a resumed run reads bdhs.jsonl back
    instead of generating again (an edited row is what it trains on)."""
    cfg = make_config(method="bdhs", train={"steps": 1}, eval={"every": None},
                      bdhs={"max_tries": 2, "sampling": {"max_new_tokens": 12}})
    out = tmp_path / "run"
    run = prepare(cfg, out)
    rows = read_jsonl(out / "bdhs.jsonl")
    records = read_preference_jsonl(cfg.data.train)
    ids = [p.id for p in run.pairs]
    assert [r["source_id"] for r in rows] == ids and len(ids) == cfg.data.k
    by_id = {r.id: r for r in records}
    tok = run.processor.tokenizer
    for pair, row in zip(run.pairs, rows, strict=True):
        assert 1 <= row["tries"] <= 2 and -1 <= row["similarity"] <= 1 + 1e-6
        assert tok.decode(pair.chosen, skip_special_tokens=True) == by_id[pair.id].chosen
        assert pair.rejected == [*tok(row["rejected"], add_special_tokens=False)["input_ids"],
                                 tok.eos_token_id]
    same = {i for i, row in enumerate(rows)
            if row["rejected"].strip() == by_id[row["source_id"]].chosen.strip()}
    source = run.grad_step.source  # type: ignore[attr-defined]
    got = (source or OfflinePairs(run.pairs, run.ref))(1, [[i] for i in range(len(rows))])
    assert [not g for g in got.groups] == [i in same for i in range(len(rows))]

    rows[0] = {**rows[0], "rejected": "A green zebra."}
    (out / "bdhs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = prepare(cfg, out)
    assert tok.decode(again.pairs[0].rejected, skip_special_tokens=True) == "A green zebra."
