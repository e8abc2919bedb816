"""The Opacus side of ``dp_overhead.py``: a correct per-PAIR DP-SGD step built on Opacus.

Opacus' ``GradSampleModule`` computes per-ROW gradients (``p.grad_sample``, one row per
leading-dimension entry of each layer's input). A preference pair is 2 rows (chosen,
rejected), and the privacy unit is the pair (DESIGN §2), so the step here is:

1. one forward through the hooked model over all 2B rows of the batch (chosen rows 0..B-1,
   rejected rows B..2B-1, exactly as ``pair_logps`` lays them out);
2. the per-pair loss and ONE backward of the summed pair losses (``loss_reduction="sum"``);
3. per-pair gradient = grad_sample[i] + grad_sample[B + i] (``sum_rows_per_pair``);
4. clip each pair to C, sum, add N(0, sigma^2 C^2), divide by B (``clip_per_unit``,
   ``noisy_mean``), then the optimizer step.

How Opacus 1.6 accumulates (``grad_sample_module.py``): each forward of a hooked module
increments a per-parameter ``_forward_counter``; each backward-hook call adds its (N, ...)
grad samples into ``_current_grad_sample[:N]`` and decrements the counter; at zero the sum
is "promoted" to ``p.grad_sample`` (a later backward without clearing makes it a LIST).
So two forwards of B rows (chosen, then rejected) and one backward would SUM the two
blocks row by row -- already per-pair, but only because row i of both passes is pair i.
We use one forward of 2B rows instead, which gives (2B, ...) per-row samples and sums the
rows of a pair explicitly; this is also what dpalign's own forward does, so the work matches.
Tied parameters (embedding = LM head) are summed over their two uses by the same
counter mechanism, which is what we want. LlamaRMSNorm has no Opacus grad sampler and goes
through Opacus' functorch fallback (``ft_compute_per_sample_gradient``). CLIPVisionEmbeddings
cannot: the fallback refuses modules with buffers (``position_ids``), and its position
table is looked up with a (1, P) index (batch dim 1); ``dp_overhead.py`` freezes those two
parameters for full fine-tuning (Conv2d, Embedding, LayerNorm, Linear have samplers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from opacus import GradSampleModule
from torch import Tensor, nn

from dpalign.losses.base import PairLogps
from dpalign.losses.objective import Objective, pair_logps
from dpalign.models.pairs import PairBatch
from dpalign.privacy.dp_sgd import clip_per_unit, noisy_mean
from dpalign.privacy.per_pair import sum_rows_per_pair


def wrap(model: nn.Module) -> GradSampleModule:
    """Opacus hooks on ``model`` (in place): per-row grads of a summed loss."""
    return GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)


def opacus_per_pair(model: nn.Module, batch: PairBatch, ref: PairLogps, objective: Objective,
                    params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    """``{name: (B, *shape)}`` per-pair gradients from Opacus' per-row grad samples.

    ``model`` must already be wrapped (``wrap``); hooks sit on its submodules, so calling
    the unwrapped model fires them. Leaves ``grad_sample`` and ``.grad`` cleared.
    """
    out = objective(pair_logps(model, batch), ref, hardness=batch.hardness)
    out.per_example.sum().backward()
    rows = len(batch.images_per_row)
    per_pair = {}
    for name, p in params.items():
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            sample = p.new_zeros((rows, *p.shape))
        if isinstance(sample, list):
            raise RuntimeError(f"{name}: grad_sample accumulated over several backwards")
        if sample.shape[0] != rows:
            raise RuntimeError(f"{name}: {sample.shape[0]} grad-sample rows, expected {rows}")
        per_pair[name] = sum_rows_per_pair(sample, batch)
        p.grad_sample = None
        p.grad = None
    return per_pair


def opacus_dp_step(model: nn.Module, batch: PairBatch, ref: PairLogps, objective: Objective,
                   params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer, *,
                   sigma: float, max_norm: float, generator: torch.Generator) -> None:
    """Per-pair grads (Opacus), clip per pair, sum, noise, mean, optimizer step."""
    per_pair = opacus_per_pair(model, batch, ref, objective, params)
    clipped, _ = clip_per_unit(per_pair, max_norm)
    noisy = noisy_mean(clipped, sigma, max_norm, float(batch.n_pairs), generator)
    for name, p in params.items():
        p.grad = noisy[name].to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
