"""Load a model and its processor from a local folder through the transformers Auto classes:
a VLM (``AutoModelForImageTextToText``) with its processor, or a text-only causal LM
(``AutoModelForCausalLM``, any config without a vision config) with its tokenizer behind
``families.TextProcessor``.

Weights load from safetensors only; remote code is never trusted unless the caller says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
    ProcessorMixin,
)

from dpalign.models.families import TextProcessor, family_of, is_text_only


class ModelFolderError(FileNotFoundError):
    """The folder is missing or does not hold a transformers model."""


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when one is visible, else the CPU; other names as torch
    spells them (``cpu``, ``cuda``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but torch sees no CUDA GPU")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, else float32; or a name of ``DTYPES``."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    model: PreTrainedModel
    processor: ProcessorMixin | TextProcessor
    path: Path


def check_model_folder(path: str | Path) -> Path:
    """``path`` if it holds a ``config.json`` (a ``save_pretrained`` folder), else a
    ``ModelFolderError`` naming it: checked before any slow work, not only at load time."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path}: no config.json here; pass a folder written by "
                               "`save_pretrained` (e.g. one made by `dpalign pretrain`)")
    return path


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
             trust_remote_code: bool = False) -> LoadedModel:
    """Model (eval mode, on ``device``: a torch name or ``auto``) and processor saved with
    ``save_pretrained`` in ``path``: a VLM, or a causal LM when the config has no vision
    config; the processor is loaded the way the model's family needs (``families``)."""
    path = check_model_folder(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM if is_text_only(config) else AutoModelForImageTextToText
    model = auto.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    processor = family_of(model).load_processor(path, trust_remote_code)
    return LoadedModel(model.to(resolve_device(device)).eval(), processor, path)
