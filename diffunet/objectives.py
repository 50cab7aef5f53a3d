"""The diffusion objectives, one entry of ``OBJECTIVES`` each: the training scheduler (diffusers'; its config is
saved with the pipeline, so stock diffusers samples the model), the loss, and the samplers that fit it.

- "ddpm": x_t = sqrt(a) x0 + sqrt(1 - a) eps on DDPMScheduler's betas (``BETA_SCHEDULES``); the network predicts
  one of ``TARGETS`` (eps, v, x0), each timestep's loss weighted per ``WEIGHTINGS``.
- "flow": rectified flow / flow matching (Liu et al. 2022, Lipman et al. 2022): x_t = (1 - t) x0 + t eps with t
  from ``FLOW_TIMES`` (logit-normal as in SD3, or uniform), the target the velocity eps - x0;
  FlowMatchEulerDiscreteScheduler's timesteps (t * 1000) condition the network.
- "edm": Karras et al. 2022. ``EDMPrecond`` wraps the U-Net into the denoiser D(x; sigma) = c_skip x + c_out
  F(c_in x, c_noise), log-normal sigmas and EDM's weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; the
  coefficients are EDMEulerScheduler's own, so training and diffusers' EDM samplers cannot disagree.

The only place these option names are checked. Adding an objective, target, weighting, schedule or sampler is one
table entry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler,
                       EDMEulerScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler, RePaintScheduler,
                       UniPCMultistepScheduler)
from diffusers.training_utils import compute_snr

from .model.tables import choose


def sigmoid_betas(steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> list[float]:
    """The sigmoid schedule of Jabri et al. 2022 (lucidrains' denoising-diffusion-pytorch default): alpha-bar
    follows a sigmoid over [start, end]. diffusers' own "sigmoid" is GeoDiff's (sigmoid *betas*), another
    schedule, so this one travels as DDPMScheduler's ``trained_betas``."""
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    v_start, v_end = torch.tensor(start / tau).sigmoid(), torch.tensor(end / tau).sigmoid()
    abar = (v_end - ((t * (end - start) + start) / tau).sigmoid()) / (v_end - v_start)
    return (1 - abar[1:] / abar[:-1]).clamp(0, 0.999).tolist()


# DDPMScheduler keywords of each beta schedule
BETA_SCHEDULES = {
    "linear": lambda cfg: {"beta_schedule": "linear"},
    "scaled_linear": lambda cfg: {"beta_schedule": "scaled_linear"},
    "squaredcos_cap_v2": lambda cfg: {"beta_schedule": "squaredcos_cap_v2"},
    "cosine": lambda cfg: {"beta_schedule": "squaredcos_cap_v2"},
    "sigmoid": lambda cfg: {"trained_betas": sigmoid_betas(cfg.num_train_timesteps)},
}


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


# Flow matching's law of t in (0, 1): (batch, diffusion cfg, generator, device) -> t (B,)
FLOW_TIMES = {
    "logit_normal": lambda b, cfg, g, device: torch.sigmoid(
        cfg.logit_mean + cfg.logit_std * torch.randn(b, generator=g, device=device)),
    "uniform": lambda b, cfg, g, device: torch.rand(b, generator=g, device=device),
}


# ---------------------------------------------------------------------------------------- losses

def diffusion_loss(model, sched: DDPMScheduler, x0: torch.Tensor, cond: dict | None = None, *,
                   weighting: str = "mse", gamma: float = 5.0, generator: torch.Generator | None = None):
    """The "ddpm" loss of ``model`` on clean images ``x0`` (B, C, H, W) in [-1, 1]: one uniform timestep and
    one noise draw per image (in that order), the target of the scheduler's ``prediction_type``, weighted per
    ``weighting``. ``cond`` holds the model's conditioning keywords (``class_labels=...``) from the task."""
    batch = x0.shape[0]
    target = choose(TARGETS, sched.config.prediction_type, "diffusion.prediction_type")
    weights_of = choose(WEIGHTINGS, weighting, "diffusion.loss_weighting")
    t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = sched.add_noise(x0, noise, t)
    pred = model(x_t, t, **(cond or {})).sample
    per_sample = (pred.float() - target.of(sched, x0, noise, t).float()).square().mean(dim=tuple(range(1, x0.ndim)))
    weights = weights_of(sched, t, target, gamma)
    return (per_sample if weights is None else per_sample * weights).mean()


def per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ...) broadcasting against ``x`` (B, C, *spatial) of any dimensionality."""
    return values.view(-1, *(1,) * (x.ndim - 1))


def flow_loss(model, sched: FlowMatchEulerDiscreteScheduler, x0: torch.Tensor, cond: dict | None = None, *,
              cfg, generator: torch.Generator | None = None) -> torch.Tensor:
    """The "flow" loss: t from ``FLOW_TIMES[cfg.time_sampling]``, x_t = (1 - t) x0 + t eps, the plain MSE to
    the velocity eps - x0, the network given t * num_train_timesteps as FlowMatchEulerDiscreteScheduler gives it.
    (The scheduler's ``scale_noise`` is this line, but it looks t up in its table of discrete sigmas.)"""
    t = choose(FLOW_TIMES, cfg.time_sampling, "diffusion.time_sampling")(x0.shape[0], cfg, generator, x0.device)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    s = per_sample(t, x0).to(x0.dtype)
    pred = model((1 - s) * x0 + s * noise, t * sched.config.num_train_timesteps, **(cond or {})).sample
    return (pred.float() - (noise - x0).float()).square().mean()


class EDMPrecond(torch.nn.Module):
    """EDM's denoiser around a U-Net F (Karras et al. 2022, table 1):
    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with the coefficients of
    ``scheduler`` (an EDM scheduler: sigma_data, and the same formulas its sampling steps use). The pipeline saves
    F and the scheduler, which applies them again at every sampling step."""

    def __init__(self, unet, scheduler: EDMEulerScheduler):
        super().__init__()
        self.unet, self.scheduler = unet, scheduler

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        s = per_sample(sigma, x)
        out = self.unet(self.scheduler.precondition_inputs(x, s), self.scheduler.precondition_noise(sigma),
                        **cond).sample
        return self.scheduler.precondition_outputs(x, out.float(), s)


def edm_loss(model, sched: EDMEulerScheduler, x0: torch.Tensor, cond: dict | None = None, *, cfg,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The "edm" loss: ln sigma ~ N(p_mean, p_std), x = x0 + sigma eps, EDM's weight times the squared
    error of D(x; sigma) to x0 (which makes the network's own regression target unit-variance)."""
    b, sd = x0.shape[0], sched.config.sigma_data
    sigma = (cfg.p_mean + cfg.p_std * torch.randn(b, generator=generator, device=x0.device)).exp()
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    denoised = EDMPrecond(model, sched)(x0 + per_sample(sigma, x0).to(x0.dtype) * noise, sigma, **(cond or {}))
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    return (weight * (denoised.float() - x0.float()).square().mean(dim=tuple(range(1, x0.ndim)))).mean()


# ---------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Sampler:
    """A diffusers scheduler that samples an objective's models, made from the training scheduler's config."""
    cls: type
    options: Callable = lambda config: {}       # training config -> keywords that ``from_config`` overrides
    needs_mask: bool = False                    # inpaints: takes an image and a mask (sample.py --cond --mask)
    keeps: tuple = ()                           # training config keys kept in its config though ``cls`` takes none


@dataclass(frozen=True)
class Objective:
    scheduler: Callable                         # diffusion cfg -> the training scheduler (saved with the pipeline)
    loss: Callable                              # (model, scheduler, x0, cond, diffusion cfg, generator) -> loss
    samplers: dict = field(default_factory=dict)   # name -> Sampler: what samples this objective's models
    default_sampler: str = ""                   # what sample.scheduler=auto picks
    describe: Callable = lambda cfg: ""         # diffusion cfg -> a phrase for the model card
    owns: Callable | None = None                # scheduler config -> whether it is this objective's; None: the
                                                # objective of the configs no other one owns (the DDPM family)
    weightings: tuple = ("mse",)                # the diffusion.loss_weighting values its loss reads
    preset: str = ""                            # a preset that trains such a model (errors name it)


def _ddpm_scheduler(cfg) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, prediction_type=cfg.prediction_type, clip_sample=False,
                         **choose(BETA_SCHEDULES, cfg.beta_schedule, "diffusion.beta_schedule")(cfg))


OBJECTIVES = {
    "ddpm": Objective(
        scheduler=_ddpm_scheduler,
        loss=lambda model, sched, x0, cond, cfg, g: diffusion_loss(
            model, sched, x0, cond, weighting=cfg.loss_weighting, gamma=cfg.snr_gamma, generator=g),
        samplers={
            "ddpm": Sampler(DDPMScheduler),
            "ddim": Sampler(DDIMScheduler),                     # deterministic at eta=0 (the default)
            "dpmpp": Sampler(DPMSolverMultistepScheduler),      # DPM-Solver++(2M)
            "euler": Sampler(EulerDiscreteScheduler),
            "heun": Sampler(HeunDiscreteScheduler),             # two model calls per step
            "heun_karras": Sampler(HeunDiscreteScheduler, lambda c: {"use_karras_sigmas": True}),
            "unipc": Sampler(UniPCMultistepScheduler),
            # training-free inpainting with any epsilon-predicting model, unconditional or class-conditional
            # (Lugmayr et al. 2022); the pipeline reads the kept target to refuse other models
            "repaint": Sampler(RePaintScheduler, needs_mask=True, keeps=("prediction_type",)),
        },
        default_sampler="ddim",
        describe=lambda cfg: (f"DDPM, {cfg.num_train_timesteps} steps, `{cfg.beta_schedule}` betas, predicting "
                              f"`{cfg.prediction_type}`"),
        weightings=tuple(WEIGHTINGS),
        preset="digits-ddpm"),
    "flow": Objective(
        scheduler=lambda cfg: FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                                              shift=cfg.flow_shift),
        loss=lambda model, sched, x0, cond, cfg, g: flow_loss(model, sched, x0, cond, cfg=cfg, generator=g),
        samplers={
            "flow_euler": Sampler(FlowMatchEulerDiscreteScheduler),
            "flow_heun": Sampler(FlowMatchHeunDiscreteScheduler),   # two model calls per step
            # DPM-Solver++(2M) on the flow's sigmas: x0 = x_t - t v
            "flow_dpmpp": Sampler(DPMSolverMultistepScheduler, lambda c: {
                "use_flow_sigmas": True, "flow_shift": c.get("shift", 1.0), "prediction_type": "flow_prediction"}),
        },
        default_sampler="flow_dpmpp",
        describe=lambda cfg: f"rectified flow, t ~ `{cfg.time_sampling}`, predicting the velocity eps - x0",
        owns=lambda config: "shift" in config or bool(config.get("use_flow_sigmas")),    # DPM-Solver on flow sigmas
        preset="digits"),
    "edm": Objective(
        scheduler=lambda cfg: EDMEulerScheduler(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                                                sigma_data=cfg.sigma_data,
                                                num_train_timesteps=cfg.num_train_timesteps),
        loss=lambda model, sched, x0, cond, cfg, g: edm_loss(model, sched, x0, cond, cfg=cfg, generator=g),
        samplers={
            "edm_euler": Sampler(EDMEulerScheduler),
            "edm_dpmpp": Sampler(EDMDPMSolverMultistepScheduler),
        },
        default_sampler="edm_dpmpp",
        describe=lambda cfg: f"EDM, sigma_data {cfg.sigma_data}, ln sigma ~ N({cfg.p_mean}, {cfg.p_std}^2)",
        owns=lambda config: "sigma_data" in config),
}
SAMPLERS = {name: s for o in OBJECTIVES.values() for name, s in o.samplers.items()}   # every name


def check(diffusion_cfg) -> None:
    """Raise ValueError (one line, the valid names) for an unknown objective, schedule, target, weighting or law
    of t, or a setting the objective does not take."""
    objective = choose(OBJECTIVES, diffusion_cfg.objective, "diffusion.objective")
    choose(BETA_SCHEDULES, diffusion_cfg.beta_schedule, "diffusion.beta_schedule")
    choose(TARGETS, diffusion_cfg.prediction_type, "diffusion.prediction_type")
    choose(WEIGHTINGS, diffusion_cfg.loss_weighting, "diffusion.loss_weighting")
    choose(FLOW_TIMES, diffusion_cfg.time_sampling, "diffusion.time_sampling")
    if diffusion_cfg.loss_weighting not in objective.weightings:
        takes = [name for name, o in OBJECTIVES.items() if diffusion_cfg.loss_weighting in o.weightings]
        raise ValueError(f"diffusion.loss_weighting={diffusion_cfg.loss_weighting} is for objective="
                         f"{', '.join(takes)}; {diffusion_cfg.objective} has its own weighting: leave it at "
                         f"{objective.weightings[0]}")
    for key in ("logit_std", "p_std", "sigma_data", "sigma_min", "flow_shift"):
        if getattr(diffusion_cfg, key) <= 0:
            raise ValueError(f"diffusion.{key} must be positive (got {getattr(diffusion_cfg, key)})")
    if diffusion_cfg.sigma_max <= diffusion_cfg.sigma_min:
        raise ValueError(f"diffusion.sigma_max ({diffusion_cfg.sigma_max}) must exceed diffusion.sigma_min "
                         f"({diffusion_cfg.sigma_min})")


def make_noise_scheduler(diffusion_cfg):
    """The objective's training scheduler; its config travels with the pipeline, so samplers use the same noise
    levels and target."""
    check(diffusion_cfg)
    return OBJECTIVES[diffusion_cfg.objective].scheduler(diffusion_cfg)


def training_loss(model, sched, x0: torch.Tensor, cond: dict | None, diffusion_cfg,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The loss of ``diffusion_cfg.objective`` on clean images ``x0`` in [-1, 1], ``cond`` the model's keywords."""
    return OBJECTIVES[diffusion_cfg.objective].loss(model, sched, x0, cond, diffusion_cfg, generator)


def objective_of(config) -> str:
    """The objective a scheduler config (a training scheduler's, or a sampler's made from it) belongs to: the
    one that ``owns`` it (EDM schedulers have ``sigma_data``, flow-matching ones ``shift`` or DPM-Solver's
    ``use_flow_sigmas``), else the one that owns no mark (DDPM's schedulers have none of their own)."""
    marked = (name for name, o in OBJECTIVES.items() if o.owns is not None and o.owns(config))
    return next(marked, None) or next(name for name, o in OBJECTIVES.items() if o.owns is None)


def sampler_name(name: str, config) -> str:
    """``name``, with "auto" resolved to the default sampler of the objective of ``config``."""
    return OBJECTIVES[objective_of(config)].default_sampler if name == "auto" else name


def make_sampler(name: str, config):
    """Sampler ``name`` (a name in ``SAMPLERS``, or "auto": the objective's default) made from the training
    scheduler's ``config``. A sampler of another objective is one ValueError line naming the ones that fit (those
    that inpaint, or not, as it does), or, where none does (RePaint for a flow model), the objective that has it."""
    objective = objective_of(config)
    fits, name = OBJECTIVES[objective].samplers, sampler_name(name, config)
    if name in SAMPLERS and name not in fits:
        alike = [n for n, s in fits.items() if s.needs_mask == SAMPLERS[name].needs_mask]
        if alike:
            raise ValueError(f"scheduler {name} does not sample {objective} models; choose one of "
                             f"{', '.join(alike)} (or auto)")
        owner = next(o for o, entry in OBJECTIVES.items() if name in entry.samplers)
        example = f", e.g. --config {OBJECTIVES[owner].preset}" if OBJECTIVES[owner].preset else ""
        raise ValueError(f"scheduler {name} samples {owner} models only; this one is {objective} "
                         f"(train one with diffusion.objective={owner}{example})")
    sampler = choose(fits, name, "scheduler")
    # only the keys this class takes (and keeps): from_config warns about each other one (flow's "shift" for
    # DPM-Solver)
    takes = set(inspect.signature(sampler.cls.__init__).parameters) | set(sampler.keeps)
    return sampler.cls.from_config({k: v for k, v in config.items() if k in takes or k.startswith("_")},
                                   **sampler.options(config))

