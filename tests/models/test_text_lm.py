"""Text-only causal LMs through dpalign's VLM path: loading with the Auto classes, pair
encoding without images, sequence log-probs against a per-row computation written here,
and per-pair gradients (both engines) against a one-pair-at-a-time loop, in float64.

The model is the tiny preset's language model alone (``build_tiny_text``, a real
``LlamaForCausalLM``), saved and loaded back; the records are the small world's pairs with
their images dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from dpalign.data.records import read_preference_jsonl
from dpalign.data.schema import PreferenceRecord
from dpalign.losses.config import LossConfig
from dpalign.losses.objective import Objective, pair_logps
from dpalign.models.encode import IGNORE
from dpalign.models.families import TEXT, ImageInputs, TextProcessor, family_of
from dpalign.models.load import LoadedModel, load_model
from dpalign.models.logprobs import sequence_logps
from dpalign.models.lora import LoraConfig, prepare_trainable
from dpalign.models.pairs import collate, encode_pairs
from dpalign.privacy.per_pair import per_pair_grads
from dpalign.train.reference import compute_reference

ATOL = 1e-10
N_PAIRS = 4


@pytest.fixture(scope="module")
def text_records(text_pool: Path) -> list[PreferenceRecord]:
    return read_preference_jsonl(text_pool)[:N_PAIRS]


def _loaded(folder: Path) -> LoadedModel:
    loaded = load_model(folder)
    loaded.model.double()
    return loaded


def _pad(loaded: LoadedModel) -> int:
    return int(loaded.processor.tokenizer.pad_token_id)


def test_load_gives_the_causal_lm_and_its_tokenizer(tiny_text_model: Path) -> None:
    loaded = load_model(tiny_text_model)
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert isinstance(loaded.processor, TextProcessor)
    assert family_of(loaded.model) is TEXT
    assert not loaded.model.training


def test_prompt_is_the_chat_template_of_the_text(tiny_text_model: Path,
                                                 text_records: list[PreferenceRecord]) -> None:
    """A text-only prompt is the tokenizer's chat template over the prompt text, the
    response its tokens + eos; no image placeholder anywhere."""
    loaded = load_model(tiny_text_model)
    tok = loaded.processor.tokenizer
    pair = encode_pairs(text_records[:1], loaded.processor)[0]
    record = text_records[0]
    expected = tok(f"<|user|>{record.prompt}<|end|><|assistant|>")["input_ids"]
    assert pair.prompt == expected
    assert pair.chosen == [*tok(record.chosen, add_special_tokens=False)["input_ids"],
                           tok.eos_token_id]
    assert len(pair.images) == 0
    assert tok.convert_tokens_to_ids("<image>") not in pair.prompt


def _row_logps(model: nn.Module, ids: list[int], n_response: int) -> torch.Tensor:
    """log p(response | prompt) of one unpadded row, from the logits of a plain forward."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:])
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked[-n_response:].sum()


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_equal_each_row_alone(tiny_text_model: Path,
                                             text_records: list[PreferenceRecord],
                                             side: str) -> None:
    """Padded batch (either side) == each row's own forward; float64, so the batch layout
    moves the sums only by rounding (1e-9 absolute on sums of ~30)."""
    loaded = _loaded(tiny_text_model)
    pairs = encode_pairs(text_records, loaded.processor)
    batch = collate(pairs, _pad(loaded), side=side)
    assert len({int(m.sum()) for m in batch.tokens.attention_mask}) > 1  # really padded
    with torch.no_grad():
        got = sequence_logps(loaded.model, batch.tokens, batch.images, batch.images_per_row)
        expected = torch.stack(
            [_row_logps(loaded.model, p.prompt + r, len(r))
             for r, p in [(p.chosen, p) for p in pairs] + [(p.rejected, p) for p in pairs]])
    torch.testing.assert_close(got.total, expected, atol=1e-9, rtol=0)
    counts = (batch.tokens.labels != IGNORE).sum(dim=1).double()
    torch.testing.assert_close(got.tokens, counts)


@pytest.mark.parametrize("engine", ["hooks", "loop"])
def test_per_pair_grads_equal_one_at_a_time(tiny_text_model: Path,
                                            text_records: list[PreferenceRecord],
                                            engine: str) -> None:
    """LoRA on the whole causal LM (the TEXT family's scope): each pair's gradient of its
    own DPO loss from the engine equals that pair collated alone and differentiated."""
    loaded = _loaded(tiny_text_model)
    pairs = encode_pairs(text_records, loaded.processor)
    pad = _pad(loaded)
    ref = compute_reference(loaded.model, pairs, pad, with_corrupt=False)
    model = prepare_trainable(loaded.model, LoraConfig()).double().train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    assert any(".layers.0.self_attn.q_proj." in n for n in params)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    objective = Objective.from_config(LossConfig(name="dpo", beta=0.5))
    got, out = per_pair_grads(model, collate(pairs, pad), ref, objective, params=params,
                              engine=engine)
    for i, pair in enumerate(pairs):
        loss = objective(pair_logps(model, collate([pair], pad)),
                         ref.index(slice(i, i + 1))).per_example.sum()
        expected = torch.autograd.grad(loss, list(params.values()))
        for (name, g), e in zip(got.items(), expected, strict=True):
            torch.testing.assert_close(g[i], e, atol=ATOL, rtol=0, msg=name)
    assert sum(float(g.abs().max()) > 0 for g in got.values()) > len(got) // 2
    with torch.no_grad():
        plain = objective(pair_logps(model, collate(pairs, pad)), ref)
    torch.testing.assert_close(out.per_example, plain.per_example, atol=ATOL, rtol=0)


def test_text_model_refuses_images(tiny_text_model: Path, small_world: Path) -> None:
    """A record with an image given to a text-only model fails naming the cause."""
    from dpalign.world.load import World

    loaded = load_model(tiny_text_model)
    record = read_preference_jsonl(World.load(small_world).pool_file)[0]
    with pytest.raises(ValueError, match="text-only model was given"):
        encode_pairs([record], loaded.processor)


def test_empty_image_inputs_batch_and_select() -> None:
    empty = ImageInputs.empty()
    assert len(empty) == 0
    assert len(ImageInputs.cat([empty, empty])) == 0
    assert len(empty.select([])) == 0
