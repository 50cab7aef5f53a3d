"""Datasets: the embedded digits, image folders, Hugging Face ``datasets``; one transform to model tensors."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=4)
def digits_arrays(size: int | tuple[int, int] = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package, no download), bicubically
    upsampled: images (N, H, W, 1) uint8 with white strokes on black, labels (N,) int64 in 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.from_numpy(digits.images).float()[:, None] / 16.0                 # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, digits.target.astype(np.int64)
