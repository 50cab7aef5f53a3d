"""The task contract: what a job must say for ``train.py`` to train it and ``sample.py`` to sample it, written once
as the ``Task`` base class, and the helpers several jobs share.

A job is one class, one line in ``TASKS`` (``tasks/__init__.py``) and a preset in ``configs/``. The trainer,
the export and the evaluator call only the methods below and never ask which job runs: docs/tasks.md walks
through adding one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import objectives
from ..data.augment import AUGMENT_DIM
from ..data.transforms import active, joint_augment
from ..data.sources import source_of
from ..errors import ConfigError
from ..model.pipeline import DiffunetPipeline
from ..model.unet import KINDS
from ..sampling import sample_with


@dataclass
class TaskSampler:
    """A task's own pipeline (``Task.pipeline``) with the run's sampling settings: ``sampler(n, **conditions)``
    gives n samples (n, C, H, W) in [-1, 1] on the CPU, image i from its own generator seeded by (``seed``, i), so
    that grids and evaluations do not depend on the batch size. ``pipe`` is there for tasks that call their
    pipeline themselves (segmentation's ensembles)."""
    pipe: DiffunetPipeline
    seed: int
    steps: int
    guidance_scale: float
    batch_size: int
    device: torch.device | None = None

    def __call__(self, n: int, **conditions) -> torch.Tensor:
        return sample_with(self.pipe, n, seed=self.seed, steps=self.steps, guidance_scale=self.guidance_scale,
                           batch_size=self.batch_size, device=self.device, **conditions)


class Task:
    """A job the U-Net does: what a batch means, the loss, the pipeline a run saves, its grids and its scores.

    Attributes (class-level, with the defaults here):

    - ``name``: its key in ``TASKS``, the config's ``task``, and the pipeline's ``task`` keyword.
    - ``section``: the config section it owns (``cfg.<section>``, a dataclass in ``config.py``), or None.
    - ``augments`` (False): takes ``train.augment_p``, EDM's non-leaky augmentation: only where x0 is the image
      alone, free to transform without a condition moving with it.
    - ``segments`` (False): its pipeline is ``DiffunetSegmentationPipeline`` (masks of images), not
      ``DiffunetPipeline`` (images).
    - ``scored_by_fid`` (False): its samples come from noise and are scored by FID against a reference (the
      post-hoc EMA sweep takes only such runs).
    - ``rows``: the rows of its sample grid, top to bottom (one example per column).
    - ``sample_arguments``: what ``python sample.py FOLDER`` needs beside the folder (the model card says it).

    Methods, in the order a run calls them (all take the resolved config ``cfg``):

    - ``dataset_options(cfg, model)``: the keywords of ``data.build_dataset`` beside the data section and size.
    - ``check(cfg, model, dataset)``: everything it needs of the config, model and data, before any compute;
      ConfigError (one line that says what to set) otherwise.
    - ``training_batch(batch, model, cfg)``: (x0, the model's conditioning keywords) from a loader batch on the
      device; random draws come from torch's global RNG, which a checkpoint saves.
    - ``loss(model, noise_scheduler, x0, cond, cfg)``: the scalar training loss (default: the diffusion
      objective's, ``objectives.training_loss``).
    - ``pipeline(unet, scheduler, cfg)``: the pipeline a run saves, and the one its grids and evaluations sample
      with (the trainer wraps it in a ``TaskSampler``; it never builds a pipeline itself).
    - ``grid(model, n, sample, held, cfg)``: (images (N, C, H, W) in [-1, 1], images per row) of a sample grid;
      ``held`` is the held-out split (``data.holdout``) or None.
    - ``evaluate(model, sample, held, cfg)``: a dict of float scores, logged and appended to ``eval.jsonl``.
    - ``card(cfg, unet)``: (what the model is, one line of Python using its pipeline ``pipe``) for the model card.
    """

    name: str = ""
    section: str | None = None
    augments: bool = False
    segments: bool = False
    scored_by_fid: bool = False
    rows: tuple[str, ...] = ()
    sample_arguments: str = "--out samples"

    def dataset_options(self, cfg, model) -> dict:
        return {"channels": model.config.in_channels}

    def check(self, cfg, model, dataset) -> None:
        needs_time(cfg, model)
        check_classes(cfg, model, dataset)

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"task {self.name!r} does not say what a batch means (training_batch)")

    def loss(self, model, noise_scheduler, x0, cond, cfg) -> torch.Tensor:
        # through the module, so that a test can stand a faulty loss in for the real one
        return objectives.training_loss(model, noise_scheduler, x0, cond, cfg.diffusion)

    def pipeline(self, unet, scheduler, cfg):
        raise NotImplementedError(f"task {self.name!r} has no pipeline")

    def grid(self, model, n: int, sample: TaskSampler, held, cfg) -> tuple[torch.Tensor, int | None]:
        raise NotImplementedError(f"task {self.name!r} has no sample grid")

    def evaluate(self, model, sample: TaskSampler, held, cfg) -> dict:
        raise NotImplementedError(f"task {self.name!r} has no evaluation")

    def card(self, cfg, unet) -> tuple[str, str]:
        raise NotImplementedError(f"task {self.name!r} has no model card")


