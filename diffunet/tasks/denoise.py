"""Denoising: restore an image from a noisy version of it, the job of the microscopy and low-dose imaging U-Nets
(CARE, Noise2Noise's supervised baseline). Added as a job is added: this file, its line in ``TASKS``, its config
section (``config.DenoiseConfig``) and a preset (``configs/digits-denoise.yaml``); nothing else changed."""

from __future__ import annotations

import torch

from .base import of_what
from .image import ImageConditioned


class Denoise(ImageConditioned):
    """x0 the clean image; the condition the same image with Gaussian noise of std ``denoise.sigma`` (in the
    images' [-1, 1] units) added and clipped to [-1, 1] as a sensor clips, or, from paired data, the given noisy
    image (``conds/``: a low-dose or short-exposure acquisition of the same field). The pipeline conditions on an
    image of the model's size as given: super-resolution's condition at factor 1, so neither the model nor the
    pipeline knows this job."""

    name = "denoise"
    section = "denoise"
    rows = ("input", "output", "truth")
    paired = "conds"

    def pipeline_options(self, cfg) -> dict:
        return {"task": "super_resolution", "sr_factor": 1}

    def known(self, x, given, cfg, held_out: bool = False) -> dict:
        if given:
            noisy = given[0]
        else:                               # held out: the same noise at every evaluation, the training RNG untouched
            noise = (torch.randn(x.shape, generator=torch.Generator().manual_seed(cfg.sample.seed)).to(x.device)
                     if held_out else torch.randn_like(x))
            noisy = (x + cfg.denoise.sigma * noise).clamp(-1, 1)
        return {"image": (noisy + 1) / 2, "cond": noisy}

    def card(self, cfg, unet) -> tuple[str, str]:
        return (f"A denoising diffusion model of {of_what(unet)} (trained on noise of std "
                f"{cfg.denoise.sigma:g} in [-1, 1])", "clean = pipe(image=noisy_images).images")

    @staticmethod
    def shown(known, x, out) -> dict:
        return {"input": known["cond"], "output": out, "truth": x}
