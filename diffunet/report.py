"""The seed's claims about the U-Net, measured: ``python -m diffunet.report [--quick] [--out report] [--seeds N]``.

Trains small denoisers on the embedded digits (16x16) and writes ``OUT/index.md``, one section per claim, each
with its setup, a table (mean ± sd over seeds), a matplotlib plot and a plain verdict, plus ``OUT/numbers.json``:

1. skips carry the high frequencies      4. upsampling artifacts (checkerboard energy)
2. skips are a gradient highway          5. padding at the borders ("same" vs "valid")
3. strided conv as a learned anti-alias  6. the 1x1 conv after concatenation (cost vs loss)

A verdict is "holds" only when every seed agrees and the mean difference exceeds the seed-to-seed spread of the
differences (runs are paired: the same seed gives the same initial weights, batches, noise and timesteps);
"does not hold" when every seed disagrees by as much; otherwise "not resolved". ``--quick`` trains for seconds:
it checks that the report runs, and its verdicts are not evidence.

Models are trained one after another on one thread by default: they are too small to gain much from intra-op
threads, and on a shared machine oversubscribed threads cost up to ten times the time (``--threads`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import DiffusionConfig
from .data import digits_arrays
from .diagnostics import encoder_grad_norms
from .objectives import diffusion_loss, make_noise_scheduler
from .nn import ResBlock
from .unet import UNet

MATPLOTLIB_MISSING = "python -m diffunet.report needs matplotlib: pip install 'diffunet[report]'"


@dataclass(frozen=True)
class Settings:
    """How much to train and measure; ``QUICK`` and ``FULL`` below, tests pass smaller ones."""

    name: str
    base_channels: int          # channels of the first level of every model
    steps: int                  # training steps of each model of sections 1, 3, 4, 6
    batch: int
    seeds: int                  # models per configuration (paired across configurations)
    probe_images: int = 297     # held-out digits every measurement uses (at most 297)
    eval_repeats: int = 2       # ... each noised this many times for the held-out loss
    grad_depths: tuple = (2, 3, 4, 5)
    small_channels: int = 8     # base channels of sections 2 and 5 (16 models; "valid" padding's ~10x FLOPs)
    grad_init_seeds: int = 3    # models per (depth, variant, skip) for gradients at init
    grad_steps: int = 100       # training steps of the gradient-highway models
    grad_probes: int = 5        # gradient measurements during their training (besides step 0)
    pad_steps: int = 100        # training steps of the padding models ("valid" costs ~20x per step at 16x16)
    pad_batch: int = 16
    timing_steps: int = 5       # interleaved timed steps per skip-fusion variant
    lr: float = 2e-3
    size: int = 16              # digits are 8x8, bicubically upsampled to this size


QUICK = Settings("quick", base_channels=8, steps=10, batch=16, seeds=2, probe_images=96, eval_repeats=1,
                 grad_init_seeds=2, grad_steps=4, grad_probes=2, pad_steps=4, pad_batch=8, timing_steps=3)
FULL = Settings("full", base_channels=16, steps=400, batch=32, seeds=2, eval_repeats=2, grad_init_seeds=3,
                grad_steps=200, pad_steps=200, pad_batch=16, timing_steps=10)

UNET_DEFAULTS = {k: p.default for k, p in inspect.signature(inspect.unwrap(UNet.__init__)).parameters.items()
                 if k != "self"}
HELD_OUT = 297                                  # the last digits: never trained on, used for every measurement
CURVE_T = (1, 3, 10, 30, 100, 200, 300, 500, 700, 900, 999)   # noise levels of the per-level loss curves
LOW_NOISE_T = (1, 3, 10, 30)                    # the low-noise end: the prediction needs the image's fine detail
PROBE_T = 200                                   # noise level of the shift and checkerboard probes
SPECTRUM_T = 30                                 # noise level of the error spectrum: the low-noise end
BORDER = 2                                      # width of the border ring (pixels) in section 5
SHIFT_CROP = 3                                  # shift consistency compares the interior, away from the wrap


# ------------------------------------------------------------------------------------------- statistics

def mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values, digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± sd`` of per-seed values (``mean`` alone for one value), to ``digits`` significant digits."""
    m, s = mean_sd(np.asarray(values, dtype=float) * scale)
    return num(m, digits) if len(np.atleast_1d(values)) < 2 else f"{num(m, digits)} ± {num(s, 2)}"


def num(x: float, digits: int = 3) -> str:
    """``digits`` significant digits, trailing zeros kept (1.00, 0.0420); e-notation outside [1e-3, 1e5)."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:#.{digits}g}".rstrip(".")
    return f"{x:.{digits - 1}e}"


@dataclass
class Check:
    """One prediction of a claim and what the seeds say about it."""

    prediction: str
    verdict: str
    evidence: str


def paired(prediction: str, margins, evidence: str) -> Check:
    """``margins``: per seed, how far the data go the predicted way (> 0 agrees). See the module docstring."""
    d = np.asarray(margins, dtype=float)
    m, s = mean_sd(d)
    if d.size and (d > 0).all() and m > s:
        verdict = "holds"
    elif d.size and (d < 0).all() and -m > s:
        verdict = "does not hold"
    else:
        verdict = "not resolved (within the seed spread)"
    return Check(prediction, verdict, evidence)


def not_worse(prediction: str, margins, evidence: str) -> Check:
    """A claim of "no worse": it holds unless every seed is worse by more than the spread (> 0 is better)."""
    check = paired(prediction, margins, evidence)
    if check.verdict != "does not hold":
        check.verdict = "holds" if check.verdict == "holds" else "holds (difference within the seed spread)"
    return check


def overall(checks: list[Check]) -> str:
    verdicts = {c.verdict.split(" (")[0] for c in checks}
    if verdicts == {"holds"}:
        return "holds"
    if verdicts == {"does not hold"}:
        return "does not hold on this data"
    if "holds" in verdicts:
        return "holds in part"
    return "does not hold on this data" if "does not hold" in verdicts else "not resolved at these settings"


# ------------------------------------------------------------------------------------------- spectra

def radial_power(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of images (N, C, H, W), per-image mean removed: (cycles/px, power)."""
    x = x.double() - x.double().mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x).abs().square().mean(dim=(0, 1)) / (h * w)
    fy, fx = torch.meshgrid(torch.fft.fftfreq(h), torch.fft.fftfreq(w), indexing="ij")
    radius = torch.sqrt(fx**2 + fy**2)
    bins = torch.round(radius * h).long()                                    # bins of width 1/h cycles/px
    total = torch.zeros(int(bins.max()) + 1, dtype=torch.float64).index_add_(0, bins.flatten(), power.flatten())
    count = torch.zeros_like(total).index_add_(0, bins.flatten(), torch.ones_like(power.flatten()))
    keep = count > 0
    keep[0] = False                                                          # DC: removed with the mean
    return (torch.arange(len(total))[keep] / h).numpy(), (total[keep] / count[keep]).numpy()


