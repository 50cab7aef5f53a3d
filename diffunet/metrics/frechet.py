"""Frechet distances of generated signals and volumes, on offline extractors that ship with the package (as the
digits one does for images); torchmetrics computes the distances (``fid.scores``).

- Signals: ``SignalClassifier``, a small 1D CNN trained on the embedded family of four classes (``"signals"``,
  ``scripts/train_array_extractors.py signals``, on items the runs never see). Its 64-d pre-activation embedding
  is the feature space; its logits give the class accuracy of class-conditional samples and IS.
- Volumes: tri-planar, the protocol of MONAI's MAISI (``compute_fid_2-5d_ct.py``): every slice of the three
  orthogonal planes goes through a 2D encoder, and the Frechet distance is computed per plane over all slices
  (``fid_xy``, ``fid_zx``, ``fid_yz``); ``fid`` is their mean. MAISI's encoder is a RadImageNet ResNet-50 (a
  download); ours, ``SliceEncoder`` (``"slices"``), is a small 2D CNN trained on slices of the embedded nuclei
  volumes to tell the plane a slice was cut from, noisy and blurred slices from clean ones, and the fraction of
  nucleus in it: features that see texture, sharpness and how much structure a slice holds.

Arrays are (N, C, *S) float in the model's value range, [-1, 1] (what ``sample.py`` writes for a generative
model of signals or volumes; a folder of other units: ``intensity="percentile"``). Planes of a (D, H, W) volume:
``xy`` are the slices along D (the first axis, a microscope's or scanner's slice axis), ``zx`` along H, ``yz``
along W.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..config import EvalConfig
from ..data.arrays import intensity_window, normalise, read_array, suffix_of, suffixes
from ..data.sources import source_of
from .fid import ASSETS, ExtractorUnavailable, ScaledFeatures, _device, fid_floor, scores

SIGNALS_WEIGHTS = ASSETS / "signals_classifier.safetensors"
SLICES_WEIGHTS = ASSETS / "slices_encoder.safetensors"
PLANES = {"xy": 0, "zx": 1, "yz": 2}            # plane name -> the spatial axis its slices are cut along
REFERENCE_SIZE = {1: 1024, 3: 128}              # embedded reference items made per evaluation (signals, volumes)


class SignalClassifier(ScaledFeatures):
    """A small 1D CNN on the embedded signals: (N, C, L) float in [-1, 1] of any length (channels averaged,
    resampled to 256) -> 64-d features (pre-activation, scaled to unit std on its training signals) and logits
    of the four classes (``synthetic.SIGNAL_CLASSES``). A second head (training only) tells clean signals from
    noisy and smoothed ones (``QUALITY``): a classifier alone learns to ignore noise, and its features would not
    see a generator's."""

    num_features = 64
    length = 256

    def __init__(self, width: int = 32, num_classes: int = 4):
        super().__init__()
        w = width

        def block(c_in, c_out):
            return [nn.Conv1d(c_in, c_out, 7, padding=3), nn.ReLU(), nn.Conv1d(c_out, c_out, 7, padding=3),
                    nn.ReLU(), nn.MaxPool1d(2)]

        self.body = nn.Sequential(*block(1, w), *block(w, 2 * w), *block(2 * w, 2 * w), *block(2 * w, 2 * w),
                                  nn.Flatten(), nn.Linear(2 * w * self.length // 16, self.num_features))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(self.num_features, num_classes))
        self.quality = nn.Sequential(nn.ReLU(), nn.Linear(self.num_features, len(self.QUALITY)))
        self.register_buffer("feature_scale", torch.ones(()))

    QUALITY = ("clean", "noisy", "smoothed")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mean(1, keepdim=True)
        if x.shape[-1] != self.length:
            x = F.interpolate(x, size=self.length, mode="linear", align_corners=False)
        return x


class SliceEncoder(ScaledFeatures):
    """A small 2D CNN on slices of the embedded nuclei volumes: (N, C, H, W) float in [-1, 1] (channels
    averaged, resampled to 32x32) -> 64-d features; its heads (training only) name the slice's kind (``KINDS``)
    and regress its nucleus fraction."""

    num_features = 64
    size = 32
    KINDS = ("xy plane", "zx or yz plane", "noisy", "blurred")

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(                                      # (B, 1, 32, 32)
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> (B, 2w, 4, 4)
            nn.Flatten(), nn.Linear(2 * w * 16, self.num_features))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(self.num_features, len(self.KINDS) + 1))
        self.register_buffer("feature_scale", torch.ones(()))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mean(1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def kinds_and_fraction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self(x) / self.feature_scale)
        return out[:, :-1], out[:, -1]


def _load(cls, weights: Path, script: str) -> nn.Module:
    if not Path(weights).is_file():
        raise ExtractorUnavailable(f"no {cls.__name__} weights at {weights}; run python "
                                   f"scripts/train_array_extractors.py {script}")
    net = cls()
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


def signals_extractor(weights: str | Path = SIGNALS_WEIGHTS) -> SignalClassifier:
    """The offline signals classifier, in eval mode."""
    return _load(SignalClassifier, weights, "signals")


def slices_extractor(weights: str | Path = SLICES_WEIGHTS) -> SliceEncoder:
    """The offline slice encoder of the tri-planar distance, in eval mode."""
    return _load(SliceEncoder, weights, "slices")


ARRAY_EXTRACTORS = {1: signals_extractor, 3: slices_extractor}     # by spatial dims


# ------------------------------------------------------------------------------------------- arrays

def array_files(folder, dims: int) -> list[Path]:
    """The signal (``dims=1``) or volume files below ``folder``, any depth, sorted by path (not sample.py's
    ``labels.csv``, the class of each sample)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of {'signals' if dims == 1 else 'volumes'}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and suffix_of(p) in suffixes(dims)
                   and p.name != "labels.csv")
    if not files:
        raise FileNotFoundError(f"no {' / '.join(sorted(suffixes(dims)))} files under {folder}")
    return files


def read_arrays(source, dims: int, intensity=("none", (-1.0, 1.0)), size: tuple[int, ...] | None = None
                ) -> np.ndarray:
    """(N, C, *S) float32 of ``source``: an array, or a folder of signal / volume files (any depth, sorted, of
    one shape), each through ``data.intensity``'s ``intensity`` (mode, bounds): "none" takes the values as they
    are. ``size``: each file's centre patch of that size instead (files of any size at least that: a reference
    of whole volumes for samples of a patch model)."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return np.asarray(source, np.float32)
    files = array_files(source, dims)
    arrays = []
    for path in files:
        array = read_array(path, dims)[0]
        if size is not None:
            if any(a < s for a, s in zip(array.shape[1:], size)):
                raise ValueError(f"{path} is {array.shape[1:]}, smaller than the samples' {tuple(size)}; the "
                                 f"reference needs items at least that large")
            array = array[(slice(None),) + tuple(slice((a - s) // 2, (a - s) // 2 + s)
                                                 for a, s in zip(array.shape[1:], size))]
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(f"{path} is {array.shape} (C, *S) but {files[0]} is {arrays[0].shape}; the Frechet "
                             f"distance takes one shape")
        arrays.append(normalise(array, intensity_window(array, *intensity)))
    return np.stack(arrays)


def reference_array_features(net: nn.Module, reference, dims: int, size: tuple[int, ...], intensity,
                             batch_size: int = EvalConfig.batch_size, device=None) -> tuple[dict, int]:
    """``array_features`` of the real items and their number: an embedded source's held-out ones at ``size``
    (``Source.held_out``; made and extracted once per process, as a run's every evaluation reads the same), else
    the centre patches of ``size`` of the items of ``read_arrays``."""
    named = source_of(reference) if isinstance(reference, str) else None
    if named is None:
        real = read_arrays(reference, dims, intensity, size)
        return array_features(net, real, batch_size, device)[0], len(real)
    if named.held_out is None or named.dims != dims:
        raise ValueError(f"{reference} has no {'signals' if dims == 1 else 'volumes'} to compare with")
    key = (reference, size, type(net).__name__, float(sum(p.detach().double().sum() for p in net.parameters())))
    if key not in _REFERENCES:
        _REFERENCES[key] = array_features(net, named.held_out(REFERENCE_SIZE[dims], size), batch_size, device)[0]
    return _REFERENCES[key], REFERENCE_SIZE[dims]


_REFERENCES: dict = {}


@torch.no_grad()
def array_features(net: nn.Module, x, batch_size: int = EvalConfig.batch_size,
                   device=None) -> tuple[dict, torch.Tensor | None]:
    """Features of every item of ``x`` (N, C, *S): signals {"": (N, 1, d)} and their logits (N, k); volumes
    {plane: (N, slices, d)} for the three planes (``PLANES``), no logits. float64 on the CPU."""
    device = device or next(net.parameters()).device
    x = torch.as_tensor(np.asarray(x, np.float32))
    if x.ndim == 3:
        feats, logits = [], []
        for batch in x.split(batch_size):
            f, l = net.features_and_logits(batch.to(device))
            feats.append(f.double().cpu())
            logits.append(l.double().cpu())
        return {"": torch.cat(feats)[:, None]}, torch.cat(logits)
    out = {}
    for plane, axis in PLANES.items():
        slices = x.movedim(2 + axis, 1)                  # (N, n_slices, C, a, b)
        n, s = slices.shape[:2]
        flat = slices.reshape(n * s, *slices.shape[2:])
        out[plane] = torch.cat([net(batch.to(device)).double().cpu() for batch in flat.split(batch_size)]
                               ).view(n, s, -1)
    return out, None


def evaluate_arrays(fake, reference, dims: int, *, labels=None, intensity=("none", (-1.0, 1.0)),
                    batch_size: int = EvalConfig.batch_size, device=None, seed: int = EvalConfig.seed,
                    kid_subset_size: int = EvalConfig.kid_subset_size, kid_subsets: int = EvalConfig.kid_subsets,
                    floor_draws: int = EvalConfig.floor_draws) -> dict:
    """Frechet distance (and KID) of generated signals or volumes against real ones.

    Args:
        fake: (N, C, *S) float in [-1, 1] (a tensor or array), or a folder of .npy / .nii.gz / ... files.
        reference: ``"signals"`` / ``"cells3d"`` (held-out embedded items made at the samples' size), a folder or
            an array.
        dims: 1 (signals) or 3 (volumes).
        labels: the class of each fake signal (class-conditional samples): adds ``accuracy``, the fraction the
            signals classifier reads as their class.
        intensity: (mode, bounds) of ``data.intensity`` applied to every file read (both sets alike).

    Returns:
        signals: fid, fid_floor, kid_mean, kid_std, is_mean, is_std (, accuracy); volumes: fid (the mean of
        the planes'), fid_floor, kid_mean (means too), and per plane fid_<plane>, fid_floor_<plane>; with
        num_fake, num_real (items, not slices). fid_floor: ``fid_floor`` of N_fake real items (drawn whole) where
        the reference holds more.
    """
    device = _device(device)
    net = ARRAY_EXTRACTORS[dims]().to(device)
    fake = read_arrays(fake, dims, intensity)
    real_f, num_real = reference_array_features(net, reference, dims, tuple(fake.shape[2:]), intensity, batch_size,
                                                device)
    fake_f, logits = array_features(net, fake, batch_size, device)
    if any(real_f[plane].shape[1] != fake_f[plane].shape[1] for plane in real_f):
        raise ValueError(f"the samples are {tuple(fake.shape[2:])} but the reference's items are another size; "
                         f"the Frechet distance compares items of one size")
    out = {}
    for plane in real_f:
        r, f = real_f[plane], fake_f[plane]
        row = scores(r.flatten(0, 1), f.flatten(0, 1), logits, kid_subset_size=kid_subset_size,
                     kid_subsets=kid_subsets, seed=seed)
        floor = fid_floor(r, len(f), floor_draws)
        suffix = f"_{plane}" if plane else ""
        out.update({f"{k}{suffix}": v for k, v in row.items()})
        if floor is not None:
            out[f"fid_floor{suffix}"] = floor
    if dims == 3:                                   # MAISI reports the planes and their mean
        for key in ("fid", "fid_floor", "kid_mean"):
            if f"{key}_xy" in out:
                out[key] = float(np.mean([out[f"{key}_{plane}"] for plane in PLANES]))
    if labels is not None and logits is not None:
        out["accuracy"] = (logits.argmax(1) == torch.as_tensor(labels).cpu()).double().mean().item()
    first = ["fid", "fid_floor"]
    return {**{k: out[k] for k in first if k in out}, **{k: v for k, v in out.items() if k not in first},
            "num_fake": len(fake), "num_real": num_real}

