"""Stage-1 vision warm-up: cell pooling and labels against hand-worked values."""

from __future__ import annotations

import torch

from dpalign.train.vision_warmup import cell_labels, pool_cells
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