def band_power(x: torch.Tensor, low: float, high: float) -> float:
    """Mean power of ``x`` (N, C, H, W) over radial frequencies in [low, high] cycles/px."""
    f, p = radial_power(x)
    return float(p[(f >= low) & (f <= high)].mean())


def nyquist_fraction(x: torch.Tensor) -> float:
    """Share of the power (mean removed) at the Nyquist frequency, (H/2, 0), (0, W/2), (H/2, W/2): a checkerboard.

    A 2x upsampler whose output pixels use different weights by parity puts energy exactly there; 2x interpolation
    has a zero there (nearest exactly, bilinear up to its clamped edge rows). White noise has 3 / (HW - 1) there.
    """
    x = x.double() - x.double().mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x).abs().square().sum(dim=(0, 1))
    return float((power[h // 2, 0] + power[0, w // 2] + power[h // 2, w // 2]) / power.sum().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- the lab

@dataclass
class Run:
    model: UNet
    grad_log: dict = field(default_factory=dict)      # step -> per-level encoder gradient norms


class Lab:
    """The data, the noise schedule, the held-out probe, and every model the sections train (cached by config)."""

    def __init__(self, settings: Settings, log=print):
        self.s, self.log = settings, log
        images, _ = digits_arrays(settings.size)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1          # (N, 1, H, W) in [-1, 1]
        self.train_x, self.test_x = x[:-HELD_OUT], x[-HELD_OUT:][:settings.probe_images]
        self.sched = make_noise_scheduler(DiffusionConfig())                          # cosine betas, epsilon
        g = torch.Generator().manual_seed(1234)
        # The held-out probe: every model sees the same images, noise and (stratified) timesteps.
        self.eval_x0 = self.test_x.repeat(settings.eval_repeats, 1, 1, 1)
        self.eval_noise = torch.randn(self.eval_x0.shape, generator=g)
        n = len(self.eval_x0)
        self.eval_t = (torch.arange(n) * 1000 // n)[torch.randperm(n, generator=g)]
        self.test_noise = self.eval_noise[:len(self.test_x)]
        self.runs: dict = {}
        self.started = time.perf_counter()

    def model_kwargs(self, **overrides) -> dict:
        kw = dict(sample_size=self.s.size, in_channels=1, base_channels=self.s.base_channels,
                  channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, attention_resolutions=(),
                  num_heads=2)
        kw.update(overrides)
        return kw

    def build(self, seed: int, **overrides) -> UNet:
        torch.manual_seed(seed)
        return UNet(**self.model_kwargs(**overrides))

    def train(self, seed: int, steps: int | None = None, batch: int | None = None, grad_every: int = 0,
              **overrides) -> Run:
        """A model trained with AdamW on the training digits; the same seed gives the same init, batches, noise."""
        steps, batch = steps or self.s.steps, batch or self.s.batch
        config = {**UNET_DEFAULTS, **self.model_kwargs(**overrides)}
        key = (seed, steps, batch, grad_every, tuple(sorted(config.items())))
        if key in self.runs:
            return self.runs[key]
        model = self.build(seed, **overrides).train()
        opt = torch.optim.AdamW(model.parameters(), lr=self.s.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(seed)
        grad_log = {}
        start = time.perf_counter()
        for step in range(steps + 1):
            if grad_every and (step % grad_every == 0 or step == steps):
                grad_log[step] = self.grad_norms(model)
            if step == steps:
                break
            x0 = self.train_x[torch.randint(0, len(self.train_x), (batch,), generator=g)]
            loss = diffusion_loss(model, self.sched, x0, generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        seconds = time.perf_counter() - start
        model.eval()
        changes = {k: v for k, v in overrides.items() if k != "zero_init"}
        final = f", final loss {loss.item():.3f}" if steps else ""
        self.log(f"[{self.elapsed():6.1f}s] trained {changes or 'baseline'} seed {seed}: {steps} steps, "
                 f"{seconds / max(steps, 1) * 1000:.0f} ms/step{final}")
        self.runs[key] = run = Run(model, grad_log)
        return run

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # ---- measurements on the held-out probe

    @torch.no_grad()
    def predict(self, model: UNet, x0: torch.Tensor, noise: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, predicted noise) for clean ``x0`` noised at ``t`` (int or (N,)), in chunks."""
        t = torch.as_tensor(t).expand(len(x0)) if torch.as_tensor(t).ndim == 0 else torch.as_tensor(t)
        x_t = self.sched.add_noise(x0, noise, t)
        eps = torch.cat([model(a, b).sample for a, b in zip(x_t.split(128), t.split(128))])
        return x_t, eps

    def loss(self, model: UNet) -> float:
        """Held-out denoising loss (the training objective: eps-MSE, t uniform), on the fixed probe."""
        _, eps = self.predict(model, self.eval_x0, self.eval_noise, self.eval_t)
        return float((eps - self.eval_noise).square().mean())

    def loss_curve(self, model: UNet) -> np.ndarray:
        """Held-out eps-MSE at each noise level of ``CURVE_T``."""
        return np.array([float((self.predict(model, self.test_x, self.test_noise, t)[1] - self.test_noise)
                               .square().mean()) for t in CURVE_T])

    def x0_hat(self, model: UNet, t: int = PROBE_T) -> torch.Tensor:
        """The model's estimate of the clean held-out digits from x_t: (x_t - sqrt(1-a) eps) / sqrt(a)."""
        x_t, eps = self.predict(model, self.test_x, self.test_noise, t)
        a = self.sched.alphas_cumprod[t]
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def grad_norms(self, model: UNet) -> list[float]:
        """Per-encoder-level gradient norms on a fixed batch, noise and timesteps (the same for every call)."""
        return encoder_grad_norms(model, self.test_x[:64], scheduler=self.sched,
                                  generator=torch.Generator().manual_seed(99))


def flops_per_image(model: UNet, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, size, size), 500)
    return float(counter.get_total_flops())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- sections

@dataclass
class Section:
    number: int
    slug: str
    title: str
    claim: str
    setup: str
    tables: list[str]
    checks: list[Check]
    notes: str
    numbers: dict
    figure: object = None           # a matplotlib Figure until written, then its file name

    @property
    def verdict(self) -> str:
        return overall(self.checks)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def describe(lab: Lab, steps: int | None = None, batch: int | None = None, **changes) -> str:
    kw = lab.model_kwargs(**changes)
    shown = ", ".join(f"{k}={v}" for k, v in kw.items() if k not in ("sample_size", "in_channels"))
    return (f"`UNet({shown})` on {lab.s.size}x{lab.s.size} digits ({len(lab.train_x)} train, "
            f"{len(lab.test_x)} held out), "
            f"AdamW lr {lab.s.lr}, batch {batch or lab.s.batch}, {steps or lab.s.steps} steps, cosine DDPM noise, "
            f"epsilon target, seeds 0..{lab.s.seeds - 1}")


def section_skips_high_frequencies(lab: Lab, plt) -> Section:
    seeds = range(lab.s.seeds)
    variants = {"concat": {}, "none": {"skip": "none"}}
    curves = {v: [] for v in variants}
    spectra, band = {v: [] for v in variants}, {v: [] for v in variants}
    data_f, data_p = radial_power(lab.test_x)
    lo, hi = 0.125, 0.25             # the top octave of the digits' own band (they are 8x8, upsampled)
    data_band = band_power(lab.test_x, lo, hi)
    for name, kw in variants.items():
        for seed in seeds:
            model = lab.train(seed, **kw).model
            curves[name].append(lab.loss_curve(model))
            error = lab.x0_hat(model, SPECTRUM_T) - lab.test_x              # what the denoiser got wrong
            spectra[name].append(radial_power(error)[1])
            band[name].append(band_power(error, lo, hi) / data_band)
    low = [i for i, t in enumerate(CURVE_T) if t in LOW_NOISE_T]
    high = [i for i, t in enumerate(CURVE_T) if t >= 500]
    low_loss = {v: [c[low].mean() for c in curves[v]] for v in variants}
    high_loss = {v: [c[high].mean() for c in curves[v]] for v in variants}
    rel_low = [n / c for n, c in zip(low_loss["none"], low_loss["concat"])]
    rel_high = [n / c for n, c in zip(high_loss["none"], high_loss["concat"])]

    rows = [[f"t = {t}"] + [fmt([c[i] for c in curves[v]], 3) for v in variants]
            + [fmt([n[i] / c[i] for n, c in zip(curves["none"], curves["concat"])], 3)]
            for i, t in enumerate(CURVE_T)]
    t1 = table(["noise level", "eps-MSE, skip=concat", "eps-MSE, skip=none", "none / concat"], rows)
    t2 = table(["", "skip=concat", "skip=none", "data"],
               [[f"error power of x0-hat at t={SPECTRUM_T} in {lo}-{hi} cycles/px, / data's power there",
                 fmt(band["concat"]), fmt(band["none"]), "1"]])
    checks = [
        paired(f"without skips the loss is higher at the low-noise end (t in {LOW_NOISE_T})",
               [n - c for n, c in zip(low_loss["none"], low_loss["concat"])],
               f"eps-MSE {fmt(low_loss['concat'])} (concat) vs {fmt(low_loss['none'])} (none)"),
        paired("the gap is wider at the low-noise end than at high noise (t >= 500)",
               [a - b for a, b in zip(rel_low, rel_high)],
               f"none/concat loss ratio {fmt(rel_low)} at low noise vs {fmt(rel_high)} at high noise"),
        paired(f"with skips the low-noise estimate (t={SPECTRUM_T}) gets the high frequencies more right",
               [np.log(n / c) for n, c in zip(band["none"], band["concat"])],
               f"error power in {lo}-{hi} cycles/px, relative to the data's: {fmt(band['concat'])} (concat) vs "
               f"{fmt(band['none'])} (none)"),
    ]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, color in (("concat", "C0"), ("none", "C3")):
        c = np.array(curves[name])
        a.errorbar(CURVE_T, c.mean(0), yerr=c.std(0, ddof=1) if len(c) > 1 else None, color=color, marker="o",
                   ms=3, capsize=2, label=f"skip={name}")
        p = np.array(spectra[name])
        b.plot(data_f, p.mean(0), color=color, marker="o", ms=3, label=f"error of x0-hat, skip={name}")
    b.plot(data_f, data_p, color="k", ls="--", label="data (held out)")
    a.set(xscale="log", yscale="log", xlabel="timestep t (low t = little noise)", ylabel="held-out eps-MSE",
          title="Denoising loss per noise level")
    b.axvspan(lo, hi, color="0.9", zorder=0)
    b.set(yscale="log", xlabel="radial frequency (cycles/px)", ylabel="power",
          title=f"Radial power spectra, x0 estimate at t={SPECTRUM_T}", xlim=(0, 0.5 * math.sqrt(2)))
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()

    return Section(
        1, "skips-high-frequencies", "Skips carry the high frequencies",
        "The skip hands the decoder the encoder's features at full resolution, so fine detail need not squeeze "
        "through the bottleneck; without it the denoiser should fail where fine detail matters most, at low noise, "
        "and its estimates should get the high frequencies wrong.",
        describe(lab) + "; skip=\"concat\" vs \"none\" at equal steps. The loss is measured on the held-out digits "
        f"at each noise level (same noise for every model); the spectra are of the error of the model's x0 "
        f"estimate, x0-hat - x0, at t={SPECTRUM_T}, against the data's own spectrum (shaded: {lo}-{hi} cycles/px, "
        f"the top octave of the data's band: digits are 8x8 upsampled, so above "
        f"{hi} cycles/px the data have almost no power).",
        [t1, t2], checks,
        "The eps-MSE is highest at the low-noise end for every model: there the noise is tiny and predicting it "
        "means knowing the clean image to the pixel. "
        + ("The gap without skips is as wide or wider at high noise: under the epsilon target the high-noise end "
           "needs every pixel too, since the target is then nearly the input itself (white noise, all frequencies), "
           "which a network without skips must also squeeze through its bottleneck." if np.mean(rel_high)
           >= np.mean(rel_low) else ""),
        {"loss_curve": {v: np.array(curves[v]).tolist() for v in variants}, "error_band_ratio": band,
         "low_noise_loss": low_loss, "high_noise_loss": high_loss}, fig)


class NoShortcut(nn.Module):
    """Measurement-only stand-in for a residual block's shortcut: zeros, so the block is its branch alone."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x.new_zeros(x.shape[0], self.channels, *x.shape[2:])


def plain(model: UNet, norm: bool = True) -> UNet:
    """Measurement-only variants (not UNet switches): residual shortcuts removed, a plain conv stack as in the
    2015 U-Net; with ``norm=False`` every GroupNorm removed as well (PyTorch's default conv init)."""
    for module in list(model.modules()):
        if isinstance(module, ResBlock):
            module.shortcut = NoShortcut(module.conv2.out_channels)
        for name, child in list(module.named_children()):
            if not norm and isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.Identity())
    return model


GRAD_VARIANTS = {
    "residual + GroupNorm (the model)": lambda m: m,
    "plain convs + GroupNorm": lambda m: plain(m),
    "plain convs, no norm": lambda m: plain(m, norm=False),
}


def section_gradient_highway(lab: Lab, plt) -> Section:
    depths, s = lab.s.grad_depths, lab.s
    mult = lambda d: dict(channel_mult=(1,) + (2,) * (d - 1), base_channels=s.small_channels)  # noqa: E731
    at_init = {}                                        # (variant, skip, depth) -> [per seed: per-level norms]
    for variant, make in GRAD_VARIANTS.items():
        for skip in ("concat", "none"):
            for d in depths:
                at_init[variant, skip, d] = [lab.grad_norms(make(lab.build(seed, **mult(d), skip=skip,
                                                                              zero_init=False)))
                                             for seed in range(s.grad_init_seeds)]
    lab.log(f"[{lab.elapsed():6.1f}s] gradients at init measured")
    every = max(s.grad_steps // s.grad_probes, 1)
    trained = {(skip, d): [lab.train(seed, steps=s.grad_steps, grad_every=every, **mult(d), skip=skip,
                                     zero_init=False).grad_log for seed in range(s.seeds)]
               for skip in ("concat", "none") for d in depths}

    def factor(norms_by_depth):
        """Per seed, the factor by which the finest level's gradient changes per level added (log-linear fit)."""
        out = []
        for seed in range(len(norms_by_depth[0])):
            y = np.array([norms_by_depth[i][seed][0] for i in range(len(depths))])
            ok = y > 0                                  # 0: below float32's range, left out of the fit
            fit = np.polyfit(np.array(depths)[ok], np.log(y[ok]), 1)[0] if ok.sum() > 1 else -np.inf
            out.append(float(np.exp(fit)))
        return out

    factors = {(v, k): factor([at_init[v, k, d] for d in depths]) for v in GRAD_VARIANTS for k in ("concat", "none")}
    rows = []
    for v in GRAD_VARIANTS:
        for k in ("concat", "none"):
            rows.append([v, k] + [fmt([n[0] for n in at_init[v, k, d]], 2) for d in depths]
                        + [fmt(factors[v, k], 2)])
    t1 = table(["blocks", "skip"] + [f"level-0 grad, depth {d}" for d in depths] + ["factor per level added"], rows)
    deep = depths[-1]
    rows = []
    for k in ("concat", "none"):
        logs = trained[k, deep]
        for step in sorted(logs[0]):
            rows.append([k, step] + [fmt([log[step][i] for log in logs], 2) for i in range(deep)])
    t2 = table(["skip", "step"] + [f"level {i}" for i in range(deep)], rows)

    model_variant = next(iter(GRAD_VARIANTS))
    checks = [
        paired(f"{v}: without skips the finest level's gradient falls with depth (factor per level < 1/2), "
               "and the skip stops the fall",
               [min(0.5 - n, c - 2 * n) for n, c in zip(factors[v, "none"], factors[v, "concat"])],
               f"factor per level added: {fmt(factors[v, 'none'], 2)} (none) vs {fmt(factors[v, 'concat'], 2)} "
               f"(concat)")
        for v in GRAD_VARIANTS]
    trained_loss = {(k, d): [lab.loss(lab.train(seed, steps=s.grad_steps, grad_every=every, **mult(d), skip=k,
                                                zero_init=False).model) for seed in range(s.seeds)]
                    for k in ("concat", "none") for d in depths}
    t3 = table(["skip"] + [f"held-out loss, depth {d}" for d in depths],
               [[k] + [fmt(trained_loss[k, d]) for d in depths] for k in ("concat", "none")])
    final = lambda k: [log[max(log)][0] for log in trained[k, deep]]  # noqa: E731
    checks.append(paired(f"the model, trained {s.grad_steps} steps at depth {deep}: the skip brings a larger "
                         "gradient to the finest level",
                         [np.log(c / n) for c, n in zip(final("concat"), final("none"))],
                         f"level-0 gradient {fmt(final('concat'), 2)} (concat) vs {fmt(final('none'), 2)} (none)"))

    def geomean(values, axis=None):
        """Geometric mean over seeds; NaN (not drawn) where a gradient is exactly 0 (float32 underflow)."""
        v = np.asarray(values, dtype=float)
        with np.errstate(divide="ignore"):
            out = np.exp(np.log(v).mean(axis=axis))
        return np.where(out > 0, out, np.nan)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = dict(zip(GRAD_VARIANTS, ("C0", "C2", "C4")))
    for v in GRAD_VARIANTS:
        for k, ls in (("concat", "-"), ("none", "--")):
            y = [geomean([n[0] for n in at_init[v, k, d]]) for d in depths]
            axes[0].plot(depths, y, ls=ls, marker="o", ms=3, color=colors[v])
            axes[1].plot(range(deep), geomean(at_init[v, k, deep], axis=0), ls=ls, marker="o", ms=3,
                         color=colors[v])
    for v in GRAD_VARIANTS:
        axes[0].plot([], [], color=colors[v], lw=6, label=v)
    axes[0].plot([], [], "k-", label="skip=concat")
    axes[0].plot([], [], "k--", label="skip=none")
    axes[0].set(yscale="log", xlabel="levels in the U-Net", ylabel="grad norm at level 0 (finest)",
                title="At init: finest level vs depth", xticks=list(depths))
    axes[1].set(yscale="log", xlabel="encoder level (0 = finest)", ylabel="grad norm",
                title=f"At init: every level, depth {deep}", xticks=list(range(deep)))
    cmap = plt.get_cmap("viridis")
    for j, d in enumerate(depths):
        for k, ls in (("concat", "-"), ("none", "--")):
            logs = trained[k, d]
            steps = sorted(logs[0])
            y = geomean([[log[st][0] for st in steps] for log in logs], axis=0)
            axes[2].plot(steps, y, ls=ls, color=cmap(j / max(len(depths) - 1, 1)),
                         label=f"depth {d}" if k == "concat" else None)
    axes[2].plot([], [], "k-", label="skip=concat")
    axes[2].plot([], [], "k--", label="skip=none")
    axes[2].set(yscale="log", xlabel="training step", ylabel="grad norm at level 0",
                title=f"During training: {model_variant.split(' (')[0]}")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()

    return Section(
        2, "gradient-highway", "Skips are a gradient highway",
        "Without skips the loss gradient must travel down through the bottleneck and back up to reach the first "
        "layers, so it should fall exponentially with the number of levels; skips give it a short path.",
        f"U-Nets of {depths[0]} to {depths[-1]} levels (`channel_mult=(1, 2, ..., 2)`, base {s.small_channels} "
        f"channels, one residual block per level), `zero_init=False` (with zero-init every gradient is exactly zero "
        f"before the first update). Gradient norm of the eps-MSE over each encoder level's parameters, on 64 held-out "
        f"digits with fixed noise and timesteps (`diffunet.diagnostics.encoder_grad_norms`). At init: "
        f"{s.grad_init_seeds} seeds per cell, and besides the model two measurement-only variants the UNet does not "
        f"offer: residual shortcuts removed (a plain conv stack, as in the 2015 U-Net), and also GroupNorm removed. "
        f"During training: the model as built, {s.grad_steps} steps, batch {s.batch}, seeds 0..{s.seeds - 1}. The "
        f"factor per level added is exp(slope) of log(level-0 gradient) against depth (a gradient of exactly 0, below "
        f"float32's range, is left out of the fit).",
        [t1, f"Per-level gradient norms during training, depth {deep}:\n\n" + t2,
         f"Held-out loss after {s.grad_steps} steps:\n\n" + t3], checks,
        "Why the model as built shows no exponential fall without skips: every level is a stack of residual blocks, "
        "whose identity shortcuts are themselves a gradient highway through the level, and GroupNorm rescales "
        "activations (and so gradients) at every block, which keeps their size independent of depth. Remove both, "
        "as in a plain network with PyTorch's default initialisation, and the seed's prediction appears: without "
        "skips the finest level's gradient falls by orders of magnitude per level, with skips it stays put. (With "
        "skips, the deeper levels get smaller gradients than the finest: the output leans on the short path.) "
        "During training the skip-less model's gradient does collapse, but read that with the loss table: a deep "
        "model without skips squeezes every pixel through a tiny bottleneck (1x1 at 5 levels), settles near the "
        "best it can do there (predicting little more than 0, loss near 1), and a model at its optimum has small "
        "gradients. That is the information argument of section 1, not a failure of gradient flow.",
        {"at_init": {f"{v} | {k} | {d}": at_init[v, k, d] for (v, k, d) in at_init},
         "factor": {f"{v} | {k}": f for (v, k), f in factors.items()},
         "trained_loss": {f"{k} | {d}": v for (k, d), v in trained_loss.items()},
         "trained": {f"{k} | {d}": [{str(st): n for st, n in log.items()} for log in trained[k, d]]
                     for (k, d) in trained}}, fig)


def shift_error(lab: Lab, model: UNet) -> float:
    """Relative change when the input moves by 1 px: ||f(shift x) - shift f(x)||^2 / ||f(x)||^2 (interior, both
    axes). The shift is circular on x_t, so both inputs are equally valid noisy digits."""
    x_t, eps = lab.predict(model, lab.test_x, lab.test_noise, PROBE_T)
    errs = []
    with torch.no_grad():
        for dims in ((-1,), (-2,)):
            shifted = torch.cat([model(a, PROBE_T).sample for a in torch.roll(x_t, 1, dims).split(128)])
            c = slice(SHIFT_CROP, -SHIFT_CROP)
            diff = (shifted - torch.roll(eps, 1, dims))[..., c, c]
            errs.append(float(diff.square().sum() / eps[..., c, c].square().sum()))
    return float(np.mean(errs))


def loss_bars(ax, loss: dict, names: list[str]) -> None:
    """Held-out loss per variant, mean and sd over seeds, on an axis zoomed to the bars' range."""
    x = np.arange(len(names))
    m = [np.mean(loss[n]) for n in names]
    sd = [np.std(loss[n], ddof=1) if len(loss[n]) > 1 else 0 for n in names]
    ax.bar(x, m, 0.6, yerr=sd, capsize=3, color="C2")
    ax.set(xticks=x, xticklabels=names, ylabel="held-out eps-MSE", title="Loss at equal steps",
           ylim=(min(mm - s for mm, s in zip(m, sd)) * 0.97, max(mm + s for mm, s in zip(m, sd)) * 1.01))


def section_downsampling(lab: Lab, plt) -> Section:
    names = ("conv", "maxpool", "avgpool", "blur")
    seeds = range(lab.s.seeds)
    init_err = {n: [shift_error(lab, lab.build(seed, downsample=n, zero_init=False).eval()) for seed in seeds]
                for n in names}
    runs = {n: [lab.train(seed, downsample=n).model for seed in seeds] for n in names}
    err = {n: [shift_error(lab, m) for m in runs[n]] for n in names}
    loss = {n: [lab.loss(m) for m in runs[n]] for n in names}
    rows = [[f"`{n}`", fmt(init_err[n], 3, 100), fmt(err[n], 3, 100), fmt(loss[n], 3)] for n in names]
    t1 = table(["downsample", "shift error at init (%)", "shift error trained (%)", "held-out loss"], rows)
    checks = [paired("trained, the strided conv is more shift-consistent than max-pool",
                     [m - c for m, c in zip(err["maxpool"], err["conv"])],
                     f"shift error {fmt(err['conv'], 3, 100)} % (conv) vs {fmt(err['maxpool'], 3, 100)} % (maxpool)")]
    checks += [paired(f"the strided conv reaches a lower loss than {n} at equal steps",
                      [o - c for o, c in zip(loss[n], loss["conv"])],
                      f"loss {fmt(loss['conv'])} (conv) vs {fmt(loss[n])} ({n})") for n in names[1:]]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(names))
    for off, data, label in ((-0.2, init_err, "at init"), (0.2, err, "trained")):
        m = [np.mean(data[n]) * 100 for n in names]
        sd = [np.std(data[n], ddof=1) * 100 if len(data[n]) > 1 else 0 for n in names]
        a.bar(x + off, m, 0.4, yerr=sd, capsize=3, label=label)
    a.set(xticks=x, xticklabels=names, ylabel="shift error (%)", title="Shift 1 px: relative change of the output")
    a.legend(fontsize=8)
    loss_bars(b, loss, names)
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()

    return Section(
        3, "downsampling", "Strided conv as a learned anti-alias filter",
        "Max-pooling keeps one pixel in four by a fixed rule and aliases; a 3x3 stride-2 conv can learn to low-pass "
        "before it discards, so it should be more shift-consistent and reach a lower loss; a fixed blur (Zhang 2019) "
        "is the principled fixed alternative.",
        describe(lab) + "; `downsample` varied. Shift error: the held-out digits noised at "
        f"t={PROBE_T} are shifted by 1 px (circularly, each axis), and the output's change from the shifted output is "
        f"measured away from the border ({SHIFT_CROP} px), relative to the output's power; at init with "
        "`zero_init=False`. The loss is the held-out eps-MSE over uniform t.",
        [t1], checks,
        "Shift consistency is bounded by the zero padding too (every model knows where the border is), which all "
        "four variants share; the skips at full resolution are shift-equivariant, so only the coarse paths alias."
        + (" Here the four downsamplers differ by less than the seeds do, in shift consistency and in loss: at "
           f"{lab.s.size}x{lab.s.size} with three levels the coarse paths are short and the full-resolution skips "
           "carry most of the output, so this data cannot show the claim either way."
           if overall(checks).startswith("not resolved") else ""),
        {"shift_error_init": init_err, "shift_error": err, "loss": loss}, fig)


def section_upsampling(lab: Lab, plt) -> Section:
    names = ("transposed", "bilinear", "nearest")
    seeds = range(lab.s.seeds)

    def upsampler_nyquist(model):
        """Checkerboard energy at each upsampler's own output, averaged over the upsamplers."""
        found = []
        hooks = [level.up.register_forward_hook(lambda m, i, o: found.append(nyquist_fraction(o)))
                 for level in model.decoder if level.up is not None]
        lab.predict(model, lab.test_x, lab.test_noise, PROBE_T)
        for h in hooks:
            h.remove()
        return float(np.mean(found))

    init = {n: [upsampler_nyquist(lab.build(seed, upsample=n, zero_init=False).eval()) for seed in seeds]
            for n in names}
    runs = {n: [lab.train(seed, upsample=n).model for seed in seeds] for n in names}
    up = {n: [upsampler_nyquist(m) for m in runs[n]] for n in names}
    out = {n: [nyquist_fraction(lab.x0_hat(m)) for m in runs[n]] for n in names}
    loss = {n: [lab.loss(m) for m in runs[n]] for n in names}
    data = nyquist_fraction(lab.test_x)
    pct = 100
    rows = [[f"`{n}`", fmt(init[n], 3, pct), fmt(up[n], 3, pct), fmt(out[n], 3, pct), fmt(loss[n])] for n in names]
    rows.append(["data (held out)", "", "", f"{data * pct:.3g}", ""])
    t1 = table(["upsample", "at upsampler outputs, init (%)", "at upsampler outputs, trained (%)",
                f"in x0-hat at t={PROBE_T}, trained (%)", "held-out loss"], rows)
    checks = []
    for other in names[1:]:
        checks.append(paired(f"at init, transposed conv leaves more checkerboard energy than {other}",
                             [np.log(t / max(o, 1e-30)) for t, o in zip(init["transposed"], init[other])],
                             f"{fmt(init['transposed'], 3, pct)} % vs {fmt(init[other], 3, pct)} %"))
    for other in names[1:]:
        checks.append(paired(f"trained, transposed conv still leaves more checkerboard energy than {other}",
                             [np.log(t / max(o, 1e-30)) for t, o in zip(up["transposed"], up[other])],
                             f"{fmt(up['transposed'], 3, pct)} % vs {fmt(up[other], 3, pct)} %"))
    for other in names[1:]:
        checks.append(paired(f"trained, the denoised image of transposed conv has more checkerboard energy than "
                             f"{other}'s",
                             [np.log(t / max(o, 1e-30)) for t, o in zip(out["transposed"], out[other])],
                             f"{fmt(out['transposed'], 3, pct)} % vs {fmt(out[other], 3, pct)} % (data: "
                             f"{data * pct:.3g} %)"))

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(names))
    for off, d, label in ((-0.27, init, "upsampler outputs, init"), (0, up, "upsampler outputs, trained"),
                          (0.27, out, f"x0-hat at t={PROBE_T}, trained")):
        m = [np.mean(d[n]) * pct for n in names]
        a.bar(x + off, m, 0.27, label=label)
    a.axhline(data * pct, color="k", ls="--", lw=1, label="data")
    a.set(xticks=x, xticklabels=names, yscale="log", ylabel="power at Nyquist (% of total)",
          title="Checkerboard energy")
    a.legend(fontsize=7)
    loss_bars(b, loss, names)
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()

    return Section(
        4, "upsampling", "Upsampling artifacts",
        "A 2x2 transposed conv applies different weights to each output pixel by its parity, which leaves a "
        "checkerboard; interpolation (nearest, bilinear) followed by a 3x3 conv has no parity structure (Odena et "
        "al. 2016).",
        describe(lab) + "; `upsample` varied. Checkerboard energy: the share of the power (mean removed) at the "
        "Nyquist frequency, (H/2, 0), (0, W/2), (H/2, W/2), measured at each upsampler's output (averaged over "
        f"upsamplers) on the held-out digits at t={PROBE_T}, at init (`zero_init=False`) and trained, and in the "
        "trained model's x0 estimate, against the data's.",
        [t1], checks,
        "Nearest 2x interpolation has an exact zero at the output's Nyquist frequency (bilinear too, up to its "
        "clamped edge rows), so those upsampler outputs carry energy there only through the edges and the "
        "zero-padded border of the 3x3 conv that follows; the transposed conv puts it there by construction."
        + (" After training the checkerboard stays at the transposed conv's own output, but the 3x3 convs after it "
           f"remove it: the denoised image carries no more Nyquist energy than the data ({data * pct:.3g} %)."
           if not any(c.verdict == "holds" for c in checks[-2:]) else ""),
        {"nyquist_up_init": init, "nyquist_up_trained": up, "nyquist_x0": out, "nyquist_data": data,
         "loss": loss}, fig)


def section_padding(lab: Lab, plt) -> Section:
    s = lab.s
    seeds = range(s.seeds)
    names = ("same", "valid")
    kw = dict(channel_mult=(1, 2), base_channels=s.small_channels)
    runs = {n: [lab.train(seed, steps=s.pad_steps, batch=s.pad_batch, padding=n, **kw).model for seed in seeds]
            for n in names}
    ring = torch.zeros(s.size, s.size, dtype=torch.bool)
    ring[:BORDER], ring[-BORDER:], ring[:, :BORDER], ring[:, -BORDER:] = True, True, True, True
    maps, border, interior = {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
    n_eval = len(lab.eval_x0)
    for n in names:
        for m in runs[n]:
            _, eps = lab.predict(m, lab.eval_x0[:n_eval], lab.eval_noise[:n_eval], lab.eval_t[:n_eval])
            err = (eps - lab.eval_noise[:n_eval]).square().mean(dim=(0, 1))          # (H, W)
            maps[n].append(err)
            border[n].append(float(err[ring].mean()))
            interior[n].append(float(err[~ring].mean()))
    ratio = {n: [b / i for b, i in zip(border[n], interior[n])] for n in names}
    probe = {n: lab.build(0, padding=n, **kw) for n in names}
    flops = {n: flops_per_image(probe[n], s.size) for n in names}
    tiling = probe["valid"].tiling(s.size)
    rows = [[f"`{n}`", fmt(border[n]), fmt(interior[n]), fmt(ratio[n]),
             fmt([(b * ring.sum() + i * (~ring).sum()) / ring.numel() for b, i in zip(border[n], interior[n])]),
             f"{flops[n] / 1e6:.1f}"] for n in names]
    t1 = table(["padding", f"eps-MSE, border ring ({BORDER} px)", "eps-MSE, interior", "border / interior",
                "eps-MSE, all", "MFLOPs / image"], rows)
    checks = [
        paired("with \"same\" padding the border ring is worse, relative to the interior, than with \"valid\"",
               [a - b for a, b in zip(ratio["same"], ratio["valid"])],
               f"border/interior {fmt(ratio['same'])} (same) vs {fmt(ratio['valid'])} (valid)"),
        paired("\"valid\" padding has a lower error in the border ring",
               [a - b for a, b in zip(border["same"], border["valid"])],
               f"border eps-MSE {fmt(border['same'])} (same) vs {fmt(border['valid'])} (valid)"),
    ]

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1, 1.2, 1.3]})
    vmax = max(float(torch.stack(maps[n]).mean(0).max()) for n in names)
    for ax, n in zip(axes[:2], names):
        im = ax.imshow(torch.stack(maps[n]).mean(0).numpy(), vmin=0, vmax=vmax, cmap="magma")
        ax.set(title=f"eps-MSE per pixel, padding={n}", xticks=[], yticks=[])
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    x = np.arange(2)
    for off, d, label in ((-0.2, border, f"border ring ({BORDER} px)"), (0.2, interior, "interior")):
        m = [np.mean(d[n]) for n in names]
        sd = [np.std(d[n], ddof=1) if len(d[n]) > 1 else 0 for n in names]
        axes[2].bar(x + off, m, 0.4, yerr=sd, capsize=3, label=label)
    axes[2].set(xticks=x, xticklabels=names, ylabel="held-out eps-MSE", title="Border vs interior")
    axes[2].legend(fontsize=8, loc="upper left")
    axes[2].grid(alpha=0.3, axis="y")
    fig.tight_layout()

    return Section(
        5, "padding", "Padding at the borders",
        "\"same\" padding computes border pixels from invented zeros; \"valid\" padding with overlap-tile (mirror "
        "the input by the margin the network consumes) never does, so its border should be no worse than its "
        "interior.",
        describe(lab, steps=s.pad_steps, batch=s.pad_batch, **kw) + f"; `padding` varied. Two levels only: at "
        f"{s.size}x{s.size} a \"valid\" network consumes {tiling.margin[0]} px per side, so it runs on a "
        f"{tiling.input_size[0]}x{tiling.input_size[1]} mirror-padded input (hence the smaller batch and fewer steps "
        f"than the other sections). Error: held-out eps-MSE per pixel over uniform t, border ring of {BORDER} px vs "
        "the rest.",
        [t1], checks,
        f"The digits' borders are always black, and zero padding tells a \"same\" network where the border is; the "
        f"mirror padding of \"valid\" hides it. The cost of \"valid\" here is {flops['valid'] / flops['same']:.0f}x "
        f"the FLOPs per image."
        + (" On digits the border ring is the easiest region for both paddings (border/interior below 1): its "
           "pixels are always black, so invented zeros have little to corrupt there. Data with content at the "
           "edges would test the claim harder." if max(np.mean(ratio[n]) for n in names) < 1 else ""),
        {"border": border, "interior": interior, "ratio": ratio, "flops": flops}, fig)


def section_concat_1x1(lab: Lab, plt) -> Section:
    names = ("concat", "concat_1x1", "add")
    seeds = range(lab.s.seeds)
    loss = {n: [lab.loss(lab.train(seed, skip=n).model) for seed in seeds] for n in names}
    probe = {n: lab.build(0, skip=n) for n in names}
    params = {n: n_params(probe[n]) for n in names}
    flops = {n: flops_per_image(probe[n], lab.s.size) for n in names}
    # Time per training step, interleaved across variants so that a change in machine load hits all alike.
    x0 = lab.train_x[: lab.s.batch]
    times, opts = {n: [] for n in names}, {n: torch.optim.AdamW(probe[n].parameters(), lr=1e-4) for n in names}
    for rep in range(lab.s.timing_steps + 1):
        for n in names:
            start = time.perf_counter()
            l = diffusion_loss(probe[n], lab.sched, x0, generator=torch.Generator().manual_seed(rep))  # noqa: E741
            opts[n].zero_grad()
            l.backward()
            opts[n].step()
            if rep:                                                     # the first step warms up
                times[n].append(time.perf_counter() - start)
    ms = {n: float(np.median(times[n]) * 1000) for n in names}
    rows = [[f"`{n}`", f"{params[n] / 1e3:.1f}k", f"{flops[n] / 1e6:.1f}", f"{ms[n]:.1f}", fmt(loss[n])]
            for n in names]
    t1 = table(["skip", "parameters", "MFLOPs / image (forward)", f"ms / step (batch {lab.s.batch}, median)",
                "held-out loss"], rows)
    saved = (params["concat_1x1"] < params["concat"], flops["concat_1x1"] < flops["concat"])
    checks = [
        Check("concat_1x1 has fewer parameters and FLOPs than concat", "holds" if all(saved) else "does not hold",
              f"{params['concat_1x1'] / params['concat'] - 1:+.0%} parameters, "
              f"{flops['concat_1x1'] / flops['concat'] - 1:+.0%} FLOPs (exact counts)"),
        not_worse("concat_1x1 is not worse than concat at equal steps",
                  [c - p for c, p in zip(loss["concat"], loss["concat_1x1"])],
                  f"loss {fmt(loss['concat_1x1'])} (concat_1x1) vs {fmt(loss['concat'])} (concat)"),
    ]

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    x = np.arange(len(names))
    for ax, values, label in ((axes[0], [params[n] / 1e3 for n in names], "parameters (k)"),
                              (axes[1], [flops[n] / 1e6 for n in names], "MFLOPs / image"),
                              (axes[2], [ms[n] for n in names], "ms / training step")):
        ax.bar(x, values, 0.6, color="C0")
        ax.set(xticks=x, xticklabels=names, title=label)
    m = [np.mean(loss[n]) for n in names]
    sd = [np.std(loss[n], ddof=1) if len(loss[n]) > 1 else 0 for n in names]
    axes[3].bar(x, m, 0.6, yerr=sd, capsize=3, color="C2")
    axes[3].set(xticks=x, xticklabels=names, title="held-out eps-MSE",
                ylim=(min(mm - s for mm, s in zip(m, sd)) * 0.97, max(mm + s for mm, s in zip(m, sd)) * 1.01))
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()

    return Section(
        6, "concat-1x1", "The 1x1 conv after concatenation",
        "Concatenating the skip doubles the channels every following 3x3 conv reads; a 1x1 conv straight after the "
        "concatenation cuts them back, saving about 9·S·C_out weights per block for (C+S)·C spent, at no cost in "
        "quality.",
        describe(lab) + "; `skip` in concat, concat_1x1, add. Parameters and forward FLOPs "
        "(`torch.utils.flop_counter`) of one 16x16 image; time per training step measured interleaved across the "
        f"variants ({lab.s.timing_steps} steps each, one thread, on a machine with load average "
        f"{os.getloadavg()[0]:.1f}).",
        [t1], checks,
        "`add` is listed as the cheapest fusion for reference; it is not part of the claim. "
        f"In numbers: the 1x1 saves {1 - params['concat_1x1'] / params['concat']:.0%} of the parameters, "
        f"{1 - flops['concat_1x1'] / flops['concat']:.0%} of the FLOPs and "
        f"{1 - ms['concat_1x1'] / ms['concat']:.0%} of the time per step, for a held-out loss "
        f"{np.mean(loss['concat_1x1']) / np.mean(loss['concat']) - 1:+.1%} at equal steps.",
        {"params": params, "flops": flops, "ms_per_step": ms, "loss": loss}, fig)


SECTIONS = (section_skips_high_frequencies, section_gradient_highway, section_downsampling, section_upsampling,
            section_padding, section_concat_1x1)


# ------------------------------------------------------------------------------------------- writing

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.titlesize": 9.5})
    return plt


def _plain(obj):
    """numbers -> JSON: numpy and tuples to lists, dict keys to strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def render(sections: list[Section], settings: Settings, seconds: float, command: str) -> str:
    out = [
        "# The seed's claims, measured",
        "",
        f"Generated by `{command}` in {seconds / 60:.1f} min ({settings.name} settings, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU). Every model is a small diffunet `UNet` trained from scratch on "
        "the embedded digits; every number is measured on "
        f"{settings.probe_images} held-out digits with fixed noise. `mean ± sd` is over "
        "seeds; runs with the same seed share initial weights, batches and noise, so differences are compared seed "
        "by seed: a verdict is *holds* only when every seed agrees and the mean difference exceeds its spread.",
        "",
    ]
    if settings.name != "full":
        out += [f"> **{settings.name} run**: too few training steps for the verdicts to mean anything; it shows "
                "that the report runs. Run `python -m diffunet.report` for the evidence.", ""]
    out += ["| # | claim | verdict |", "|---|---|---|"]
    out += [f"| {s.number} | [{s.title}](#{s.number}-{s.slug}) | {s.verdict} |" for s in sections]
    for s in sections:
        out += ["", f"<a id=\"{s.number}-{s.slug}\"></a>", f"## {s.number}. {s.title}", "",
                f"**Claim.** {s.claim}", "", f"**Setup.** {s.setup}", ""]
        for t in s.tables:
            out += [t, ""]
        out += [f"![{s.title}]({s.figure})", "", f"**Verdict: {s.verdict}.**", "",
                table(["prediction", "verdict", "evidence"], [[c.prediction, c.verdict, c.evidence]
                                                              for c in s.checks]), ""]
        if s.notes:
            out += [s.notes, ""]
    return "\n".join(out)


def run_report(out: str | Path = "report", settings: Settings = FULL, seeds: int | None = None, log=print,
               command: str = "python -m diffunet.report") -> list[Section]:
    """Train, measure and write ``out/index.md``, ``out/numbers.json`` and one PNG per section."""
    plt = _pyplot()
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    if settings.seeds < 1:
        raise ValueError("seeds must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lab = Lab(settings, log)
    sections = []
    for make in SECTIONS:
        section = make(lab, plt)
        name = f"{section.number}-{section.slug}.png"
        section.figure.savefig(out / name)
        plt.close(section.figure)
        section.figure = name
        sections.append(section)
        log(f"[{lab.elapsed():6.1f}s] section {section.number} ({section.title}): {section.verdict}")
    seconds = time.perf_counter() - start
    (out / "index.md").write_text(render(sections, settings, seconds, command))
    numbers = {s.slug: {"verdict": s.verdict, "checks": [dataclasses.asdict(c) for c in s.checks], **s.numbers}
               for s in sections}
    numbers["settings"] = dataclasses.asdict(settings)
    numbers["seconds"] = seconds
    (out / "numbers.json").write_text(json.dumps(_plain(numbers), indent=1))
    log(f"wrote {out / 'index.md'} in {seconds:.0f} s")
    return sections


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffunet.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds of training: checks that the report runs")
    p.add_argument("--out", default="report", help="output folder (index.md, numbers.json, PNGs)")
    p.add_argument("--seeds", type=int, default=None, help="models per configuration (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see module doc)")
    args = p.parse_args(argv)
    _pyplot()                                               # fail before training, not after
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    command = "python -m diffunet.report" + " ".join(["", *(argv if argv is not None else sys.argv[1:])])
    run_report(args.out, QUICK if args.quick else FULL, args.seeds,
               log=lambda msg: print(msg, file=sys.stderr, flush=True), command=command.rstrip())


if __name__ == "__main__":
    main()
