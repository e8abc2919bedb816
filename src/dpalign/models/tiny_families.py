"""Tiny, randomly initialised models of the public VLM families, built offline.

Each builder makes a real transformers model class of its family (LLaVA-1.5, LLaVA-NeXT,
Qwen2-VL, Idefics3/SmolVLM) at toy size, with a locally trained byte-level BPE tokenizer that
carries the family's special tokens, a chat template laid out like the family's published one,
and the family's own processor. Saved with ``save_pretrained`` and loaded back with the Auto
classes, they exercise the same loading path, processor quirks (image-token expansion,
``pixel_values`` shapes, ``image_sizes`` / ``image_grid_thw`` / ``pixel_attention_mask``) and
forward signatures as the full-size checkpoints, in seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from dpalign.models.families import ImageQwen2VLProcessor
from dpalign.models.tiny import CLIP_MEAN, CLIP_STD, BuiltModel, TinyVLMConfig, build_tiny
from dpalign.models.tokenizer import train_tokenizer

# Chat templates laid out like each family's published one; every one accepts list content
# ({"type": "image"} / {"type": "text"}) and ends the generation prompt where the answer starts.
LLAVA_NEXT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST] ' }}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endfor -%}{{ ' [/INST]' }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{{ ' ' + part['text'] }}{%- endfor -%}{{ '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
)
QWEN2_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}:"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


@dataclass(frozen=True)
class TinySizes:
    """Toy sizes shared by the families (the LM is a small Llama/Qwen2 stack)."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    vocab_size: int = 600


def _tokenizer(texts: Iterable[str], sizes: TinySizes, specials: Sequence[str], *, eos: str,
               pad: str, image: str, template: str) -> PreTrainedTokenizerFast:
    return train_tokenizer(texts, vocab_size=sizes.vocab_size, special_tokens=specials,
                           eos=eos, pad=pad, image=image, chat_template=template)


def _llama(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)


def _clip(sizes: TinySizes) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=2 * sizes.vision_hidden,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
        image_size=sizes.image_size, patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden)


def _finish(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def build_llava(texts: Iterable[str], seed: int = 0, sizes: TinySizes = TinySizes()) -> BuiltModel:
    """LLaVA-1.5 layout: the project's ``tiny`` preset at these sizes (CLIP + Llama)."""
    return build_tiny(texts, TinyVLMConfig(
        image_size=sizes.image_size, patch_size=sizes.patch_size, vision_hidden=sizes.vision_hidden,
        vision_layers=sizes.layers, vision_heads=sizes.heads, text_hidden=sizes.hidden,
        text_layers=sizes.layers, text_heads=sizes.heads, text_intermediate=sizes.intermediate,
        vocab_size=sizes.vocab_size), seed)


def build_llava_next(texts: Iterable[str], seed: int = 0,
                     sizes: TinySizes = TinySizes()) -> BuiltModel:
    """LLaVA-NeXT (1.6): any-resolution tiles (``image_sizes``), ``[INST]`` template."""
    tokenizer = _tokenizer(texts, sizes, ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                           eos="</s>", pad="<pad>", image="<image>", template=LLAVA_NEXT_TEMPLATE)
    s = sizes.image_size
    config = LlavaNextConfig(
        vision_config=_clip(sizes), text_config=_llama(tokenizer, sizes),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    _finish(model, tokenizer)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s},
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_TEMPLATE, image_token="<image>")
    return BuiltModel(model, processor)


def build_qwen2_vl(texts: Iterable[str], seed: int = 0,
                   sizes: TinySizes = TinySizes()) -> BuiltModel:
    """Qwen2-VL: native-resolution patches (``image_grid_thw``), M-RoPE, ChatML template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(texts, sizes, specials, eos="<|im_end|>", pad="<|endoftext|>",
                           image="<|image_pad|>", template=QWEN2_VL_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = sizes.hidden // sizes.heads
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": sizes.hidden,
            "intermediate_size": sizes.intermediate, "num_hidden_layers": sizes.layers,
            "num_attention_heads": sizes.heads, "num_key_value_heads": sizes.heads,
            "max_position_embeddings": 512, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}},
        vision_config={"depth": sizes.layers, "embed_dim": sizes.vision_hidden,
                       "hidden_size": sizes.hidden, "num_heads": sizes.heads,
                       "patch_size": sizes.patch_size // 2, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    _finish(model, tokenizer)
    patch = sizes.patch_size // 2
    pixels = sizes.image_size * sizes.image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": pixels, "longest_edge": 4 * pixels},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = ImageQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=QWEN2_VL_TEMPLATE)
    return BuiltModel(model, processor)


def build_idefics3(texts: Iterable[str], seed: int = 0,
                   sizes: TinySizes = TinySizes()) -> BuiltModel:
    """Idefics3 / SmolVLM: SigLIP-style tower, pixel-shuffle connector,
    ``pixel_attention_mask``, ``<fake_token_around_image><global-img><image>...`` prompts."""
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<pad>",
                "<fake_token_around_image>", "<image>", "<global-img>"]
    tokenizer = _tokenizer(texts, sizes, specials, eos="<end_of_utterance>", pad="<pad>",
                           image="<image>", template=IDEFICS3_TEMPLATE)
    scale = 2
    vision = Idefics3VisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=2 * sizes.vision_hidden,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
        image_size=sizes.image_size, patch_size=sizes.patch_size)
    config = Idefics3Config(
        vision_config=vision, text_config=_llama(tokenizer, sizes).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    _finish(model, tokenizer)
    s = sizes.image_size
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": s}, max_image_size={"longest_edge": s},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    seq_len = (s // sizes.patch_size) ** 2 // scale ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE)
    return BuiltModel(model, processor)


FamilyBuilder = Callable[..., BuiltModel]
TINY_FAMILIES: dict[str, FamilyBuilder] = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "qwen2_vl": build_qwen2_vl,
    "idefics3": build_idefics3,
}
