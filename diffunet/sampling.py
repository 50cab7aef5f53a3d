"""Sampling: diffusers schedulers by name, a reproducible sample loop, image grids."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)
from PIL import Image

from .nn import choose

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
}


def make_scheduler(name: str, config) -> object:
    """A sampling scheduler ``name`` built from the training scheduler's ``config`` (same betas and target)."""
    return choose(SCHEDULERS, name, "scheduler").from_config(config)


@torch.no_grad()
def generate(unet, scheduler, num_images: int, *, steps: int = 50, seed: int = 0, start_index: int = 0,
             class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0, eta: float = 0.0,
             batch_size: int = 64, device=None, progress: bool = False) -> torch.Tensor:
    """``num_images`` samples in [-1, 1], shape (N, C, H, W); image i comes from its own generator seeded by
    (seed, start_index + i), so the result does not depend on the batch size."""
    device = device or unet.device
    images = []
    for lo in range(0, num_images, batch_size):
        idx = range(start_index + lo, start_index + min(lo + batch_size, num_images))
        labels = None if class_labels is None else class_labels[lo:lo + len(idx)].to(device)
        images.append(_generate_batch(unet, scheduler, idx, steps, seed, labels, guidance_scale, eta, device))
    return torch.cat(images)


def _image_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _generate_batch(unet, scheduler, indices, steps, seed, labels, guidance_scale, eta, device):
    cfg = unet.config
    h, w = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else cfg.sample_size
    gens = [_image_generator(seed, i) for i in indices]
    x = torch.stack([torch.randn(cfg.in_channels, h, w, generator=g) for g in gens]).to(device, unet.dtype)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    extra = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        if labels is not None and guidance_scale != 1.0:
            both = unet(torch.cat([inp, inp]), t, torch.cat([labels, torch.full_like(labels, cfg.num_classes)])).sample
            cond, uncond = both.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        else:
            out = unet(inp, t, labels).sample
        step_kwargs = dict(extra)
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = gens if len(gens) > 1 else gens[0]
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x.float().clamp(-1, 1).cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Write (N, H, W, C) uint8 images as one PNG grid, ``nrow`` images per row (default: about square)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3]).save(path)
    return path
