"""The objective table (``diffunet.objectives``): flow matching and EDM beside DDPM's targets. Training and
sampling must agree on each objective's conventions (what the time input is, what the network predicts), so the
tests drive both with the exact answer for a one-point data distribution, where every quantity is known."""

import json

import numpy as np
import pytest
import torch
from diffusers import (DiffusionPipeline, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler,
                       EDMEulerScheduler, FlowMatchEulerDiscreteScheduler)
from types import SimpleNamespace

import diffunet.data
from diffunet import objectives
from diffunet.config import ConfigError, load_config
from diffunet.objectives import OBJECTIVES, EDMPrecond, make_noise_scheduler, sigmoid_betas, training_loss
from diffunet.model.pipeline import DiffunetPipeline, denoise
from diffunet.sampling import load_model, make_scheduler
from diffunet.training.loop import train, validate

from conftest import tiny
from test_training import fast_cfg

POINT = torch.linspace(-0.8, 0.8, 256).view(1, 1, 16, 16)        # the one image of the data distribution


def diffusion(objective, *overrides):
    return load_config(None, [f"diffusion.objective={objective}", *overrides]).diffusion


class Exact(torch.nn.Module):
    """The ideal network for data = {POINT}, in each objective's own terms (what its loss is minimised by)."""

    def __init__(self, objective: str, sched):
        super().__init__()
        self.objective, self.sched = objective, sched

    def forward(self, x, t, class_labels=None, **_):
        t = torch.as_tensor(t, dtype=torch.float64).expand(len(x)).view(-1, 1, 1, 1)
        x = x.double()
        if self.objective == "flow":                            # v = eps - x0 = (x_t - x0) / t
            out = (x - POINT) / (t / self.sched.config.num_train_timesteps)
        else:                                                   # edm: F = (x0 - c_skip x) / c_out, x = x_in / c_in
            sigma, sd = torch.exp(4 * t), self.sched.config.sigma_data
            x = x * (sigma ** 2 + sd ** 2).sqrt()
            c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
            out = (POINT - c_skip * x) / c_out
        return SimpleNamespace(sample=out.float())


@pytest.mark.parametrize("objective", ["flow", "edm"])
def test_the_exact_network_has_zero_loss(objective):
    cfg = diffusion(objective)
    sched = make_noise_scheduler(cfg)
    loss = training_loss(Exact(objective, sched), sched, POINT.repeat(8, 1, 1, 1), None, cfg,
                         torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6
    wrong = training_loss(lambda x, t: SimpleNamespace(sample=torch.zeros_like(x)), sched, POINT.repeat(8, 1, 1, 1),
                          None, cfg, torch.Generator().manual_seed(0))
    assert wrong.item() > 0.1                                   # and a wrong one does not


@pytest.mark.parametrize("objective", ["flow", "edm"])
def test_every_sampler_of_an_objective_reaches_the_data_with_the_exact_network(objective):
    sched = make_noise_scheduler(diffusion(objective))
    exact = Exact(objective, sched)
    for name in OBJECTIVES[objective].samplers:                 # the pipeline's loop, as DiffunetPipeline runs it
        x = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(1))
        out = denoise(make_scheduler(name, sched.config), lambda x, t: exact(x, t).sample, x, 6)
        assert (out - POINT).abs().max() < 2e-3, name


def test_edm_precond_is_the_scheduler_preconditioning():
    sched = make_noise_scheduler(diffusion("edm"))
    net = tiny(zero_init=False).eval()
    x, sigma = torch.randn(3, 1, 16, 16), torch.tensor([0.05, 1.0, 20.0])
    with torch.no_grad():
        d = EDMPrecond(net, sched)(x, sigma)
        sd, s = 0.5, sigma.view(-1, 1, 1, 1)
        f = net(x / (s ** 2 + sd ** 2).sqrt(), 0.25 * sigma.log()).sample
        want = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * f    # Karras et al., table 1
    assert torch.allclose(d, want, atol=1e-5)


@pytest.mark.parametrize("objective", ["ddpm", "flow", "edm"])
def test_each_objective_learns_a_fixed_batch(objective):
    cfg = diffusion(objective, "diffusion.num_train_timesteps=100")
    sched = make_noise_scheduler(cfg)
    model = tiny(zero_init=False, attention_resolutions=())
    x0 = torch.from_numpy(diffunet.data.digits_arrays(16)[0][:16]).permute(0, 3, 1, 2).float() / 127.5 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(40):
        loss = training_loss(model, sched, x0, None, cfg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])


