"""LoRA adapters through peft, or full fine-tuning, as the config (``LoraConfig``) says."""

from __future__ import annotations

import re
import warnings

import peft
import torch
from pydantic import Field

from dpalign.config import Section
from dpalign.models.families import family_of


class LoraConfig(Section):
    """LoRA adapters (peft) on the language model's ``target_modules``, or full fine-tuning
    when ``enabled`` is false."""

    enabled: bool = Field(True, description="train LoRA adapters (peft); off = full "
                                            "fine-tuning of every parameter")
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16, gt=0, description="LoRA alpha: the adapters' update is scaled by "
                                               "alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input "
                                                        "(peft lora_dropout)")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                              "o_proj"],
                                      description="names of the modules given adapters (the "
                                                  "last part of a module's path), under scope")
    scope: str | None = Field(
        None, description="only modules whose path contains this; '' = anywhere; unset = "
                          "the model family's language model (language_model, text_model)")


def target_pattern(cfg: LoraConfig, scope: str | None = None) -> str:
    """A peft ``target_modules`` regex: modules named in the list, under ``scope`` if set
    (``scope`` defaults to ``cfg.scope``)."""
    names = "|".join(re.escape(m) for m in cfg.target_modules)
    where = cfg.scope if scope is None else scope
    scope = f".*{re.escape(where)}" if where else ""
    return rf"{scope}.*\.({names})$" if scope else rf"(.*\.)?({names})$"


def prepare_trainable(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """A peft model with fresh adapters (B = 0, so it equals ``model`` at step 0), or
    ``model`` itself with every parameter trainable when LoRA is disabled."""
    if not cfg.enabled:
        model.requires_grad_(True)
        return model
    scope = family_of(model).lm_scope if cfg.scope is None else cfg.scope
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=target_pattern(cfg, scope), bias="none")
    try:
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules {cfg.target_modules} (scope "
                         f"{scope!r}) match no module of the model: {exc}") from exc


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with adapters merged in (itself if no adapters)."""
    return model.merge_and_unload() if isinstance(model, peft.PeftModel) else model
