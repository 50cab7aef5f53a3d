"""Diagnostics that make the U-Net's behaviour visible in numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffunet import UNet


def encoder_grad_norms(model: UNet, images: torch.Tensor, timesteps: torch.Tensor | None = None,
                       class_labels: torch.Tensor | None = None, scheduler: DDPMScheduler | None = None,
                       generator: torch.Generator | None = None) -> list[float]:
    """The gradient norm reaching each encoder level (finest first) for the noise-prediction loss on a batch.

    ``images`` are clean samples in [-1, 1]; they are noised at ``timesteps`` (default: uniform draws) by
    ``scheduler`` (default: DDPM, 1000 linear steps). With ``skip="none"`` the gradient must cross the whole
    bottleneck to reach level 0; with skips it has a short path. The model's ``.grad`` fields are left alone.
    Note that ``zero_init=True`` models have exactly zero gradients before the first update.
    """
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000)
    batch = images.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(images.shape, generator=generator).to(images)
    noisy = scheduler.add_noise(images, noise, timesteps)
    loss = F.mse_loss(model(noisy, timesteps.to(images.device), class_labels).sample, noise)
    levels = [list(level.parameters()) for level in model.encoder]
    grads = torch.autograd.grad(loss, [p for ps in levels for p in ps])
    norms, i = [], 0
    for ps in levels:
        norms.append(torch.sqrt(sum(g.float().pow(2).sum() for g in grads[i:i + len(ps)])).item())
        i += len(ps)
    return norms
