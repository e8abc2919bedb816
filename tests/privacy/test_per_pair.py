"""Per-pair gradients against a one-pair-at-a-time loop written here (opacus-style), in
float64 on the tiny LLaVA: LoRA (dpo, mdpo with corrupted-image rows), full fine-tuning,
the sum over pairs vs a plain backward, user-level grouping, and the hooks engine's limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dpalign.data.records import read_preference_jsonl
from dpalign.losses.base import PairLogps
from dpalign.losses.config import LossConfig
from dpalign.losses.objective import Objective, pair_logps
from dpalign.models.load import LoadedModel, load_model
from dpalign.models.lora import LoraConfig, prepare_trainable
from dpalign.models.pairs import EncodedPair, PairBatch, collate, encode_pairs
from dpalign.privacy.dp_sgd import group_by_unit
from dpalign.privacy.per_pair import (
    ENGINES,
    LinearPairGrads,
    per_pair_grads,
    select_pair,
)
from dpalign.train.reference import compute_reference
from dpalign.world.load import World

ATOL = 1e-10
N_PAIRS = 4


@pytest.fixture(scope="module")
def records(small_world: Path) -> list:
    return read_preference_jsonl(World.load(small_world).pool_file)


def _vlm(tiny_model: Path) -> LoadedModel:
    vlm = load_model(tiny_model)
    vlm.model.double()
    return vlm


def _pad(vlm: LoadedModel) -> int:
    return int(vlm.processor.tokenizer.pad_token_id)  # type: ignore[attr-defined]


def _pairs(vlm: LoadedModel, records: list, n: int = N_PAIRS) -> list[EncodedPair]:
    """The first ``n`` pool pairs (with corrupted images), padded to different lengths."""
    pairs = encode_pairs(records[:n], vlm.processor, corrupt_seed=0)
    assert len({len(p.prompt) + len(p.chosen) for p in pairs}) > 1
    assert len({len(p.prompt) + len(p.rejected) for p in pairs}) > 1
    return pairs


def _perturb(params: dict[str, nn.Parameter], seed: int = 0, scale: float = 0.05) -> None:
    """Move away from policy == reference so that every term of the loss matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _lora(vlm: LoadedModel) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    model = prepare_trainable(vlm.model, LoraConfig()).double().train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    _perturb(params)
    return model, params


def _setup(tiny_model: Path, records: list, with_corrupt: bool
           ) -> tuple[LoadedModel, list[EncodedPair], PairLogps, PairBatch]:
    vlm = _vlm(tiny_model)
    pairs = _pairs(vlm, records)
    ref = compute_reference(vlm.model, pairs, _pad(vlm), with_corrupt=with_corrupt)
    return vlm, pairs, ref, collate(pairs, _pad(vlm), with_corrupt=with_corrupt)


def _one_at_a_time(model: nn.Module, pairs: list[EncodedPair], pad_id: int, ref: PairLogps,
                   objective: Objective, params: dict[str, nn.Parameter],
                   with_corrupt: bool) -> dict[str, Tensor]:
    """The reference: each pair collated alone, its own forward and autograd.grad."""
    rows = []
    for i, pair in enumerate(pairs):
        one = collate([pair], pad_id, with_corrupt=with_corrupt)
        loss = objective(pair_logps(model, one), ref.index(slice(i, i + 1))).per_example.sum()
        rows.append(torch.autograd.grad(loss, list(params.values()), allow_unused=True))
    return {name: torch.stack([torch.zeros_like(p) if r[k] is None else r[k] for r in rows])
            for k, (name, p) in enumerate(params.items())}


def _assert_grads_equal(got: dict[str, Tensor], expected: dict[str, Tensor],
                        atol: float = ATOL) -> None:
    assert got.keys() == expected.keys()
    nonzero = 0
    for name, g in expected.items():
        assert got[name].shape == g.shape, name
        torch.testing.assert_close(got[name], g, atol=atol, rtol=0, msg=name)
        nonzero += int(g.abs().max() > 0)
    assert nonzero > len(expected) // 2  # most parameters really got a gradient


def test_engines_registry() -> None:
    assert set(ENGINES) == {"loop", "hooks"}


