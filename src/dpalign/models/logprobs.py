"""Sequence log-probs of responses under any transformers VLM (response tokens only).

Rows are (images, templated prompt, response) token sequences padded left or right; the
position ids are rebuilt from the attention mask so that padding on either side gives the
same log-probs as each row alone. Before the forward pass the number of image placeholder
tokens in every row is checked against what the vision tower produces, so a mismatched
processor fails with a message that names the row instead of deep inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpalign.models.encode import IGNORE, TokenBatch
from dpalign.models.families import ImageInputs, family_of


class ImageTokenMismatchError(ValueError):
    """A row's ``<image>`` placeholder count differs from the image features it needs."""


@dataclass(frozen=True)
class SequenceLogps:
    """total: (N,) summed log-probs of the response tokens; tokens: (N,) their count."""

    total: Tensor
    tokens: Tensor

    @property
    def mean(self) -> Tensor:
        """(N,) per-token mean log-prob."""
        return self.total / self.tokens.clamp(min=1)


def image_token_id(model: torch.nn.Module) -> int:
    """The placeholder token id of a LLaVA-style model config."""
    token = placeholder_id(model)
    if token is None:
        raise ValueError(f"{type(model).__name__}: config has no image_token_id")
    return token


def placeholder_id(model: torch.nn.Module) -> int | None:
    """The image placeholder token id of the model's config; None for a text-only model."""
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def image_tokens(model: torch.nn.Module, pixel_values: Tensor) -> Tensor:
    """The language-model inputs the images become: (N, C, H, W) -> (N, P, D), P tokens per
    image (``get_image_features`` returns a tensor, a per-image tuple or an output object
    across transformers versions and models; all are stacked here)."""
    features = model.get_image_features(pixel_values=pixel_values)
    features = getattr(features, "pooler_output", features)
    if isinstance(features, (list, tuple)):
        features = torch.stack(list(features))
    return features.reshape(len(pixel_values), -1, features.shape[-1])


def check_image_tokens(input_ids: Tensor, images_per_row: Tensor, token_id: int,
                       per_image: int | Tensor) -> None:
    """Raise ``ImageTokenMismatchError`` naming the first row whose placeholder count is not
    the feature count of its images. input_ids: (N, L); images_per_row: (N,); per_image: the
    features of each image, (I,) in row order, or one int for all."""
    found = (input_ids.cpu() == token_id).sum(dim=1)
    if isinstance(per_image, int):
        per_image = torch.full((int(images_per_row.sum()),), per_image, dtype=torch.long)
    rows = torch.arange(len(images_per_row)).repeat_interleave(images_per_row)
    expected = torch.zeros_like(found).index_add_(0, rows, per_image.to(found.dtype))
    bad = (found != expected).nonzero().flatten()
    if len(bad):
        row = int(bad[0])
        raise ImageTokenMismatchError(
            f"row {row}: {int(found[row])} image tokens in the prompt but its "
            f"{int(images_per_row[row])} image(s) give {int(expected[row])} features; "
            "the processor does not match the model")


