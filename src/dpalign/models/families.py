"""What differs between VLM families, kept in one registry keyed by ``config.model_type``.

Most of a family's quirks live in its own processor (image-token expansion, chat template,
``pixel_values`` layout), which dpalign always uses. What remains is small:

- image inputs: every tensor an image processor returns (``pixel_values`` and, by family,
  ``image_sizes`` / ``image_grid_thw`` / ``pixel_attention_mask``) is kept per image in an
  ``ImageInputs``, so pairs can be batched, split and moved without knowing the family;
- per-row inputs the forward needs besides the tokens (Qwen2-VL's ``mm_token_type_ids``);
- positions: Llama-style families take position ids rebuilt from the attention mask;
  Qwen2-VL computes its 3-D M-RoPE positions itself (from the mask and the image grid);
- where the language model sits (the default LoRA scope);
- loading the processor: Qwen2-VL's processor also wants a video processor, which needs
  torchvision; without it dpalign loads the image half alone (``ImageQwen2VLProcessor``).

A text-only causal LM (any ``AutoModelForCausalLM``: a config without a vision config) is
one more family, ``TEXT``: its "processor" is its tokenizer behind ``TextProcessor``, which
takes the chat messages and calls dpalign makes of a VLM processor, so the same pair
encoding, log-probs, DP engine and trainer serve it; LoRA targets the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2VLProcessor,
)

# --- image inputs --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInputs:
    """The processed inputs of I images, in order.

    tensors: ``{name: (sum_i units[name][i], *rest)}`` as the image processor returns them,
    concatenated over images (``pixel_values`` (I, C, H, W) for LLaVA-1.5, (I, tiles, C, H, W)
    for LLaVA-NeXT and Idefics3, (patches, D) for Qwen2-VL; ``image_sizes`` (I, 2),
    ``image_grid_thw`` (I, 3), ``pixel_attention_mask`` (I, frames, H, W)).
    units: ``{name: (I,)}`` how many leading entries of each tensor belong to each image.
    """

    tensors: dict[str, Tensor]
    units: dict[str, Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.units.values()))) if self.units else 0

    @staticmethod
    def empty() -> ImageInputs:
        """No images (a text-only row, or a batch of them)."""
        return ImageInputs({}, {})

    @property
    def pixel_values(self) -> Tensor:
        """The ``pixel_values`` tensor (every family has one)."""
        return self.tensors["pixel_values"]

    def select(self, index: Sequence[int] | Tensor) -> ImageInputs:
        """The images at ``index`` (in that order)."""
        index = [int(i) for i in index]
        tensors, units = {}, {}
        for name, t in self.tensors.items():
            counts = self.units[name]
            starts = counts.cumsum(0) - counts
            tensors[name] = torch.cat([t[int(starts[i]):int(starts[i] + counts[i])]
                                       for i in index]) if index else t[:0]
            units[name] = counts[index]
        return ImageInputs(tensors, units)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageInputs:
        """On ``device``; floating tensors also cast to ``dtype`` when given."""
        def move(t: Tensor) -> Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast)
        return ImageInputs({k: move(t) for k, t in self.tensors.items()}, self.units)

    @staticmethod
    def cat(parts: Sequence[ImageInputs]) -> ImageInputs:
        """All images of ``parts`` in order. Trailing dimensions that differ (tiles or frames
        per image) are zero-padded to the largest, as the processors pad a batch; the
        models drop all-zero tiles/frames (and LLaVA-NeXT reads ``image_sizes``). Parts
        without images (text-only rows) add nothing."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return ImageInputs.empty()
        names = parts[0].tensors.keys()
        return ImageInputs({n: _pad_cat([p.tensors[n] for p in parts]) for n in names},
                           {n: torch.cat([p.units[n] for p in parts]) for n in names})


def _pad_cat(tensors: Sequence[Tensor]) -> Tensor:
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            grown = t.new_zeros((t.shape[0], *shape))
            grown[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
            t = grown
        padded.append(t)
    return torch.cat(padded)


def process_images(processor: ProcessorMixin, images: Sequence[Image.Image]) -> ImageInputs:
    """Each image through the processor's image processor on its own, so every tensor's
    leading entries can be attributed to their image (no images: ``ImageInputs.empty()``)."""
    parts = []
    for image in images:
        out = processor.image_processor(images=[image], return_tensors="pt")  # type: ignore[attr-defined]
        tensors = {k: v for k, v in out.items() if isinstance(v, Tensor)}
        parts.append(ImageInputs(tensors, {k: torch.tensor([len(v)]) for k, v in tensors.items()}))
    return ImageInputs.cat(parts)


# --- processors ----------------------------------------------------------------------------


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (which needs torchvision, absent on
    CPU-only machines); images and text behave exactly as in ``Qwen2VLProcessor``."""

    def __init__(self, image_processor: object = None, tokenizer: object = None,
                 chat_template: str | None = None, **kwargs: object) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)  # type: ignore[attr-defined]
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)  # type: ignore[attr-defined]
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class TextProcessor:
    """A text-only model's tokenizer in the shape dpalign uses a VLM processor in.

    ``apply_chat_template`` takes the same messages (list content with image and text parts;
    image parts must be absent) and renders them with the tokenizer's chat template, the
    content flattened to its text, as text LLM templates expect; a tokenizer without a chat
    template gets the prompt text as is (TRL's "standard" prompt + completion layout).
    ``__call__(text=...)`` tokenises as a processor does (special tokens added as the
    tokenizer adds them); ``save_pretrained`` saves the tokenizer. A tokenizer without a pad
    token pads with its eos token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: Path | str, trust_remote_code: bool = False) -> TextProcessor:
        return cls(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))

    def apply_chat_template(self, messages: list[dict[str, object]], *,
                            add_generation_prompt: bool = False, tokenize: bool = False,
                            **kwargs: object) -> str:
        flat = [{**m, "content": _text_of(m["content"])} for m in messages]
        if self.tokenizer.chat_template is None:
            return "\n".join(str(m["content"]) for m in flat)
        return self.tokenizer.apply_chat_template(  # type: ignore[return-value]
            flat, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kwargs)

    def __call__(self, text: Sequence[str] | str, images: object = None,
                 **kwargs: object) -> BatchEncoding:
        if images:
            raise ValueError("a text-only model was given images; its records must have "
                             "no 'images'")
        return self.tokenizer(text, **kwargs)

    def save_pretrained(self, path: Path | str) -> None:
        self.tokenizer.save_pretrained(path)


