"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3
and appendix C): choose the EMA length after training instead of before.

During training ``PowerEMA`` tracks the weights under a few power-function EMA profiles (``train.phema_sigma_rels``,
EDM2's 0.05 and 0.10 by default) and writes them at ``train.phema_snapshots`` evenly spaced steps to
``<run>/phema_snapshots/phema-<step>.safetensors``. Afterwards any length is a linear combination of those
snapshots: the one whose profile is nearest, in least squares over the profiles as functions of training time,
to the profile asked for (``solve_coefficients``).

    python -m diffunet.posthoc_ema runs/digits --sigma-rel 0.05 0.08 0.12      # runs/digits/phema/sigma_rel_0.080/ ...
    python -m diffunet.posthoc_ema runs/digits --sweep --draws 4   # FID of each length: phema_sweep.json/.png

The length is ``sigma_rel``, the profile's standard deviation relative to its age. A power-function profile at step
t weighs the weights of step tau by tau^gamma (tau <= t); sigma_rel and gamma are one number in two units
(``std_to_exp``, ``exp_to_std``). Its per-step update ``beta_t = (1 - 1/t)^(gamma + 1)`` gives step tau the
weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the continuous profile integrated over that step, so the
snapshots are the profiles the least squares assumes. The maths is ours, written after EDM2's ``training/phema.py``.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import PosthocEMAError
from .state import fsync_dir

SNAPSHOT_DIR = "phema_snapshots"                       # under the run's output_dir
SNAPSHOT = re.compile(r"^phema-(\d+)\.safetensors$")
MAX_SIGMA_REL = float(np.sqrt(1 / 12))                  # gamma = 0, a flat profile: the longest whose weights never fall
DEFAULT_SIGMA_RELS = (0.05, 0.10)                       # EDM2's tracked pair
SWEEP_SIGMA_RELS = (0.02, 0.03, 0.045, 0.065, 0.09, 0.13, 0.18, 0.25)


# ------------------------------------------------------------------------------------------ the maths (float64)

def check_sigma_rel(sigma_rel: float) -> float:
    """``sigma_rel`` as a float if a power-function profile has that length (gamma >= 0); PosthocEMAError if not."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise PosthocEMAError(f"sigma_rel {sigma_rel:g} is outside (0, {MAX_SIGMA_REL:.4f}]: longer profiles would "
                              f"weigh early weights more than late ones")
    return float(sigma_rel)


def exp_to_std(gamma) -> np.ndarray:
    """sigma_rel of the profile tau^gamma on [0, t], relative to t (EDM2 eq. 123)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(sigma_rel) -> np.ndarray:
    """The exponent gamma of relative width ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2), which is eq. 123 solved for gamma (EDM2 eq. 126)."""
    s = np.asarray(sigma_rel, dtype=np.float64)
    roots = [np.roots([1, 7, 16 - v ** -2, 12 - v ** -2]) for v in s.ravel()]
    return np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots]).reshape(s.shape)


def beta(t: int, gamma: float) -> float:
    """The decay of step ``t`` (1-based) of a power-function EMA: (1 - 1/t)^(gamma + 1); 0 at t = 1."""
    return (1 - 1 / t) ** (gamma + 1)


def power_function_correlation(a_step, a_sigma_rel, b_step, b_sigma_rel) -> np.ndarray:
    """<p_a, p_b> of two normalised profiles (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (EDM2 eq. 151),
    broadcast: the integral over the shorter's support is (ga+1)(gb+1) (t_short/t_long)^g_long /
    ((ga + gb + 1) t_long), g_long the exponent of the longer one."""
    ga, gb = std_to_exp(a_sigma_rel), std_to_exp(b_sigma_rel)
    a_step, b_step = np.float64(a_step), np.float64(b_step)
    g_long = np.where(a_step < b_step, gb, -ga)           # -ga: (ta/tb)^-ga = (tb/ta)^ga when a is the longer
    return (ga + 1) * (gb + 1) * (a_step / b_step) ** g_long / ((ga + gb + 1) * np.maximum(a_step, b_step))


def solve_coefficients(in_steps: Sequence[int], in_sigma_rels: Sequence[float], out_step: int,
                       out_sigma_rel: float) -> np.ndarray:
    """x (one per input profile) minimising ||sum_i x_i p_i - p_out||^2: A x = b with A_ij = <p_i, p_j>,
    b_i = <p_i, p_out>, then normalised to sum 1 (EDM2 algorithm 3). Inputs: the snapshot profiles' steps and
    sigma_rels, paired."""
    steps, sigmas = np.float64(in_steps).reshape(-1, 1), np.float64(in_sigma_rels).reshape(-1, 1)
    A = power_function_correlation(steps, sigmas, steps.T, sigmas.T)
    b = power_function_correlation(steps[:, 0], sigmas[:, 0], np.float64(out_step), np.float64(out_sigma_rel))
    x = np.linalg.solve(A, b)
    return x / x.sum()


# ------------------------------------------------------------------------------------------ tracking in training

