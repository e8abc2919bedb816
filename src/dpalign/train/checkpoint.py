"""Checkpoints: trainable weights (safetensors), optimizer, schedule, RNG and loop state.

Each checkpoint is a folder ``checkpoints/step_NNNNNN`` assembled under a temporary name and
renamed into place, so a crash mid-write leaves the previous checkpoint intact. The loop
state (``LoopState``: the loss's state, e.g. DAMA's running mean, and the privacy ledger)
is saved with the step as the JSON object ``state.json`` (an audit's running canary scores,
a tensor, as ``audit.safetensors``): everything needed for a resumed run to continue exactly
where the interrupted one stopped.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpalign.io import atomic_directory, atomic_write_json
from dpalign.rundir import CHECKPOINT_PREFIX, checkpoint_name
from dpalign.train.state import LoopState

AUDIT_FILE = "audit.safetensors"  # ``LoopState.audit`` of an audit run


@dataclass(frozen=True)
class Checkpoint:
    step: int
    state: LoopState
    path: Path


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> detached copy of every parameter that requires grad."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, schedule: Any, state: LoopState,
                    keep: int) -> Path:
    """Write ``folder/step_NNNNNN`` atomically and keep only the newest ``keep``."""
    target = folder / checkpoint_name(step)
    with atomic_directory(target) as staging:
        save_file(trainable_state(model), str(staging / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "torch_rng": torch.get_rng_state()}, staging / "optimizer.pt")
        if state.audit is not None:
            save_file({"audit": state.audit.contiguous()}, str(staging / AUDIT_FILE))
        atomic_write_json(staging / "state.json", {"step": step, **state.to_dict()})
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old)
    return target


def latest_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``folder``, or None."""
    done = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file())
    if not done:
        return None
    state = json.loads((done[-1] / "state.json").read_text())
    audit = done[-1] / AUDIT_FILE
    scores = load_file(str(audit))["audit"] if audit.is_file() else None
    return Checkpoint(int(state.pop("step")), LoopState.from_dict(state, scores), done[-1])


def restore(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            schedule: Any) -> None:
    """Load weights, optimizer, schedule and the global torch RNG from ``checkpoint``."""
    weights = load_file(str(checkpoint.path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise ValueError(f"{checkpoint.path}: trainable parameters differ from the model's "
                         f"(e.g. {sorted(missing)[:3]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    extra = torch.load(checkpoint.path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    schedule.load_state_dict(extra["schedule"])
    torch.set_rng_state(extra["torch_rng"])
