"""Segmentation targets, of real masks and the procedural cells alike: the value rule of a mask of class ids, its
instances, the 2015 U-Net loss weight (``weight_map``; of each item, cached: ``WeightMaps``), the one-pixel borders
that part touching cells (``carve_borders``) and the object count that checks them (``count_objects``).
``folders`` reads the mask files and ``cells`` draws its masks with these; this module reads no file and knows no
dataset, so it imports nothing of ``data``.

A segmentation mask is gray (or RGB with equal channels): values a subset of {0, 255} are a binary mask, read as
0/1; any other values must be the integer class ids 0..K-1 of a K-class model (``model.out_channels``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

FOUR = ndimage.generate_binary_structure(2, 1)     # 4-connectivity: the cross


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
    """(H, W) class ids -> (H, W) int32 instance ids, what ``weight_map`` takes: the 4-connected components
    of each foreground class (ids != 0), numbered 1..n across the classes; 0 is background. Two touching objects
    of one class are one instance (a mask of class ids cannot tell them apart)."""
    out = np.zeros(ids.shape, np.int32)
    n = 0
    for c in np.unique(ids[ids != 0]):
        labels, count = ndimage.label(ids == c, FOUR)
        out[labels > 0] = labels[labels > 0] + n
        n += count
    return out


def weight_map(instances: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The U-Net paper's loss weight: w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / (2 sigma^2)).

    d1, d2: Euclidean distances to the nearest and second-nearest cell, the border term on background pixels
    only (as in the paper: it up-weights the thin gaps between touching cells). Each cell's distance transform
    runs in its bounding box grown by 5 sigma: beyond that the term is below w0 exp(-12.5) ~ 4e-6 w0 and is
    taken as 0. w_c balances the classes: w_c = 1 / (K f_k) for a pixel of class k (foreground / background),
    f_k the class's pixel fraction and K the number of classes present, so the mean of w_c over the image is 1.
    instances: (H, W) int, 0 background, >0 cell ids. Returns (H, W) float32.
    """
    fg = instances > 0
    f = fg.mean()
    k = 2 if 0 < f < 1 else 1
    w_c = np.where(fg, 1 / (k * f) if f > 0 else 1.0, 1 / (k * (1 - f)) if f < 1 else 1.0)

    margin = math.ceil(5 * sigma)
    d1 = np.full(instances.shape, np.inf)
    d2 = np.full(instances.shape, np.inf)
    for i, obj in enumerate(ndimage.find_objects(instances), start=1):
        if obj is None:
            continue
        box = tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in obj)
        d = ndimage.distance_transform_edt(instances[box] != i)
        b1, b2 = d1[box], d2[box]                       # views: updated in place
        b2[...] = np.where(d < b1, b1, np.minimum(b2, d))
        b1[...] = np.minimum(b1, d)
    border = w0 * np.exp(-np.square(d1 + d2) / (2 * sigma ** 2))     # exp(-inf) = 0 where fewer than 2 cells
    return (w_c + np.where(fg, 0.0, border)).astype(np.float32)


def carve_borders(instances: np.ndarray) -> np.ndarray:
    """The instance map with a one-pixel background border between touching cells: each pixel with a 4-neighbour
    of a lower non-zero id is set to 0. The masks the U-Net paper trained on (ISBI) draw these borders; without
    them touching cells are one blob in a binary mask, which no loss could teach the network to split."""
    carved = instances.copy()
    for axis in (0, 1):
        n = instances.shape[axis]
        first, second = (np.take(instances, range(0, n - 1), axis), np.take(instances, range(1, n), axis))
        touch = (first > 0) & (second > 0) & (first != second)
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        carved[tuple(hi)][touch & (second > first)] = 0          # the higher id of the two gives the pixel up
        carved[tuple(lo)][touch & (first > second)] = 0
    return carved


def count_objects(binary_mask: np.ndarray) -> int:
    """Connected components of a binary mask (any dimensionality), face connectivity (4 in 2D, 6 in 3D): cells
    touching only at a corner count as two, so a predicted one-pixel gap between touching cells separates them."""
    mask = np.asarray(binary_mask) > 0
    return int(ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, 1))[1])


class WeightMaps:
    """The U-Net paper's loss weight (``weight_map``) of each item's mask, kept per item index once computed:
    the items are deterministic and the distance transforms cost more than reading the files. A dataset that drops
    items calls ``clear`` (its indices change)."""

    def __init__(self, w0: float, sigma: float):
        self.w0, self.sigma, self.cache = w0, sigma, {}

    def __call__(self, i: int, mask: torch.Tensor) -> torch.Tensor:
        """(1, H, W) class ids of item ``i`` -> its (1, H, W) float32 weight map."""
        if i not in self.cache:
            weight = weight_map(instances(mask[0].numpy()), self.w0, self.sigma)
            self.cache[i] = torch.from_numpy(weight)[None]
        return self.cache[i]

    def clear(self) -> None:
        self.cache.clear()
