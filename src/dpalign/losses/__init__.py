"""Preference losses: pure per-pair functions, chosen by name from ``LOSSES``.

Every loss is ``f(policy: PairLogps, ref: PairLogps, *, beta, **params) -> LossOut`` with an
unreduced (B,) loss and detached (B,) metrics (DESIGN §4). Losses work for B = 1 and under
``torch.func.vmap`` over single pairs, so the DP step can take per-pair gradients.

A ``LossSpec`` says what a loss needs besides the two ``PairLogps``: its keyword-parameter
model (validated with the config, before training starts) and which extra inputs the step
must supply. ``spec.call`` is the one uniform way to run any loss; ``Objective``
(``dpalign.losses.objective``) is the configured loss (``LossConfig``) applied to a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

from dpalign.losses.apo import ApoParams, apo_down, apo_zero
from dpalign.losses.base import (
    TIE_RTOL,
    LossOut,
    PairLogps,
    implicit_rewards,
    reward_metrics,
    reward_ties,
)
from dpalign.losses.bradley_terry import BradleyTerryParams, bradley_terry
from dpalign.losses.cdpo import CdpoParams, cdpo
from dpalign.losses.dama import (
    DamaParams,
    dama,
    dama_alpha_data,
    dama_alpha_model,
    dama_batch_gap,
    dama_context,
    update_running_mean,
)
from dpalign.losses.dpo import DpoParams, dpo, log_ratio_margin
from dpalign.losses.hinge import HingeParams, hinge
from dpalign.losses.ipo import IpoParams, ipo, token_means
from dpalign.losses.mdpo import MdpoParams, mdpo
from dpalign.losses.mixtures import DiscopopParams, ExoParams, discopop, exo_pair
from dpalign.losses.mmdpo import MmdpoParams, mmdpo
from dpalign.losses.pair_classifiers import NoParams, bco_pair, nca_pair, sppo_hard
from dpalign.losses.params import LossParams
from dpalign.losses.reference_free import OrpoParams, SimpoParams, log1mexp, orpo, simpo
from dpalign.losses.robust import RobustParams, robust
from dpalign.losses.sft import sft_nll, with_sft

LossFn = Callable[..., LossOut]
# (policy, ref, state, params) -> (keyword inputs of the loss, new state); see LossSpec.
BatchContext = Callable[..., tuple[dict[str, Any], Any]]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss.

    fn:                the loss function.
    params:            its frozen pydantic model of keyword parameters, with defaults.
    needs_corrupt:     policy/ref must carry ``chosen_corrupt`` (mDPO's corrupted image).
    needs_hardness:    the step passes ``hardness=`` (B,) in [0, 1] (DAMA).
    needs_alpha_model: the step passes ``alpha_model=`` () (DAMA; from ``batch_context``).
    loop_params:       fields of ``params`` that configure ``batch_context`` rather than
                       ``fn`` (e.g. DAMA's EMA momentum); ``call`` does not pass them to ``fn``.
    batch_context:     None, or ``(policy, ref, state, params) -> (kwargs, new_state)``: keyword
                       inputs of ``fn`` computed once per step from the whole batch's
                       ``PairLogps`` (each (B,)) and a JSON state the loop keeps (DAMA's
                       running reward gap; None before the first step).
    private_context:   the keyword inputs used instead under DP, where one pair's loss may not
                       depend on the other pairs of its batch (DAMA: alpha_model held at 1).
    scores:            ``policy`` holds a reward model's scores, not log-probs (Bradley-Terry):
                       no KL to a reference is logged.
    reference_free:    ``fn`` ignores ``ref`` (SimPO, ORPO): a policy run takes no reference
                       pass over its training pairs and passes zeros; no KL to a reference is
                       logged (held-out metrics still compare with the starting policy).
    averages_tokens:   ``fn`` takes per-token means of the log-probs itself (SimPO, ORPO), so
                       ``loss.length_normalize`` (which would divide twice) is rejected.
    """

    fn: LossFn
    params: type[LossParams]
    needs_corrupt: bool = False
    needs_hardness: bool = False
    needs_alpha_model: bool = False
    loop_params: frozenset[str] = frozenset()
    batch_context: BatchContext | None = None
    private_context: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    scores: bool = False
    reference_free: bool = False
    averages_tokens: bool = False

    @property
    def logs_kl(self) -> bool:
        """Whether a run logs ``kl_proxy``, the policy's KL to its reference: not for a
        reward model's ``scores``, nor for a ``reference_free`` loss, whose reference is zeros
        (a 'KL' to zeros would be the squared per-token NLL, not a distance to anything)."""
        return not (self.scores or self.reference_free)

    def make_params(self, raw: Mapping[str, Any] | LossParams | None = None) -> LossParams:
        """Validate raw keyword parameters (unknown keys and out-of-range values raise)."""
        if isinstance(raw, self.params):
            return raw
        return self.params.model_validate(dict(raw or {}))

    def call(self, policy: PairLogps, ref: PairLogps, *, beta: float,
             params: Mapping[str, Any] | LossParams | None = None,
             hardness: Tensor | None = None,
             alpha_model: float | Tensor | None = None) -> LossOut:
        """Run ``fn`` with ``params`` (defaults if None) and the extra inputs it needs."""
        kwargs = self.make_params(params).model_dump(exclude=set(self.loop_params))
        if self.needs_hardness:
            kwargs["hardness"] = _required("hardness", hardness)
        if self.needs_alpha_model:
            kwargs["alpha_model"] = _required("alpha_model", alpha_model)
        return self.fn(policy, ref, beta=beta, **kwargs)


