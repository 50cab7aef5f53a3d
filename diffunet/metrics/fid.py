"""Sample quality: FID, KID and IS through torchmetrics, on Inception-v3 or on an offline digits classifier.

An extractor maps uint8 images (N, C, H, W) to features (N, d) (its ``forward``, torchmetrics' contract for a
custom ``feature`` module) and, through ``features_and_logits``, to class logits for the Inception Score:

- ``"digits"``: a small CNN trained on the embedded digits (``scripts/train_digits_extractor.py``), shipped as
  ``assets/digits_classifier.safetensors``; works offline, for the default run.
- ``"inception"`` or a file path: the TorchScript Inception-v3 of the FID literature (``inception-2015-12-05.pt``,
  the TensorFlow FID network as ported by StyleGAN2-ADA and clean-fid); needs no extra package, but the file
  must be on disk: nothing is downloaded.

Numbers are comparable only for the same extractor, reference set and sample count (see docs/sampling.md).

Arrays follow one layout throughout: numpy images are (N, H, W, C) (``to_uint8``, ``image_batches``), torch
images are (N, C, H, W) (the extractors' input); both uint8.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
# the submodules: torchmetrics.image exports these names only when torch-fidelity (and so torchvision) is installed
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from ..config import EvalConfig
from ..data.files import read_image
from ..data.sources import Source, source_of
from ..model.tables import choose

ASSETS = Path(__file__).parent / "assets"
DIGITS_WEIGHTS = ASSETS / "digits_classifier.safetensors"
CACHE_DIR = Path(os.environ.get("DIFFUNET_CACHE", "~/.cache/diffunet")).expanduser()
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IS_MIN_SPLIT = 100                                  # fewest images per Inception Score split
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".npy"}


class ExtractorUnavailable(RuntimeError):
    """No weights for the requested feature extractor; the message is one line that says what to do."""


def _device(device) -> torch.device:
    """``device``, or by default the GPU where there is one, else the CPU."""
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------- extractors

class ScaledFeatures(nn.Module):
    """An extractor whose ``body`` maps ``prepare``'d input to features, multiplied by a ``feature_scale`` buffer
    set after training (unit standard deviation on its training items: FID then lands in tens, not thousands, and
    KID's kernel (x.y / d + 1)^3 sees O(1) values), and whose ``head`` maps the unscaled features to logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(x)) * self.feature_scale

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self(x)
        return features, self.head(features / self.feature_scale)


class DigitsClassifier(ScaledFeatures):
    """A small CNN on the embedded digits. Its 64-d pre-activation embedding is the feature space of FID / KID
    (pre-activation: no ReLU zeros, closer to the Gaussian FID assumes); its logits give IS (10 classes, so
    IS <= 10). Takes uint8 (N, C, H, W) of any size: RGB is averaged to gray, and the image is resized to 16x16."""

    num_features = 64                               # torchmetrics reads this instead of probing with a dummy image
    size = 16

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(                                      # (B, 1, 16, 16)
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                            # -> (B, w, 8, 8)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                            # -> (B, 2w, 4, 4)
            nn.Flatten(), nn.Linear(2 * w * 16, self.num_features),     # -> (B, 64)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(self.num_features, num_classes))
        self.register_buffer("feature_scale", torch.ones(()))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W), C in {1, 3} -> float (N, 1, 16, 16) in [-1, 1]."""
        if x.shape[1] not in (1, 3):
            raise ValueError(f"the digits extractor takes 1- or 3-channel images, got {x.shape[1]} channels")
        x = x.float().mean(1, keepdim=True) / 255
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1


class TorchScriptInception(nn.Module):
    """The FID Inception-v3 as a TorchScript file (StyleGAN2-ADA's ``inception-2015-12-05.pt``): uint8 RGB of
    any size in (it resizes to 299 itself), 2048-d pool features out; gray images are repeated to RGB."""

    num_features = 2048

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:
            raise ExtractorUnavailable(f"{path} is not a TorchScript Inception ({type(e).__name__}); expected "
                                       f"inception-2015-12-05.pt from {INCEPTION_URL}") from None

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes 1- or 3-channel images, got {x.shape[1]} channels")
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x), return_features=True)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prepare(x)
        probs = self.net(x, no_output_bias=True)        # IS as originally computed: softmax without the bias
        return self.net(x, return_features=True), probs.clamp_min(1e-12).log()  # softmax(log p) = p


def digits_extractor(weights: str | Path = DIGITS_WEIGHTS) -> DigitsClassifier:
    """The offline digits classifier, in eval mode (a torchmetrics ``feature`` module)."""
    if not Path(weights).is_file():
        raise ExtractorUnavailable(f"no digits extractor weights at {weights}; "
                                   "run python scripts/train_digits_extractor.py")
    net = DigitsClassifier()
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


def inception_extractor(weights: str | Path | None = None) -> TorchScriptInception:
    """Inception-v3 from ``weights``, else $DIFFUNET_INCEPTION, else ``CACHE_DIR/inception-2015-12-05.pt``."""
    path = Path(weights or os.environ.get("DIFFUNET_INCEPTION") or CACHE_DIR / "inception-2015-12-05.pt")
    if not path.is_file():
        raise ExtractorUnavailable(f"no Inception weights at {path}: download {INCEPTION_URL} elsewhere and pass "
                                   "--inception-weights FILE (or put it there), or use --extractor digits")
    return TorchScriptInception(path).eval()


EXTRACTORS = {"digits": digits_extractor, "inception": inception_extractor}


def load_extractor(extractor: str | Path | nn.Module) -> nn.Module:
    """``"digits"``, ``"inception"``, a path to Inception weights, or a module (used as it is)."""
    if isinstance(extractor, nn.Module):
        return extractor.eval()
    if str(extractor) in EXTRACTORS:
        return EXTRACTORS[str(extractor)]()
    if Path(extractor).suffix or os.sep in str(extractor):
        return inception_extractor(extractor)
    return choose(EXTRACTORS, str(extractor), "extractor")     # raises, listing the valid names


def _fingerprint(path: Path) -> list:
    return [path.name, path.stat().st_size, path.stat().st_mtime_ns]


def _extractor_id(extractor) -> str:
    if isinstance(extractor, nn.Module):
        return type(extractor).__name__ + hashlib.sha256(
            b"".join(p.detach().cpu().numpy().tobytes() for p in extractor.parameters())).hexdigest()
    if str(extractor) == "digits":
        return "digits:" + hashlib.sha256(DIGITS_WEIGHTS.read_bytes()).hexdigest()
    return f"inception:{_fingerprint(Path(extractor)) if Path(extractor).is_file() else extractor}"


# ------------------------------------------------------------------------------------------- images

def _image_files(folder: Path) -> list[Path]:
    # grid.png is the preview sample.py writes next to the images, not a sample
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png")


def _named_reference(source) -> Source | None:
    """The ``data.SOURCES`` entry whose embedded images ``source`` names (``"digits"``), or None."""
    named = source_of(source)
    return named if named is not None and named.reference is not None else None


def image_batches(source, batch_size: int = EvalConfig.batch_size) -> Iterator[np.ndarray]:
    """(B, H, W, C) uint8 batches of ``source``: an array (N, H, W, C) or (N, H, W), ``"digits"`` (the embedded
    set at 16x16), an .npz (its ``images`` array, else its first) or a folder of image files."""
    if (named := _named_reference(source)) is not None:
        source = named.reference()
    elif not isinstance(source, np.ndarray) and Path(source).suffix == ".npz":
        with np.load(source) as f:
            source = f["images"] if "images" in f else f[f.files[0]]
    if isinstance(source, np.ndarray):
        source = source[..., None] if source.ndim == 3 else source
        for lo in range(0, len(source), batch_size):
            yield source[lo:lo + batch_size]
        return
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{source} is not 'digits', an .npz or a folder of images")
    files = _image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    for lo in range(0, len(files), batch_size):
        yield np.stack([read_image(p) for p in files[lo:lo + batch_size]])


@torch.no_grad()
def extract(extractor: nn.Module, source, batch_size: int = EvalConfig.batch_size,
            device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, d) and logits (N, k) of every image of ``source`` (see ``image_batches``), float64 on CPU."""
    device = device or next(extractor.parameters(), torch.empty(0)).device
    feats, logits = [], []
    for batch in image_batches(source, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)   # (B, H, W, C) -> (B, C, H, W)
        f, l = extractor.features_and_logits(x)
        feats.append(f.double().cpu())
        logits.append(l.double().cpu())
    return torch.cat(feats), torch.cat(logits)


def reference_features(reference, extractor, net: nn.Module | None = None, *, batch_size: int = EvalConfig.batch_size,
                       device=None, cache: bool = True) -> torch.Tensor:
    """Features of the reference set, cached in ``CACHE_DIR`` (``$DIFFUNET_CACHE``) under a hash of the
    extractor's weights and the reference's identity (name, or file names, sizes and modification times)."""
    net = net if net is not None else load_extractor(extractor)
    if isinstance(reference, np.ndarray) or not cache:
        return extract(net, reference, batch_size, device)[0]
    ref = str(reference)
    if _named_reference(ref) is not None:
        identity = [ref, 16]            # a named set is the same images everywhere (16: the digits' size, in old keys)
    else:
        path = Path(ref).resolve()
        identity = [str(path)] + ([_fingerprint(p) for p in _image_files(path)] if path.is_dir() else _fingerprint(path))
    key = hashlib.sha256(json.dumps([_extractor_id(extractor), identity]).encode()).hexdigest()[:20]
    file = CACHE_DIR / f"reference-{key}.npy"
    if file.is_file():
        return torch.from_numpy(np.load(file))
    feats = extract(net, reference, batch_size, device)[0]
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file.with_suffix(".part.npy"), feats.numpy())
    os.replace(file.with_suffix(".part.npy"), file)
    return feats


# ------------------------------------------------------------------------------------------- metrics

class Precomputed(nn.Module):
    """Hands already-extracted features to torchmetrics as its ``feature`` module: one extractor pass then
    serves FID, KID and IS, and the reference's features can come from the cache."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def scores(real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor | None = None, *,
           kid_subset_size: int = EvalConfig.kid_subset_size, kid_subsets: int = EvalConfig.kid_subsets,
           is_splits: int = EvalConfig.is_splits, seed: int = EvalConfig.seed) -> dict:
    """FID, KID (and IS with logits) of feature sets (N, d), by torchmetrics. KID's subsets are min(
    ``kid_subset_size``, N_real, N_fake) images; IS uses up to ``is_splits`` splits of at least 100 images; the
    random subsets and split order come from ``seed``."""
    d = real.shape[1]
    fid = FrechetInceptionDistance(feature=Precomputed(d))
    kid = KernelInceptionDistance(feature=Precomputed(d), subsets=kid_subsets,
                                  subset_size=min(kid_subset_size, len(real), len(fake)))
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
        out = dict(fid=fid.compute().item(), kid_mean=kid_mean.item(), kid_std=kid_std.item())
        if fake_logits is not None:
            # each split estimates the marginal p(y) from its own images; small splits bias IS down hard (real
            # digits: 3.8 with 10 splits of 5 images, 9.5 at 900 images), so keep >= 100 images per split
            splits = max(1, min(is_splits, len(fake_logits) // IS_MIN_SPLIT))
            inception_score = InceptionScore(feature=Precomputed(fake_logits.shape[1]), splits=splits)
            inception_score.update(fake_logits)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*degrees of freedom.*")    # one split: std is nan
                is_mean, is_std = inception_score.compute()
            out.update(is_mean=is_mean.item(), is_std=is_std.item())
    return out


def fid_floor(real: torch.Tensor, n: int, draws: int = EvalConfig.floor_draws) -> float | None:
    """The FID that ``n`` real images score against the reference they come from: the mean over ``draws`` fixed
    draws (``numpy.random.default_rng(d)``, d = 0 .. draws - 1, without replacement) of ``n`` rows of the
    reference's features ``real`` against all of them. A score of ``n`` samples is read against this, not
    against 0: FID is biased by the set's size. None where the reference holds no more than ``n`` images.
    ``real`` (N, S, d) holds S features per item (the slices of a volume): items are drawn whole."""
    if draws < 1 or n >= len(real):
        return None
    key = (real.shape, float(real.sum()), float(real.square().sum()), n, draws)    # the same features, n, draws
    if key not in _FLOORS:
        fid = FrechetInceptionDistance(feature=Precomputed(real.shape[-1]), reset_real_features=False)
        fid.update(real.flatten(0, -2), real=True)                      # the reference's statistics, once
        fids = []
        for d in range(draws):
            drawn = real[torch.from_numpy(np.random.default_rng(d).choice(len(real), n, replace=False))]
            fid.update(drawn.flatten(0, -2), real=False)
            fids.append(fid.compute().item())
            fid.reset()                                                 # the draw's features go, the reference stays
        _FLOORS[key] = float(np.mean(fids))
    return _FLOORS[key]


_FLOORS: dict = {}      # fid_floor's results in this process: a run's every evaluation reads the same reference


def evaluate(fake, reference="digits", extractor="digits", *, batch_size: int = EvalConfig.batch_size, device=None,
             kid_subset_size: int = EvalConfig.kid_subset_size, kid_subsets: int = EvalConfig.kid_subsets,
             is_splits: int = EvalConfig.is_splits, cache: bool = True, seed: int = EvalConfig.seed,
             floor_draws: int = EvalConfig.floor_draws) -> dict:
    """Score generated images against a reference set.

    Args:
        fake: uint8 images (N, H, W, C) (e.g. ``to_uint8(generate(...))``), a folder of images or an .npz.
        reference: ``"digits"`` (the embedded set, 1,797 images), a folder, an .npz, or a uint8 array.
        extractor: ``"digits"`` (offline classifier), ``"inception"`` (weights from $DIFFUNET_INCEPTION or
            ``CACHE_DIR/inception-2015-12-05.pt``), a path to Inception weights, or an ``nn.Module`` with
            ``features_and_logits``. Missing weights raise ``ExtractorUnavailable`` (a one-line message).
        kid_subset_size: KID's subsets hold min(kid_subset_size, N_real, N_fake) images ...
        kid_subsets: ... and it averages the unbiased MMD^2 over this many random ones.
        is_splits: IS is averaged over this many splits of the fake set, fewer where a split would hold
            under 100 images (one split below 200 images).
        cache: reuse the reference's features from ``CACHE_DIR`` (arrays are never cached).
        seed: fixes KID's subsets and IS's splits, so the same inputs give the same numbers.
        floor_draws: ``fid_floor`` over this many draws of N_fake real images (0: none).

    Returns:
        dict(fid, fid_floor, kid_mean, kid_std, is_mean, is_std, num_fake, num_real); is_* only where the
        extractor has class logits (digits, Inception); fid_floor (``fid_floor``) only where the reference holds
        more images than the samples.
    """
    device = _device(device)
    net = load_extractor(extractor).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        real = reference_features(reference, extractor, net, batch_size=batch_size, device=device, cache=cache)
        fake, logits = extract(net, fake, batch_size, device)
        out = scores(real, fake, logits, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                     is_splits=is_splits, seed=seed)
        floor = fid_floor(real, len(fake), floor_draws)
    out = {"fid": out.pop("fid"), **({"fid_floor": floor} if floor is not None else {}), **out}
    return dict(out, num_fake=len(fake), num_real=len(real))
