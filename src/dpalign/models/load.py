"""Load a VLM and its processor from a local folder through the transformers Auto classes.

Weights load from safetensors only; remote code is never trusted unless the caller says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin


class ModelFolderError(FileNotFoundError):
    """The folder is missing or does not hold a transformers model."""


@dataclass
class LoadedVLM:
    model: PreTrainedModel
    processor: ProcessorMixin
    path: Path


def load_vlm(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
             trust_remote_code: bool = False) -> LoadedVLM:
    """Model (eval mode) and processor saved with ``save_pretrained`` in ``path``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path}: no config.json here; pass a folder written by "
                               "`save_pretrained` (e.g. one made by `dpalign pretrain`)")
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LoadedVLM(model.to(device).eval(), processor, path)
