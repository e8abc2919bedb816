"""The ``tiny`` preset, and ``BuiltModel``, what every preset builder returns.

``tiny`` is a real ``LlavaForConditionalGeneration``: a small CLIP vision tower, a LLaVA
projector and a small Llama language model, with a locally trained tokenizer and a
``LlavaProcessor``. It is saved with ``save_pretrained`` and loaded back with the Auto
classes, the same path a real VLM takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from dpalign.models.families import TextProcessor
from dpalign.models.tokenizer import CHAT_TEMPLATE, IMAGE, train_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TinyVLMConfig(BaseModel):
    """Sizes of the tiny LLaVA. Image tokens per image = (image_size / patch_size) ** 2."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(64, ge=16)
    patch_size: int = Field(32, ge=2)
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 384
    max_positions: int = 256
    vocab_size: int = 1024


@dataclass
class BuiltModel:
    """A freshly built model and its processor, ready for ``save_pretrained``; provenance:
    where pretrained parts came from (JSON-able, recorded beside the trained model)."""

    model: PreTrainedModel
    processor: ProcessorMixin
    provenance: dict[str, Any] = field(default_factory=dict)


def _llama_config(cfg: TinyVLMConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def build_tiny_text(texts: Iterable[str], cfg: TinyVLMConfig | None = None,
                    seed: int = 0) -> BuiltModel:
    """The tiny preset's language model alone: a ``LlamaForCausalLM`` (sizes from ``cfg``'s
    text fields) initialised from ``seed``, with a tokenizer trained on ``texts`` and the
    chat template on it; its processor is a ``TextProcessor``. A text-only model for the
    text-LLM path (loads back with ``AutoModelForCausalLM``)."""
    import torch

    cfg = cfg or TinyVLMConfig()
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(cfg, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return BuiltModel(model=model, processor=TextProcessor(tokenizer))  # type: ignore[arg-type]


def build_tiny(texts: Iterable[str], cfg: TinyVLMConfig, seed: int = 0) -> BuiltModel:
    """Tokenizer trained on ``texts``; CLIP-vision + Llama LLaVA initialised from ``seed``."""
    import torch

    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden,
    )
    text = _llama_config(cfg, tokenizer)
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=n_patches,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    # CLIP adds a CLS token that strategy "default" drops: one extra token per image.
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE, num_additional_image_tokens=1,
    )
    return BuiltModel(model=model, processor=processor)
