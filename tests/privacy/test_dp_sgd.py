"""Clip, group and noise against one-unit-at-a-time loops; noise statistics; generators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpalign.privacy.dp_sgd import (
    clip_fraction,
    clip_margin,
    clip_per_unit,
    empty_units,
    group_by_unit,
    noise_generator,
    noise_to_signal,
    noisy_mean,
    norm_quantiles,
    per_unit_norms,
    step_diagnostics,
)


def _grads(units: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(units, 3, 4, generator=g), "b": torch.randn(units, 4, generator=g)}


def test_norms_equal_a_hand_loop() -> None:
    grads = _grads(6)
    norms = per_unit_norms(grads)
    for u in range(6):
        flat = torch.cat([grads["w"][u].flatten(), grads["b"][u].flatten()])
        assert norms[u] == pytest.approx(float(flat.norm()), rel=1e-6)


def test_clip_bounds_every_unit_and_keeps_small_ones() -> None:
    grads = _grads(16)
    c = 3.0
    clipped, norms = clip_per_unit(grads, c)
    after = per_unit_norms(clipped)
    assert (after <= c * (1 + 1e-6)).all()
    for u in range(16):
        if norms[u] <= c:
            assert torch.equal(clipped["w"][u], grads["w"][u])
        else:  # scaled, same direction, norm C up to rounding (never above: see below)
            assert after[u] == pytest.approx(c, rel=1e-6)
            assert torch.allclose(clipped["b"][u] * norms[u] / c, grads["b"][u], atol=1e-6)
    assert 0 < int((norms > c).sum()) < 16


def test_batch_of_one_clips_to_exactly_c() -> None:
    grads = {"w": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[12.0]])}  # norm 13
    clipped, norms = clip_per_unit(grads, 1.3)
    assert norms.tolist() == [13.0]
    # just under C: scaled by (C / 13)(1 - 2u) in float32 (u = 6e-8), never above
    assert 1.3 * (1 - 4e-7) <= per_unit_norms(clipped)[0] <= 1.3
    assert torch.allclose(clipped["w"], torch.tensor([[0.3, 0.4]]))


def _float64_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: every unit's norm from its float64 elements, one unit at a time."""
    return torch.stack([torch.cat([g[u].double().flatten() for g in grads.values()]).norm()
                        for u in range(next(iter(grads.values())).shape[0])])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", [7, 1_000_000])