@pytest.mark.parametrize(("loss", "with_corrupt"), [("dpo", False), ("mdpo", True)])
@pytest.mark.parametrize("engine", ["hooks", "loop"])
def test_lora_per_pair_grads_equal_one_at_a_time(tiny_model: Path, records: list, loss: str,
                                                 with_corrupt: bool, engine: str) -> None:
    vlm, pairs, ref, batch = _setup(tiny_model, records, with_corrupt)
    model, params = _lora(vlm)
    objective = Objective.from_config(LossConfig(name=loss, beta=0.5))
    got, out = per_pair_grads(model, batch, ref, objective, params=params, engine=engine)
    expected = _one_at_a_time(model, pairs, _pad(vlm), ref, objective, params, with_corrupt)
    _assert_grads_equal(got, expected)
    with torch.no_grad():
        plain = objective(pair_logps(model, batch), ref)
    torch.testing.assert_close(out.per_example, plain.per_example, atol=ATOL, rtol=0)
    assert not out.per_example.requires_grad
    assert all(p.grad is None for p in params.values())


@pytest.mark.parametrize("engine", ["hooks", "loop"])
def test_sum_over_pairs_is_the_batch_gradient(tiny_model: Path, records: list,
                                              engine: str) -> None:
    """sum_i d loss_i / d theta == the gradient of per_example.sum() from a plain backward."""
    vlm, _, ref, batch = _setup(tiny_model, records, with_corrupt=True)
    model, params = _lora(vlm)
    objective = Objective.from_config(LossConfig(name="mdpo", beta=0.5))
    got, _ = per_pair_grads(model, batch, ref, objective, params=params, engine=engine)
    objective(pair_logps(model, batch), ref).per_example.sum().backward()
    for name, p in params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(got[name].sum(dim=0), p.grad, atol=ATOL, rtol=0, msg=name)


def _full(vlm: LoadedModel, names: list[str]) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """Full fine-tuning (LoRA disabled), restricted to ``names`` to keep the test fast."""
    model = prepare_trainable(vlm.model, LoraConfig(enabled=False)).train()
    named = dict(model.named_parameters())
    model.requires_grad_(False)
    params = {n: named[n] for n in names}
    for p in params.values():
        p.requires_grad_(True)
    _perturb(params, scale=0.01)
    return model, params


# Linear layers of the language model, the projector and the vision tower (which run on
# images, not rows), an embedding tied to the output layer, and norms.
LINEAR_PARAMS = [
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.language_model.layers.3.mlp.down_proj.weight",
    "model.multi_modal_projector.linear_1.weight",
    "model.multi_modal_projector.linear_1.bias",
    "model.vision_tower.encoder.layers.0.self_attn.v_proj.weight",
    "model.vision_tower.encoder.layers.1.mlp.fc1.bias",
]
OTHER_PARAMS = [
    "model.language_model.embed_tokens.weight",
    "model.language_model.norm.weight",
    "model.vision_tower.embeddings.patch_embedding.weight",
]


def test_full_finetuning_loop_engine(tiny_model: Path, records: list) -> None:
    vlm, pairs, ref, batch = _setup(tiny_model, records, with_corrupt=False)
    model, params = _full(vlm, LINEAR_PARAMS + OTHER_PARAMS)
    objective = Objective.from_config(LossConfig(name="dpo", beta=0.5))
    got, _ = per_pair_grads(model, batch, ref, objective, params=params, engine="loop")
    expected = _one_at_a_time(model, pairs, _pad(vlm), ref, objective, params, False)
    _assert_grads_equal(got, expected)


def test_full_finetuning_hooks_engine_on_linear_layers(tiny_model: Path,
                                                       records: list) -> None:
    """Vision-tower and projector layers see one activation per image, not per row."""
    vlm, pairs, ref, batch = _setup(tiny_model, records, with_corrupt=True)
    model, params = _full(vlm, LINEAR_PARAMS)
    objective = Objective.from_config(LossConfig(name="mdpo", beta=0.5))
    got, _ = per_pair_grads(model, batch, ref, objective, params=params, engine="hooks")
    expected = _one_at_a_time(model, pairs, _pad(vlm), ref, objective, params, True)
    _assert_grads_equal(got, expected)


@pytest.mark.parametrize("name", OTHER_PARAMS)
def test_hooks_engine_refuses_non_linear_parameters(tiny_model: Path, records: list,
                                                    name: str) -> None:
    """Embeddings (here also tied to lm_head, a Linear), norms and convolutions."""
    vlm, _, ref, batch = _setup(tiny_model, records, with_corrupt=False)
    model, params = _full(vlm, [LINEAR_PARAMS[0], name])
    objective = Objective.from_config(LossConfig(name="dpo"))
    with pytest.raises(ValueError, match=r"(?s)nn\.Linear.*'model\..*engine 'loop'") as err:
        per_pair_grads(model, batch, ref, objective, params=params, engine="hooks")
    assert repr(name) in str(err.value)