def _text_of(content: object) -> str:
    """Message content as plain text: a string as is, list content's text parts joined;
    an image part is an error (a text model cannot take it)."""
    if isinstance(content, str):
        return content
    parts = list(content)  # type: ignore[call-overload]
    if any(part.get("type") == "image" for part in parts):
        raise ValueError("a text-only model was given an image; its records must have no "
                         "'images'")
    return "".join(str(part.get("text", "")) for part in parts)


def text_processor(path: Path, trust_remote_code: bool) -> TextProcessor:
    return TextProcessor.from_pretrained(path, trust_remote_code)


def is_text_only(config: PretrainedConfig) -> bool:
    """True for a causal LM's config (no vision config: not a VLM)."""
    return getattr(config, "vision_config", None) is None


class ProcessorLoadError(ValueError):
    """The folder's processor could not be loaded as an image-text processor."""


def auto_processor(path: Path, trust_remote_code: bool) -> ProcessorMixin:
    """``AutoProcessor``, checked to be an image-text processor (it silently returns a bare
    tokenizer when a sub-processor cannot be built)."""
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not hasattr(processor, "image_processor"):
        raise ProcessorLoadError(
            f"{path}: AutoProcessor gave a {type(processor).__name__}, not an image-text "
            "processor; the folder needs processor_config.json (or preprocessor_config.json) "
            "from the model's processor.save_pretrained")
    return processor


def qwen2_vl_processor(path: Path, trust_remote_code: bool) -> ProcessorMixin:
    """The full processor when torchvision is installed, else its image half."""
    try:
        return auto_processor(path, trust_remote_code)
    except (ProcessorLoadError, ImportError, ValueError, AttributeError):
        return ImageQwen2VLProcessor.from_pretrained(path)


# --- families ------------------------------------------------------------------------------

RowInputs = Callable[[Tensor, torch.nn.Module], dict[str, Tensor]]


def no_row_inputs(input_ids: Tensor, model: torch.nn.Module) -> dict[str, Tensor]:
    return {}


def mm_token_types(input_ids: Tensor, model: torch.nn.Module) -> dict[str, Tensor]:
    """Qwen2-VL: (N, L) 1 on image placeholder tokens, 0 elsewhere (feeds M-RoPE)."""
    return {"mm_token_type_ids": (input_ids == model.config.image_token_id).int()}


@dataclass(frozen=True)
class Family:
    """How dpalign drives one VLM family (see the module doc)."""

    name: str
    lm_scope: str = "language_model"
    position_ids: bool = True
    row_inputs: RowInputs = no_row_inputs
    load_processor: Callable[[Path, bool], ProcessorMixin] = auto_processor
    model_types: tuple[str, ...] = field(default=())


LLAVA = Family("llava", model_types=("llava", "llava_next", "llava_onevision"))
QWEN2_VL = Family("qwen2_vl", position_ids=False, row_inputs=mm_token_types,
                  load_processor=qwen2_vl_processor, model_types=("qwen2_vl", "qwen2_5_vl"))
IDEFICS3 = Family("idefics3", lm_scope="text_model", model_types=("idefics3", "smolvlm"))
TEXT = Family("text", lm_scope="", load_processor=text_processor)
FAMILIES: dict[str, Family] = {t: f for f in (LLAVA, QWEN2_VL, IDEFICS3) for t in f.model_types}


def family_of(model_or_type: torch.nn.Module | str) -> Family:
    """The family of a model (or of a ``config.model_type``): a registered VLM family,
    ``TEXT`` for a model whose config has no vision config, else LLaVA-like."""
    if isinstance(model_or_type, str):
        return FAMILIES.get(model_or_type, LLAVA)
    config = getattr(model_or_type, "config", None)
    kind = getattr(config, "model_type", "")
    if kind not in FAMILIES and config is not None and is_text_only(config):
        return TEXT
    return FAMILIES.get(kind, LLAVA)
