"""The steps of an RL run (``method: rloo | grpo``): rollouts, per-prompt gradients, update.

Each step samples prompts (training records): Poisson over the privacy units under DP
(``DPStep``'s plan, ledger, clipping and noise, unchanged), a shuffled batch without. For
the sampled prompts ``Rollouts`` samples k answers each from the current policy and scores
them (``dpalign.rl.rollout``); the loss of a prompt is its RL loss over its k answers
(``dpalign.rl.advantages``), so under DP the engine takes one gradient per prompt over its k
rows together, clipped as one vector (a user's prompts summed when the unit is the user).
One optimizer step per sampled batch (one PPO epoch; see ``dpalign.rl.privacy``). The
privacy argument is in ``dpalign.rl.privacy``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpalign.data.sampling import batch_indices, steps_per_epoch
from dpalign.data.schema import PreferenceRecord
from dpalign.losses.base import LossOut
from dpalign.online.judge import Judge
from dpalign.privacy.dp_sgd import empty_units, sum_into_units
from dpalign.privacy.plan import rank_and_world
from dpalign.rl.reward import LoadedReward
from dpalign.rl.rollout import Rollout, RolloutSettings, make_rollout, rollout_loss
from dpalign.train.config import TrainConfig
from dpalign.train.dp_step import DPStep
from dpalign.train.state import LoopState
from dpalign.train.step import chunks

RL_METRICS = ("rl_reward", "rl_reward_std", "rl_judge", "rl_kl", "rl_entropy", "rl_length",
              "rl_advantage_std", "kl_proxy")


@dataclass(frozen=True)
class Rollouts:
    """A run's rollout maker: ``records`` the training records (prompt i = record i)."""

    cfg: TrainConfig
    model: torch.nn.Module
    processor: Any
    reward: LoadedReward
    judge: Judge
    records: Sequence[PreferenceRecord]
    pad_id: int

    def __call__(self, step: int, indices: list[int]) -> Rollout:
        online = self.cfg.online
        settings = RolloutSettings(online.samples, online.sampling, online.batch_size,
                                   self.cfg.train.seed)
        return make_rollout(self.model, self.processor, self.reward, self.judge,
                            [self.records[i] for i in indices], step, settings, self.pad_id)

    def loss(self) -> Any:
        rl = self.cfg.rl
        return rollout_loss(self.model, self.cfg.method, rl.kl_beta, rl.advantage_eps)


def rl_metrics(out: LossOut | None, n_prompts: int, seconds: float) -> dict[str, Any]:
    """The step's RL row: means over prompts (None without prompts), their count and the
    rollout's seconds (``online_seconds``: generation and scoring). ``loss`` is the RL
    objective's value (minus the mean KL-shaped reward, ``rl_objective``); the surrogate the
    gradient is taken of is ``rl_surrogate`` (its value is no measure of progress)."""
    row: dict[str, Any] = {
        "loss": None if out is None else float(out.metrics["rl_objective"].mean()),
        "rl_surrogate": None if out is None else float(out.per_example.mean())}
    for key in RL_METRICS:
        row[key] = None if out is None else float(out.metrics[key].mean())
    return row | {"rl_prompts": n_prompts, "online_seconds": seconds}


def _chunked(engine: Any, rollout: Rollout, loss: Any, size: int | None
             ) -> tuple[dict[str, torch.Tensor], LossOut]:
    """Per-prompt gradients ``{name: (U, *shape)}`` of a rollout, ``size`` prompts at a time
    (a prompt's gradient depends on its rows alone)."""
    parts = [engine.units(rollout.part(list(range(part.start, part.stop))), loss)
             for part in chunks(rollout.n_units, size)]
    grads = {name: torch.cat([g[name] for g, _ in parts]) for name in engine.params}
    return grads, LossOut.cat([out for _, out in parts])


@dataclass(frozen=True)
class RLDPStep(DPStep):
    """``DPStep`` whose units are prompts with their k answers (see the module doc)."""

    rollouts: Rollouts | None = None

    def _unit_grads(self, step: int, sampled: list[int],
                    canary_units: list[list[int]] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if canary_units:
            raise ValueError("audit canaries are not supported in RL runs")
        assert self.rollouts is not None
        rank, world = rank_and_world()
        mine = [self.units[u] for u in sampled[rank::world]]
        flat = [i for unit in mine for i in unit]
        if not flat:
            return empty_units(self.engine.params, len(mine)), rl_metrics(None, 0, 0.0)
        tick = time.perf_counter()
        rollout = self.rollouts(step, flat)
        seconds = time.perf_counter() - tick
        grads, out = _chunked(self.engine, rollout, self.rollouts.loss(),
                              self.cfg.train.micro_batch_size)
        if any(len(unit) != 1 for unit in mine):  # the unit is the user: sum their prompts
            grads = sum_into_units(grads, [u for u, unit in enumerate(mine) for _ in unit],
                                   len(mine))
        return grads, rl_metrics(out, len(flat), seconds)


@dataclass(frozen=True)
class RLPlainStep:
    """The non-DP RL step: the backward of the batch-mean loss over
    ``train.batch_size`` prompts (``micro_batch_size`` at a time), clipped to
    ``optim.max_grad_norm``."""

    cfg: TrainConfig
    rollouts: Rollouts
    params: list[torch.nn.Parameter]

    def __call__(self, step: int, state: LoopState) -> tuple[dict[str, Any], LoopState]:
        cfg, n = self.cfg, len(self.rollouts.records)
        drawn = batch_indices(n, cfg.train.batch_size, cfg.train.seed, step - 1)
        tick = time.perf_counter()
        rollout = self.rollouts(step, drawn)
        seconds = time.perf_counter() - tick
        loss = self.rollouts.loss()
        outs = []
        for part in chunks(rollout.n_units, cfg.train.micro_batch_size):
            out = loss(rollout.part(list(range(part.start, part.stop))))
            (out.per_example.sum() / len(drawn)).backward()
            outs.append(LossOut(out.per_example.detach(), out.metrics))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params,
                                                   cfg.optim.max_grad_norm or math.inf)
        epoch = (step - 1) // steps_per_epoch(n, cfg.train.batch_size)
        row = {"epoch": epoch, **rl_metrics(LossOut.cat(outs), len(drawn), seconds),
               "grad_norm": float(grad_norm)}
        return row, state
