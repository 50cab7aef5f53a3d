"""The image-conditioned jobs: super-resolution and inpainting. The condition is made from each training image
(or given by paired data), and the pipeline builds it at sampling time with the same functions
(``model.pipeline.IMAGE_TASKS``), so that training and sampling cannot drift apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import to_uint8
from ..data.inpaint_masks import MASKS, MASKS_ND, draw_masks
from ..data.sources import source_of
from ..errors import ConfigError
from ..metrics.paired import array_scores, cubic_upsample, linear_fill, paired_scores
from ..model.pipeline import IMAGE_TASKS, ImageTask, inpainting_condition, upsample_condition
from ..model.tables import choose
from .base import TaskSampler, augment_jointly, check_classes, check_cond_dropout, condition, flip, labels, needs_time, of_what
from .generate import Generate


def degrade(x: torch.Tensor, factor) -> torch.Tensor:
    """Super-resolution's input: (B, C, *S) -> (B, C, *S/f) by area averaging (each low-resolution pixel or
    voxel the mean of its block, as a sensor with bigger pixels would see it); ``factor`` one int, or one per
    axis ((2, 1, 1): thick slices)."""
    factors = (factor,) * (x.ndim - 2) if isinstance(factor, int) else tuple(factor)
    return F.interpolate(x, size=tuple(s // f for s, f in zip(x.shape[2:], factors)), mode="area")


def sr_factors(cfg, dims: int) -> tuple[int, ...]:
    """Super-resolution's factor per axis: ``super_resolution.factors``, else ``factor`` along every axis."""
    sr = cfg.super_resolution
    return tuple(int(f) for f in sr.factors) if sr.factors is not None else (int(sr.factor),) * dims


