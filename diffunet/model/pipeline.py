"""``DiffunetPipeline``: the project's one sampling loop, as a diffusers pipeline (modelled on ``DiTPipeline``).

    pipe = DiffusionPipeline.from_pretrained("runs/digits/pipeline", trust_remote_code=True)   # the folder's code
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe(class_labels=[3, 3, 7], guidance_scale=2.0, num_inference_steps=20).images
    sharp = sr_pipe(image=low_res_images).images                        # a super_resolution run's pipeline
    filled = inpaint_pipe(image=images, mask_image=masks).images        # white in the mask: to fill
    pipe.scheduler = RePaintScheduler.from_config(pipe.scheduler.config)   # any epsilon model inpaints (RePaint)

Image i draws all its randomness (initial noise and every noise draw of a stochastic scheduler) from
``generator[i]`` when ``generator`` is a list, so an image depends on its own generator only, never on the batch
it was drawn in: ``diffunet.sampling`` seeds one generator per image index on top of this.

This file travels inside exported pipeline folders, which load without diffunet installed: it imports torch,
diffusers and its own folder's ``unet`` only.
"""

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput, RePaintScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .tiles import predict_tiled
from .unet import KINDS, LETTERS


class ResizeWarning(UserWarning):
    """A condition of another size than the model's, resized to it (``sample.py --cond`` counts them)."""


OUTPUT_TYPES = ("pil", "np", "pt", "latent")   # "latent": the raw final sample, model space (~[-1, 1]), float32


def check_output_type(output_type: str | None, dims: int, types=OUTPUT_TYPES) -> str:
    """``output_type``, or the default of ``dims`` (None: "pil" for images, "np" for signals and volumes); one
    line for an unknown one, or "pil" for data that is not an image."""
    if output_type is None:
        return "pil" if dims == 2 else "np"
    if output_type not in types:
        raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(types)}")
    if output_type == "pil" and dims != 2:
        raise ValueError(f"output_type='pil' makes images, and this model makes {dims}D {KINDS[dims]}: use "
                         f"output_type='np' or 'pt' ((B, C, {LETTERS[dims]}) arrays)")
    return output_type


def to_model_space(data, dims: int, processor: VaeImageProcessor, name: str = "image") -> torch.Tensor:
    """A batch in [0, 1] as the model's (B, C, *spatial) in [-1, 1]. Images go through diffusers' processor (PIL,
    np (B, H, W, C), tensors (B, C, H, W)); signals and volumes are tensors or arrays (B, C, L) / (B, C, D, H, W),
    or a list of (C, ...) ones, channels first as the model takes them."""
    if dims == 2:
        return processor.preprocess(data)
    if isinstance(data, (list, tuple)):
        data = torch.stack([torch.as_tensor(np.asarray(d) if not torch.is_tensor(d) else d) for d in data])
    x = (data if torch.is_tensor(data) else torch.as_tensor(np.asarray(data))).float()
    if x.ndim != dims + 2:
        raise ValueError(f"{name} must be (B, C, {LETTERS[dims]}) {KINDS[dims]} in [0, 1] for this {dims}D model, "
                         f"got shape {tuple(x.shape)}")
    return x * 2 - 1


def from_model_space(x: torch.Tensor, output_type: str, dims: int, processor: VaeImageProcessor):
    """The final samples (B, C, *spatial) in [-1, 1] as ``output_type``: diffusers' processor for images (np
    (B, H, W, C)); signals and volumes stay channels first, (B, C, *spatial) in [0, 1] ("latent": as they are)."""
    if dims == 2 or output_type == "latent":
        return processor.postprocess(x, output_type)
    x = (x / 2 + 0.5).clamp(0, 1)
    return x if output_type == "pt" else x.cpu().float().numpy()