def position_ids(attention_mask: Tensor) -> Tensor:
    """(N, L) positions counting only attended tokens, so left padding starts at 0."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def token_logps(logits: Tensor, labels: Tensor) -> SequenceLogps:
    """Sum and count of log p(label_t | <t) over positions where labels != IGNORE.

    logits: (N, L, V) for inputs of length L; labels: (N, L) aligned with the inputs."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    # at least float32 (bf16 logits lose the log-prob's low bits), float64 kept as is
    logp = torch.log_softmax(
        logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return SequenceLogps((picked * mask).sum(dim=1), mask.sum(dim=1).to(picked.dtype))


def logits_needed(labels: Tensor) -> int:
    """How many trailing positions' logits ``token_logps`` needs for labels (N, L): from the
    one before the first labelled token of any row to the end (at least 1). Asking the model
    for only these (``logits_to_keep``) spares the (N, L, V) logits of the image and prompt
    tokens, most of a VLM's sequence and, with a large vocabulary, most of its memory."""
    labelled = (labels[:, 1:] != IGNORE).any(dim=0).nonzero()
    first = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
    return labels.shape[1] - first


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are."""
    return next(model.parameters()).device


def as_images(images: ImageInputs | Tensor) -> ImageInputs:
    """``ImageInputs`` as is; a bare (I, C, H, W) ``pixel_values`` tensor (LLaVA-1.5) wrapped."""
    if isinstance(images, ImageInputs):
        return images
    return ImageInputs({"pixel_values": images},
                       {"pixel_values": torch.ones(len(images), dtype=torch.long)})


def forward_inputs(model: torch.nn.Module, batch: TokenBatch,
                   images: ImageInputs) -> dict[str, Tensor]:
    """The keyword arguments of ``model(...)`` for these rows and images, on the model's
    device (floating image tensors in the model's dtype), as the model's family wants them."""
    family = family_of(model)
    device = model_device(model)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    inputs = {"input_ids": ids, "attention_mask": mask, **family.row_inputs(ids, model)}
    if family.position_ids:
        inputs["position_ids"] = position_ids(mask)
    return inputs | images.to(device, model.dtype).tensors


def sequence_logps(model: torch.nn.Module, batch: TokenBatch, images: ImageInputs | Tensor,
                   images_per_row: Tensor | None = None) -> SequenceLogps:
    """Response log-probs of each row, on the model's device. images: the rows' images in
    row order (``ImageInputs``, or a LLaVA (I, C, H, W) pixel tensor); images_per_row: (N,)
    (default one each). Text-only rows have no images (``ImageInputs.empty()``, counts 0);
    a text-only model (no image placeholder in its config) takes only such rows."""
    images = as_images(images)
    n = batch.input_ids.shape[0]
    counts = images_per_row if images_per_row is not None else torch.ones(n, dtype=torch.long)
    token = placeholder_id(model)
    if token is not None:
        per_image = features_per_image(model, images) if len(images) else 0
        check_image_tokens(batch.input_ids, counts, token, per_image)
    elif len(images):
        raise ValueError(f"{type(model).__name__} is a text-only model but the rows have "
                         f"{len(images)} image(s)")
    keep = logits_needed(batch.labels)
    out = model(**forward_inputs(model, batch, images), logits_to_keep=keep)
    return token_logps(out.logits, batch.labels[:, -keep:].to(out.logits.device))


def count_features(features: object) -> int:
    """How many language-model tokens ``get_image_features`` returned, whatever its form
    (a tensor (..., D), a per-image tuple/list, or an output object with pooler_output)."""
    features = getattr(features, "pooler_output", features)
    if isinstance(features, (list, tuple)):
        return sum(count_features(f) for f in features)
    return features.numel() // features.shape[-1]  # type: ignore[union-attr]


def _image_key(images: ImageInputs) -> tuple[object, ...]:
    return tuple((k, tuple(t.shape), tuple(t.flatten().tolist()) if not t.is_floating_point()
                  and t.numel() <= 16 else None) for k, t in images.tensors.items())


def features_per_image(model: torch.nn.Module, images: ImageInputs) -> Tensor:
    """(I,) image-feature tokens each image becomes, from ``model.get_image_features`` run
    once per distinct input shape (cached on the model; no gradient)."""
    cache: dict[tuple[object, ...], int] = model.__dict__.setdefault("_dpalign_image_tokens", {})
    counts = []
    for i in range(len(images)):
        one = images.select([i])
        key = _image_key(one)
        if key not in cache:
            with torch.no_grad():
                moved = one.to(model_device(model), model.dtype).tensors
                cache[key] = count_features(model.get_image_features(**moved))
        counts.append(cache[key])
    return torch.tensor(counts, dtype=torch.long)
