"""Per-PAIR gradients for DP-SGD: one gradient row per preference pair (DESIGN §2).

A batch of B pairs is R = 2B (or 3B with mDPO) model rows; the privacy unit is the pair, so
its gradient is d(loss_i)/d(theta) with all of its rows together, never one row at a time.
Engines (chosen by name from ``ENGINES``):

- ``"loop"``: each pair alone, one forward and backward per pair. Any model, any trainable
  parameter (full fine-tuning included); the reference the others are tested against.
- ``"hooks"``: one forward and one backward of ``per_example.sum()`` for the whole batch.
  Every ``nn.Linear`` owning a trainable weight/bias contracts its output gradient with its
  input over all rows and positions of one pair (g^T a; Opacus' idea, but summed per pair
  in the same contraction instead of per row first). Only for parameters that belong to
  ``nn.Linear`` modules (LoRA's ``lora_A``/``lora_B``, projections). The first batch checks
  that the per-pair gradients sum to the batch gradient.

A ``vmap`` engine through ``torch.func`` is not offered: transformers' LLaVA forward makes
data-dependent checks (image-token counts) that ``vmap`` cannot trace.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dpalign.losses.base import LossOut, PairLogps
from dpalign.losses.objective import Objective, pair_logps, with_policy_metrics
from dpalign.models.pairs import PairBatch, select_rows

Params = Mapping[str, nn.Parameter]
AlphaModel = float | Tensor | None


class Engine(Protocol):
    """Per-pair gradients of ``params`` for a batch: ``{name: (B, *shape)}`` and the loss;
    ``units``: the same for any ``Units`` batch and its loss (RL's prompts)."""

    params: Params

    def __call__(self, batch: PairBatch, ref: PairLogps, objective: Objective,
                 hardness: Tensor | None, alpha_model: AlphaModel = None
                 ) -> tuple[dict[str, Tensor], LossOut]: ...

    def units(self, units: Units, loss: UnitLoss) -> tuple[dict[str, Tensor], LossOut]: ...


# --- rows of a pair --------------------------------------------------------------------------

def pair_rows(batch: PairBatch) -> Tensor:
    """(k, B) row indices: column i holds pair i's rows (i, B + i [, 2B + i]); k = 2 or 3."""
    b, k = batch.n_pairs, 3 if batch.with_corrupt else 2
    return torch.arange(k * b).view(k, b)


def select_pair(batch: PairBatch, i: int) -> PairBatch:
    """Pair ``i`` alone: its rows, their images and hardness, padding columns dropped."""
    tokens, images, per_row = select_rows(batch.tokens, batch.images, batch.images_per_row,
                                          pair_rows(batch)[:, i])
    hardness = None if batch.hardness is None else batch.hardness[i:i + 1]
    return replace(batch, ids=[batch.ids[i]], tokens=tokens, images=images,
                   images_per_row=per_row, hardness=hardness, n_pairs=1)


def sum_rows_per_pair(per_row: Tensor, batch: PairBatch) -> Tensor:
    """(R, *shape) per-row gradients -> (B, *shape) per-pair gradients."""
    k = 3 if batch.with_corrupt else 2
    return per_row.view(k, batch.n_pairs, *per_row.shape[1:]).sum(dim=0)


def _slice_alpha(alpha_model: AlphaModel, i: int) -> AlphaModel:
    is_per_pair = isinstance(alpha_model, Tensor) and alpha_model.dim() > 0
    return alpha_model[i:i + 1] if is_per_pair else alpha_model  # type: ignore[index]


def _zeros_if_none(grads: tuple[Tensor | None, ...], params: Params) -> dict[str, Tensor]:
    return {name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(params.items(), grads, strict=True)}


# --- units: pairs, or any batch whose rows lie in blocks ----------------------------------

class Units(Protocol):
    """A batch of U privacy units whose R model rows lie in k blocks of U (unit i's rows
    are i, U + i, ..., (k-1) U + i): a ``PairBatch``'s chosen / rejected [/ corrupt] rows
    (``PairUnits``), or the k samples of each of U prompts in RL. ``images_per_row``: (R,);
    ``unit(i)``: unit i alone, as a batch of one."""

    @property
    def n_units(self) -> int: ...

    @property
    def images_per_row(self) -> Tensor: ...

    def unit(self, i: int) -> Units: ...


UnitLoss = Callable[[Any], LossOut]
"""The (U,) loss of a ``Units`` batch under the model, each entry a function of its own unit
alone (the engines take each unit's gradient of its entry)."""


def unit_of_row(units: Units) -> Tensor:
    """(R,) the unit each row belongs to."""
    return torch.arange(len(units.images_per_row)) % units.n_units


def unit_of_image(units: Units) -> Tensor:
    """(I,) the unit each image belongs to (images in row order)."""
    rows = torch.arange(len(units.images_per_row))
    return rows.repeat_interleave(units.images_per_row) % units.n_units


@dataclass(frozen=True)
class PairUnits:
    """Preference pairs as ``Units``: the batch with each pair's reference log-probs,
    hardness and DAMA alpha (sliced with the pair)."""

    batch: PairBatch
    ref: PairLogps
    hardness: Tensor | None = None
    alpha_model: AlphaModel = None

    @property
    def n_units(self) -> int:
        return self.batch.n_pairs

    @property
    def images_per_row(self) -> Tensor:
        return self.batch.images_per_row

    def unit(self, i: int) -> PairUnits:
        return PairUnits(select_pair(self.batch, i), self.ref.index(slice(i, i + 1)),
                         None if self.hardness is None else self.hardness[i:i + 1],
                         _slice_alpha(self.alpha_model, i))


def pair_loss(model: nn.Module, objective: Objective) -> UnitLoss:
    """The (B,) loss of ``PairUnits`` under ``model``: ``objective`` on the pairs' log-probs
    (or a reward model's scores), with the policy metrics."""
    def loss(units: PairUnits) -> LossOut:
        policy = pair_logps(model, units.batch)
        return with_policy_metrics(objective(policy, units.ref, hardness=units.hardness,
                                             alpha_model=units.alpha_model), policy, units.ref,
                                   kl=objective.spec.logs_kl)
    return loss


# --- engine "loop" -------------------------------------------------------------------------

@dataclass(frozen=True)
class LoopEngine:
    """Per-unit gradients, one forward + backward per unit: any model, any parameter."""

    model: nn.Module
    params: Params

    def __call__(self, batch: PairBatch, ref: PairLogps, objective: Objective,
                 hardness: Tensor | None, alpha_model: AlphaModel = None
                 ) -> tuple[dict[str, Tensor], LossOut]:
        return self.units(PairUnits(batch, ref, hardness, alpha_model),
                          pair_loss(self.model, objective))

    def units(self, units: Units, loss: UnitLoss) -> tuple[dict[str, Tensor], LossOut]:
        """``{name: (U, *shape)}``: row i is d loss(unit i alone) / d param; the LossOut."""
        rows: list[dict[str, Tensor]] = []
        outs: list[LossOut] = []
        for i in range(units.n_units):
            out = loss(units.unit(i))
            grads = torch.autograd.grad(out.per_example.sum(), list(self.params.values()),
                                        allow_unused=True)
            rows.append(_zeros_if_none(grads, self.params))
            outs.append(LossOut(out.per_example.detach(), out.metrics))
        per_unit = {name: torch.stack([r[name] for r in rows]) for name in self.params}
        return per_unit, LossOut.cat(outs)


# --- engine "hooks" ------------------------------------------------------------------------

def linear_owners(model: nn.Module, params: Params) -> dict[str, tuple[nn.Linear, str]]:
    """``{name: (linear, "weight" | "bias")}`` for every parameter in ``params``.

    Raises ``ValueError`` naming the first parameter that is not owned by an ``nn.Linear``
    or is also owned by another kind of module (e.g. an output layer tied to an embedding).
    """
    wanted = {id(p): name for name, p in params.items()}
    owners: dict[str, tuple[nn.Linear, str]] = {}
    others: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            name = wanted.get(id(p))
            if name is None:
                continue
            if isinstance(module, nn.Linear):
                owners.setdefault(name, (module, attr))
            else:
                others.setdefault(name, f"{type(module).__name__} {path or '<root>'}")
    for name in params:
        if name in others or name not in owners:
            where = f" (used by {others[name]})" if name in others else ""
            raise ValueError(f"engine 'hooks' computes per-pair gradients only for nn.Linear "
                             f"weights and biases; trainable parameter {name!r} is not one"
                             f"{where}. Use engine 'loop', or freeze it.")
    return owners


class LinearPairGrads:
    """Context manager recording per-PAIR gradients of ``nn.Linear`` weights and biases.

    ``owners``: ``{name: (linear, attr)}``; ``n_pairs``: B; ``pair_of_row``: (R,) the pair of
    each model row; ``pair_of_image``: (I,) the pair of each image, for layers that run on
    images (vision tower, projector) rather than rows. A layer's input a: (N, *, in) and
    output gradient g: (N, *, out), N in {R, I}; each call adds sum over the N of one pair
    of g^T a (weight, (out, in)) and of g summed (bias, (out,)) to that pair. The gradient
    hook sits on each call's own output, so a layer called several times in one forward is
    paired correctly. After the backward, ``samples`` holds ``{name: (B, *shape)}``.

    Every recorded output becomes ``output + probe`` for a zero scalar leaf ``probe``, so a
    backward to ``probe`` alone reaches every recorded output without computing any
    parameter's batch gradient (the per-pair contractions replace it).

    Rows laid out as k blocks of B (pair i's rows are i, B + i, ...: ``pair_rows``) take one
    einsum over (k, B, L) per call, with no per-row intermediate.
    """

    def __init__(self, owners: Mapping[str, tuple[nn.Linear, str]], n_pairs: int,
                 pair_of_row: Tensor, pair_of_image: Tensor) -> None:
        self.n_pairs = n_pairs
        n_rows, n_images = len(pair_of_row), len(pair_of_image)
        if n_images == n_rows and not torch.equal(pair_of_image, pair_of_row):
            raise ValueError("as many images as rows but not one per row: cannot tell image "
                             "activations from row activations; use engine 'loop'")
        blocked = (n_rows % n_pairs == 0
                   and torch.equal(pair_of_row, torch.arange(n_rows) % n_pairs))
        self.blocks = {n_rows: n_rows // n_pairs} if blocked else {}
        self.index = {n_images: pair_of_image, n_rows: pair_of_row}
        self.modules: dict[nn.Linear, dict[str, str]] = {}
        for name, (module, attr) in owners.items():
            self.modules.setdefault(module, {})[attr] = name
        self.samples: dict[str, Tensor] = {}
        self.probe = torch.zeros((), requires_grad=True)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LinearPairGrads:
        for module in self.modules:
            self._handles.append(module.register_forward_hook(self._on_forward))
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward(self, module: nn.Module, args: tuple[Tensor, ...],
                    output: Tensor) -> Tensor | None:
        """Adds ``probe`` (a zero scalar) to the output and hooks the sum's gradient."""
        if not output.requires_grad:  # a no-grad forward (e.g. the image-token count check)
            return None
        if not args:
            raise ValueError(f"{type(module).__name__} called without a positional input")
        a = args[0].detach()
        names = self.modules[module]  # type: ignore[index]
        probed = output + self.probe
        probed.register_hook(lambda g: self._accumulate(names, a, g))
        return probed

    def _accumulate(self, names: dict[str, str], a: Tensor, g: Tensor) -> None:
        n = a.shape[0]
        if n not in self.index:
            raise RuntimeError(f"a linear layer saw a leading dimension {n}, neither the "
                               f"{len(self.index)} rows nor the images; use engine 'loop'")
        for attr, name in names.items():
            value = (self._blocked(attr, a, g, self.blocks[n]) if n in self.blocks
                     else self._indexed(attr, a, g, self.index[n].to(a.device)))
            if name in self.samples:
                self.samples[name].add_(value)
            else:
                self.samples[name] = value

    def _blocked(self, attr: str, a: Tensor, g: Tensor, k: int) -> Tensor:
        """(B, *shape) from rows in k blocks of B: one contraction over (k, L)."""
        g4 = g.reshape(k, self.n_pairs, -1, g.shape[-1])
        if attr == "bias":
            return g4.sum(dim=(0, 2))
        return torch.einsum("kblo,kbli->boi", g4, a.reshape(k, self.n_pairs, -1, a.shape[-1]))

    def _indexed(self, attr: str, a: Tensor, g: Tensor, pair: Tensor) -> Tensor:
        """(B, *shape) from N items each belonging to ``pair[n]``."""
        n = a.shape[0]
        g3 = g.reshape(n, -1, g.shape[-1])
        each = (g3.sum(dim=1) if attr == "bias"
                else torch.einsum("nlo,nli->noi", g3, a.reshape(n, -1, a.shape[-1])))
        return each.new_zeros((self.n_pairs, *each.shape[1:])).index_add_(0, pair, each)


def _check_sums(per_pair: Mapping[str, Tensor], batch_grads: Mapping[str, Tensor]) -> None:
    """Raise if the per-pair gradients do not sum to the batch gradient (a parameter used
    outside its layer's forward, e.g. through ``F.linear``, would break the hooks)."""
    for name, g in batch_grads.items():
        total = per_pair[name].sum(dim=0)
        tol = torch.finfo(g.dtype).eps ** 0.5 * float(g.abs().max() + total.abs().max())
        err = float((total - g).abs().max())
        if err > tol:
            raise RuntimeError(f"engine 'hooks': per-pair gradients of {name!r} do not sum to "
                               f"its batch gradient (max error {err:.3g}); the parameter is "
                               "used outside nn.Linear.forward. Use engine 'loop'.")


@dataclass(frozen=True)
class HookEngine:
    """Per-pair gradients from one forward and one backward of the whole batch; only for
    parameters owned by ``nn.Linear`` (resolved once, when the engine is made).

    The backward runs to the recorder's probe, not to the parameters, so no batch gradient
    is computed; except on the engine's first batch, where the batch gradient is also taken
    and the per-pair gradients must sum to it (``_check_sums``): a parameter also used
    outside its layer's forward would otherwise be missed silently. ``checked`` records that
    this was done (the engine's only state).
    """

    model: nn.Module
    params: Params
    owners: Mapping[str, tuple[nn.Linear, str]]
    checked: list[bool] = field(default_factory=list)

    @classmethod
    def build(cls, model: nn.Module, params: Params) -> HookEngine:
        return cls(model, params, linear_owners(model, params))

    def __call__(self, batch: PairBatch, ref: PairLogps, objective: Objective,
                 hardness: Tensor | None, alpha_model: AlphaModel = None
                 ) -> tuple[dict[str, Tensor], LossOut]:
        return self.units(PairUnits(batch, ref, hardness, alpha_model),
                          pair_loss(self.model, objective))

    def units(self, units: Units, loss: UnitLoss) -> tuple[dict[str, Tensor], LossOut]:
        """``{name: (U, *shape)}`` per-unit gradients of ``loss(units)`` from one forward
        and one backward, and the LossOut (per_example detached)."""
        b = units.n_units
        check = [] if self.checked else list(self.params.values())
        with LinearPairGrads(self.owners, b, unit_of_row(units),
                             unit_of_image(units)) as recorder:
            out = loss(units)
            _, *batch_grads = torch.autograd.grad(out.per_example.sum(),
                                                  [recorder.probe, *check], allow_unused=True)
        per_unit = {name: recorder.samples.get(name, p.new_zeros((b, *p.shape)))
                    for name, p in self.params.items()}
        if check:
            _check_sums(per_unit, _zeros_if_none(tuple(batch_grads), self.params))
            self.checked.append(True)
        return per_unit, LossOut(out.per_example.detach(), out.metrics)


# --- public entry --------------------------------------------------------------------------

ENGINES: dict[str, Callable[[nn.Module, Params], Engine]] = {
    "loop": LoopEngine, "hooks": HookEngine.build}


def make_engine(name: str, model: nn.Module, params: Params) -> Engine:
    """The per-pair engine ``name`` for ``params`` of ``model`` (made once per run)."""
    if name not in ENGINES:
        raise ValueError(f"unknown per-pair engine {name!r}; known: {', '.join(ENGINES)}")
    if not params:
        raise ValueError("no trainable parameters given")
    return ENGINES[name](model, params)


def per_pair_grads(model: nn.Module, batch: PairBatch, ref: PairLogps, objective: Objective,
                   *, params: Params, engine: str = "hooks", hardness: Tensor | None = None,
                   alpha_model: AlphaModel = None) -> tuple[dict[str, Tensor], LossOut]:
    """Gradient of each pair's loss ``objective(...).per_example[i]`` (not the mean).

    Args: ``batch`` of B pairs; ``ref`` the reference log-probs of those B pairs (B,);
    ``params`` the trainable parameters by name; ``hardness`` (B,) and ``alpha_model`` as
    ``Objective`` takes them. Returns ``{name: Tensor (B, *param.shape)}`` (row i is
    d loss_i / d param) and the batch's ``LossOut`` (per_example detached). Parameters'
    ``.grad`` are not touched. A training loop makes the engine once (``make_engine``).
    """
    run = make_engine(engine, model, params)
    if batch.n_pairs == 0:
        raise ValueError("empty batch: its per-pair gradients are dp_sgd.empty_units(params)")
    return run(batch, ref, objective, hardness, alpha_model)