class PowerEMA:
    """The model's parameters under K power-function EMA profiles, fp32, one multi-tensor lerp per profile per
    step. Parameters only: buffers come from the live model (as diffusers' EMAModel does).

    Written here because diffusers has no post-hoc EMA, and ema-pytorch's ``PostHocEMA`` (not a dependency) keeps
    its profiles as whole model copies, written by ``torch.save`` (pickles) at a fixed interval without an atomic
    rename, outside accelerate's checkpoint; these snapshots are safetensors, atomic, and resumed exactly."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]],
                 sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS):
        named = list(named_parameters)
        self.names = [n for n, _ in named]
        self.sigma_rels = [check_sigma_rel(s) for s in sigma_rels]
        self.gammas = [float(g) for g in std_to_exp(self.sigma_rels)]
        self.profiles = [[p.detach().float().clone() for _, p in named] for _ in self.sigma_rels]
        self.step = 0                                    # updates made; the next is step + 1 (1-based)

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor]) -> None:
        """One optimizer step's update: profile k <- lerp(profile k, weights, 1 - beta_k(t))."""
        self.step += 1
        weights = [p.detach().float() for p in parameters]   # .float() of an fp32 tensor is the tensor itself
        for gamma, profile in zip(self.gammas, self.profiles):
            torch._foreach_lerp_(profile, weights, 1 - beta(self.step, gamma))

    def to(self, device) -> "PowerEMA":
        self.profiles = [[p.to(device) for p in profile] for profile in self.profiles]
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every profile's tensors, keyed "<k>.<parameter name>" (k: index in ``sigma_rels``), on the CPU."""
        return {f"{k}.{name}": p.detach().cpu().contiguous()
                for k, profile in enumerate(self.profiles) for name, p in zip(self.names, profile)}

    def meta(self) -> dict:
        return {"step": self.step, "sigma_rels": self.sigma_rels, "names": self.names}

    def state_dict(self) -> dict:
        return dict(self.meta(), tensors=self.tensors())

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; refused (PosthocEMAError) for other lengths or other parameters."""
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels or list(state["names"]) != self.names:
            raise PosthocEMAError(f"the saved post-hoc EMA tracks sigma_rels {list(state['sigma_rels'])} of "
                                  f"{len(state['names'])} parameters, this run {self.sigma_rels} of {len(self.names)}")
        tensors = state["tensors"]
        with torch.no_grad():
            for k, profile in enumerate(self.profiles):
                for name, p in zip(self.names, profile):
                    p.copy_(tensors[f"{k}.{name}"])
        self.step = int(state["step"])

    # checkpoint folders: safetensors + JSON, nothing a load could execute (see state.save)
    def save_to(self, folder: Path) -> dict:
        save_file(self.tensors(), Path(folder) / "phema.safetensors")
        return self.meta()

    def load_from(self, folder: Path, meta: dict) -> None:
        with safe_open(Path(folder) / "phema.safetensors", "pt") as f:
            self.load_state_dict(dict(meta, tensors={k: f.get_tensor(k) for k in f.keys()}))

    def snapshot(self, folder: Path, step: int | None = None) -> Path:
        """Write ``folder/phema-<step>.safetensors`` atomically (temporary name, fsync, rename, fsync the
        folder): every profile, with the step, the sigma_rels and the parameter names as metadata."""
        step = self.step if step is None else step
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        final, tmp = folder / f"phema-{step:06d}.safetensors", folder / f".phema-{step:06d}.safetensors.tmp"
        try:
            save_file(self.tensors(), tmp, metadata={"step": str(step), "sigma_rels": json.dumps(self.sigma_rels),
                                                    "names": json.dumps(self.names)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(folder)
        finally:
            tmp.unlink(missing_ok=True)
        return final


def snapshot_steps(max_steps: int, count: int) -> set[int]:
    """``count`` evenly spaced steps of a run, the last at ``max_steps`` (every step where count >= max_steps)."""
    return {round(k * max_steps / count) for k in range(1, count + 1)} - {0} if count > 0 else set()


# ------------------------------------------------------------------------------------------ reconstruction

def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, file) of every snapshot of run ``run_dir``, oldest first."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = sorted((int(m[1]), p) for p in folder.glob("phema-*.safetensors") if (m := SNAPSHOT.match(p.name)))
    if not found:
        raise PosthocEMAError(f"{folder} holds no post-hoc EMA snapshots: train with train.phema_snapshots > 0 "
                              f"and train.phema_sigma_rels set")
    return found


@contextmanager
def readable(path: Path):
    """Reading snapshot ``path`` inside: a file that is not one (truncated, damaged) is one PosthocEMAError line."""
    try:
        yield
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise PosthocEMAError(f"post-hoc EMA snapshot {path} cannot be read ({type(e).__name__}: {e}); move it "
                              f"out of {Path(path).parent} to reconstruct from the others") from None


def reconstruct(run_dir: Path, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The parameters (name -> fp32 tensor) of an EMA of length ``sigma_rel`` at snapshot ``step`` (default: the
    last), combined from every snapshot up to it."""
    sigma_rel = check_sigma_rel(sigma_rel)
    found = snapshots(run_dir)
    step = found[-1][0] if step is None else step
    if step not in {s for s, _ in found}:
        raise PosthocEMAError(f"{Path(run_dir) / SNAPSHOT_DIR} has no snapshot at step {step}; it has steps "
                              f"{', '.join(str(s) for s, _ in found)}")
    used = [(s, p) for s, p in found if s <= step]
    in_steps, in_sigmas, keys = [], [], []
    for s, path in used:
        with readable(path), safe_open(path, "pt") as f:
            meta = f.metadata()
            for k, sigma in enumerate(json.loads(meta["sigma_rels"])):
                in_steps.append(s), in_sigmas.append(sigma), keys.append((path, k))
            names = json.loads(meta["names"])
    x = solve_coefficients(in_steps, in_sigmas, step, sigma_rel)
    out = {name: torch.zeros(()) for name in names}
    for (path, k), weight in zip(keys, x):
        with readable(path), safe_open(path, "pt") as f:
            for name in names:
                out[name] = out[name] + float(weight) * f.get_tensor(f"{k}.{name}").double()
    return {name: t.float() for name, t in out.items()}
