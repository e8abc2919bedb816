"""``benchmarks/vs_opake.py`` with Opake's side, where its venv exists (``make opake-venv``).

The smoke test (``test_benchmarks.py``) runs dpalign's side alone on every machine; here the
peer runs under ``.venv-opake/bin/python`` on the smallest settings, and both sides must do
the same work: the same reference log-probs, the same per-pair gradient norms and the same
first loss at the same weights. Opake's trainer is built with ``--opake-fast-digest`` (its
weight fingerprint read in one buffer per tensor instead of byte by byte), which must give
Opake's own digest. Skipped where the peer venv is not built (CI does not build it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
PEER = ROOT / ".venv-opake" / "bin" / "python"
needs_peer = pytest.mark.skipif(
    not PEER.is_file(), reason="Opake's peer venv .venv-opake is not built here "
    "(`make opake-venv`, ~100 s from the package indexes; CI does not build it)")


def _env() -> dict[str, str]:
    return {**os.environ, "DPALIGN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def test_missing_peer_says_how_to_build(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import vs_opake
    finally:
        sys.path.remove(str(BENCHMARKS))
    python, message = vs_opake.find_peer(tmp_path / ".venv-opake")
    assert python is None and message is not None and "make opake-venv" in message
    assert vs_opake.find_peer(tmp_path, skip=True)[0] is None


DIGEST_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import opake_side, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from opake.api.transformers.trl import _dpo_trainer as module
torch.manual_seed(0)
model = get_peft_model(LlamaForCausalLM(LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)),
    LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
def digests():
    out = []
    for dtype in (torch.float16, torch.float32):  # .to() converts in place
        model.to(dtype)
        out += [module._tensor_state_digest(model, exclude_adapter=e) for e in (False, True)]
    return out
slow = digests()
opake_side.use_fast_digest()
fast = digests()
print(slow == fast, len(set(slow)))
"""


@needs_peer
def test_fast_digest_is_opakes() -> None:
    done = subprocess.run([str(PEER), "-c", DIGEST_CHECK, str(BENCHMARKS)], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["True", "4"]


@needs_peer
def test_both_sides_do_the_same_work(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCHMARKS / "vs_opake.py"), "--warmup", "1", "--repeats",
               "1", "--batch-size", "2", "--threads", "1", "--cache", str(tmp_path),
               "--opake-fast-digest", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=_env(),
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("speedup_vs_opake", "speedup_vs_opake_cpu", "dpalign_dp_over_plain",
                "opake_dp_over_plain", "plain_time_ratio", "opake_construct_s"):
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert report["grad_norm_max_rel_diff"] < 1e-4
    assert report["ref_logp_max_rel_diff"] < 1e-5
    ours, peer = report["dpalign"]["dp"], report["opake"]["dp"]
    assert ours["first_loss"] == pytest.approx(peer["first_loss"], rel=1e-5)
    assert len(ours["per_pair_grad_norms"]) == 2 and min(ours["per_pair_grad_norms"]) > 0
    assert peer["fast_digest"] is True
