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
from .augment import AUGMENT_DIM, augment
from .config import ConfigError
from .data import to_uint8
from .masks import MASKS, draw_masks
from .metrics import ExtractorUnavailable, evaluate, load_extractor, paired_scores
from .cells import count_objects
from .sampling import make_scheduler
from .pipeline import IMAGE_TASKS, DiffunetPipeline, inpainting_condition, upsample_condition
from .segment_pipeline import DiffunetSegmentationPipeline, mask_classes, mask_to_sample
from .segmentation import LOSSES, segmentation_loss, segmentation_scores
from .tables import choose

# (n, **conditions) -> n samples (n, C, H, W) in [-1, 1] from the EMA model: the trainer's, seeded
Sampler = Callable[..., torch.Tensor]


class Generate:
    """Unconditional or class-conditional generation: x0 is the image; the class label, where the model has
    classes, conditions it, and is dropped to the null class with probability ``train.label_dropout`` so that
    one model also learns the unconditional score (classifier-free guidance)."""

    name = "generate"                   # the pipeline's ``task``
    augments = True                     # takes train.augment_p: its x0 is the image alone, free to transform
    segments = False                    # its pipeline is DiffunetSegmentationPipeline (masks of images)
    sample_arguments = "--out samples"  # what ``python sample.py FOLDER`` needs beside it (the model card's)

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
        horizontal flips if ``data.hflip``, then label dropout (one uniform draw per image for each), then the
        non-leaky augmentation (``train.augment_p``) with its ``augment_labels``."""
        x, y = batch[:2]
        x, keywords = flip(cfg, x)[0], labels(y, model, cfg)
        if cfg.train.augment_p > 0:
            x, keywords["augment_labels"] = augment(x, cfg.train.augment_p)
        return x, keywords

    def loss(self, model, noise_scheduler, x0, cond, cfg) -> torch.Tensor:
        # through the module, so that a test can stand a faulty loss in for the real one
        return objectives.training_loss(model, noise_scheduler, x0, cond, cfg.diffusion)

    def pipeline_options(self, cfg) -> dict:
        """The ``DiffunetPipeline`` keywords (beside unet and scheduler) a run of this task saves."""
        return {"task": self.name}

    def pipeline(self, unet, scheduler, cfg):
        """The pipeline a run of this task saves: its EMA U-Net, the training noise scheduler, and how the run
        samples (``sample_keywords``)."""
        return DiffunetPipeline(unet=unet, scheduler=scheduler, **self.pipeline_options(cfg), **sample_keywords(cfg))

    def card(self, cfg, unet) -> tuple[str, str]:
        """(what the model is, a line of Python that uses its pipeline ``pipe``), for the model card."""
        c = unet.config
        kind = f"class-conditional ({c.num_classes} classes)" if c.num_classes else "unconditional"
        usage = (f"images = pipe(class_labels=list(range({c.num_classes})), guidance_scale=2.0).images"
                 if c.num_classes else "images = pipe(batch_size=16).images")
        return f"A {kind} diffusion model of {c.in_channels}-channel images", usage

    def dataset_options(self, cfg, model) -> dict:
        """The keywords of ``data.build_dataset`` beside the data section and the size: the images' channels, and
        how masks are read (segmentation: class ids, and the loss's weight map)."""
        return {"channels": model.config.in_channels}

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


def sample_keywords(cfg, keys=("scheduler", "steps", "guidance_scale")) -> dict:
    """The run's ``sample.*`` as the pipelines' ``sample_*`` keywords: saved in its folder, so that sample.py
    and a call without steps or guidance sample as the run did."""
    return {f"sample_{key}": cfg.sample[key] for key in keys}


def check_augment(cfg, model, task) -> None:
    """``train.augment_p``: a probability, for a task whose target can be augmented alone, and a model that takes
    the labels (``model.augment_dim``)."""
    p = cfg.train.augment_p
    if not 0 <= p < 1:
        raise ConfigError(f"train.augment_p must be in [0, 1) (got {p})")
    if p > 0 and not getattr(task, "augments", False):
        raise ConfigError(f"train.augment_p={p} is for task=generate (task={cfg.task} conditions on an image "
                          f"that would have to be augmented with it); set train.augment_p=0")
    if p > 0 and model.config.augment_dim != AUGMENT_DIM:
        raise ConfigError(f"train.augment_p={p} needs model.augment_dim={AUGMENT_DIM} (the augmentation labels' "
                          f"width; got {model.config.augment_dim}); set model.augment_dim={AUGMENT_DIM}")


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
    augments = False                    # a geometric augmentation would have to move the condition as well
    paired = ""                         # the paired data this task can take: "conds" or "masks"
    sample_arguments = "--cond inputs/ --out outputs"

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
    sample_arguments = "--cond inputs/ --mask masks/ --out outputs"
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


class Segmentation:
    """Deterministic segmentation, the 2015 U-Net's job: a U-Net without time (``model.time_condition=none``)
    maps the image to class logits (``model.out_channels`` = K classes, 2 for a binary mask), trained with
    ``segment.loss`` (a name in ``segmentation.LOSSES``; ``unet_weighted_ce`` takes the paper's weight map, made
    by the data pipeline). Batches are (image, label, mask[, weight]): paired folders' ``masks/``, an HF mask
    column, or the embedded cells (``data.source=cells``). Grids: image, truth, prediction; evaluation: Dice,
    IoU and HD95 on held-out images (``data.holdout``), and the objects counted in prediction and truth."""

    name = "segmentation"
    rows = ("image", "truth", "output")
    augments = False                    # the mask would have to move with the image
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
        if model.config.time_condition != "none":
            raise ConfigError(f"task={self.name} is deterministic: set model.time_condition=none (for segmentation "
                              f"by diffusion: task=segmentation_diffusion)")
        if self.classes(model) < 2:
            raise ConfigError("task=segmentation needs model.out_channels >= 2 (class logits; 2 for a binary mask)")
        if model.config.cond_channels:
            raise ConfigError(f"task={self.name} segments the image itself: set model.cond_channels=0")

    def check_data(self, cfg, dataset) -> None:
        try:
            choose(LOSSES, cfg.segment.loss, "segment.loss")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if getattr(dataset, "condition", None) != "masks":
            raise ConfigError(f"task={self.name} needs masks: data.source=cells, a folder with images/ and masks/, "
                              f"or an HF dataset with data.mask_column (data.source={cfg.data.source} has none)")
        if cfg.train.eval_every > 0 and cfg.data.holdout < 1:
            raise ConfigError(f"train.eval_every needs held-out images for task={self.name}: set data.holdout")

    def dataset_options(self, cfg, model) -> dict:
        self.check_model(cfg, model)
        weights = (cfg.segment.w0, cfg.segment.sigma) if cfg.segment.loss == "unet_weighted_ce" else None
        return {"channels": model.config.in_channels, "mask_classes": self.classes(model), "weights": weights}

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        """(the mask (B, 1, H, W) class ids, {"image": ..., "weight": ...}): flips apply to all three alike."""
        x, _, mask, *weight = batch
        x, mask, *weight = flip(cfg, x, mask, *weight)
        return mask, {"image": x, "weight": weight[0] if weight else None}

    def loss(self, model, noise_scheduler, mask, inputs, cfg) -> torch.Tensor:
        return segmentation_loss(cfg.segment.loss, model(inputs["image"]).sample, mask, inputs["weight"])

    def pipeline(self, unet, scheduler, cfg):
        return DiffunetSegmentationPipeline(unet=unet, scheduler=None)

    def pipeline_options(self, cfg) -> dict:
        return {}

    def card(self, cfg, unet) -> tuple[str, str]:
        return (f"A deterministic segmentation model ({self.classes(unet)} classes) of "
                f"{unet.config.in_channels}-channel images", "masks = pipe(image=images, tile=128).masks")

    def segment(self, model, x: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class ids (B, H, W), the uncertainty map (B, H, W) or None) of images ``x`` (B, C, H, W) in [-1, 1]."""
        pipe = self.pipeline(model, None, cfg)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(image=(x + 1) / 2, output_type="pt")
        return out.masks, out.std

    def outputs(self, model, held, n: int, cfg):
        items = [held[i] for i in range(min(n, len(held)))]
        x = torch.stack([item[0] for item in items]).to(model.device)
        truth = torch.stack([item[2] for item in items])[:, 0].long().to(model.device)   # (n, H, W)
        masks, std = self.segment(model, x, cfg)
        return x, truth, masks, std

    def grid(self, model, n: int, sample: Sampler, held, cfg) -> tuple[torch.Tensor, int]:
        """Up to 16 held-out images, one per column; rows: ``self.rows`` (image, truth, prediction[, std map])."""
        x, truth, masks, std = self.outputs(model, held, min(n, 16), cfg)
        k, c = self.classes(model), x.shape[1]
        shown = {"image": x}
        for row, ids in (("truth", truth), ("output", masks)):           # class ids -> gray in [-1, 1]
            shown[row] = (ids[:, None].float() * 2 / (k - 1) - 1).expand(-1, c, -1, -1)
        if std is not None:                                              # 4 std: 0.25 and above is white
            shown["std"] = (std[:, None] * 4 - 1).clamp(-1, 1).expand(-1, c, -1, -1)
        return torch.cat([shown[row] for row in self.rows]), len(x)

    def evaluate(self, model, sample: Sampler, held, cfg) -> dict:
        """Dice, IoU, HD95 (``segmentation.segmentation_scores``) of ``train.eval_num_images`` held-out images,
        and the mean number of objects (4-connected components of the foreground) in prediction and truth."""
        x, truth, masks, std = self.outputs(model, held, cfg.train.eval_num_images, cfg)
        scores = segmentation_scores(masks.cpu(), truth.cpu(), self.classes(model))
        for name, ids in (("objects", masks), ("objects_truth", truth)):
            scores[name] = sum(count_objects(m > 0) for m in ids.cpu().numpy()) / len(ids)
        if std is not None:                                              # does the uncertainty mean something?
            wrong = masks != truth
            scores["std_wrong"] = float(std[wrong].mean()) if wrong.any() else float("nan")
            scores["std_right"] = float(std[~wrong].mean()) if (~wrong).any() else float("nan")
        return scores


class SegmentationDiffusion(Segmentation, Generate):
    """Segmentation by diffusion (Wolleb et al. 2022, MedSegDiff): the mask is x0 (``mask_to_sample``: one
    channel 2 m - 1 for a binary mask, so ``model.in_channels=1``; K one-hot channels for K > 2) and the image is
    the condition (``model.cond_channels`` = the image's channels), dropped with ``train.cond_dropout``.
    Evaluation samples an ensemble of ``segment.ensemble`` masks per image: the majority mask is scored, and the
    std map's mean on wrong and on right pixels is logged beside it."""

    name = "segmentation_diffusion"
    rows = ("image", "truth", "output", "std")
    loss = Generate.loss
    sample_arguments = "--cond images/ --out masks --num-per-cond 8"

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
        x, mask = flip(cfg, x, mask)
        keywords = {"cond": x}
        if cfg.train.cond_dropout > 0:
            keywords["cond_dropped"] = torch.rand(x.shape[0], device=x.device) < cfg.train.cond_dropout
        return mask_to_sample(mask, self.classes(model)), keywords

    def pipeline(self, unet, scheduler, cfg):
        return DiffunetSegmentationPipeline(unet=unet, scheduler=scheduler,
                                            **sample_keywords(cfg, ("scheduler", "steps")))

    def card(self, cfg, unet) -> tuple[str, str]:
        return (f"A diffusion segmentation model ({self.classes(unet)} classes) of "
                f"{unet.config.cond_channels}-channel images",
                "out = pipe(image=images, num_samples=8, tile=128)   # out.masks, out.std")

    def segment(self, model, x, cfg):
        scheduler = make_scheduler(cfg.sample.scheduler, objectives.make_noise_scheduler(cfg.diffusion).config)
        pipe = self.pipeline(model, scheduler, cfg)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(cfg.sample.seed * 1_000_003 + i) for i in range(len(x))]
        masks, stds = [], []
        for lo in range(0, len(x), 32):                 # 32 images x the ensemble per batch: bounded memory
            out = pipe(image=(x[lo:lo + 32] + 1) / 2, num_samples=cfg.segment.ensemble,
                       num_inference_steps=cfg.sample.steps, generator=generators[lo:lo + 32], output_type="pt")
            masks.append(out.masks)
            stds.append(out.std if out.std is not None else torch.zeros_like(out.masks, dtype=torch.float32))
        return torch.cat(masks), torch.cat(stds)


TASKS = {"generate": Generate(), "super_resolution": SuperResolution(), "inpainting": Inpainting(),
         "segmentation": Segmentation(), "segmentation_diffusion": SegmentationDiffusion()}


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
