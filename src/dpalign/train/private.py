"""DP-DPO in your own training loop: ``make_private`` gives a step that turns a batch of
preference pairs into one private update.

    private = make_private(model, optimizer, processor=processor, n_pairs=len(records),
                           batch_size=8, steps=100,
                           privacy={"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    for batch in private.batches(records):        # Poisson-sampled, as the accountant assumes
        metrics = private.step(batch)             # per-pair grads, clip, noise, optimizer.step()
    print(private.epsilon())

It is the trainer's DP step (``dpalign.train.dp_step``) without the trainer: the pair (or
the user, ``privacy.unit: user``) is the privacy unit, each unit's gradient of its own total
loss comes from the per-pair engine (``privacy.engine``), is clipped by the configured rule
(fixed, adaptive, automatic), summed, given N(0, (sigma C)^2) noise once from the generator
of (``privacy.noise_seed``, step), divided by the expected batch and written to ``.grad`` of
the trainable parameters; then ``optimizer.step()`` runs and the step joins the ledger. Fed
the trainer's batches (``batches`` samples them exactly as ``dpalign train`` does, from
``seed``), the updates equal the trainer's (``tests/train/test_private_step.py``).

The accounting assumes what the trainer does: each step's batch is a Poisson sample of the
``n_pairs`` units at rate batch_size / n_pairs (or a fixed-size shuffle with
``privacy.sampling: shuffle``). ``batches`` draws exactly that; a batch chosen any other way
(a shuffled DataLoader of fixed-size batches under Poisson accounting) makes the reported
epsilon a claim about a different mechanism. Reference log-probs are those of the model
with its LoRA adapters disabled (the trainer's reference), computed per batch unless given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from torch import nn

from dpalign.data.schema import PreferenceRecord
from dpalign.losses import get_loss
from dpalign.losses.base import PairLogps
from dpalign.losses.config import LossConfig
from dpalign.losses.objective import Objective
from dpalign.models.pairs import EncodedPair, encode_pairs
from dpalign.privacy.accounting import Ledger
from dpalign.privacy.clipping import CLIPPING, next_clip_norm
from dpalign.privacy.config import PrivacyConfig
from dpalign.privacy.dp_sgd import step_diagnostics, sum_into_units
from dpalign.privacy.per_pair import Engine, make_engine
from dpalign.privacy.plan import (
    PrivacyPlan,
    noisy_count_once,
    noisy_once,
    plan_privacy,
    privacy_units,
    spent_epsilon,
    user_units,
)
from dpalign.rl.reward import zero_reference
from dpalign.train.dp_step import chunked_grads, noise_variance
from dpalign.train.optim import set_noise_variance
from dpalign.train.reference import compute_reference

Pairs = Sequence[PreferenceRecord] | Sequence[EncodedPair]


class BudgetSpentError(RuntimeError):
    """Another step would take epsilon past ``privacy.target_epsilon``."""


@dataclass
class PrivateStep:
    """One private update per call (see the module doc). State: ``steps_taken``, the
    privacy ``ledger`` and adaptive clipping's current C (``clip_norm``); ``state_dict`` /
    ``load_state_dict`` carry them through your checkpoints."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    processor: Any
    privacy: PrivacyConfig
    objective: Objective
    plan: PrivacyPlan
    engine: Engine
    units: list[list[int]]
    seed: int = 0
    micro_batch_size: int | None = None
    steps_taken: int = 0
    ledger: Ledger = field(default_factory=Ledger)
    clip_norm: float | None = None

    @property
    def pad_id(self) -> int:
        return int(self.processor.tokenizer.pad_token_id)

    def sample(self, step: int) -> list[int]:
        """The unit indices of batch ``step`` (1-based), as ``dpalign train`` draws them."""
        return self.plan.sample(self.privacy, self.seed, step)

    def batches(self, records: Sequence[Any]) -> Iterator[list[Any]]:
        """For each remaining planned step, the items of ``records`` (records or encoded
        pairs, one per pair, in the order ``n_pairs`` counted) in that step's sampled units;
        stops at the planned steps or at the target epsilon's budget."""
        while self.steps_taken < self.plan.budget_steps:
            idx = [i for u in self.sample(self.steps_taken + 1) for i in self.units[u]]
            yield [records[i] for i in idx]

    def encode(self, batch: Pairs) -> list[EncodedPair]:
        """Records tokenised with the processor; encoded pairs as they are."""
        if batch and isinstance(batch[0], PreferenceRecord):
            return encode_pairs(batch, self.processor)  # type: ignore[arg-type]
        return list(batch)  # type: ignore[arg-type]

    def reference(self, pairs: Sequence[EncodedPair]) -> PairLogps:
        """Reference log-probs of ``pairs``: the model with its LoRA adapters disabled
        (zeros for a reference-free loss). A fully fine-tuned model has no reference inside
        it: pass ``ref=`` to ``step``."""
        if self.objective.spec.reference_free:
            return zero_reference(len(pairs))
        if not isinstance(self.model, peft.PeftModel):
            raise ValueError("reference log-probs come from the model with its LoRA adapters "
                             "disabled; this model has no adapters: pass ref= to step() "
                             "(e.g. dpalign.train.reference.compute_reference on the base "
                             "model before fine-tuning)")
        with self.model.disable_adapter():
            return compute_reference(self.model, pairs, self.pad_id,
                                     with_corrupt=self.objective.spec.needs_corrupt)

    def step(self, batch: Pairs, ref: PairLogps | None = None,
             units: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """One private update from ``batch`` (the sampled pairs, records or encoded; ``ref``
        their reference log-probs, (B,) each, computed when None): sets ``.grad``, runs
        ``optimizer.step()`` and ``zero_grad``, records the step in the ledger. Returns the
        step's metrics (loss and reward metrics over its pairs, DP diagnostics, epsilon).
        ``units``: positions in ``batch`` of each privacy unit; default one pair each, or
        with ``privacy.unit: user`` the records of one ``user_id`` together."""
        if self.steps_taken >= self.plan.budget_steps and self.privacy.target_epsilon:
            raise BudgetSpentError(
                f"privacy.target_epsilon={self.privacy.target_epsilon:g} allows "
                f"{self.plan.budget_steps} steps; all are taken")
        step = self.steps_taken + 1
        pairs = self.encode(batch)
        units = [list(u) for u in units] if units is not None else self._units_of(batch)
        clip_norm = self.privacy.max_grad_norm if self.clip_norm is None else self.clip_norm
        metrics: dict[str, Any] = {"loss": None}
        if pairs:
            ref = self.reference(pairs) if ref is None else ref
            device = next(self.model.parameters()).device
            grads, out = chunked_grads(self.engine, pairs, list(range(len(pairs))),
                                       ref.to(device), self.objective, self.pad_id,
                                       self.micro_batch_size)
            if len(units) != len(pairs):
                grads = sum_into_units(grads, [u for u, unit in enumerate(units) for _ in unit],
                                       len(units))
            metrics = {"loss": float(out.per_example.mean()),
                       **{k: float(v.float().mean()) for k, v in out.metrics.items()}}
        else:
            grads = {k: torch.zeros(0, *p.shape, device=p.device, dtype=p.dtype)
                     for k, p in self.engine.params.items()}
        rule = CLIPPING[self.privacy.clipping]
        clipped, norms = rule.clip(grads, clip_norm, self.privacy.auto_gamma)
        noisy = noisy_once(clipped, self.plan, self.privacy, step, clip_norm)
        for name, param in self.engine.params.items():
            param.grad = noisy[name].to(param.dtype)
        sigma = self.plan.gradient_sigma
        variance = noise_variance(sigma, clip_norm, self.plan.expected_batch)
        set_noise_variance(self.optimizer, variance)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if rule.adapts:
            unclipped = noisy_count_once(norms, clip_norm, self.plan, self.privacy, step)
            self.clip_norm = next_clip_norm(clip_norm, unclipped, self.privacy.target_quantile,
                                            self.privacy.clip_lr)
            metrics["dp_unclipped_estimate"] = unclipped
        self.ledger = self.ledger.append(self.plan.entry(self.privacy))
        self.steps_taken = step
        diag = step_diagnostics(clipped, norms, sigma, clip_norm, self.plan.expected_batch)
        return {"step": step, **metrics, "pairs": len(pairs),
                **{f"dp_{k}": (None if isinstance(v, float) and math.isnan(v) else v)
                   for k, v in diag.as_dict().items()},
                "dp_clip_norm": clip_norm, "dp_noise_variance": variance,
                "epsilon": self.epsilon() if self._accounted(step) else None}

    def _accounted(self, step: int) -> bool:
        """Whether a step's row carries epsilon: every ``privacy.account_every`` steps and
        at the last planned one, as the trainer logs it (a PLD accounting of a Poisson
        ledger takes ~0.5 s; ``epsilon()`` is always there to ask)."""
        return step % self.privacy.account_every == 0 or step == self.plan.budget_steps

    def _units_of(self, batch: Pairs) -> list[list[int]]:
        """The batch's privacy units as positions in it: one pair each, or with
        ``privacy.unit: user`` the records of one ``user_id`` together."""
        if self.privacy.unit == "example":
            return [[i] for i in range(len(batch))]
        if batch and not isinstance(batch[0], PreferenceRecord):
            raise ValueError("privacy.unit=user: pass the batch as records (their user_id "
                             "groups them) or give units=")
        return privacy_units(batch, [r.user_id for r in batch], "user")  # type: ignore[arg-type, union-attr]

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default ``privacy.delta``), by the configured
        accountant over the ledger (0 before the first step)."""
        if not self.ledger.entries:
            return 0.0
        cfg = self.privacy if delta is None else self.privacy.model_copy(update={"delta": delta})
        return spent_epsilon(self.ledger, cfg)

    def state_dict(self) -> dict[str, Any]:
        """What to save with your checkpoint to resume the privacy state exactly."""
        return {"steps_taken": self.steps_taken, "ledger": self.ledger.to_json(),
                "clip_norm": self.clip_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_taken = int(state["steps_taken"])
        self.ledger = Ledger.from_json(state["ledger"])
        self.clip_norm = state["clip_norm"]


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, *, processor: Any,
                 n_pairs: int, batch_size: int, steps: int,
                 privacy: PrivacyConfig | Mapping[str, Any],
                 loss: LossConfig | Mapping[str, Any] | str = "dpo",
                 users: Sequence[str] | None = None, seed: int = 0,
                 micro_batch_size: int | None = None) -> PrivateStep:
    """A ``PrivateStep`` for ``model`` (its parameters that require grad are trained, e.g.
    after ``dpalign.models.lora.prepare_trainable``) and ``optimizer`` over them.

    n_pairs: the training pairs' count (the privacy units: pairs, or distinct users of
    ``users``, one user id per pair, with ``privacy.unit: user``); batch_size: the expected
    batch (sample rate batch_size / units); steps: the planned steps (sigma is calibrated
    for them when ``privacy.target_epsilon`` is given); privacy: the ``privacy`` section of
    a training config (``enabled`` is implied); loss: a registered loss name or a ``loss``
    section; seed: the batch sampler's seed (``train.seed`` of a ``dpalign train`` run)."""
    raw = privacy.model_dump() if isinstance(privacy, PrivacyConfig) else dict(privacy)
    cfg = PrivacyConfig.model_validate({**raw, "enabled": True})
    loss_cfg = (LossConfig(name=loss) if isinstance(loss, str)
                else loss if isinstance(loss, LossConfig) else LossConfig.model_validate(loss))
    get_loss(loss_cfg.name)
    if cfg.unit == "user" and (users is None or len(users) != n_pairs):
        raise ValueError("privacy.unit=user needs users=: one user id per training pair")
    units = ([[i] for i in range(n_pairs)] if cfg.unit == "example"
             else user_units(users))  # type: ignore[arg-type]
    plan = plan_privacy(cfg, len(units), batch_size, steps)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no parameter that requires grad: add LoRA adapters "
                         "(dpalign.models.lora.prepare_trainable) or unfreeze some")
    return PrivateStep(model, optimizer, processor, cfg, Objective.from_config(loss_cfg),
                       plan, make_engine(cfg.engine, model, params), units, seed,
                       micro_batch_size)

