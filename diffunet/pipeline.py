"""``DiffunetPipeline``: the project's one sampling loop, as a diffusers pipeline (modelled on ``DiTPipeline``).

    pipe = DiffusionPipeline.from_pretrained("runs/digits/pipeline", trust_remote_code=True)   # the folder's code
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe(class_labels=[3, 3, 7], guidance_scale=2.0, num_inference_steps=20).images

Image i draws all its randomness (initial noise and every noise draw of a stochastic scheduler) from
``generator[i]`` when ``generator`` is a list, so an image depends on its own generator only, never on the batch
it was drawn in: ``diffunet.sampling`` seeds one generator per image index on top of this.

This file travels inside exported pipeline folders, which load without diffunet installed: it imports torch and
diffusers only.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt", "latent")   # "latent": the raw final sample, model space (~[-1, 1]), float32


def predict(unet, x, t, class_labels=None, guidance_scale: float = 1.0, cond: dict | None = None) -> torch.Tensor:
    """The model output for the scheduler. Classifier-free guidance (Ho & Salimans 2022):
    uncond + w (cond - uncond), so w = 1 is the conditional model and w = 0 the unconditional (null class);
    only other w pay for the second pass, batched with the first. ``cond``: the model's other conditioning
    keywords (image conditions), the same in both passes."""
    cond = cond or {}
    if class_labels is None or guidance_scale == 1.0:
        return unet(x, t, class_labels, **cond).sample
    if guidance_scale == 0.0:
        return unet(x, t, None, **cond).sample                     # class_labels=None is the null class
    null = torch.full_like(class_labels, unet.null_class)
    twice = {k: torch.cat([v, v]) for k, v in cond.items()}
    conditional, unconditional = unet(torch.cat([x, x]), t, torch.cat([class_labels, null]),
                                      **twice).sample.chunk(2)        # (2B, ...) -> 2x (B, ...)
    return unconditional + guidance_scale * (conditional - unconditional)


class DiffunetPipeline(DiffusionPipeline):
    """Sampling from diffunet's ``UNet`` with any diffusers scheduler: class labels, classifier-free guidance,
    one generator per image, and (with a model that takes them) image conditions.

    The U-Net runs in its own dtype and device (a low-precision one under autocast); the scheduler's arithmetic
    stays in float32, since low-precision betas and sigmas visibly hurt few-step samplers.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(do_normalize=True)    # [-1, 1] <-> [0, 1], tensors <-> PIL / np

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, class_labels=None, guidance_scale: float = 1.0,
                 num_inference_steps: int = 50, generator: torch.Generator | list[torch.Generator] | None = None,
                 eta: float = 0.0, image=None, mask_image=None, output_type: str = "pil", return_dict: bool = True):
        """Sample images.

        Args:
            batch_size: the number of images; by default what ``class_labels`` or a ``generator`` list says, else 1.
            class_labels: one class id per image (a list or tensor), or one id for every image; None samples the
                unconditional model (the null class of a class-conditional one).
            guidance_scale: classifier-free guidance w: 1 the conditional model, 0 the unconditional, other
                values uncond + w (cond - uncond), two passes per step (batched).
            num_inference_steps: scheduler steps.
            generator: one ``torch.Generator`` for the whole batch, or a list, one per image: image i then draws
                its initial noise and every scheduler noise draw from ``generator[i]`` alone.
            eta: DDIM's noise (0 deterministic, 1 DDPM-like); schedulers without it ignore it.
            image, mask_image: image conditions, for a model built to take them (see ``condition``).
            output_type: "pil", "np" ((B, H, W, C) in [0, 1]), "pt" ((B, C, H, W) in [0, 1]) or "latent" (the
                final sample in the model's space, unclamped).
            return_dict: an ``ImagePipelineOutput``, else a 1-tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
        unet, scheduler, device = self.unet, self.scheduler, self._execution_device
        labels = self.check_labels(class_labels)
        batch = self.batch_size_of(batch_size, labels, generator)
        if labels is not None:
            labels = labels.expand(batch).to(device) if labels.ndim == 0 else labels.to(device)
        cond = self.condition(image, mask_image, batch)

        shape = (batch, unet.config.in_channels, *unet.image_size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)  # per image if a list
        scheduler.set_timesteps(num_inference_steps, device=device)    # also resets multistep solvers' history
        x = x * scheduler.init_noise_sigma
        step_kwargs = self.step_kwargs(generator, eta)
        # A low-precision U-Net runs under autocast: the backbone keeps its time features in fp32 (as under
        # mixed-precision training), and autocast casts them for the layers that follow.
        dtype = unet.dtype                                              # read once: ModelMixin walks the modules
        low_precision = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
        for t in self.progress_bar(scheduler.timesteps):
            model_input = scheduler.scale_model_input(x, t).to(dtype)
            with low_precision:
                out = predict(unet, model_input, t, labels, guidance_scale, cond).float()
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample

        images = self.image_processor.postprocess(x, output_type)
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
    def batch_size_of(batch_size: int | None, labels: torch.Tensor | None, generator) -> int:
        """The number of images: ``batch_size``, one per label, one per generator; ValueError if they disagree."""
        counts = {"batch_size": batch_size,
                  "class_labels": len(labels) if labels is not None and labels.ndim else None,
                  "generators": len(generator) if isinstance(generator, list) else None}
        given = {name: n for name, n in counts.items() if n is not None}
        if len(set(given.values())) > 1:
            counts = ", ".join(f"{n} {name}" for name, n in given.items())
            raise ValueError(f"the number of images is ambiguous: {counts}")
        return next(iter(given.values()), 1)

    def condition(self, image, mask_image, batch_size: int) -> dict:
        """The model's image-conditioning keywords from ``image`` / ``mask_image``, for every step's call.

        The U-Net of super-resolution and inpainting (``UNet(cond_channels=K)``, which concatenates a condition
        to the noisy input) is the next step; its keyword is built here. Today no model takes one."""
        if image is None and mask_image is None:
            return {}
        given = " and ".join(name for name, v in (("image=", image), ("mask_image=", mask_image)) if v is not None)
        raise ValueError(f"{given} given, but this model takes no image condition (it has no cond_channels): "
                         f"it generates from noise{' and class labels' if self.unet.config.num_classes else ''}")

    def step_kwargs(self, generator, eta: float) -> dict:
        """The keywords this scheduler's ``step`` takes: DDIM's ``eta``, and the generator(s) for its noise."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = generator           # a list: one noise stream per image (randn_tensor)
        return kwargs
