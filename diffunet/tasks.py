"""What a batch means, one entry per job: the clean target x0, the model's conditioning keywords, the loss, the
conditions of sample grids and evaluation, and the score of samples.

``TASKS`` holds "generate" today; super-resolution, inpainting and segmentation become entries of the same
table. The training loop, the sampler and the evaluator call a task's methods and never ask which task runs.
Sampling conditions are keywords of ``sampling.generate``, which hands them to ``DiffunetPipeline``:
``class_labels`` today, ``image`` / ``mask_image`` (one per image) for the image-conditioned jobs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import objectives
from .config import ConfigError
from .metrics import ExtractorUnavailable, evaluate, load_extractor
from .tables import choose


class Generate:
    """Unconditional or class-conditional generation: x0 is the image; the class label, where the model has
    classes, conditions it, and is dropped to the null class with probability ``train.label_dropout`` so that
    one model also learns the unconditional score (classifier-free guidance)."""

    def check(self, cfg, model, dataset) -> None:
        """What this task needs of the config, the model and the data; ConfigError (one line) otherwise."""
        if cfg.train.eval_every > 0:
            if eval_reference(cfg) is None:
                raise ConfigError(f"train.eval_every needs train.eval_reference (a folder, an .npz or 'digits') "
                                  f"for data.source={cfg.data.source}")
            try:
                load_extractor(cfg.train.eval_extractor)
            except ExtractorUnavailable as e:
                raise ConfigError(f"train.eval_extractor: {e}") from None
        classes = model.config.num_classes
        if classes and not dataset.num_classes:
            raise ConfigError(f"model.num_classes={classes} but data.source={cfg.data.source} has no labels; "
                              f"set model.num_classes=null or give labelled data")
        if classes and dataset.num_classes > classes:
            raise ConfigError(f"data has {dataset.num_classes} classes but model.num_classes={classes}")

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        """(x0, the model's conditioning keywords) from a loader batch (images, labels) on the device: random
        horizontal flips if ``data.hflip``, then label dropout (one uniform draw per image for each)."""
        x, y = batch
        if cfg.data.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if model.null_class is None:
            return x, {}
        drop = torch.rand(y.shape[0], device=y.device) < cfg.train.label_dropout
        return x, {"class_labels": torch.where(drop, torch.full_like(y, model.null_class), y)}

    def loss(self, model, noise_scheduler, x0, cond, cfg) -> torch.Tensor:
        # through the module, so that a test can stand a faulty loss in for the real one
        return objectives.diffusion_loss(model, noise_scheduler, x0, cond, weighting=cfg.diffusion.loss_weighting,
                                         gamma=cfg.diffusion.snr_gamma)

    def grid(self, model, n: int) -> tuple[dict, int | None]:
        """(sampling conditions, images per grid row) of a grid of ``n``: balanced classes, one per column."""
        k = model.config.num_classes
        if not k:
            return {"class_labels": None}, None
        return {"class_labels": torch.arange(n) % k}, (k if n >= k else None)

    def evaluation(self, model) -> dict:
        """Sampling conditions of the images that evaluation scores: every class equally often."""
        return {"class_labels": "all" if model.config.num_classes else None}

    def score(self, images: torch.Tensor, cfg) -> dict:
        """FID / KID (and IS where the extractor has one) of uint8 samples against the reference."""
        return evaluate(images, eval_reference(cfg), cfg.train.eval_extractor, seed=cfg.sample.seed)


TASKS = {"generate": Generate()}


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
