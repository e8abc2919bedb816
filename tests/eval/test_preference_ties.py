"""The untrained policy scored in another batch layout is a tie on every pair, not a coin.

On some CPUs (AVX-512 kernels) the same model's summed log-probs differ by a few float32
ulps between batch layouts; ``reward_accuracy = mean(chosen > rejected)`` then read 0.42-0.46
for a policy equal to its reference. Here the tiny model scores the held-out pairs in
batches of 32 (the reference) and of 1, 5 and 7 (the "policy").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpalign.data.records import read_preference_jsonl
from dpalign.eval.preference import preference_metrics
from dpalign.losses import TIE_RTOL
from dpalign.models.load import load_model
from dpalign.models.pairs import encode_pairs
from dpalign.train.reference import compute_reference
from dpalign.world.load import World


@pytest.mark.parametrize("batch_size", [1, 5, 7])
def test_policy_equal_to_reference_ties_in_any_layout(small_world: Path, tiny_model: Path,
                                                      batch_size: int) -> None:
    vlm = load_model(tiny_model)
    pairs = encode_pairs(read_preference_jsonl(World.load(small_world).heldout_file),
                         vlm.processor)
    pad = vlm.processor.tokenizer.pad_token_id
    ref = compute_reference(vlm.model, pairs, pad, with_corrupt=False, batch_size=32)
    policy = compute_reference(vlm.model, pairs, pad, with_corrupt=False,
                               batch_size=batch_size)
    # the layouts agree to float32 rounding: well inside the tie tolerance (40x margin)
    rel = ((policy.chosen - ref.chosen).abs() / ref.chosen.abs()).max()
    assert float(rel) <= TIE_RTOL / 40
    metrics = preference_metrics(policy, ref, beta=0.1)
    assert metrics["reward_accuracy"] == 0.0
    assert abs(metrics["reward_margin"]) <= 0.1 * TIE_RTOL * float(ref.chosen.abs().max()) * 4
    # the same call on the reference itself is exactly the tie value
    exact = preference_metrics(ref, ref, beta=0.1)
    assert (exact["reward_accuracy"], exact["reward_margin"]) == (0.0, 0.0)
    assert torch.equal(ref.chosen_tokens, policy.chosen_tokens)