def predict(unet, x, t, class_labels=None, guidance_scale: float = 1.0, cond: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The model output for the scheduler. Classifier-free guidance (Ho & Salimans 2022):
    uncond + w (cond - uncond), so w = 1 is the conditional model and w = 0 the unconditional (null class, and
    the image condition ``cond`` dropped); only other w pay for the second pass, batched with the first."""
    def call(x, labels, dropped: bool | None):
        extra = {} if cond is None else {"cond": cond.repeat(len(x) // len(cond), *(1,) * (cond.ndim - 1)),
                                         "cond_dropped": dropped}
        return unet(x, t, labels, **extra).sample

    def flags(*values):                                             # one flag per image of each pass
        return torch.tensor(values, device=x.device).repeat_interleave(len(x))

    if (class_labels is None and cond is None) or guidance_scale == 1.0:
        return call(x, class_labels, flags(False))
    null = None if class_labels is None else torch.full_like(class_labels, unet.null_class)
    if guidance_scale == 0.0:
        return call(x, null, flags(True))
    labels = None if class_labels is None else torch.cat([class_labels, null])
    conditional, unconditional = call(torch.cat([x, x]), labels, flags(False, True)).chunk(2)  # (2B,) -> 2x (B,)
    return unconditional + guidance_scale * (conditional - unconditional)


def denoise(scheduler, model, x: torch.Tensor, num_inference_steps: int, generator=None, eta: float = 0.0,
            progress_bar=iter) -> torch.Tensor:
    """The sampling loop: ``x`` (pure noise, unit variance) denoised by ``model(x_t, t)`` -> the scheduler's model
    output, through ``scheduler``'s steps; ``generator`` (one, or a list: one per image) feeds stochastic steps."""
    scheduler.set_timesteps(num_inference_steps, device=x.device)    # also resets multistep solvers' history
    # flow-matching schedulers start from unit noise and take the sample as it is: neither attribute exists there
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    kwargs = step_kwargs(scheduler, generator, eta)
    for t in progress_bar(scheduler.timesteps):
        x = scheduler.step(model(scale(x, t), t), t, x, **kwargs).prev_sample
    return x


def step_kwargs(scheduler, generator, eta: float) -> dict:
    """The keywords this scheduler's ``step`` takes: DDIM's ``eta``, and the generator(s) for its noise."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": eta} if "eta" in accepted else {}
    if "generator" in accepted:
        kwargs["generator"] = generator           # a list: one noise stream per image (randn_tensor)
    return kwargs


# The installed package's reader of a local folder (``diffunet.pretrained.load_pipeline``), which ``import diffunet``
# puts here; it stays None in the copy of this file inside an exported folder, where diffusers' loader reads it.
# Set from outside rather than imported, so that this folder imports nothing of the toolkit.
folder_reader: Callable | None = None


def from_folder(cls, diffusers_loader, path, kwargs: dict):
    """``cls.from_pretrained(path, **kwargs)``: the installed diffunet's reader (``folder_reader``) for a local
    folder; ``diffusers_loader`` otherwise: a Hub id, or this file running as the copy inside an exported folder."""
    if folder_reader is not None and os.path.isdir(path):
        return folder_reader(cls, path, **kwargs)
    return diffusers_loader(path, **kwargs)


# ---------------------------------------------------------------------------------------- image conditions
# What an image-conditioned task gives the model, one entry per task. The training side (diffunet.tasks) builds
# its conditions with these same functions, so training and sampling cannot drift apart.

# The smooth interpolation of each dimensionality (torch has no tricubic one)
SMOOTH = {1: "linear", 2: "bicubic", 3: "trilinear"}


def upsample_condition(low: torch.Tensor, size) -> torch.Tensor:
    """Super-resolution's condition: the low-resolution input (B, C, *small) in [-1, 1], upsampled to the model's
    size (B, C, *size) and clamped: bicubic in an image (it overshoots), linear along a signal, trilinear in a
    volume."""
    if tuple(low.shape[2:]) == tuple(size):
        return low
    mode = SMOOTH[low.ndim - 2]
    return F.interpolate(low, size=tuple(size), mode=mode, align_corners=False).clamp(-1, 1)


def inpainting_condition(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inpainting's condition: the image with the region to fill zeroed, and the mask (1: to fill) as one more
    channel: (B, C, *S), (B, 1, *S) -> (B, C + 1, *S)."""
    return torch.cat([image * (1 - mask), mask], dim=1)


@dataclass(frozen=True)
class ImageTask:
    """How a task's ``image`` / ``mask_image`` become the model's condition, and what is pasted back at the end."""
    condition: Callable | None          # (image, mask, model size) -> cond (B, K, H, W); None: no image condition
    extra_channels: int = 0             # cond_channels - in_channels (a task with a condition)
    takes_mask: bool = False
    scale: Callable = lambda f: 1       # (sr_factor) -> how much smaller than the model's the input image is
    paste: bool = False                 # the known pixels are copied into the output (exactly)


# Every task a DiffunetPipeline takes (its ``task`` keyword), the one check of that name
IMAGE_TASKS = {
    "generate": ImageTask(condition=None),      # from noise (and class labels): the model has no cond_channels
    "super_resolution": ImageTask(lambda image, mask, size: upsample_condition(image, size), scale=lambda f: f),
    "inpainting": ImageTask(lambda image, mask, size: inpainting_condition(image, mask), extra_channels=1,
                            takes_mask=True, paste=True),
}


class DiffunetPipeline(DiffusionPipeline):
    """Sampling from diffunet's ``UNet`` with any diffusers scheduler: class labels, classifier-free guidance,
    one generator per image, and (with a model that takes them) image conditions.

    The U-Net runs in its own dtype and device (a low-precision one under autocast); the scheduler's arithmetic
    stays in float32, since low-precision betas and sigmas visibly hurt few-step samplers.
    """

    model_cpu_offload_seq = "unet"

    # The keywords' annotations are real classes, not strings (no `from __future__ import annotations` here):
    # diffusers >= 0.33 looks each one up to type-check what model_index.json gives.
    def __init__(self, unet, scheduler, task: str = "generate", sr_factor: int = 1, sample_scheduler: str = "auto",
                 sample_steps: int = 50, sample_guidance_scale: float = 1.0, intensity: list = None,
                 sr_factors: list = None):
        super().__init__()
        if task not in IMAGE_TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(IMAGE_TASKS)}")
        self.register_modules(unet=unet, scheduler=scheduler)
        # saved in model_index.json: the task, and how the run sampled (its sample.* settings), which a call
        # without num_inference_steps / guidance_scale and diffunet's sample.py reuse
        self.register_to_config(task=task, sr_factor=sr_factor, sample_scheduler=sample_scheduler,
                                sample_steps=sample_steps, sample_guidance_scale=sample_guidance_scale)
        if intensity is not None:               # signals and volumes: how files map to [-1, 1] (data.arrays)
            self.register_to_config(intensity=list(intensity))
        if sr_factors is not None:              # super-resolution by axis, e.g. [2, 1, 1]: thick slices to thin
            self.register_to_config(sr_factors=[int(f) for f in sr_factors])
        self.image_processor = VaeImageProcessor(do_normalize=True)    # [-1, 1] <-> [0, 1], tensors <-> PIL / np
        # conditions keep their size (the default processor rounds sizes to multiples of 8, a VAE's factor)
        self.cond_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
        self.mask_processor = VaeImageProcessor(do_resize=False, do_normalize=False, do_binarize=True,
                                                do_convert_grayscale=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; for the installed class and a local folder (``train.py``'s
        ``pipeline/``, ``diffunet.export``'s folder) through diffunet's own reader instead: nothing in the folder
        is imported or run, no ``trust_remote_code`` is needed, and the result is this class."""
        return from_folder(cls, super().from_pretrained, pretrained_model_name_or_path, kwargs)

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, class_labels=None, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
                 image=None, mask_image=None, tile=None, overlap: int | None = None, tile_batch_size: int = 4,
                 output_type: str | None = None, return_dict: bool = True):
        """Sample images.

        Args:
            batch_size: the number of images; by default what ``class_labels``, a ``generator`` list or ``image``
                says, else 1.
            class_labels: one class id per image (a list or tensor), or one id for every image; None samples the
                unconditional model (the null class of a class-conditional one).
            guidance_scale: classifier-free guidance w: 1 the conditional model, 0 the unconditional, other
                values uncond + w (cond - uncond), two passes per step (batched); default: the run's
                (``config.sample_guidance_scale``).
            num_inference_steps: scheduler steps; default: the run's (``config.sample_steps``).
            generator: one ``torch.Generator`` for the whole batch, or a list, one per image: image i then draws
                its initial noise and every scheduler noise draw from ``generator[i]`` alone.
            eta: DDIM's noise (0 deterministic, 1 DDPM-like); schedulers without it ignore it.
            image: the condition, one per image (PIL images, an np array (B, H, W, C) or a tensor (B, C, H, W) in
                [0, 1]): the low-resolution input of a super-resolution model, the image to complete of an
                inpainting model or, with ``RePaintScheduler``, of any model (training-free inpainting).
            mask_image: the region to fill, white (1) where the output is generated, black where ``image`` is
                kept; those pixels of the output equal ``image`` exactly.
            tile: with ``image``: an output of any size (``image``'s, times the super-resolution factors), the
                network run on tiles of ``tile`` output pixels (an int, or one per axis) at every step, their
                outputs blended where they overlap (MultiDiffusion, Bar-Tal et al. 2023: one sample of the whole,
                so no seams, in memory bounded by the tile); None: inputs of the model's size.
            overlap: with ``tile``: the blended width between neighbouring tiles (default a quarter of the tile).
            tile_batch_size: with ``tile``: tiles per network call.
            output_type: "pil", "np" ((B, H, W, C) in [0, 1]), "pt" ((B, C, H, W) in [0, 1]) or "latent" (the
                final sample in the model's space, unclamped); default "pil". A model of signals or volumes
                (``spatial_dims`` 1 or 3) gives "np" (its default) and "pt" channels first, (B, C, L) or
                (B, C, D, H, W), and ``image`` / ``mask_image`` are tensors or arrays of that layout.
            return_dict: an ``ImagePipelineOutput``, else a 1-tuple.
        """
        unet, scheduler, device = self.unet, self.scheduler, self._execution_device
        output_type = check_output_type(output_type, unet.dims)
        if guidance_scale is None:
            guidance_scale = self.config.sample_guidance_scale
        if num_inference_steps is None:
            num_inference_steps = self.config.sample_steps
        labels = self.check_labels(class_labels)
        batch = self.batch_size_of(batch_size, labels, generator, image, unet.dims)
        if labels is not None:
            labels = labels.expand(batch).to(device) if labels.ndim == 0 else labels.to(device)
        if tile is not None and (self.image_task.condition is None or isinstance(scheduler, RePaintScheduler)
                                 or unet.valid):
            raise ValueError("tile= is for super-resolution and inpainting models with padding='same' (tiles "
                             "overlap and blend at every step); this one samples at its own size: leave tile=None")
        known, mask = self.known_pixels(image, mask_image, batch, device, any_size=tile is not None)
        size = unet.image_size if tile is None else tuple(n * f for n, f in zip(known.shape[2:], self.input_factors))
        cond = self.condition(known, mask, size)

        shape = (batch, unet.config.in_channels, *size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)  # per image if a list
        # A low-precision U-Net runs under autocast: the backbone keeps its time features in fp32 (as under
        # mixed-precision training), and autocast casts them for the layers that follow.
        dtype = unet.dtype                                              # read once: ModelMixin walks the modules
        low_precision = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)

        def model(x, t, labels=labels, cond=cond):
            with low_precision:
                return predict(unet, x.to(dtype), t, labels, guidance_scale, cond).float()

        if tile is not None:                    # each step: the tiles' outputs blended into the whole one's
            whole = model

            def model(x, t):
                return predict_tiled(lambda x, **kw: whole(x, t, **kw), x, tile, overlap=overlap,
                                     batch_size=tile_batch_size, geometry=unet, labels=labels, cond=cond)

        if isinstance(scheduler, RePaintScheduler):
            x = self.repaint(model, x, known, mask, num_inference_steps, generator, eta)
        else:
            x = denoise(scheduler, model, x, num_inference_steps, generator, eta, self.progress_bar)
        if mask is not None:
            x = torch.where(mask.bool(), x, known)          # the known pixels, exactly as given
        images = from_model_space(x, output_type, unet.dims, self.image_processor)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # ---------------------------------------------------------------------------------------- the inputs

    def check_labels(self, class_labels) -> torch.Tensor | None:
        """``class_labels`` as a long tensor, 0-d (one class for all) or (B,); ValueError for labels this
        model cannot take."""
        if class_labels is None:
            return None
        classes = self.unet.config.num_classes
        if not classes:
            raise ValueError("class_labels given, but this model is unconditional (num_classes=None)")
        labels = torch.as_tensor(class_labels).long()
        if labels.ndim > 1:
            raise ValueError(f"class_labels must be one id or one per image, got shape {tuple(labels.shape)}")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < classes):
            raise ValueError(f"class labels must be in 0..{classes - 1}, got {labels.tolist()}")
        return labels

    @staticmethod
    def batch_size_of(batch_size: int | None, labels: torch.Tensor | None, generator, image=None,
                      dims: int = 2) -> int:
        """The number of images: ``batch_size``, one per label, one per generator, one per condition image;
        ValueError if they disagree."""
        counts = {"batch_size": batch_size,
                  "class_labels": len(labels) if labels is not None and labels.ndim else None,
                  "generators": len(generator) if isinstance(generator, list) else None,
                  "images": len(image) if isinstance(image, (list, tuple)) or getattr(image, "ndim", 0) == dims + 2
                  else None}
        given = {name: n for name, n in counts.items() if n is not None}
        if len(set(given.values())) > 1:
            counts = ", ".join(f"{n} {name}" for name, n in given.items())
            raise ValueError(f"the number of images is ambiguous: {counts}")
        return next(iter(given.values()), 1)

    @property
    def image_task(self) -> ImageTask:
        return IMAGE_TASKS[self.config.task]

    def known_pixels(self, image, mask_image, batch: int, device, any_size: bool = False
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``image`` as (B, C, h, w) in [-1, 1] and ``mask_image`` as (B, 1, H, W) in {0, 1} on ``device`` (None
        where not given), checked against what this model and scheduler take: one ValueError line otherwise.
        ``any_size``: ``image`` keeps its size (sampled by tiles), and the output's is the mask's."""
        task, repaint = self.image_task, isinstance(self.scheduler, RePaintScheduler)
        takes_mask = repaint or task.takes_mask
        if task.condition is None and not repaint:
            if image is None and mask_image is None:
                return None, None
            given = " and ".join(n for n, v in (("image=", image), ("mask_image=", mask_image)) if v is not None)
            raise ValueError(f"{given} given, but this model takes no image condition (it has no cond_channels): "
                             f"it generates from noise{' and class labels' if self.unet.config.num_classes else ''}; "
                             f"for training-free inpainting use RePaintScheduler")
        if image is None or (takes_mask and mask_image is None):
            need = "image= and mask_image=" if takes_mask else "image="
            raise ValueError(f"this {'RePaint ' if repaint else ''}pipeline ({self.config.task}) needs {need}")
        if mask_image is not None and not takes_mask:
            raise ValueError(f"mask_image= given, but a {self.config.task} model takes no mask")
        size, dims = self.unet.image_size, self.unet.dims
        low = tuple(n // f for n, f in zip(size, (1,) * dims if repaint else self.input_factors))   # SR: smaller
        known = to_model_space(image, dims, self.cond_processor)
        if any_size:
            low = tuple(known.shape[2:])
            size = tuple(n * f for n, f in zip(low, self.input_factors))
        known = self.fit(known, (low, size), "image", SMOOTH[dims])
        if known.shape[1] != self.unet.config.in_channels or len(known) != batch:
            raise ValueError(f"image= holds {len(known)} image(s) of {known.shape[1]} channel(s); this call makes "
                             f"{batch} image(s) of {self.unet.config.in_channels}")
        mask = None
        if takes_mask:
            mask = (self.mask_processor.preprocess(mask_image) if dims == 2 else
                    (to_model_space(mask_image, dims, None, "mask_image") > 0).float())   # binarized at 1/2
            mask = self.fit(mask, (size,), "mask_image", "nearest")
            if mask.shape[:2] != (batch, 1):
                raise ValueError(f"mask_image= holds {len(mask)} mask(s) of {mask.shape[1]} channel(s); "
                                 f"expected {batch} of 1")
        return known.to(device), None if mask is None else mask.to(device)

    @property
    def input_factors(self) -> tuple[int, ...]:
        """How many times smaller than the model's size the ``image`` of this task is, per axis: super-resolution's
        ``sr_factors`` (by axis) or ``sr_factor`` (every axis); 1 for the other tasks."""
        factors = self.config.get("sr_factors")
        if factors is None or self.config.task != "super_resolution":
            return (self.image_task.scale(self.config.sr_factor),) * self.unet.dims
        return tuple(factors)

    @staticmethod
    def fit(x: torch.Tensor, sizes: tuple, name: str, mode: str) -> torch.Tensor:
        """(B, C, *spatial) as given if its size is one of ``sizes``, else resized to the first, with a warning,
        where only the scale differs; ValueError where the aspect ratio does."""
        have, size = tuple(x.shape[2:]), tuple(sizes[0])
        if have in {tuple(s) for s in sizes}:
            return x
        shown, want = "x".join(map(str, have)), "x".join(map(str, size))
        if len(have) != len(size) or len({a / b for a, b in zip(have, size)}) > 1:
            raise ValueError(f"{name} is {shown}, but this model takes {want} (another aspect ratio): crop it to "
                             f"{':'.join(map(str, size))}")
        warnings.warn(f"{name} is {shown}; resized to the model's {want}", ResizeWarning, stacklevel=3)
        if mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode=mode, antialias=mode == "bicubic", align_corners=False).clamp(-1, 1)

    def condition(self, known: torch.Tensor | None, mask: torch.Tensor | None, size=None) -> torch.Tensor | None:
        """The model's condition ``cond`` (B, cond_channels, H, W) from the known pixels, for every step's call:
        the task's (``IMAGE_TASKS``); None for a task without one (RePaint conditions through the scheduler).
        ``size``: the output's (default the model's)."""
        task = self.image_task
        if task.condition is None:
            return None
        want = self.unet.config.in_channels + task.extra_channels
        if self.unet.config.cond_channels != want:
            raise ValueError(f"a {self.config.task} pipeline needs a UNet with cond_channels={want}, "
                             f"this one has {self.unet.config.cond_channels}")
        return task.condition(known, mask, self.unet.image_size if size is None else size)

    def repaint(self, model, x, known, mask, num_inference_steps: int, generator, eta: float) -> torch.Tensor:
        """RePaint (Lugmayr et al. 2022) with diffusers' ``RePaintScheduler``: at each step the known region is
        the forward-noised ``known`` image, and the scheduler jumps back in time to harmonize the two (its
        ``jump_length`` / ``jump_n_sample``: set them with ``scheduler.set_timesteps`` defaults, 10 and 10). Needs
        an epsilon-predicting model, as the scheduler's arithmetic assumes."""
        scheduler = self.scheduler
        target = scheduler.config.get("prediction_type", "epsilon")    # kept from the training scheduler's config
        if target != "epsilon":
            raise ValueError(f"RePaintScheduler needs an epsilon-prediction model; this one predicts {target}")
        scheduler.eta = eta                                             # DDIM's eta for the unknown region
        scheduler.set_timesteps(num_inference_steps, device=x.device)
        keep = 1 - mask                                                 # RePaint's mask: 1 where the image is kept
        t_last = scheduler.timesteps[0] + 1
        for t in self.progress_bar(scheduler.timesteps):
            if t < t_last:                                              # a step down: denoise
                x = scheduler.step(model(x, t), t, x, known, keep, generator).prev_sample
            else:                                                       # a jump up: re-noise by one step
                x = scheduler.undo_step(x, t_last, generator)
            t_last = t
        return x
