"""Sampled answers from a VLM, optionally continuing a given answer start with the image's
attention masked (BDHS), for every family dpalign loads.

``sample`` runs transformers' ``generate`` (temperature / top-p sampling, or greedy at
temperature 0) on batches of queries, left-padded. Randomness is seeded per call and batch
(``torch.random.fork_rng``), so the same model, queries and seed give the same answers on one
machine (a resumed online run regenerates a step's answers exactly).

Image masking: each image-token position of the prompt is removed from the attention mask
with probability ``image_mask_rate`` (drawn from a ``torch.Generator`` of its own). The
positions the model uses are those of the *unmasked* prompt, computed by the model's own
``_prepare_position_ids_for_generation`` and handed to ``generate``: left to itself,
``generate`` derives positions from the attention mask, which would move every text token
after a masked image by the number of masked positions (and breaks Qwen2-VL's M-RoPE, which
counts image tokens through the mask). Generated tokens attend to everything unmasked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from pydantic import Field
from torch import Tensor
from transformers import PreTrainedModel, ProcessorMixin

from dpalign.config import Section
from dpalign.models.encode import PromptEncoder, pad_batch
from dpalign.models.families import process_images
from dpalign.models.logprobs import forward_inputs, image_token_id, model_device
from dpalign.progress import progress


class SamplingConfig(Section):
    """How answers are sampled from the policy."""

    temperature: float = Field(1.0, ge=0, description="softmax temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(48, ge=1, description="most tokens per answer")


@dataclass(frozen=True)
class Query:
    """One generation input: absolute image paths, the user prompt, and ``prefix``, the
    start of the assistant's answer that the model continues (empty: a fresh answer)."""

    images: tuple[Path, ...]
    prompt: str
    prefix: str = ""


def mask_image_positions(input_ids: Tensor, attention_mask: Tensor, token_id: int, rate: float,
                         generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The attention mask (N, L) with each position holding ``token_id`` set to 0 with
    probability ``rate`` (independently), and the (N, L) bool tensor of masked positions.
    Other positions (text, padding) are never touched."""
    is_image = input_ids == token_id
    draws = torch.rand(input_ids.shape, generator=generator) < rate
    hit = is_image & draws.to(input_ids.device)
    return attention_mask.masked_fill(hit, 0), hit


def _prefix_ids(processor: ProcessorMixin, prefix: str) -> list[int]:
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    return tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []


def _continuation(processor: ProcessorMixin, prefix: list[int], new: list[int]) -> str:
    """The text ``new`` adds after ``prefix``, decoded together so spacing is right."""
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    start = tokenizer.decode(prefix, skip_special_tokens=True)
    full = tokenizer.decode(prefix + new, skip_special_tokens=True)
    return full[len(start):] if full.startswith(start) else full


@torch.no_grad()
def _sample_batch(model: PreTrainedModel, processor: ProcessorMixin, encode: PromptEncoder,
                  queries: Sequence[Query], n: int, sampling: SamplingConfig, seed: int,
                  image_mask_rate: float, stop: Sequence[str]) -> list[list[str]]:
    """n continuations of each query of one batch."""
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    images = [[Image.open(p).convert("RGB") for p in q.images] for q in queries]
    prefixes = [_prefix_ids(processor, q.prefix) for q in queries]
    ids = [encode(q.prompt, n_images=len(ims), sizes=[im.size for im in ims]) + pre
           for q, ims, pre in zip(queries, images, prefixes, strict=True)]
    batch = pad_batch(ids, [[] for _ in ids], tokenizer.pad_token_id, side="left")
    inputs = forward_inputs(model, batch, process_images(processor, [im for ims in images
                                                                     for im in ims]))
    inputs.pop("position_ids", None)
    positions = model._prepare_position_ids_for_generation(  # the unmasked prompt's
        inputs["input_ids"], dict(inputs))
    if image_mask_rate > 0:
        generator = torch.Generator().manual_seed(seed)
        inputs["attention_mask"], _ = mask_image_positions(
            inputs["input_ids"], inputs["attention_mask"], image_token_id(model),
            image_mask_rate, generator)
    greedy = sampling.temperature == 0
    device = model_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            **inputs, position_ids=positions, max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy, num_return_sequences=1 if greedy else n,
            **({} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "top_k": 0}),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}))
    new = out[:, batch.input_ids.shape[1]:].cpu().repeat_interleave(n if greedy else 1, 0)
    new = new.tolist()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = [_continuation(processor, prefixes[row // n],
                           [t for t in seq if t not in (eos, pad)]) for row, seq in enumerate(new)]
    return [texts[i * n:(i + 1) * n] for i in range(len(queries))]


def sample(model: PreTrainedModel, processor: ProcessorMixin, queries: Sequence[Query], *,
           n: int = 1, sampling: SamplingConfig, seed: int, image_mask_rate: float = 0.0,
           batch_size: int = 16, description: str | None = None,
           stop: Sequence[str] = ()) -> list[list[str]]:
    """``n`` continuations per query: the text generated after its prefix (special tokens
    dropped, not stripped), image-token attention masked with probability
    ``image_mask_rate`` per image position; a continuation also ends once it produces one
    of the ``stop`` strings (kept in the text; tokens past it may follow and are the
    caller's to cut). Batch ``b`` (``batch_size`` queries) is seeded
    with ``seed`` and ``b``, so answers do not depend on how many batches follow. The model
    is put in eval mode for generation (no dropout) and returned to its previous mode."""
    if not 0 <= image_mask_rate <= 1:
        raise ValueError(f"image_mask_rate {image_mask_rate} is not in [0, 1]")
    was_training = model.training
    model.eval()
    encode = PromptEncoder(processor)
    starts = range(0, len(queries), batch_size)
    batches = progress(starts, description=description, total=len(starts)) if description \
        else starts
    answers: list[list[str]] = []
    try:
        for b, start in enumerate(batches):
            answers.extend(_sample_batch(model, processor, encode,
                                         queries[start:start + batch_size], n, sampling,
                                         seed * 100_003 + b, image_mask_rate, stop))
    finally:
        model.train(was_training)
    return answers