def test_edm_weight_makes_the_network_regress_its_own_target_at_unit_weight():
    """EDM's weight (sigma^2 + sd^2) / (sigma sd)^2 is 1 / c_out^2: the loss is the plain MSE of F to its target
    (x0 - c_skip x) / c_out, which the hand computation below states without the scheduler."""
    cfg = diffusion("edm")
    sched, sd = make_noise_scheduler(cfg), cfg.sigma_data
    x0 = POINT.repeat(6, 1, 1, 1)
    zero = lambda x, t, **_: SimpleNamespace(sample=torch.zeros_like(x))      # F = 0: D(x) = c_skip x
    loss = training_loss(zero, sched, x0, None, cfg, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)                                        # the loss's draws, in its order
    sigma = (cfg.p_mean + cfg.p_std * torch.randn(6, generator=g)).exp().double().view(-1, 1, 1, 1)
    x = x0.double() + sigma * torch.randn(x0.shape, generator=g).double()
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    want = ((x0.double() - c_skip * x) / c_out).square().mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


class OffInX0(torch.nn.Module):
    """A network whose x0 estimate is off by a fixed ``delta``: it knows the clean batch ``x0``, reads x0 + delta
    for it, and answers in ``sched``'s target (its eps and v follow from x_t and that x0 by the scheduler's
    alphas). It records the timesteps it is asked about."""

    def __init__(self, sched, x0, delta):
        super().__init__()
        self.sched, self.x0, self.delta, self.seen = sched, x0.double(), delta.double(), []

    def forward(self, x_t, t, **_):
        self.seen.append(t.clone())
        abar = self.sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        x0_hat = self.x0 + self.delta
        eps_hat = (x_t.double() - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        out = {"epsilon": eps_hat, "sample": x0_hat,
               "v_prediction": abar.sqrt() * eps_hat - (1 - abar).sqrt() * x0_hat}[self.sched.config.prediction_type]
        return SimpleNamespace(sample=out.float())


def test_min_snr_is_the_same_x0_error_weighted_by_min_snr_gamma_for_every_target():
    """min-SNR-gamma (Hang et al. 2023) weights each timestep's error *in x0 terms* by min(snr, gamma), whatever
    the network predicts: for an x0 estimate off by delta, ``diffusion_loss`` is mean_t(min(snr_t, gamma) |delta|^2)
    for eps, v and x0 alike. This checks each target (``TARGETS[...].of``), its weight and their product together."""
    gamma, batch = 5.0, 64
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 1, 4, 4, generator=g) * 2 - 1
    delta = 0.1 * torch.randn(1, 1, 4, 4, generator=g)                   # the same error for every image
    losses = {}
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        sched = make_noise_scheduler(diffusion("ddpm", "diffusion.beta_schedule=cosine",
                                               f"diffusion.prediction_type={prediction_type}"))
        model = OffInX0(sched, x0, delta)
        losses[prediction_type] = objectives.diffusion_loss(model, sched, x0, weighting="min_snr", gamma=gamma,
                                                            generator=torch.Generator().manual_seed(1)).item()
        (t,) = model.seen
        abar = sched.alphas_cumprod[t].double()
        snr = abar / (1 - abar)
        want = (snr.clamp(max=gamma) * delta.double().square().mean()).mean().item()
        assert losses[prediction_type] == pytest.approx(want, rel=1e-4), prediction_type
    assert (snr > gamma).any() and (snr < gamma).any()                  # the cap binds on some timesteps, not all
    # weighting="mse": x0's bare |delta|^2, which min-SNR's weights move
    plain = objectives.diffusion_loss(model, sched, x0, weighting="mse", generator=torch.Generator().manual_seed(1))
    assert plain.item() == pytest.approx(delta.square().mean().item(), rel=1e-4)
    assert plain.item() != pytest.approx(losses["sample"], rel=0.05)


def test_objective_of_reads_each_objectives_mark():
    for name, sampler in objectives.SAMPLERS.items():
        objective = next(o for o, entry in OBJECTIVES.items() if name in entry.samplers)
        training = make_noise_scheduler(diffusion(objective)).config
        assert objectives.objective_of(make_scheduler(name, training).config) == objective, name