# ------------------------------------------------------------------------------------------ shared by tasks

def sample_keywords(cfg, keys=("scheduler", "steps", "guidance_scale")) -> dict:
    """The run's ``sample.*`` as the pipelines' ``sample_*`` keywords: saved in its folder, so that sample.py
    and a call without steps or guidance sample as the run did; for signals and volumes also ``intensity``, how
    their files map to [-1, 1] (``data.intensity`` and its range), which sample.py applies to what it reads."""
    keywords = {f"sample_{key}": cfg.sample[key] for key in keys}
    if cfg.model.spatial_dims != 2:
        keywords["intensity"] = [str(cfg.data.intensity), *map(float, cfg.data.intensity_range)]
    return keywords


def check_augment(cfg, model, task: Task) -> None:
    """``train.augment_p``: a probability, for a task whose target can be augmented alone, and a model that takes
    the labels (``model.augment_dim``)."""
    p = cfg.train.augment_p
    if not 0 <= p < 1:
        raise ConfigError(f"train.augment_p must be in [0, 1) (got {p})")
    if p > 0 and not task.augments:
        raise ConfigError(f"train.augment_p={p} is for task=generate (task={cfg.task} conditions on an image "
                          f"that would have to be augmented with it); set train.augment_p=0")
    if p > 0 and model.config.augment_dim != AUGMENT_DIM:
        raise ConfigError(f"train.augment_p={p} needs model.augment_dim={AUGMENT_DIM} (the augmentation labels' "
                          f"width; got {model.config.augment_dim}); set model.augment_dim={AUGMENT_DIM}")


def needs_time(cfg, model) -> None:
    """Diffusion denoises at a timestep: a model built without time cannot be trained for it."""
    if not model.timed:
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
    """Random flips of the last axis (an image's width, a signal's time) if ``data.hflip``, one draw per
    sample, the same for a sample and its condition."""
    if not cfg.data.hflip:
        return images
    flipped = torch.rand(images[0].shape[0], device=images[0].device) < 0.5
    return tuple(torch.where(flipped.view(-1, *(1,) * (x.ndim - 1)), x.flip(-1), x) for x in images)


def augment_jointly(cfg, *tensors: torch.Tensor, masks: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """``data.augment``'s joint transforms (``data.transforms``) of a batch's tensors, the sample first; those at
    the positions ``masks`` (masks, weight maps) by nearest neighbour and without intensity changes."""
    if not active(cfg.data.augment):
        return tensors
    return tuple(joint_augment(cfg.data.augment, list(tensors), [i in masks for i in range(len(tensors))]))


def of_what(unet, channels: int | None = None) -> str:
    """What a model's card says it takes: "1-channel images", "2-channel volumes"."""
    return f"{unet.config.in_channels if channels is None else channels}-channel {KINDS[unet.dims]}"


def labels(y: torch.Tensor, model, cfg) -> dict:
    """``class_labels`` for a class-conditional model, dropped to the null class with ``train.label_dropout``."""
    if model.null_class is None:
        return {}
    drop = torch.rand(y.shape[0], device=y.device) < cfg.train.label_dropout
    return {"class_labels": torch.where(drop, torch.full_like(y, model.null_class), y)}


def condition(cond: torch.Tensor, cfg) -> dict:
    """The model's ``cond`` keywords: the condition, and with ``train.cond_dropout`` the images whose condition
    is dropped (``cond_dropped``, one uniform draw per image) so that guidance can apply to it."""
    keywords = {"cond": cond}
    if cfg.train.cond_dropout > 0:
        keywords["cond_dropped"] = torch.rand(cond.shape[0], device=cond.device) < cfg.train.cond_dropout
    return keywords


def check_cond_dropout(cfg) -> None:
    if not 0 <= cfg.train.cond_dropout < 1:
        raise ConfigError(f"train.cond_dropout must be in [0, 1) (got {cfg.train.cond_dropout})")


def eval_reference(cfg) -> str | None:
    """What evaluation compares with: the configured reference, else the training data if it can."""
    if cfg.train.eval_reference:
        return cfg.train.eval_reference
    source, named = str(cfg.data.source), source_of(str(cfg.data.source))
    referenced = named is not None and (named.reference or named.held_out) is not None
    return source if referenced or Path(source).is_dir() else None
