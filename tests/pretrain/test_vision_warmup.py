"""Stage-1 vision warm-up: cell pooling and labels against hand-worked values."""

from __future__ import annotations

import torch

from dpalign.pretrain.vision_warmup import cell_labels, pool_cells
from dpalign.world.vocab import CATEGORY_NAMES, COLOUR_NAMES


def test_pool_cells_means_the_patches_of_each_cell() -> None:
    # 4x4 patches numbered row-major 0..15; 2x2 cells hold patches
    # (0,1,4,5) (2,3,6,7) (8,9,12,13) (10,11,14,15) -> means 2.5, 4.5, 10.5, 12.5.
    features = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    pooled = pool_cells(features, grid=2)
    assert pooled.shape == (1, 4, 1)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_cell_labels_put_category_and_colour_in_their_cells() -> None:
    anns = [{"objects": ["knife", "fork"], "colours": ["red", "cyan"], "cells": [3, 0]}]
    cats, cols = cell_labels(anns, grid=2)
    k, f = CATEGORY_NAMES.index("knife") + 1, CATEGORY_NAMES.index("fork") + 1
    r, c = COLOUR_NAMES.index("red") + 1, COLOUR_NAMES.index("cyan") + 1
    assert cats.tolist() == [[f, 0, 0, k]]
    assert cols.tolist() == [[c, 0, 0, r]]


def test_word_token_ids_are_the_mid_sentence_tokens(tiny_model) -> None:
    """Each category's id is the token the tokenizer gives " <word>" (the form inside
    captions and questions), and every category maps to a distinct token."""
    from dpalign.models.load import load_model
    from dpalign.pretrain.vision_warmup import word_token_ids

    tokenizer = load_model(tiny_model).processor.tokenizer
    ids = word_token_ids(tokenizer, list(CATEGORY_NAMES))
    sentence = tokenizer("Is there a cat in the image?", add_special_tokens=False)["input_ids"]
    assert int(ids[CATEGORY_NAMES.index("cat")]) in sentence
    assert len(set(ids.tolist())) == len(CATEGORY_NAMES)


def _word_hits(model, pixels, cats, cat_ids) -> float:
    """Fraction of present cells whose image token scores its own category word highest
    among the 20 category words."""
    from dpalign.models.logprobs import image_tokens

    with torch.no_grad():
        words = model.get_input_embeddings().weight[cat_ids]  # (20, D)
        scores = image_tokens(model, pixels) @ words.T  # (N, P, 20)
    present = cats != 0
    return float((scores.argmax(-1)[present] == cats[present] - 1).float().mean())


def test_align_projector_puts_image_tokens_next_to_their_words(tiny_model, small_world) -> None:
    """Stage 1b makes each present cell's image token score its own category word above the
    other 19 far more often than before (chance is 1/20), and its loss falls. The session's
    tiny model had only 10 vision warm-up steps, so its tower tells shapes apart poorly and
    the bar is modest: at least 4x chance and +0.1 over the start."""
    from PIL import Image

    from dpalign.io import read_jsonl
    from dpalign.models.encode import pixel_values
    from dpalign.models.load import load_model
    from dpalign.pretrain.vision_warmup import align_projector, word_token_ids
    from dpalign.world.load import World

    torch.manual_seed(0)
    vlm = load_model(tiny_model)
    model, tokenizer = vlm.model, vlm.processor.tokenizer
    world = World.load(small_world)
    anns = read_jsonl(world.pretrain_annotations)[:96]
    folder = world.pretrain_file.parent
    pixels = pixel_values(vlm.processor, [Image.open(folder / a["image"]).convert("RGB")
                                          for a in anns])
    cats, cols = cell_labels(anns, world.grid)
    cat_ids = word_token_ids(tokenizer, list(CATEGORY_NAMES))
    col_ids = word_token_ids(tokenizer, list(COLOUR_NAMES))
    before = _word_hits(model, pixels, cats, cat_ids)
    log = align_projector(model, pixels, cats, cols, cat_ids, col_ids, steps=150,
                          batch_size=32, lr=3e-3, gen=torch.Generator().manual_seed(0))
    after = _word_hits(model, pixels, cats, cat_ids)
    assert log[-1]["align_loss"] < 0.7 * log[0]["align_loss"]
    assert after >= 4 / 20 and after >= before + 0.1, (before, after)
