"""Segmentation targets: the value rule of a mask of class ids, its instances, and the 2015 U-Net weight map of
each item (``WeightMaps``). ``data`` reads the mask files and builds the datasets with these; this module reads
no file and knows no dataset, so it imports nothing of ``data``.

A segmentation mask is gray (or RGB with equal channels): values a subset of {0, 255} are a binary mask, read as
0/1; any other values must be the integer class ids 0..K-1 of a K-class model (``model.out_channels``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from . import cells


def _binary(values: np.ndarray) -> bool:
    """Whether a mask's (unique) values are those of a binary mask saved as 0/255 (or all 0, or all 255)."""
    return bool(np.isin(values, (0, 255)).all())


def class_values_problem(gray: np.ndarray, classes: int, name: str) -> str | None:
    """Why the (H, W) values of the mask ``name`` are not class ids of a ``classes``-class model, or None."""
    values = np.unique(gray)
    if _binary(values):
        return None
    fix = f"ids must be 0..{classes - 1}, or 0/255 for a binary mask"
    odd = values[(values < 0) | (values % 1 != 0)]
    if odd.size:
        return f"{name} has value {odd[0]:g}, which is not a class id; {fix}"
    big = values[values >= classes]
    if big.size:
        return f"{name} has class id {big[0]:g}, but the model has {classes} classes (model.out_channels); {fix}"
    return None


def class_ids(gray: np.ndarray) -> np.ndarray:
    """A checked (H, W) mask (``class_values_problem``) -> (H, W) int64 class ids: 0/255 read as 0/1."""
    return (gray > 0 if _binary(np.unique(gray)) else gray).astype(np.int64)


def instances(ids: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W) int32 instance ids, what ``cells.weight_map`` takes: the 4-connected components
    of each foreground class (ids != 0), numbered 1..n across the classes; 0 is background. Two touching objects
    of one class are one instance (a mask of class ids cannot tell them apart)."""
    out = np.zeros(ids.shape, np.int32)
    n = 0
    for c in np.unique(ids[ids != 0]):
        labels, count = ndimage.label(ids == c, cells.FOUR)
        out[labels > 0] = labels[labels > 0] + n
        n += count
    return out


class WeightMaps:
    """The U-Net paper's loss weight (``cells.weight_map``) of each item's mask, kept per item index once computed:
    the items are deterministic and the distance transforms cost more than reading the files. A dataset that drops
    items calls ``clear`` (its indices change)."""

    def __init__(self, w0: float, sigma: float):
        self.w0, self.sigma, self.cache = w0, sigma, {}

    def __call__(self, i: int, mask: torch.Tensor) -> torch.Tensor:
        """(1, H, W) class ids of item ``i`` -> its (1, H, W) float32 weight map."""
        if i not in self.cache:
            weight = cells.weight_map(instances(mask[0].numpy()), self.w0, self.sigma)
            self.cache[i] = torch.from_numpy(weight)[None]
        return self.cache[i]

    def clear(self) -> None:
        self.cache.clear()
