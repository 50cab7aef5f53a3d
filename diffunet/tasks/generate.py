"""Generation from noise: unconditional, or class-conditional with classifier-free guidance."""

from __future__ import annotations

import torch

from ..data import to_uint8
from ..data.augment import augment
from ..errors import ConfigError
from ..metrics import ExtractorUnavailable, evaluate, load_extractor
from ..metrics.frechet import ARRAY_EXTRACTORS, evaluate_arrays
from ..model.pipeline import DiffunetPipeline
from ..sampling import class_labels_for
from .base import TaskSampler, Task, augment_jointly, check_classes, eval_reference, flip, labels, needs_time, of_what, sample_keywords


class Generate(Task):
    """Unconditional or class-conditional generation: x0 is the image; the class label, where the model has
    classes, conditions it, and is dropped to the null class with probability ``train.label_dropout`` so that
    one model also learns the unconditional score (classifier-free guidance)."""

    name = "generate"
    augments = True
    scored_by_fid = True

    def check(self, cfg, model, dataset) -> None:
        needs_time(cfg, model)
        check_classes(cfg, model, dataset)
        if cfg.train.eval_every > 0:
            if eval_reference(cfg) is None:                 # 2D only: signals and volumes come from folders
                raise ConfigError(f"train.eval_every needs train.eval_reference (a folder, an .npz or 'digits') "
                                  f"for data.source={cfg.data.source}")
            try:
                load_extractor(cfg.train.eval_extractor) if model.dims == 2 else ARRAY_EXTRACTORS[model.dims]()
            except ExtractorUnavailable as e:
                raise ConfigError(f"train.eval_extractor: {e}") from None

    def training_batch(self, batch, model, cfg) -> tuple[torch.Tensor, dict]:
        """(x0, the model's conditioning keywords) from a loader batch (images, labels) on the device: random
        horizontal flips if ``data.hflip`` and ``data.augment``'s transforms, then label dropout (one uniform draw per image for each), then the
        non-leaky augmentation (``train.augment_p``) with its ``augment_labels``."""
        x, y = batch[:2]
        x = augment_jointly(cfg, *flip(cfg, x))[0]
        keywords = labels(y, model, cfg)
        if cfg.train.augment_p > 0:
            x, keywords["augment_labels"] = augment(x, cfg.train.augment_p)
        return x, keywords

    def pipeline_options(self, cfg) -> dict:
        """The ``DiffunetPipeline`` keywords (beside unet, scheduler and the sampling settings) of this task."""
        return {"task": self.name}

    def pipeline(self, unet, scheduler, cfg):
        """``DiffunetPipeline`` of the run's U-Net and ``scheduler``, with how the run samples (``sample_*``)."""
        return DiffunetPipeline(unet=unet, scheduler=scheduler, **self.pipeline_options(cfg), **sample_keywords(cfg))

    def card(self, cfg, unet) -> tuple[str, str]:
        c = unet.config
        kind = f"class-conditional ({c.num_classes} classes)" if c.num_classes else "unconditional"
        usage = (f"images = pipe(class_labels=list(range({c.num_classes})), guidance_scale=2.0).images"
                 if c.num_classes else "images = pipe(batch_size=16).images")
        return f"A {kind} diffusion model of {of_what(unet)}", usage

    def grid(self, model, n: int, sample: TaskSampler, held, cfg) -> tuple[torch.Tensor, int | None]:
        """``n`` samples: balanced classes, one per column."""
        k = model.config.num_classes
        if not k:
            return sample(n, class_labels=None), None
        return sample(n, class_labels=torch.arange(n) % k), (k if n >= k else None)

    def evaluate(self, model, sample: TaskSampler, held, cfg) -> dict:
        """FID / KID (and IS where the extractor has one) of ``train.eval_num_images`` samples, every class
        equally often, against the reference."""
        classes = "all" if model.config.num_classes else None
        images = sample(cfg.train.eval_num_images, class_labels=classes)
        if model.dims != 2:                     # signals and volumes: metrics.frechet's extractors
            labels = class_labels_for(classes, range(len(images)), model.config.num_classes)
            return evaluate_arrays(images, eval_reference(cfg), model.dims, labels=labels, seed=cfg.sample.seed,
                                   intensity=(cfg.data.intensity, tuple(cfg.data.intensity_range)))
        return evaluate(to_uint8(images), eval_reference(cfg), cfg.train.eval_extractor, seed=cfg.sample.seed)