class ImageConditioned(Generate):
    """What super-resolution and inpainting share: the condition built from each batch (or given by paired
    data), dropped with ``train.cond_dropout`` for guidance; grids and evaluation on held-out images
    (``data.holdout``) scored against the truth: PSNR, SSIM, LPIPS where it is available, and for the digits the
    class accuracy of the outputs."""

    rows = ("input", "output", "truth")
    augments = False                    # a geometric augmentation would have to move the condition as well
    scored_by_fid = False               # scored against the truth of each input instead
    paired = ""                         # the paired data this task can take: "conds" or "masks"
    sample_arguments = "--cond inputs/ --out outputs"

    def check(self, cfg, model, dataset) -> None:
        needs_time(cfg, model)
        check_classes(cfg, model, dataset)
        want = model.config.in_channels + self.image_task(cfg).extra_channels
        if model.config.cond_channels != want:
            raise ConfigError(f"task={self.name} needs model.cond_channels={want} (got "
                              f"{model.config.cond_channels}); set model.cond_channels={want}")
        if cfg.train.eval_every > 0 and cfg.data.holdout < 1:
            raise ConfigError(f"train.eval_every needs held-out images for task={self.name}: set data.holdout "
                              f"(e.g. data.holdout=256)")
        check_cond_dropout(cfg)
        if cfg[self.section].ensemble < 1:
            raise ConfigError(f"{self.section}.ensemble={cfg[self.section].ensemble}: evaluation averages that many "
                              f"samples per input; set 1 or more")
        given = getattr(dataset, "condition", None)
        if given not in (None, self.paired):
            raise ConfigError(f"data.source={cfg.data.source} pairs its images with {given}, but task={self.name} "
                              f"takes {self.paired} (or none: they are made from the images)")

    @staticmethod
    def baselines(known, x) -> dict:
        """Outputs of classical methods for these inputs, scored beside the model's (signals and volumes)."""
        return {}

    def image_task(self, cfg) -> ImageTask:
        """How the saved pipeline builds this task's condition (``IMAGE_TASKS``, by the pipeline's ``task``)."""
        return IMAGE_TASKS[self.pipeline_options(cfg)["task"]]

    def card(self, cfg, unet) -> tuple[str, str]:
        mask = ", mask_image=masks" if self.image_task(cfg).takes_mask else ""
        return (f"A {self.name.replace('_', '-')} diffusion model of {of_what(unet)}",
                f"outputs = pipe(image=inputs{mask}).images")

    def known(self, x: torch.Tensor, given: list, cfg, held_out: bool = False) -> dict:
        """The sampling conditions (``image`` and, for inpainting, ``mask_image``, in [0, 1]) and the model's
        ``cond`` of images ``x`` (B, C, H, W), from the paired data ``given`` or made from ``x``; ``held_out``:
        for grids and evaluation (the same every time, and leaving the training RNG alone)."""
        raise NotImplementedError

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        """(x0, {"cond": ..., "cond_dropped": ...} and the class labels) from a loader batch; flips apply to an
        image and its condition together. Draws: ``data.augment``'s transforms of the image (and a given
        condition), the condition's own (inpainting masks), flips, then label dropout, then condition dropout."""
        x, y, *given = batch
        x, *given = augment_jointly(cfg, x, *given, masks=(1,) if self.paired == "masks" else ())
        cond = self.known(x, given, cfg)["cond"]
        x, cond = flip(cfg, x, cond)
        keywords = labels(y, model, cfg)
        keywords.update(condition(cond, cfg))
        return x, keywords

    def examples(self, held, n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The first ``n`` held-out images: (x0 (n, C, H, W), labels (n,), their paired conditions)."""
        items = [held[i] for i in range(min(n, len(held)))]
        x = torch.stack([item[0] for item in items])
        y = torch.tensor([item[1] for item in items])
        given = [torch.stack([item[2] for item in items])] if len(items[0]) > 2 else []
        return x, y, given

    def outputs(self, model, sample: TaskSampler, held, n: int, cfg, ensemble: int = 1):
        """(x0, labels, the conditions, the outputs) of the first ``n`` held-out images; each output the mean of
        ``ensemble`` samples (the minimum-squared-error estimate where there are several)."""
        x, y, given = self.examples(held, n)
        known = self.known(x, given, cfg, held_out=True)
        conditions = {k: v.repeat_interleave(ensemble, 0) for k, v in known.items() if k in ("image", "mask_image")}
        labels_ = ({"class_labels": y.repeat_interleave(ensemble)} if model.config.num_classes and bool((y >= 0).all())
                   else {})
        out = sample(len(x) * ensemble, **conditions, **labels_)
        return x, y, known, out.view(len(x), ensemble, *out.shape[1:]).mean(1)

    def grid(self, model, n: int, sample: TaskSampler, held, cfg) -> tuple[torch.Tensor, int]:
        """Up to 16 held-out images, one per column; rows: ``self.rows`` (input, ..., output, truth)."""
        x, _, known, out = self.outputs(model, sample, held, min(n, 16), cfg)
        shown = self.shown(known, x, out)
        return torch.cat([shown[row] for row in self.rows]), len(x)

    def evaluate(self, model, sample: TaskSampler, held, cfg) -> dict:
        """PSNR / SSIM (/ LPIPS) against the truth of ``train.eval_num_images`` held-out images; for a source
        with a classifier of its own (the digits) also the class accuracy of the outputs under it."""
        x, y, known, out = self.outputs(model, sample, held, cfg.train.eval_num_images, cfg,
                                        cfg[self.section].ensemble)
        if model.dims != 2:                     # signals and volumes: PSNR, MAE (and SSIM in 3D) of the values
            return array_scores(out, x, mask=known.get("mask_image"), baselines=self.baselines(known, x))
        named = source_of(str(cfg.data.source))
        classifier = named.classifier if named is not None else None
        return paired_scores(to_uint8(out), to_uint8(x), mask=known.get("mask_image"),
                             labels=y if classifier else None, classifier=classifier)


class SuperResolution(ImageConditioned):
    """x0 the image; the condition its low-resolution version: area-downsampled by ``super_resolution.factor``
    and bicubically upsampled back to the model's size (or, from paired data, the given low-resolution image), so
    that any image folder or dataset is a training set."""

    name = "super_resolution"
    section = "super_resolution"
    rows = ("input", "bicubic", "output", "truth")
    paired = "conds"

    def check(self, cfg, model, dataset) -> None:
        super().check(cfg, model, dataset)
        size, given = model.image_size, cfg.super_resolution.factors
        if given is not None:
            factors = tuple(given)
            if len(factors) != model.dims or min(factors) < 1 or max(factors) < 2 or \
                    any(s % f for s, f in zip(size, factors)):
                raise ConfigError(f"super_resolution.factors={list(factors)} must give {model.dims} factors, one per "
                                  f"axis of {'x'.join(map(str, size))}, each dividing its size, at least one 2 or "
                                  f"more (e.g. [2, 1, 1] for thick slices)")
            return
        f = cfg.super_resolution.factor
        if f < 2 or any(s % f for s in size[::-1]):
            raise ConfigError(f"super_resolution.factor={f} must be at least 2 and divide the model's size "
                              f"{'x'.join(map(str, size[::-1]))}")

    def pipeline_options(self, cfg) -> dict:
        options = {**super().pipeline_options(cfg), "sr_factor": cfg.super_resolution.factor}
        if cfg.super_resolution.factors is not None:
            options["sr_factors"] = [int(f) for f in cfg.super_resolution.factors]
        return options

    def known(self, x, given, cfg, held_out: bool = False) -> dict:
        size = x.shape[2:]
        low = given[0] if given else degrade(x, sr_factors(cfg, x.ndim - 2))    # (B, C, H/f, W/f), or as given
        return {"image": (low + 1) / 2, "cond": upsample_condition(low, size), "low": low}

    @staticmethod
    def baselines(known, x) -> dict:
        """What the classical methods give for these inputs: linear (the model's own condition: linear or
        trilinear) and cubic spline upsampling, scored beside the model's outputs."""
        return {"linear": known["cond"], "cubic": cubic_upsample(known["low"], tuple(x.shape[2:]))}

    @staticmethod
    def shown(known, x, out) -> dict:
        size = x.shape[2:]
        return {"input": F.interpolate(known["low"], size=size, mode="nearest"), "bicubic": known["cond"],
                "output": out, "truth": x}


class Inpainting(ImageConditioned):
    """The condition: the image with a region masked out, plus the mask (1: to fill), so cond_channels =
    in_channels + 1. Masks are drawn per batch (``inpainting.mask``: a name in ``data.inpaint_masks.MASKS``) or
    read from paired data. The output equals the input outside the mask, exactly (the pipeline pastes it back)."""

    name = "inpainting"
    section = "inpainting"
    rows = ("input", "mask", "output", "truth")
    sample_arguments = "--cond inputs/ --mask masks/ --out outputs"
    paired = "masks"

    def check(self, cfg, model, dataset) -> None:
        super().check(cfg, model, dataset)
        try:
            table = MASKS if model.dims == 2 else MASKS_ND
            choose(table, cfg.inpainting.mask, "inpainting.mask")
            choose(table, cfg.inpainting.eval_mask, "inpainting.eval_mask")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def known(self, x, given, cfg, held_out: bool = False) -> dict:
        if given:
            mask = given[0]
        elif held_out:                      # inpainting.eval_mask, seeded: the same masks at every evaluation
            mask = draw_masks(cfg.inpainting.eval_mask, x.shape[0], tuple(x.shape[2:]), device=x.device,
                              generator=torch.Generator().manual_seed(cfg.sample.seed))
        else:
            mask = draw_masks(cfg.inpainting.mask, x.shape[0], tuple(x.shape[2:]), device=x.device)
        return {"image": (x + 1) / 2, "mask_image": mask, "cond": inpainting_condition(x, mask)}

    @staticmethod
    def baselines(known, x) -> dict:
        """Signals: linear interpolation across each gap, imputation's classical baseline."""
        return {"linear": linear_fill(x, known["mask_image"])} if x.ndim == 3 else {}

    @staticmethod
    def shown(known, x, out) -> dict:
        mask = known["mask_image"]
        return {"input": x * (1 - mask), "mask": mask * 2 - 1, "output": out, "truth": x}
