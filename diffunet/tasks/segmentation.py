"""Segmentation: the two jobs (``Segmentation``, deterministic, the 2015 U-Net's; ``SegmentationDiffusion``, by
diffusion with an ensemble's uncertainty), their losses, one table entry each (``LOSSES``), and the scores of
predicted masks (Dice, IoU, the 95 % Hausdorff distance) through torchmetrics. Their config section is
``segment``.

The network outputs logits (B, K, H, W), K >= 2 classes (a binary mask is background / foreground, K = 2), and the
target is (B, H, W) or (B, 1, H, W) class ids. ``unet_weighted_ce`` also takes the per-pixel weight map of the
2015 U-Net paper (w_c + w0 exp(-(d1 + d2)^2 / 2 sigma^2), made from the instance masks in the data pipeline),
which up-weights the thin background borders between touching objects.

Why written here: torchmetrics' Dice is a metric (argmax, not differentiable) and MONAI's ``DiceCELoss`` is a
bench-only peer, not a dependency; the soft Dice below is the usual few lines (V-Net's, as MONAI computes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from scipy import ndimage
from torchmetrics.functional.segmentation.utils import mask_edges
from torchmetrics.segmentation import DiceScore, MeanIoU

from ..data.seg_masks import count_objects
from ..errors import ConfigError
from ..model.segment_pipeline import DiffunetSegmentationPipeline, mask_classes, mask_to_sample
from ..model.tables import choose
from .base import TaskSampler, Task, augment_jointly, condition, flip, needs_time, of_what, sample_keywords


def class_ids(target: torch.Tensor, classes: int, dims: int = 2) -> torch.Tensor:
    """(B, 1, *S) or (B, *S) class ids of ``dims``-D masks -> (B, *S) long; ValueError for an id outside
    0..classes-1."""
    target = target[:, 0] if target.ndim == dims + 2 else target
    target = target.long()
    if target.numel() and not (0 <= int(target.min()) and int(target.max()) < classes):
        raise ValueError(f"mask ids must be in 0..{classes - 1} for a {classes}-class output, got "
                         f"{int(target.min())}..{int(target.max())}")
    return target


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (1..K-1) and the batch: 2 |p t| / (|p| + |t|) of the softmax
    probabilities p and the one-hot target t, per image and class (eps keeps empty classes at Dice 1)."""
    p = logits.float().softmax(1)[:, 1:]                                # (B, K, *S) -> (B, K-1, *S)
    t = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
    spatial = tuple(range(2, logits.ndim))
    inter, total = (p * t).sum(spatial), (p + t).sum(spatial)          # (B, K-1)
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


def _weighted_ce(logits, target, weight):
    if weight is None:
        raise ValueError("loss unet_weighted_ce needs the weight map (the data pipeline's, from instance masks)")
    weight = weight[:, 0] if weight.ndim == 4 else weight
    return (F.cross_entropy(logits.float(), target, reduction="none") * weight).mean()


@dataclass(frozen=True)
class Loss:
    """(logits (B, K, H, W), class ids (B, H, W), weight map (B, H, W) or None) -> scalar loss."""
    fn: Callable
    needs_weight: bool = False          # takes the 2015 paper's weight map, which the data pipeline then makes

    def __call__(self, logits, target, weight=None):
        return self.fn(logits, target, weight)


LOSSES: dict[str, Loss] = {
    "ce": Loss(lambda logits, target, weight: F.cross_entropy(logits.float(), target)),
    "dice_ce": Loss(lambda logits, target, weight: F.cross_entropy(logits.float(), target) + soft_dice(logits, target)),
    "unet_weighted_ce": Loss(_weighted_ce, needs_weight=True),
}


