"""The diffusion objective: diffusers' DDPMScheduler for the forward process, the three prediction targets and
the loss weightings."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from .nn import choose

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "squaredcos_cap_v2",
                  "cosine": "squaredcos_cap_v2"}


def make_noise_scheduler(diffusion_cfg) -> DDPMScheduler:
    """The training scheduler; its config travels with the pipeline, so samplers use the same betas and target."""
    choose(TARGETS, diffusion_cfg.prediction_type, "diffusion.prediction_type")
    return DDPMScheduler(
        num_train_timesteps=diffusion_cfg.num_train_timesteps,
        beta_schedule=choose(BETA_SCHEDULES, diffusion_cfg.beta_schedule, "diffusion.beta_schedule"),
        beta_start=diffusion_cfg.beta_start,
        beta_end=diffusion_cfg.beta_end,
        prediction_type=diffusion_cfg.prediction_type,
        clip_sample=False,
    )


# What the network is trained to predict from x_t = sqrt(a) x0 + sqrt(1-a) eps.
TARGETS = {
    "epsilon": lambda sched, x0, noise, t: noise,
    "v_prediction": lambda sched, x0, noise, t: sched.get_velocity(x0, noise, t),
    "sample": lambda sched, x0, noise, t: x0,
}

# min-SNR-gamma (Hang et al. 2023) caps each timestep's weight at gamma in x0 terms: min(snr, gamma), divided
# by what the target's MSE already carries (snr for eps, snr + 1 for v, 1 for x0).
SNR_DIVISOR = {"epsilon": lambda snr: snr, "v_prediction": lambda snr: snr + 1, "sample": lambda snr: torch.ones_like(snr)}


def loss_weights(sched: DDPMScheduler, t: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor | None:
    """Per-sample loss weights (B,), or None for plain MSE."""
    if weighting == "mse":
        return None
    if weighting != "min_snr":
        raise ValueError(f"unknown diffusion.loss_weighting {weighting!r}; choose 'mse' or 'min_snr'")
    snr = compute_snr(sched, t)
    return snr.clamp(max=gamma) / SNR_DIVISOR[sched.config.prediction_type](snr)


def diffusion_loss(model, sched: DDPMScheduler, x0: torch.Tensor, labels: torch.Tensor | None = None, *,
                   weighting: str = "mse", gamma: float = 5.0, generator: torch.Generator | None = None):
    """The denoising loss of ``model`` on clean images ``x0`` (B, C, H, W) in [-1, 1]: one uniform timestep and
    one noise draw per image, the target of the scheduler's ``prediction_type``, weighted per ``weighting``."""
    batch = x0.shape[0]
    t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = sched.add_noise(x0, noise, t)
    target = TARGETS[sched.config.prediction_type](sched, x0, noise, t)
    pred = model(x_t, t, labels).sample
    per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
    weights = loss_weights(sched, t, weighting, gamma)
    return (per_sample if weights is None else per_sample * weights).mean()