def _required(name: str, value: Any) -> Any:
    if value is None:
        raise ValueError(f"this loss needs the input {name}=")
    return value


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo, DpoParams),
    "ipo": LossSpec(ipo, IpoParams),
    "hinge": LossSpec(hinge, HingeParams),
    "cdpo": LossSpec(cdpo, CdpoParams),
    "robust": LossSpec(robust, RobustParams),
    "mdpo": LossSpec(mdpo, MdpoParams, needs_corrupt=True),
    "mmdpo": LossSpec(mmdpo, MmdpoParams),
    "dama": LossSpec(dama, DamaParams, needs_hardness=True, needs_alpha_model=True,
                     loop_params=frozenset({"momentum"}), batch_context=dama_context,
                     private_context=MappingProxyType({"alpha_model": 1.0})),
    "apo_zero": LossSpec(apo_zero, ApoParams),
    "apo_down": LossSpec(apo_down, ApoParams),
    "bco_pair": LossSpec(bco_pair, NoParams),
    "nca_pair": LossSpec(nca_pair, NoParams),
    "sppo_hard": LossSpec(sppo_hard, NoParams),
    "exo_pair": LossSpec(exo_pair, ExoParams),
    "discopop": LossSpec(discopop, DiscopopParams),
    "simpo": LossSpec(simpo, SimpoParams, reference_free=True, averages_tokens=True),
    "orpo": LossSpec(orpo, OrpoParams, reference_free=True, averages_tokens=True),
    "bradley_terry": LossSpec(bradley_terry, BradleyTerryParams, scores=True),
}
REWARD_LOSSES = frozenset({"bradley_terry"})
"""Losses of reward models (``reward.enabled``), not of policies."""


class UnknownLossError(KeyError, ValueError):
    """An unknown loss name (a KeyError for lookups, a ValueError for pydantic validators)."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; raises ``UnknownLossError`` listing the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise UnknownLossError(f"unknown loss {name!r}; known losses: {known}") from None


__all__ = [
    "LOSSES",
    "REWARD_LOSSES",
    "TIE_RTOL",
    "BatchContext",
    "LossFn",
    "LossOut",
    "LossParams",
    "LossSpec",
    "PairLogps",
    "UnknownLossError",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "bradley_terry",
    "cdpo",
    "dama",
    "dama_alpha_data",
    "dama_alpha_model",
    "dama_batch_gap",
    "dama_context",
    "discopop",
    "dpo",
    "exo_pair",
    "get_loss",
    "hinge",
    "implicit_rewards",
    "ipo",
    "log1mexp",
    "log_ratio_margin",
    "mdpo",
    "mmdpo",
    "nca_pair",
    "orpo",
    "reward_metrics",
    "reward_ties",
    "robust",
    "sft_nll",
    "simpo",
    "sppo_hard",
    "token_means",
    "update_running_mean",
    "with_sft",
]
