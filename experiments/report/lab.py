"""The lab the report's claims share: settings, data and noise, training of small denoisers, the measures, the
verdict rule (paired over seeds) and the writing of ``index.md``, ``numbers.json`` and the plots.

Only diffunet's public names are used: ``UNet`` and its switches, ``diffunet.objectives``, ``diffunet.config``
and ``diffunet.data``; the gradient probe is ``diagnostics`` beside this file (``experiments.report.diagnostics``).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffunet import UNet
from diffunet.config import DiffusionConfig
from diffunet.data import digits_arrays
from .diagnostics import encoder_grad_norms
from diffunet.objectives import diffusion_loss, make_noise_scheduler

COMMAND = "python -m experiments.report"
MATPLOTLIB_MISSING = f"{COMMAND} needs matplotlib: pip install 'diffunet[report]'"

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


def loss_bars(ax, loss: dict, names: list[str]) -> None:
    """Held-out loss per variant, mean and sd over seeds, on an axis zoomed to the bars' range."""
    x = np.arange(len(names))
    m = [np.mean(loss[n]) for n in names]
    sd = [np.std(loss[n], ddof=1) if len(loss[n]) > 1 else 0 for n in names]
    ax.bar(x, m, 0.6, yerr=sd, capsize=3, color="C2")
    ax.set(xticks=x, xticklabels=names, ylabel="held-out eps-MSE", title="Loss at equal steps",
           ylim=(min(mm - s for mm, s in zip(m, sd)) * 0.97, max(mm + s for mm, s in zip(m, sd)) * 1.01))


# ------------------------------------------------------------------------------------------- writing

def pyplot():
    """matplotlib's pyplot on the Agg backend, or the one-line error that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.titlesize": 9.5})
    return plt


def jsonable(obj):
    """numbers -> JSON: numpy and tuples to lists, dict keys to strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
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
                f"that the report runs. Run `{COMMAND}` for the evidence.", ""]
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
