"""Memorization: how many samples are near-copies of a training image.

FID rewards a model that replays its training set: on a few hundred images that is what an over-trained model
does, and its FID approaches the training set's own. This measure tells the two apart. Its scale comes from
the data: how far each training image is from its nearest *other* training image. A sample nearer a training
image than all but ``quantile`` of the training images are to their nearest neighbour is counted as memorized
(pixel L2: the plainest measure of a copy, and the one that matters for an exact replay).
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 1024                        # rows of one distance block: memory ~ CHUNK x N floats


def _flat(images, what: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"memorization: {what} must be a non-empty batch of images (N, ...), got shape "
                         f"{tuple(x.shape)}")
    return x.reshape(len(x), -1).double()


def nearest(a: torch.Tensor, b: torch.Tensor, skip_self: bool = False) -> torch.Tensor:
    """(N,) the L2 distance from each row of ``a`` (N, D) to its nearest row of ``b`` (M, D); ``skip_self``: ``a``
    is ``b`` and a row's own distance does not count. In blocks of CHUNK rows, without the matrix-product
    shortcut (whose cancellation would put a copy at a small non-zero distance)."""
    out = []
    for lo in range(0, len(a), CHUNK):
        d = torch.cdist(a[lo:lo + CHUNK], b, compute_mode="donot_use_mm_for_euclid_dist")   # (chunk, M)
        if skip_self:
            rows = torch.arange(len(d))
            d[rows, rows + lo] = float("inf")
        out.append(d.min(dim=1).values)
    return torch.cat(out)


def memorization(samples, train, quantile: float = 0.05) -> dict:
    """Samples that copy the training set.

    Args:
        samples: generated images (N, ...), a tensor or an array, in the same layout and scale as ``train``.
        train: the training images (M, ...), M >= 2.
        quantile: the threshold is this quantile of the training images' nearest-other distances.

    Returns:
        dict(memorized: the fraction of samples nearer their nearest training image than the threshold,
        threshold, median_distance: the median sample-to-nearest-training-image distance, num_samples, num_train).
    """
    if not 0 < quantile < 1:
        raise ValueError(f"memorization: quantile must be in (0, 1) (got {quantile})")
    s, t = _flat(samples, "samples"), _flat(train, "train")
    if len(t) < 2:
        raise ValueError("memorization: train needs at least 2 images (the threshold is their mutual distance)")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"memorization: samples have {s.shape[1]} values per image, train {t.shape[1]}; "
                         f"give both in the same size and layout")
    threshold = torch.quantile(nearest(t, t, skip_self=True), quantile)
    dist = nearest(s, t)
    return dict(memorized=(dist < threshold).double().mean().item(), threshold=threshold.item(),
                median_distance=torch.quantile(dist, 0.5).item(), num_samples=len(s), num_train=len(t))
