"""Turn (image, prompt, response) into model inputs with any transformers VLM processor.

The prompt goes through the processor's chat template (list content: one image part, one
text part), so the image placeholder is expanded the way the model expects. The response is
tokenised on its own and ends with the end-of-turn token; padding puts response tokens
where the loss can find them. Shapes: ``B`` examples, ``L`` tokens after padding.
``max_positions`` reads how long a row the model takes (the trainer refuses longer pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PretrainedConfig, ProcessorMixin

IGNORE = -100


def user_message(prompt: str, n_images: int = 1) -> list[dict[str, object]]:
    """A user turn with ``n_images`` image parts followed by the prompt text."""
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def chat_prompt(processor: ProcessorMixin, prompt: str, n_images: int = 1) -> str:
    """The templated prompt text, ending where the assistant's answer starts."""
    return processor.apply_chat_template(  # type: ignore[attr-defined]
        user_message(prompt, n_images), add_generation_prompt=True, tokenize=False
    )


class PromptEncoder:
    """Token ids of templated prompts with image placeholders expanded, cached per prompt and
    image sizes.

    The expansion depends only on image sizes (fixed for LLaVA-1.5, per size for LLaVA-NeXT
    tiles and Qwen2-VL patches), so it is computed once on blank images of those sizes.
    ``image_size`` is the size assumed when a call gives none; ``sizes=[]`` is a prompt
    without images (a text-only pair).
    """

    def __init__(self, processor: ProcessorMixin,
                 image_size: tuple[int, int] | None = None) -> None:
        self.processor = processor
        self.image_size = image_size
        self._cache: dict[tuple[str, tuple[tuple[int, int], ...]], list[int]] = {}

    def __call__(self, prompt: str, n_images: int = 1,
                 sizes: Sequence[tuple[int, int]] | None = None) -> list[int]:
        if sizes is None:
            if self.image_size is None:
                raise ValueError("PromptEncoder: give the images' sizes (no default size)")
            sizes = [self.image_size] * n_images
        key = (prompt, tuple(tuple(s) for s in sizes))
        if key not in self._cache:
            text = chat_prompt(self.processor, prompt, len(sizes))
            blanks = [Image.new("RGB", tuple(s)) for s in sizes]
            images = {"images": [blanks]} if blanks else {}  # a text-only prompt has none
            enc = self.processor(text=[text], **images)  # type: ignore[operator]
            self._cache[key] = list(enc["input_ids"][0])
        return self._cache[key]


def response_ids(processor: ProcessorMixin, response: str) -> list[int]:
    """Token ids of ``response`` followed by the end-of-turn (eos) token."""
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def max_positions(config: PretrainedConfig) -> int | None:
    """The most positions the model's language part takes (``max_position_embeddings`` of the
    text config, or its older names), or None when the config names no limit."""
    text = config.get_text_config()
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class TokenBatch:
    """input_ids, attention_mask, labels: each (B, L); labels are IGNORE off the response."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def pad_batch(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int,
              side: str = "right") -> TokenBatch:
    """Concatenate prompt + response per example and pad to the longest, left or right."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        start = width - len(p) - len(r) if side == "left" else 0
        ids[i, start:start + len(p) + len(r)] = torch.tensor(p + r)
        mask[i, start:start + len(p) + len(r)] = 1
        labels[i, start + len(p):start + len(p) + len(r)] = torch.tensor(r)
    return TokenBatch(ids, mask, labels)


def pixel_values(processor: ProcessorMixin, images: Sequence[Image.Image]) -> torch.Tensor:
    """Processed images, (N, C, H, W) float32."""
    out = processor.image_processor(images=list(images), return_tensors="pt")  # type: ignore[attr-defined]
    return out["pixel_values"]
