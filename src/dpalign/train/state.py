"""The loop's state between steps: a value that each step returns anew.

``LoopState`` holds what a resumed run needs besides the weights and the optimizer: the
loss's batch-context state (DAMA's running mean of the reward gap; None for other losses),
the privacy ledger, adaptive clipping's current norm C_t and, in an audit run
(``dpalign.audit``), the running sum of the released audit vector. Only the checkpoint
serialises it: ``to_dict``/``from_dict`` give the same JSON object as before it was typed
(``clip_norm`` is written only when set), so older checkpoints resume; ``audit`` is a tensor
and goes to a file of its own (``train.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dpalign.privacy.accounting import Ledger

LOSS_STATE_KEY = "dama_running_mean"  # the checkpoint's key of ``LoopState.loss_state``


@dataclass(frozen=True)
class LoopState:
    """loss_state: the loss's batch-context state (``LossSpec.batch_context``), a JSON
    value; ledger: the DP events so far (empty without DP); clip_norm: the clipping norm
    C_t of the next DP step under ``privacy.clipping=adaptive`` (None: not adaptive, or
    before its first step: ``privacy.max_grad_norm``); audit: (size,) float64, the sum over
    steps of the released audit vector of gradient canaries (None outside an audit)."""

    loss_state: float | None = None
    ledger: Ledger = field(default_factory=Ledger)
    clip_norm: float | None = None
    audit: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``state.json`` object (without its ``step``)."""
        raw = {LOSS_STATE_KEY: self.loss_state, "ledger": self.ledger.to_json()}
        return raw if self.clip_norm is None else {**raw, "clip_norm": self.clip_norm}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], audit: torch.Tensor | None = None) -> LoopState:
        """Inverse of ``to_dict`` (a checkpoint from before ``clip_norm`` has none); ``audit``
        as read from its own file."""
        return cls(raw[LOSS_STATE_KEY], Ledger.from_json(raw["ledger"]), raw.get("clip_norm"),
                   audit)


class GradStep(Protocol):
    """One step's gradients: sets ``.grad`` of the trainable parameters for batch ``step``
    (1-based) and returns the step's metrics row and the state after it."""

    def __call__(self, step: int, state: LoopState) -> tuple[dict[str, Any], LoopState]: ...
