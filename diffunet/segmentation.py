"""Segmentation losses, one table entry each (``LOSSES``): what the deterministic U-Net (``time_condition="none"``)
is trained with on image -> mask pairs, binary or multi-class; and the scores of predicted masks (Dice, IoU, the
95 % Hausdorff distance) through torchmetrics.

The network outputs logits (B, K, H, W), K >= 2 classes (a binary mask is background / foreground, K = 2), and the
target is (B, H, W) or (B, 1, H, W) class ids. ``unet_weighted_ce`` also takes the per-pixel weight map of the
2015 U-Net paper (w_c + w0 exp(-(d1 + d2)^2 / 2 sigma^2), made from the instance masks in the data pipeline),
which up-weights the thin background borders between touching objects.

Why written here: torchmetrics' Dice is a metric (argmax, not differentiable) and MONAI's ``DiceCELoss`` is a
bench-only peer, not a dependency; the soft Dice below is the usual few lines (V-Net's, as MONAI computes it).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torchmetrics.functional.segmentation.utils import distance_transform, mask_edges
from torchmetrics.segmentation import DiceScore, MeanIoU

from .tables import choose


def class_ids(target: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) class ids -> (B, H, W) long; ValueError for an id outside 0..classes-1."""
    target = target[:, 0] if target.ndim == 4 else target
    target = target.long()
    if target.numel() and not (0 <= int(target.min()) and int(target.max()) < classes):
        raise ValueError(f"mask ids must be in 0..{classes - 1} for a {classes}-class output, got "
                         f"{int(target.min())}..{int(target.max())}")
    return target


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (1..K-1) and the batch: 2 |p t| / (|p| + |t|) of the softmax
    probabilities p and the one-hot target t, per image and class (eps keeps empty classes at Dice 1)."""
    p = logits.float().softmax(1)[:, 1:]                                # (B, K, H, W) -> (B, K-1, H, W)
    t = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter, total = (p * t).sum((2, 3)), (p + t).sum((2, 3))            # (B, K-1)
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


def _weighted_ce(logits, target, weight):
    if weight is None:
        raise ValueError("loss unet_weighted_ce needs the weight map (the data pipeline's, from instance masks)")
    weight = weight[:, 0] if weight.ndim == 4 else weight
    return (F.cross_entropy(logits.float(), target, reduction="none") * weight).mean()


# (logits (B, K, H, W), class ids (B, H, W), weight map (B, H, W) or None) -> scalar loss
LOSSES: dict[str, Callable] = {
    "ce": lambda logits, target, weight: F.cross_entropy(logits.float(), target),
    "dice_ce": lambda logits, target, weight: F.cross_entropy(logits.float(), target) + soft_dice(logits, target),
    "unet_weighted_ce": _weighted_ce,
}


def segmentation_loss(name: str, logits: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """The loss ``LOSSES[name]`` of ``logits`` (B, K, H, W) against the mask ``target`` (class ids, (B, [1,] H, W));
    a wrong name fails with the valid names."""
    loss = choose(LOSSES, name, "segmentation loss")
    if logits.shape[1] < 2:
        raise ValueError(f"segmentation needs at least 2 output channels (background and foreground), got "
                         f"{logits.shape[1]}; set model.out_channels=2 for a binary mask")
    return loss(logits, class_ids(target, logits.shape[1]), weight)


# ------------------------------------------------------------------------------------------ scores

def hd95(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """The 95 % Hausdorff distance (pixels) between two binary masks (H, W): the larger of the two directed 95th
    percentiles of edge-to-edge distances (torchmetrics' surface distances; the definition MONAI uses), nan if
    either mask is empty. torchmetrics' own HausdorffDistance is the 100 % one, which a single stray pixel sets."""
    if not pred.any() or not truth.any():
        return float("nan")
    # torchmetrics' edges; its distance transform through scipy: the default ("pytorch") engine compares every
    # pixel with every edge pixel at once, ~36 GB for a 512 x 512 mask
    edges_pred, edges_truth = (e.bool() for e in mask_edges(pred.bool(), truth.bool()))
    there = torch.as_tensor(distance_transform((~edges_truth).float(), engine="scipy"))[edges_pred]
    back = torch.as_tensor(distance_transform((~edges_pred).float(), engine="scipy"))[edges_truth]
    return max(float(torch.quantile(there.float(), 0.95)), float(torch.quantile(back.float(), 0.95)))


def segmentation_scores(pred: torch.Tensor, truth: torch.Tensor, num_classes: int = 2) -> dict:
    """Dice, IoU (foreground classes, macro, per image then averaged: torchmetrics) and the mean 95 % Hausdorff
    distance over images and foreground classes present in both, of class-id masks (N, H, W) or (N, 1, H, W)."""
    pred, truth = class_ids(pred, num_classes), class_ids(truth, num_classes)
    dice = DiceScore(num_classes, include_background=False, input_format="index")(pred, truth)
    iou = MeanIoU(num_classes, include_background=False, input_format="index")(pred, truth)
    distances = [hd95(p == c, t == c) for p, t in zip(pred, truth) for c in range(1, num_classes)]
    finite = [d for d in distances if d == d]
    return {"dice": float(dice), "iou": float(iou),
            "hd95": sum(finite) / len(finite) if finite else float("nan"), "num_images": len(pred)}
