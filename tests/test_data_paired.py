"""Paired and conditioned data: inpainting masks, paired folders, HF condition columns, the holdout split."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet.data import MASKS, draw_masks


# ------------------------------------------------------------------------------------------ masks

@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("size", [(16, 16), (12, 20), (2, 3)])
def test_masks_are_binary_with_both_values(name, size):
    m = draw_masks(name, 32, size, torch.Generator().manual_seed(0))
    assert m.shape == (32, 1, *size) and m.dtype == torch.float32
    assert ((m == 0) | (m == 1)).all()
    per_image = m.flatten(1)
    assert (per_image.max(1).values == 1).all() and (per_image.min(1).values == 0).all()


@pytest.mark.parametrize("name", list(MASKS))
def test_masks_are_reproducible_from_the_seed_and_vary_between_images(name):
    a = draw_masks(name, 8, (16, 16), torch.Generator().manual_seed(3))
    b = draw_masks(name, 8, (16, 16), torch.Generator().manual_seed(3))
    c = draw_masks(name, 8, (16, 16), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(x.flatten().tolist()) for x in a}) > 1
    # image i uses the stream in order: the first images of a larger batch are the same
    assert torch.equal(draw_masks(name, 3, (16, 16), torch.Generator().manual_seed(3)), a[:3])


def test_mask_coverage_is_in_range():
    g = torch.Generator().manual_seed(0)
    for name, (lo, hi) in {"box": (0.08, 0.65), "stroke": (0.08, 0.7)}.items():
        cover = draw_masks(name, 64, (32, 32), g).mean((1, 2, 3))
        assert lo <= cover.min() and cover.max() <= hi, name
    half = draw_masks("half", 64, (16, 24), g)
    assert (half.sum((1, 2, 3)) == 16 * 24 / 2).all()
    # each of the four halves occurs, and a half is a full half-plane: rows (top/bottom) or columns (left/right)
    sides = {(int(h[0, 0, 0]), int(h[0, -1, -1]), int(h[0, 0, -1])) for h in half}
    assert sides == {(1, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1)}


def test_masks_move_to_the_device_and_unknown_names_list_the_valid_ones():
    assert draw_masks("box", 2, 8, device="meta").device.type == "meta"
    with pytest.raises(ValueError, match=r"unknown data.mask 'boxes'; choose one of 'box', 'stroke', 'half', 'mixed'"):
        draw_masks("boxes", 2, (8, 8))
