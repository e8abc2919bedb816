"""Reference log-probs, computed once per dataset and cached in the run directory.

The reference model is the policy before training, so its log-probs on the training and
held-out pairs (and on mDPO's corrupted images) never change during a run: computing them
once halves the forward work per step and frees the reference model's memory. The cache is
a safetensors file keyed by the pairs' ids and the model folder; a resumed run reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from dpalign.io import atomic_write_bytes, atomic_write_json
from dpalign.losses.base import PairLogps
from dpalign.losses.objective import pair_logps
from dpalign.models.pairs import EncodedPair, collate

FIELDS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "chosen_corrupt")


@torch.no_grad()
def compute_reference(model: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int, *,
                      with_corrupt: bool, batch_size: int = 32) -> PairLogps:
    """Log-probs of every pair under ``model`` (eval mode), each field (N,)."""
    was_training = model.training
    model.eval()
    parts = [pair_logps(model, collate(pairs[i:i + batch_size], pad_id,
                                       with_corrupt=with_corrupt))
             for i in range(0, len(pairs), batch_size)]
    model.train(was_training)
    corrupt = torch.cat([p.chosen_corrupt for p in parts]) if with_corrupt else None  # type: ignore[misc]
    return PairLogps(*(torch.cat([getattr(p, f) for p in parts]) for f in FIELDS[:4]),
                     chosen_corrupt=corrupt)


def _key(ids: Sequence[str], model_dir: Path, with_corrupt: bool,
         dtype: torch.dtype) -> dict[str, object]:
    return {"ids": list(ids), "model": str(model_dir.resolve()), "with_corrupt": with_corrupt,
            "dtype": str(dtype).removeprefix("torch.")}


def cached_reference(path: Path, model: torch.nn.Module, pairs: Sequence[EncodedPair],
                     pad_id: int, *, model_dir: Path, with_corrupt: bool,
                     batch_size: int = 32) -> PairLogps:
    """Read ``path`` (.safetensors beside a .json key) if it matches these pairs and this
    model, else compute the reference log-probs and write both files atomically."""
    key = _key([p.id for p in pairs], model_dir, with_corrupt, next(model.parameters()).dtype)
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        tensors = load_file(str(path))
        return PairLogps(**{f: tensors.get(f) for f in FIELDS})  # type: ignore[arg-type]
    ref = compute_reference(model, pairs, pad_id, with_corrupt=with_corrupt,
                            batch_size=batch_size)
    tensors = {f: getattr(ref, f).cpu().contiguous() for f in FIELDS if getattr(ref, f) is not None}
    atomic_write_bytes(path, save(tensors))
    atomic_write_json(meta, key)
    return ref