def test_flow_times_follow_their_law():
    cfg = diffusion("flow", "diffusion.logit_mean=0.5")
    t = objectives.FLOW_TIMES["logit_normal"](20000, cfg, torch.Generator().manual_seed(0), "cpu")
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 1.0) < 0.03
    u = objectives.FLOW_TIMES["uniform"](20000, cfg, torch.Generator().manual_seed(0), "cpu")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_sigmoid_schedule_is_lucidrains_and_travels_as_trained_betas(tmp_path):
    betas = torch.tensor(sigmoid_betas(1000), dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    assert (betas >= 0).all() and (abar[1:] <= abar[:-1]).all() and abar[0] > 0.999 and abar[-1] < 1e-4
    # the middle of the chain: the sigmoid at 0 maps to alpha-bar 1/2 (start=-3, end=3, symmetric)
    assert abs(abar[499].item() - 0.5) < 0.01
    sched = make_noise_scheduler(diffusion("ddpm", "diffusion.beta_schedule=sigmoid"))
    DiffunetPipeline(unet=tiny(), scheduler=sched).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert len(saved["trained_betas"]) == 1000
    _, again = load_model(tmp_path, "ddim")
    assert torch.allclose(again.alphas_cumprod.double(), abar, atol=1e-6)


def test_a_sampler_of_another_objective_is_one_line():
    flow = make_noise_scheduler(diffusion("flow")).config
    with pytest.raises(ValueError, match=r"^scheduler ddim does not sample flow models; choose one of flow_euler, "
                                         r"flow_heun, flow_dpmpp \(or auto\)$"):
        make_scheduler("ddim", flow)
    with pytest.raises(ValueError, match="samples ddpm models only"):
        make_scheduler("repaint", flow)
    assert type(make_scheduler("auto", flow)).__name__ == "DPMSolverMultistepScheduler"
    assert make_scheduler("auto", flow).config.use_flow_sigmas
    edm = make_noise_scheduler(diffusion("edm")).config
    assert type(make_scheduler("auto", edm)).__name__ == "EDMDPMSolverMultistepScheduler"


@pytest.mark.parametrize("overrides, message", [
    (["diffusion.objective=flw"], "unknown diffusion.objective 'flw'; choose one of 'ddpm', 'flow', 'edm'"),
    (["diffusion.objective=flow", "sample.scheduler=ddim"],
     "sample.scheduler: scheduler ddim does not sample flow models; choose one of flow_euler, flow_heun, "
     "flow_dpmpp (or auto)"),
    (["diffusion.objective=edm", "diffusion.loss_weighting=min_snr"],
     "diffusion.loss_weighting=min_snr is for objective=ddpm; edm has its own weighting: leave it at mse"),
    (["diffusion.objective=flow", "diffusion.time_sampling=normal"], "unknown diffusion.time_sampling 'normal'"),
    (["diffusion.objective=edm", "diffusion.sigma_max=0.001"], "diffusion.sigma_max (0.001) must exceed"),
])
def test_objective_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(fast_cfg(tmp_path, *overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("objective, scheduler_class, training_class", [
    ("flow", DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler),
    ("edm", EDMDPMSolverMultistepScheduler, EDMEulerScheduler)])
def test_a_trained_run_saves_its_objective_for_stock_diffusers(tmp_path, objective, scheduler_class, training_class):
    """scheduler/ is the run's sampler (sample.scheduler=auto: the objective's DPM-Solver++), so that stock
    diffusers samples as the run did; the training scheduler is recorded in unet/config.json."""
    path = train(fast_cfg(tmp_path, f"diffusion.objective={objective}", "train.max_steps=2",
                          "train.checkpoint_every=2"))
    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    assert type(pipe.scheduler) is scheduler_class                      # diffusers' own class, from the folder
    assert objectives.objective_of(pipe.scheduler.config) == objective
    record = json.loads((path / "unet" / "config.json").read_text())["_diffunet_training_scheduler"]
    assert record["_class_name"] == training_class.__name__
    images = pipe(class_labels=[1, 2], num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
    _, sampler = load_model(path)                                       # sample.py's default: auto
    assert type(sampler).__name__ == {"flow": "DPMSolverMultistepScheduler",
                                      "edm": "EDMDPMSolverMultistepScheduler"}[objective]
    card = (path / "README.md").read_text()
    assert {"flow": "rectified flow", "edm": "EDM, sigma_data 0.5"}[objective] in card