def test_clipped_norms_never_exceed_c(dtype: torch.dtype, params: int) -> None:
    """The sensitivity bound the accountant assumes: every clipped unit, measured in float64,
    has norm <= C. Plain C / norm scaling in float32 left 64/64 units of a 1M-parameter
    gradient above C (bf16: 57/64, by up to 2.3e-3 relative)."""
    units = 64 if params < 1000 else 16
    g = torch.Generator().manual_seed(params)
    grads = {"w": (torch.randn(units, params - params // 4, generator=g) * 0.01).to(dtype),
             "b": (torch.randn(units, params // 4, generator=g) * 0.02).to(dtype)}
    c = 0.5 * float(_float64_norms(grads).median())
    clipped, norms = clip_per_unit(grads, c)
    after = _float64_norms(clipped)
    assert norms.dtype == torch.float64
    assert torch.allclose(norms, _float64_norms(grads), rtol=1e-12)
    assert (norms > c).sum() >= units // 2 - 1
    assert bool((after <= c).all()), f"max excess {float((after / c).max()) - 1:.3g}"
    assert all(clipped[k].dtype == dtype for k in grads)
    # clipped units lose only the stated margin m (and a rounding): >= C (1 - m)(1 - u)
    margin = clip_margin(grads)
    scaled = norms > c
    assert bool((after[scaled] >= c * (1 - 2 * margin)).all())
    for u_ in (~scaled).nonzero().flatten().tolist():  # units under C are untouched
        assert all(torch.equal(clipped[k][u_], grads[k][u_]) for k in grads)


def test_infinite_c_is_the_identity() -> None:
    grads = _grads(5)
    clipped, _ = clip_per_unit(grads, math.inf)
    assert all(torch.equal(clipped[k], grads[k]) for k in grads)


def test_no_noise_no_clip_is_the_plain_mean() -> None:
    grads = _grads(8)
    mean = noisy_mean(grads, 0.0, math.inf, 8, torch.Generator().manual_seed(0))
    for k in grads:
        assert torch.allclose(mean[k], grads[k].mean(dim=0), atol=1e-6)


def test_dp_step_with_no_noise_no_clip_equals_the_non_dp_gradient() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.randn(6)
    w = torch.randn(3, requires_grad=True)
    per_example = torch.stack([torch.autograd.grad((x[i] @ w - y[i]) ** 2, w)[0]
                               for i in range(6)])
    clipped, _ = clip_per_unit({"w": per_example}, math.inf)
    dp = noisy_mean(clipped, 0.0, math.inf, 6, torch.Generator().manual_seed(1))["w"]
    (full,) = torch.autograd.grad(((x @ w - y) ** 2).mean(), w)
    assert torch.allclose(dp, full, atol=1e-6)


def test_noise_std_matches_sigma_c_over_batch() -> None:
    sigma, c, batch = 0.8, 2.5, 4.0
    zeros = {"w": torch.zeros(1, 500, 400)}
    noise = noisy_mean(zeros, sigma, c, batch, torch.Generator().manual_seed(7))["w"]
    expected = sigma * c / batch
    n = noise.numel()
    assert abs(float(noise.mean())) < 3 * expected / math.sqrt(n)
    assert abs(float(noise.std()) - expected) < 3 * expected / math.sqrt(2 * n)


def test_noise_is_added_to_the_sum_before_dividing() -> None:
    grads = _grads(3)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = noisy_mean(grads, 1.0, 2.0, 5.0, gen_a)
    # One vector over all parameters, in key order, then cut back into the parameters.
    flat = torch.randn(sum(g[0].numel() for g in grads.values()), generator=gen_b) * 2.0
    pieces = flat.split([g[0].numel() for g in grads.values()])
    noise = {k: p.view(g.shape[1:]) for (k, g), p in zip(grads.items(), pieces, strict=True)}
    for k in grads:
        assert torch.allclose(out[k], (grads[k].sum(0) + noise[k]) / 5.0, atol=1e-6)


def test_empty_batch_is_noise_only() -> None:
    params = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    empty = empty_units(params)
    assert empty["w"].shape == (0, 3, 4)
    out = noisy_mean(empty, 1.0, 1.0, 2.0, torch.Generator().manual_seed(0))
    assert {k: v.shape for k, v in out.items()} == {k: p.shape for k, p in params.items()}
    assert (out["w"] != 0).all()
    quiet = noisy_mean(empty, 0.0, 1.0, 2.0, torch.Generator().manual_seed(0))
    assert all((v == 0).all() for v in quiet.values())
    _, norms = clip_per_unit(empty, 1.0)
    assert norms.shape == (0,)


def test_same_seed_same_noise_secure_differs() -> None:
    zeros = {"w": torch.zeros(1, 64)}
    first = noisy_mean(zeros, 1.0, 1.0, 1.0, noise_generator(3))["w"]
    again = noisy_mean(zeros, 1.0, 1.0, 1.0, noise_generator(3))["w"]
    assert torch.equal(first, again)
    secure_a = noisy_mean(zeros, 1.0, 1.0, 1.0, noise_generator(None, secure=True))["w"]
    secure_b = noisy_mean(zeros, 1.0, 1.0, 1.0, noise_generator(None, secure=True))["w"]
    assert not torch.equal(secure_a, secure_b)
    with pytest.raises(ValueError, match="secure"):
        noise_generator(3, secure=True)
    with pytest.raises(ValueError, match="seed"):
        noise_generator(None)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_per_unit(_grads(2), 0.0)
    with pytest.raises(ValueError, match="infinite"):
        noisy_mean(_grads(2), 1.0, math.inf, 2, torch.Generator())
    with pytest.raises(ValueError, match="number of units"):
        per_unit_norms({"w": torch.zeros(2, 3), "b": torch.zeros(3, 3)})


def test_group_by_unit_equals_a_hand_loop() -> None:
    grads = _grads(7)
    users = ["u2", "u1", "u2", "u3", "u1", "u2", "u4"]
    grouped, order = group_by_unit(grads, users)
    assert order == ["u2", "u1", "u3", "u4"]
    for row, user in enumerate(order):
        members = [i for i, u in enumerate(users) if u == user]
        for k in grads:
            assert torch.allclose(grouped[k][row], grads[k][members].sum(dim=0), atol=1e-6)
    clipped, norms = clip_per_unit(grouped, 1.0)  # a user's sum is clipped as one vector
    assert norms[0] == pytest.approx(float(per_unit_norms(
        {k: g[[0, 2, 5]].sum(0, keepdim=True) for k, g in grads.items()})[0]), rel=1e-6)
    assert (per_unit_norms(clipped) <= 1.0 + 1e-6).all()


def test_diagnostics_by_hand() -> None:
    norms = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    assert clip_fraction(norms, 1.5) == pytest.approx(0.6)
    quantiles = norm_quantiles(norms)
    np_q = np.quantile(norms.numpy(), [0.1, 0.5, 0.9])
    assert [quantiles["p10"], quantiles["p50"], quantiles["p90"]] == pytest.approx(np_q)
    assert quantiles["max"] == 8.0
    clipped = {"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]])}  # sum (3, 4), norm 5
    # noise std sigma*C/B = 2*1/4 = 0.5; mean clipped gradient norm 5/4 -> ratio 0.4
    assert noise_to_signal(clipped, 2.0, 1.0, 4.0) == pytest.approx(0.4)
    assert noise_to_signal(clipped, 0.0, 1.0, 4.0) == 0.0
    diag = step_diagnostics(clipped, torch.tensor([3.0, 4.0]), 2.0, 3.5, 4.0)
    assert diag.units == 2 and diag.clip_fraction == 0.5 and diag.norm_max == 4.0
    assert set(diag.as_dict()) == {"units", "clip_fraction", "norm_p10", "norm_p50",
                                   "norm_p90", "norm_max", "noise_to_signal"}
    empty = step_diagnostics({"w": torch.zeros(0, 2)}, torch.zeros(0), 1.0, 1.0, 2.0)
    assert empty.clip_fraction == 0.0 and math.isnan(empty.norm_p50)
    assert math.isinf(empty.noise_to_signal)
