"""The diffusion objectives: what the network predicts (one table), how each timestep's loss is weighted
(another), and diffusers' DDPMScheduler for the forward process. The only place these option names are checked.

Adding an objective is one entry of ``TARGETS``; adding a weighting is one entry of ``WEIGHTINGS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from .tables import choose

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "squaredcos_cap_v2",
                  "cosine": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class Target:
    """What the network is trained to predict from x_t = sqrt(a) x0 + sqrt(1-a) eps."""
    of: Callable            # (scheduler, x0, noise, t) -> the regression target, shaped like x0
    snr_weight: Callable    # snr -> the weight, in x0 terms, that this target's plain MSE already carries


TARGETS = {
    "epsilon": Target(of=lambda sched, x0, noise, t: noise, snr_weight=lambda snr: snr),
    "v_prediction": Target(of=lambda sched, x0, noise, t: sched.get_velocity(x0, noise, t),
                           snr_weight=lambda snr: snr + 1),
    "sample": Target(of=lambda sched, x0, noise, t: x0, snr_weight=torch.ones_like),
}

# Per-sample loss weights (B,) from (scheduler, timesteps, target, gamma), or None for the plain mean.
# min-SNR-gamma (Hang et al. 2023) caps each timestep's weight at gamma in x0 terms: min(snr, gamma), divided by
# what the target's MSE already carries.
WEIGHTINGS = {
    "mse": lambda sched, t, target, gamma: None,
    "min_snr": lambda sched, t, target, gamma: _min_snr(compute_snr(sched, t), target, gamma),
}


def _min_snr(snr: torch.Tensor, target: Target, gamma: float) -> torch.Tensor:
    return snr.clamp(max=gamma) / target.snr_weight(snr)


def check(diffusion_cfg) -> None:
    """Raise ValueError (one line, the valid names) for an unknown schedule, target or weighting."""
    choose(BETA_SCHEDULES, diffusion_cfg.beta_schedule, "diffusion.beta_schedule")
    choose(TARGETS, diffusion_cfg.prediction_type, "diffusion.prediction_type")
    choose(WEIGHTINGS, diffusion_cfg.loss_weighting, "diffusion.loss_weighting")


def make_noise_scheduler(diffusion_cfg) -> DDPMScheduler:
    """The training scheduler; its config travels with the pipeline, so samplers use the same betas and target."""
    check(diffusion_cfg)
    return DDPMScheduler(
        num_train_timesteps=diffusion_cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[diffusion_cfg.beta_schedule],
        beta_start=diffusion_cfg.beta_start,
        beta_end=diffusion_cfg.beta_end,
        prediction_type=diffusion_cfg.prediction_type,
        clip_sample=False,
    )


def diffusion_loss(model, sched: DDPMScheduler, x0: torch.Tensor, cond: dict | None = None, *,
                   weighting: str = "mse", gamma: float = 5.0, generator: torch.Generator | None = None):
    """The denoising loss of ``model`` on clean images ``x0`` (B, C, H, W) in [-1, 1]: one uniform timestep and
    one noise draw per image (in that order), the target of the scheduler's ``prediction_type``, weighted per
    ``weighting``. ``cond`` holds the model's conditioning keywords (``class_labels=...``) from the task."""
    batch = x0.shape[0]
    target = choose(TARGETS, sched.config.prediction_type, "diffusion.prediction_type")
    weights_of = choose(WEIGHTINGS, weighting, "diffusion.loss_weighting")
    t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = sched.add_noise(x0, noise, t)
    pred = model(x_t, t, **(cond or {})).sample
    per_sample = (pred.float() - target.of(sched, x0, noise, t).float()).square().mean(dim=(1, 2, 3))
    weights = weights_of(sched, t, target, gamma)
    return (per_sample if weights is None else per_sample * weights).mean()
