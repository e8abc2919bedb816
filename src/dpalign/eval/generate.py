"""Greedy generation in batches for any VLM loaded with the Auto classes (left padding)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from dpalign.models.encode import PromptEncoder, pad_batch
from dpalign.models.families import process_images
from dpalign.models.logprobs import forward_inputs
from dpalign.progress import progress


@torch.no_grad()
def generate(model: PreTrainedModel, processor: ProcessorMixin, image_paths: Sequence[Path],
             prompts: Sequence[str], *, batch_size: int = 64, max_new_tokens: int = 32,
             description: str = "generate") -> list[str]:
    """Greedy answers, one per (image, prompt), decoded without special tokens."""
    if len(image_paths) != len(prompts):
        raise ValueError(f"{len(image_paths)} images but {len(prompts)} prompts")
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    encode = PromptEncoder(processor)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, description=description, total=len(starts)):
        images = [Image.open(p).convert("RGB") for p in image_paths[start:start + batch_size]]
        ids = [encode(p, sizes=[im.size]) for p, im in zip(prompts[start:start + batch_size],
                                                           images, strict=True)]
        batch = pad_batch(ids, [[] for _ in ids], tokenizer.pad_token_id, side="left")
        inputs = forward_inputs(model, batch, process_images(processor, images))
        inputs.pop("position_ids", None)  # generate() derives positions from the mask
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, batch.input_ids.shape[1]:].cpu()
        answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    model.train(was_training)
    return answers
