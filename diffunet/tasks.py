"""What a batch means, one entry per job: the clean target x0, the model's conditioning keywords, the loss, the
sample grid, and the evaluation.

``TASKS``: "generate" (from noise and class labels), "super_resolution" (x0 the image, the condition its
low-resolution version) and "inpainting" (the condition the image with a region masked out, plus the mask). The
training loop, the sampler and the evaluator call a task's methods and never ask which task runs. Sampling
conditions are keywords of ``sampling.generate``, which hands them to ``DiffunetPipeline``: ``class_labels``,
and ``image`` / ``mask_image`` (one per image, in [0, 1]) for the image-conditioned jobs, whose conditions the
pipeline builds with the same functions as training does (``pipeline.IMAGE_TASKS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import objectives
from .config import ConfigError
from .data import to_uint8
from .masks import MASKS, draw_masks
from .metrics import ExtractorUnavailable, evaluate, load_extractor, paired_scores
from .pipeline import IMAGE_TASKS, inpainting_condition, upsample_condition
from .tables import choose

# (n, **conditions) -> n samples (n, C, H, W) in [-1, 1] from the EMA model: the trainer's, seeded
Sampler = Callable[..., torch.Tensor]


class Generate:
    """Unconditional or class-conditional generation: x0 is the image; the class label, where the model has
    classes, conditions it, and is dropped to the null class with probability ``train.label_dropout`` so that
    one model also learns the unconditional score (classifier-free guidance)."""

    name = "generate"                   # the pipeline's ``task``

    def check(self, cfg, model, dataset) -> None:
        """What this task needs of the config, the model and the data; ConfigError (one line) otherwise."""
        needs_time(cfg, model)
        check_classes(cfg, model, dataset)
        if cfg.train.eval_every > 0:
            if eval_reference(cfg) is None:
                raise ConfigError(f"train.eval_every needs train.eval_reference (a folder, an .npz or 'digits') "
                                  f"for data.source={cfg.data.source}")
            try:
                load_extractor(cfg.train.eval_extractor)
            except ExtractorUnavailable as e:
                raise ConfigError(f"train.eval_extractor: {e}") from None

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        """(x0, the model's conditioning keywords) from a loader batch (images, labels) on the device: random
        horizontal flips if ``data.hflip``, then label dropout (one uniform draw per image for each)."""
        x, y = batch[:2]
        return flip(cfg, x)[0], labels(y, model, cfg)

    def loss(self, model, noise_scheduler, x0, cond, cfg) -> torch.Tensor:
        # through the module, so that a test can stand a faulty loss in for the real one
        return objectives.diffusion_loss(model, noise_scheduler, x0, cond, weighting=cfg.diffusion.loss_weighting,
                                         gamma=cfg.diffusion.snr_gamma)

    def pipeline_options(self, cfg) -> dict:
        """The ``DiffunetPipeline`` keywords (beside unet and scheduler) a run of this task saves."""
        return {"task": self.name}

    def grid(self, model, n: int, sample: Sampler, held, cfg) -> tuple[torch.Tensor, int | None]:
        """(images (N, C, H, W) in [-1, 1], images per row) of the sample grid of ``n``: balanced classes, one
        per column."""
        k = model.config.num_classes
        if not k:
            return sample(n, class_labels=None), None
        return sample(n, class_labels=torch.arange(n) % k), (k if n >= k else None)

    def evaluate(self, model, sample: Sampler, held, cfg) -> dict:
        """FID / KID (and IS where the extractor has one) of ``train.eval_num_images`` samples, every class
        equally often, against the reference."""
        images = sample(cfg.train.eval_num_images, class_labels="all" if model.config.num_classes else None)
        return evaluate(to_uint8(images), eval_reference(cfg), cfg.train.eval_extractor, seed=cfg.sample.seed)


def needs_time(cfg, model) -> None:
    """Diffusion denoises at a timestep: a model built without time cannot be trained for it."""
    if model.config.time_condition == "none":
        raise ConfigError(f"task={cfg.task} trains a diffusion model, which needs a timestep: set "
                          f"model.time_condition=scale_shift (or add); 'none' is for deterministic networks")


def check_classes(cfg, model, dataset) -> None:
    """A class-conditional model needs labelled data, with no more classes than it has."""
    classes = model.config.num_classes
    if classes and not dataset.num_classes:
        raise ConfigError(f"model.num_classes={classes} but data.source={cfg.data.source} has no labels; "
                          f"set model.num_classes=null or give labelled data")
    if classes and dataset.num_classes > classes:
        raise ConfigError(f"data has {dataset.num_classes} classes but model.num_classes={classes}")


def flip(cfg, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Random horizontal flips if ``data.hflip``, one draw per image, the same for an image and its condition."""
    if not cfg.data.hflip:
        return images
    flipped = torch.rand(images[0].shape[0], device=images[0].device) < 0.5
    return tuple(torch.where(flipped[:, None, None, None], x.flip(-1), x) for x in images)


def labels(y: torch.Tensor, model, cfg) -> dict:
    """``class_labels`` for a class-conditional model, dropped to the null class with ``train.label_dropout``."""
    if model.null_class is None:
        return {}
    drop = torch.rand(y.shape[0], device=y.device) < cfg.train.label_dropout
    return {"class_labels": torch.where(drop, torch.full_like(y, model.null_class), y)}


def degrade(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Super-resolution's input: (B, C, H, W) -> (B, C, H/f, W/f) by area averaging (each low-resolution pixel
    the mean of its f x f block, as a sensor with bigger pixels would see it)."""
    return F.interpolate(x, size=(x.shape[-2] // factor, x.shape[-1] // factor), mode="area")


class ImageConditioned(Generate):
    """What super-resolution and inpainting share: the condition built from each batch (or given by paired
    data), dropped with ``train.cond_dropout`` for guidance; grids and evaluation on held-out images
    (``data.holdout``) scored against the truth: PSNR, SSIM, LPIPS where it is available, and for the digits the
    class accuracy of the outputs."""

    rows = ("input", "output", "truth")
    paired = ""                         # the paired data this task can take: "conds" or "masks"

    def check(self, cfg, model, dataset) -> None:
        needs_time(cfg, model)
        check_classes(cfg, model, dataset)
        want = model.config.in_channels + IMAGE_TASKS[self.name].extra_channels
        if model.config.cond_channels != want:
            raise ConfigError(f"task={self.name} needs model.cond_channels={want} (got "
                              f"{model.config.cond_channels}); set model.cond_channels={want}")
        if cfg.train.eval_every > 0 and cfg.data.holdout < 1:
            raise ConfigError(f"train.eval_every needs held-out images for task={self.name}: set data.holdout "
                              f"(e.g. data.holdout=256)")
        if not 0 <= cfg.train.cond_dropout < 1:
            raise ConfigError(f"train.cond_dropout must be in [0, 1) (got {cfg.train.cond_dropout})")
        given = getattr(dataset, "condition", None)
        if given not in (None, self.paired):
            raise ConfigError(f"data.source={cfg.data.source} pairs its images with {given}, but task={self.name} "
                              f"takes {self.paired} (or none: they are made from the images)")

    def known(self, x: torch.Tensor, given: list, cfg, held_out: bool = False) -> dict:
        """The sampling conditions (``image`` and, for inpainting, ``mask_image``, in [0, 1]) and the model's
        ``cond`` of images ``x`` (B, C, H, W), from the paired data ``given`` or made from ``x``; ``held_out``:
        for grids and evaluation (the same every time, and leaving the training RNG alone)."""
        raise NotImplementedError

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        """(x0, {"cond": ..., "cond_dropped": ...} and the class labels) from a loader batch; flips apply to an
        image and its condition together."""
        x, y, *given = batch
        cond = self.known(x, given, cfg)["cond"]
        x, cond = flip(cfg, x, cond)
        keywords = {"cond": cond, **labels(y, model, cfg)}
        if cfg.train.cond_dropout > 0:
            keywords["cond_dropped"] = torch.rand(x.shape[0], device=x.device) < cfg.train.cond_dropout
        return x, keywords

    def examples(self, held, n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The first ``n`` held-out images: (x0 (n, C, H, W), labels (n,), their paired conditions)."""
        items = [held[i] for i in range(min(n, len(held)))]
        x = torch.stack([item[0] for item in items])
        y = torch.tensor([item[1] for item in items])
        given = [torch.stack([item[2] for item in items])] if len(items[0]) > 2 else []
        return x, y, given

    def outputs(self, model, sample: Sampler, held, n: int, cfg):
        x, y, given = self.examples(held, n)
        known = self.known(x, given, cfg, held_out=True)
        conditions = {k: v for k, v in known.items() if k in ("image", "mask_image")}
        labels_ = {"class_labels": y} if model.config.num_classes and bool((y >= 0).all()) else {}
        return x, y, known, sample(len(x), **conditions, **labels_)

    def grid(self, model, n: int, sample: Sampler, held, cfg) -> tuple[torch.Tensor, int]:
        """Up to 16 held-out images, one per column; rows: ``self.rows`` (input, ..., output, truth)."""
        x, _, known, out = self.outputs(model, sample, held, min(n, 16), cfg)
        shown = self.shown(known, x, out)
        return torch.cat([shown[row] for row in self.rows]), len(x)

    def evaluate(self, model, sample: Sampler, held, cfg) -> dict:
        """PSNR / SSIM (/ LPIPS) against the truth of ``train.eval_num_images`` held-out images; for the digits
        also the class accuracy of the outputs under the digits classifier."""
        x, y, known, out = self.outputs(model, sample, held, cfg.train.eval_num_images, cfg)
        digits = str(cfg.data.source) == "digits"
        return paired_scores(to_uint8(out), to_uint8(x), mask=known.get("mask_image"),
                             labels=y if digits else None, classifier="digits" if digits else None)


class SuperResolution(ImageConditioned):
    """x0 the image; the condition its low-resolution version: area-downsampled by ``data.sr_factor`` and
    bicubically upsampled back to the model's size (or, from paired data, the given low-resolution image), so
    that any image folder or dataset is a training set."""

    name = "super_resolution"
    rows = ("input", "bicubic", "output", "truth")
    paired = "conds"

    def check(self, cfg, model, dataset) -> None:
        super().check(cfg, model, dataset)
        f, (h, w) = cfg.data.sr_factor, model.image_size
        if f < 2 or h % f or w % f:
            raise ConfigError(f"data.sr_factor={f} must be at least 2 and divide the model's size {h}x{w}")

    def pipeline_options(self, cfg) -> dict:
        return {**super().pipeline_options(cfg), "sr_factor": cfg.data.sr_factor}

    def known(self, x, given, cfg, held_out: bool = False) -> dict:
        size = x.shape[-2:]
        low = given[0] if given else degrade(x, cfg.data.sr_factor)     # (B, C, H/f, W/f), or as given
        return {"image": (low + 1) / 2, "cond": upsample_condition(low, size), "low": low}

    @staticmethod
    def shown(known, x, out) -> dict:
        size = x.shape[-2:]
        return {"input": F.interpolate(known["low"], size=size, mode="nearest"), "bicubic": known["cond"],
                "output": out, "truth": x}


class Inpainting(ImageConditioned):
    """The condition: the image with a region masked out, plus the mask (1: to fill), so cond_channels =
    in_channels + 1. Masks are drawn per batch (``data.mask``: a name in ``masks.MASKS``) or read from paired
    data. The output equals the input outside the mask, exactly (the pipeline pastes it back)."""

    name = "inpainting"
    rows = ("input", "mask", "output", "truth")
    paired = "masks"

    def check(self, cfg, model, dataset) -> None:
        super().check(cfg, model, dataset)
        try:
            choose(MASKS, cfg.data.mask, "data.mask")
            choose(MASKS, cfg.data.eval_mask, "data.eval_mask")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def known(self, x, given, cfg, held_out: bool = False) -> dict:
        if given:
            mask = given[0]
        elif held_out:                      # data.eval_mask, seeded: the same masks at every evaluation
            mask = draw_masks(cfg.data.eval_mask, x.shape[0], tuple(x.shape[-2:]), device=x.device,
                              generator=torch.Generator().manual_seed(cfg.sample.seed))
        else:
            mask = draw_masks(cfg.data.mask, x.shape[0], tuple(x.shape[-2:]), device=x.device)
        return {"image": (x + 1) / 2, "mask_image": mask, "cond": inpainting_condition(x, mask)}

    @staticmethod
    def shown(known, x, out) -> dict:
        mask = known["mask_image"]
        return {"input": x * (1 - mask), "mask": mask * 2 - 1, "output": out, "truth": x}


TASKS = {"generate": Generate(), "super_resolution": SuperResolution(), "inpainting": Inpainting()}


def task_of(cfg):
    """The task entry ``cfg.task`` names; ConfigError (one line, the valid names) for an unknown one."""
    try:
        return choose(TASKS, cfg.task, "task")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def eval_reference(cfg) -> str | None:
    """What evaluation compares with: the configured reference, else the training data if it can."""
    if cfg.train.eval_reference:
        return cfg.train.eval_reference
    source = str(cfg.data.source)
    return source if source == "digits" or Path(source).is_dir() else None