def segmentation_loss(name: str, logits: torch.Tensor, target: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """The loss ``LOSSES[name]`` of ``logits`` (B, K, H, W) against the mask ``target`` (class ids, (B, [1,] H, W));
    a wrong name fails with the valid names."""
    loss = choose(LOSSES, name, "segmentation loss")
    if logits.shape[1] < 2:
        raise ValueError(f"segmentation needs at least 2 output channels (background and foreground), got "
                         f"{logits.shape[1]}; set model.out_channels=2 for a binary mask")
    return loss(logits, class_ids(target, logits.shape[1], logits.ndim - 2), weight)


# ------------------------------------------------------------------------------------------ scores

def hd95(pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...] | None = None) -> float:
    """The 95 % Hausdorff distance between two binary masks (H, W) or (D, H, W), in pixels or, with ``spacing``
    (the voxel size per axis), in its units: the larger of the two directed 95th percentiles of edge-to-edge
    distances (torchmetrics' surface distances; the definition MONAI uses), nan if either mask is empty.
    torchmetrics' own HausdorffDistance is the 100 % one, which a single stray pixel sets."""
    if not pred.any() or not truth.any():
        return float("nan")
    # torchmetrics' edges (2D and 3D); scipy's exact Euclidean distance transform, which torchmetrics'
    # distance_transform wraps for 2D only (its default "pytorch" engine compares every pixel with every edge
    # pixel at once, ~36 GB for a 512 x 512 mask)
    edges_pred, edges_truth = (e.bool() for e in mask_edges(pred.bool(), truth.bool()))
    there = torch.as_tensor(ndimage.distance_transform_edt((~edges_truth).numpy(), spacing))[edges_pred]
    back = torch.as_tensor(ndimage.distance_transform_edt((~edges_pred).numpy(), spacing))[edges_truth]
    return max(float(torch.quantile(there.float(), 0.95)), float(torch.quantile(back.float(), 0.95)))


def segmentation_scores(pred: torch.Tensor, truth: torch.Tensor, num_classes: int = 2, dims: int = 2,
                        spacing: tuple[float, ...] | None = None) -> dict:
    """Dice, IoU (foreground classes, macro, per image then averaged: torchmetrics) and the mean 95 % Hausdorff
    distance (``hd95``, in ``spacing``'s units if given) over items and foreground classes present in both, of
    class-id masks (N, *S) or (N, 1, *S), ``dims``-D."""
    pred, truth = class_ids(pred, num_classes, dims), class_ids(truth, num_classes, dims)
    dice = DiceScore(num_classes, include_background=False, input_format="index")(pred, truth)
    iou = MeanIoU(num_classes, include_background=False, input_format="index")(pred, truth)
    distances = [hd95(p == c, t == c, spacing) for p, t in zip(pred, truth) for c in range(1, num_classes)]
    finite = [d for d in distances if d == d]
    return {"dice": float(dice), "iou": float(iou),
            "hd95": sum(finite) / len(finite) if finite else float("nan"), "num_images": len(pred)}


# ------------------------------------------------------------------------------------------ the tasks