def test_user_level_grouping_equals_direct_gradient(tiny_model: Path, records: list) -> None:
    """group_by_unit over per-pair grads == d(sum of a user's pair losses)/d theta."""
    vlm, pairs, ref, batch = _setup(tiny_model, records, with_corrupt=False)
    model, params = _lora(vlm)
    objective = Objective.from_config(LossConfig(name="dpo", beta=0.5))
    got, _ = per_pair_grads(model, batch, ref, objective, params=params)
    users = ["u1", "u2", "u1", "u1"]
    grouped, order = group_by_unit(got, users)
    assert order == ["u1", "u2"]
    for u, user in enumerate(order):
        idx = [i for i, uid in enumerate(users) if uid == user]
        sub = collate([pairs[i] for i in idx], _pad(vlm))
        loss = objective(pair_logps(model, sub), ref.index(torch.tensor(idx))).per_example.sum()
        direct = torch.autograd.grad(loss, list(params.values()))
        for name, g in zip(params, direct, strict=True):
            torch.testing.assert_close(grouped[name][u], g, atol=ATOL, rtol=0, msg=name)


def test_select_pair_takes_the_pairs_rows_and_images(tiny_model: Path,
                                                     records: list) -> None:
    vlm = _vlm(tiny_model)
    pairs = _pairs(vlm, records)
    batch = collate(pairs, _pad(vlm), with_corrupt=True)
    alone = collate([pairs[2]], _pad(vlm), with_corrupt=True)
    one = select_pair(batch, 2)
    assert (one.n_pairs, one.ids, one.with_corrupt) == (1, [pairs[2].id], True)
    for a, b in zip((one.tokens.input_ids, one.tokens.attention_mask, one.tokens.labels),
                    (alone.tokens.input_ids, alone.tokens.attention_mask, alone.tokens.labels),
                    strict=True):
        width = b.shape[1]
        assert torch.equal(a[:, :width], b)
        assert a.shape[1] == width or not one.tokens.attention_mask[:, width:].any()
    assert torch.equal(one.images.pixel_values, alone.images.pixel_values)
    assert torch.equal(one.images_per_row, alone.images_per_row)


def test_unknown_engine_and_empty_params() -> None:
    with pytest.raises(ValueError, match="unknown per-pair engine 'vmap'; known: loop, hooks"):
        per_pair_grads(nn.Linear(1, 1), None, None, None, params={"w": nn.Parameter(  # type: ignore[arg-type]
            torch.ones(1))}, engine="vmap")
    with pytest.raises(ValueError, match="no trainable parameters"):
        per_pair_grads(nn.Linear(1, 1), None, None, None, params={})  # type: ignore[arg-type]


class _Twice(nn.Module):
    """A layer applied twice in one forward, on (R, L, 3) rows, plus one on 'images'."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.img = nn.Linear(3, 3).double()

    def forward(self, x: Tensor, images: Tensor, image_row: Tensor) -> Tensor:
        h = self.lin(torch.tanh(self.lin(x)))
        per_row = torch.zeros(x.shape[0], 3, dtype=x.dtype).index_add(
            0, image_row, self.img(images).sum(1))
        return (h.sum(1) * per_row).pow(2).sum(1)  # (R,)


@pytest.mark.parametrize("pair_of_row", [[0, 1, 2, 3], [0, 1, 0, 1], [1, 0, 1, 1]])
def test_pair_grads_with_a_layer_called_twice_and_image_rows(pair_of_row: list[int]) -> None:
    """Each call's gradient is paired with its own input; image activations go to their
    rows' pairs (rows 0 and 2 have two images, row 1 one, row 3 none); rows laid out in
    blocks of B ([0, 1, 0, 1]) and in any other order ([1, 0, 1, 1]) give the same sums."""
    torch.manual_seed(0)
    net = _Twice()
    x, images = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(5, 2, 3,
                                                                        dtype=torch.float64)
    image_row = torch.tensor([0, 0, 1, 2, 2])
    pairs = torch.tensor(pair_of_row)
    n_pairs = int(pairs.max()) + 1
    params = dict(net.named_parameters())
    owners = {n: (getattr(net, n.split(".")[0]), n.split(".")[1]) for n in params}
    with LinearPairGrads(owners, n_pairs, pairs, pairs[image_row]) as rec:
        net(x, images, image_row).sum().backward()
    for i in range(n_pairs):
        expected = [torch.zeros_like(p) for p in params.values()]
        for r in (pairs == i).nonzero().flatten().tolist():
            mine = image_row == r
            loss = net(x[r:r + 1], images[mine], torch.zeros(int(mine.sum()), dtype=torch.long))
            grads = torch.autograd.grad(loss.sum(), list(params.values()))
            expected = [e + g for e, g in zip(expected, grads, strict=True)]
        for name, g in zip(params, expected, strict=True):
            torch.testing.assert_close(rec.samples[name][i], g, atol=1e-12, rtol=0, msg=name)