class Segmentation(Task):
    """Deterministic segmentation, the 2015 U-Net's job: a U-Net without time (``model.time_condition=none``)
    maps the image to class logits (``model.out_channels`` = K classes, 2 for a binary mask), trained with
    ``segment.loss`` (a name in ``LOSSES``; ``unet_weighted_ce`` takes the paper's weight map, made by the data
    pipeline). Batches are (image, label, mask[, weight]): paired folders' ``masks/``, an HF mask column, or the
    embedded cells (``data.source=cells``). Grids: image, truth, prediction; evaluation: Dice, IoU and HD95 on
    held-out images (``data.holdout``), and the objects counted in prediction and truth."""

    name = "segmentation"
    section = "segment"
    rows = ("image", "truth", "output")
    segments = True
    sample_arguments = "--cond images/ --out masks --tile 128"

    def classes(self, model) -> int:
        return mask_classes(model)

    def check(self, cfg, model, dataset) -> None:
        self.check_model(cfg, model)
        self.check_data(cfg, dataset)

    def check_model(self, cfg, model) -> None:
        """What this task needs of the model; run before the data are read (``dataset_options``), whose reading
        depends on it."""
        if model.timed:
            raise ConfigError(f"task={self.name} is deterministic: set model.time_condition=none (for segmentation "
                              f"by diffusion: task=segmentation_diffusion)")
        if self.classes(model) < 2:
            raise ConfigError("task=segmentation needs model.out_channels >= 2 (class logits; 2 for a binary mask)")
        if model.config.cond_channels:
            raise ConfigError(f"task={self.name} segments the image itself: set model.cond_channels=0")

    def check_data(self, cfg, dataset) -> None:
        self.loss_entry(cfg)
        if getattr(dataset, "condition", None) != "masks":
            raise ConfigError(f"task={self.name} needs masks: data.source=cells, a folder with images/ and masks/, "
                              f"or an HF dataset with data.mask_column (data.source={cfg.data.source} has none)")
        if cfg.train.eval_every > 0 and cfg.data.holdout < 1:
            raise ConfigError(f"train.eval_every needs held-out images for task={self.name}: set data.holdout")

    @staticmethod
    def loss_entry(cfg) -> Loss:
        try:
            return choose(LOSSES, cfg.segment.loss, "segment.loss")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def dataset_options(self, cfg, model) -> dict:
        self.check_model(cfg, model)
        weights = (cfg.segment.w0, cfg.segment.sigma) if self.loss_entry(cfg).needs_weight else None
        return {"channels": model.config.in_channels, "mask_classes": self.classes(model), "weights": weights}

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        """(the mask (B, 1, H, W) class ids, {"image": ..., "weight": ...}): flips apply to all three alike."""
        x, _, mask, *weight = batch
        x, mask, *weight = augment_jointly(cfg, *flip(cfg, x, mask, *weight), masks=(1, 2))
        return mask, {"image": x, "weight": weight[0] if weight else None}

    def loss(self, model, noise_scheduler, mask, inputs, cfg) -> torch.Tensor:
        return segmentation_loss(cfg.segment.loss, model(inputs["image"]).sample, mask, inputs["weight"])

    def pipeline(self, unet, scheduler, cfg):
        return DiffunetSegmentationPipeline(unet=unet, scheduler=None, **sample_keywords(cfg, ()))

    def card(self, cfg, unet) -> tuple[str, str]:
        return (f"A deterministic segmentation model ({self.classes(unet)} classes) of {of_what(unet)}",
                "masks = pipe(image=images, tile=128).masks")

    def segment(self, sample: TaskSampler, x: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class ids (B, H, W), the uncertainty map (B, H, W) or None) of images ``x`` (B, C, H, W) in [-1, 1]."""
        out = sample.pipe(image=(x + 1) / 2, output_type="pt")
        return out.masks, out.std

    def outputs(self, model, sample: TaskSampler, held, n: int, cfg):
        items = [held[i] for i in range(min(n, len(held)))]
        x = torch.stack([item[0] for item in items]).to(model.device)
        truth = torch.stack([item[2] for item in items])[:, 0].long().to(model.device)   # (n, H, W)
        masks, std = self.segment(sample, x, cfg)
        return x, truth, masks, std

    def grid(self, model, n: int, sample: TaskSampler, held, cfg) -> tuple[torch.Tensor, int]:
        """Up to 16 held-out images, one per column; rows: ``self.rows`` (image, truth, prediction[, std map])."""
        x, truth, masks, std = self.outputs(model, sample, held, min(n, 16), cfg)
        k, c = self.classes(model), x.shape[1]
        shown = {"image": x}
        for row, ids in (("truth", truth), ("output", masks)):           # class ids -> gray in [-1, 1]
            shown[row] = (ids[:, None].float() * 2 / (k - 1) - 1).expand(-1, c, *ids.shape[1:])
        if std is not None:                                              # 4 std: 0.25 and above is white
            shown["std"] = (std[:, None] * 4 - 1).clamp(-1, 1).expand(-1, c, *std.shape[1:])
        return torch.cat([shown[row] for row in self.rows]), len(x)

    def evaluate(self, model, sample: TaskSampler, held, cfg) -> dict:
        """Dice, IoU, HD95 (``segmentation_scores``) of ``train.eval_num_images`` held-out images, and the mean
        number of objects (4-connected components of the foreground) in prediction and truth."""
        x, truth, masks, std = self.outputs(model, sample, held, cfg.train.eval_num_images, cfg)
        scores = segmentation_scores(masks.cpu(), truth.cpu(), self.classes(model), model.dims)
        for name, ids in (("objects", masks), ("objects_truth", truth)):
            scores[name] = sum(count_objects(m > 0) for m in ids.cpu().numpy()) / len(ids)
        if std is not None:                                              # does the uncertainty mean something?
            wrong = masks != truth
            scores["std_wrong"] = float(std[wrong].mean()) if wrong.any() else float("nan")
            scores["std_right"] = float(std[~wrong].mean()) if (~wrong).any() else float("nan")
        return scores


class SegmentationDiffusion(Segmentation):
    """Segmentation by diffusion (Wolleb et al. 2022, MedSegDiff): the mask is x0 (``mask_to_sample``: one
    channel 2 m - 1 for a binary mask, so ``model.in_channels=1``; K one-hot channels for K > 2) and the image is
    the condition (``model.cond_channels`` = the image's channels), dropped with ``train.cond_dropout``.
    Evaluation samples an ensemble of ``segment.ensemble`` masks per image: the majority mask is scored, and the
    std map's mean on wrong and on right pixels is logged beside it."""

    name = "segmentation_diffusion"
    rows = ("image", "truth", "output", "std")
    sample_arguments = "--cond images/ --out masks --num-per-cond 8"
    loss = Task.loss                    # the diffusion objective's, of the mask as a sample

    def check_model(self, cfg, model) -> None:
        needs_time(cfg, model)
        if model.config.cond_channels < 1:
            raise ConfigError(f"task={self.name} conditions on the image: set model.cond_channels to its channels")
        if model.config.num_classes:
            raise ConfigError(f"task={self.name} takes no class labels: set model.num_classes=null")
        if cfg.segment.ensemble < 1:
            raise ConfigError(f"segment.ensemble must be at least 1 (got {cfg.segment.ensemble})")

    def dataset_options(self, cfg, model) -> dict:
        self.check_model(cfg, model)
        return {"channels": model.config.cond_channels, "mask_classes": self.classes(model), "weights": None}

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        """(x0: the mask as a sample in [-1, 1], {"cond": the image[, "cond_dropped": ...]})."""
        x, _, mask = batch[:3]
        x, mask = augment_jointly(cfg, *flip(cfg, x, mask), masks=(1,))
        return mask_to_sample(mask, self.classes(model), model.dims), condition(x, cfg)

    def pipeline(self, unet, scheduler, cfg):
        return DiffunetSegmentationPipeline(unet=unet, scheduler=scheduler,
                                            **sample_keywords(cfg, ("scheduler", "steps")))

    def card(self, cfg, unet) -> tuple[str, str]:
        return (f"A diffusion segmentation model ({self.classes(unet)} classes) of "
                f"{of_what(unet, unet.config.cond_channels)}",
                "out = pipe(image=images, num_samples=8, tile=128)   # out.masks, out.std")

    def segment(self, sample: TaskSampler, x, cfg):
        generators = [torch.Generator().manual_seed(cfg.sample.seed * 1_000_003 + i) for i in range(len(x))]
        masks, stds = [], []
        for lo in range(0, len(x), 32):                 # 32 images x the ensemble per batch: bounded memory
            out = sample.pipe(image=(x[lo:lo + 32] + 1) / 2, num_samples=cfg.segment.ensemble,
                              num_inference_steps=cfg.sample.steps, generator=generators[lo:lo + 32],
                              output_type="pt")
            masks.append(out.masks)
            stds.append(out.std if out.std is not None else torch.zeros_like(out.masks, dtype=torch.float32))
        return torch.cat(masks), torch.cat(stds)

