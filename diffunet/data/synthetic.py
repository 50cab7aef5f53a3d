"""The embedded offline data of signals and volumes, made from a seed in seconds (``SOURCES``' ``signals`` and
``cells3d``): no download, the same arrays bit for bit for the same seed.

``make_signal`` draws one 1D signal of one of four classes (``SIGNAL_CLASSES``: sine, square wave, chirp, pulse
train), each with random amplitude, frequency, phase, offset drift and noise, so a classifier or a generative
model has something to learn while a class stays recognisable at any length.

``make_nuclei`` draws one 3D fluorescence-like volume and its exact instance map: nuclei as rotated ellipsoids,
many touching and some overlapping (a later one hides part of an earlier one), with texture, an uneven
background, anisotropic optical blur (more along the first axis, as a microscope's axial blur) and shot noise;
the instances come from the geometry, before blur and noise, so the masks are exact.

Seeds: the training items of ``seed`` are seeded ``(seed, 1, k)``, held-out ones ``(seed, 2, k)``: never the same.

    python -m diffunet.synthetic volumes OUT --num 3 --size 64     # OUT/images/*.nii.gz + OUT/masks/
    python -m diffunet.synthetic signals OUT --num 40 --length 256  # OUT/<class>/*.npy
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

# ------------------------------------------------------------------------------------------ 1D signals

SIGNAL_CLASSES = ("sine", "square", "chirp", "pulses")


def _sine(rng, t):
    return np.sin(2 * math.pi * rng.uniform(2, 5) * t + rng.uniform(0, 2 * math.pi))


def _square(rng, t):
    return np.tanh(6 * np.sin(2 * math.pi * rng.uniform(2, 5) * t + rng.uniform(0, 2 * math.pi)))


def _chirp(rng, t):
    f0, f1 = rng.uniform(1, 3), rng.uniform(8, 12)
    return np.sin(2 * math.pi * (f0 * t + (f1 - f0) * t ** 2 / 2) + rng.uniform(0, 2 * math.pi))


def _pulses(rng, t):
    period, width = rng.uniform(0.15, 0.3), rng.uniform(0.012, 0.025)
    phase = (t - rng.uniform(0, period)) % period
    distance = np.minimum(phase, period - phase)
    return 2 * np.exp(-0.5 * (distance / width) ** 2) - 1


WAVES = dict(zip(SIGNAL_CLASSES, (_sine, _square, _chirp, _pulses)))


def make_signal(length: int, label: int, seed) -> np.ndarray:
    """One (1, length) float32 signal in [-1, 1] of class ``label`` (an index of ``SIGNAL_CLASSES``)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length, endpoint=False)
    wave = WAVES[SIGNAL_CLASSES[label]](rng, t)
    drift = rng.uniform(-0.1, 0.1) + rng.uniform(-0.1, 0.1) * t
    signal = rng.uniform(0.55, 0.8) * wave + drift + rng.normal(0, 0.03, length)
    return np.clip(signal, -1, 1).astype(np.float32)[None]


def signals_arrays(n: int, length: int, seed: int = 0, part: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` signals (n, 1, length) float32 and their labels (n,) int64, the classes in turn (item k of class
    k mod 4), seeded (seed, part, k): part 1 trains, part 2 is held out."""
    labels = np.arange(n) % len(SIGNAL_CLASSES)
    signals = np.stack([make_signal(length, int(label), (seed, part, k)) for k, label in enumerate(labels)])
    return signals, labels.astype(np.int64)


# ------------------------------------------------------------------------------------------ 3D nuclei

RADII = (3.5, 7.0)             # semi-axes of a nucleus, voxels
NEIGHBOUR_P = 0.6              # chance a nucleus is placed against an earlier one (touching / overlapping)
BLUR = (1.2, 0.6, 0.6)         # optical blur sigma per axis (D, H, W): axial blur is the larger


def _rotation(rng) -> np.ndarray:
    """A uniformly random 3D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _smooth(rng, shape, sigma: float) -> np.ndarray:
    """Smooth random field, zero mean, unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / max(field.std(), 1e-6)


def make_nuclei(size=(48, 48, 48), seed=0, coverage: float = 0.25, photons: float = 200.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """One volume (D, H, W) float32 in [0, 1] and its instances (D, H, W) int32 (0 background, 1..n)."""
    shape = (size,) * 3 if isinstance(size, int) else tuple(size)
    rng = np.random.default_rng(seed)
    instances = np.zeros(shape, np.int32)
    centres, n, target = [], 0, coverage * np.prod(shape)
    grid = np.indices(shape, dtype=np.float32)
    for _ in range(400):
        if (instances > 0).sum() >= target:
            break
        radii = rng.uniform(*RADII, 3)
        if centres and rng.random() < NEIGHBOUR_P:             # against an earlier nucleus
            c0, r0 = centres[rng.integers(len(centres))]
            direction = rng.standard_normal(3)
            centre = c0 + direction / np.linalg.norm(direction) * (r0 + radii.mean()) * rng.uniform(0.75, 1.0)
        else:
            centre = rng.uniform(0, shape)
        half = int(math.ceil(radii.max())) + 1
        lo = np.maximum(np.floor(centre).astype(int) - half, 0)
        hi = np.minimum(np.floor(centre).astype(int) + half + 1, shape)
        if np.any(hi - lo < 2):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        offset = grid[(slice(None),) + box] - centre.reshape(3, 1, 1, 1)
        local = np.einsum("ij,j...->i...", _rotation(rng).T, offset)        # into the ellipsoid's frame
        inside = ((local / radii.reshape(3, 1, 1, 1)) ** 2).sum(0) <= 1
        if inside.sum() < 0.5 * (4 / 3) * math.pi * radii.prod():          # mostly outside the volume
            continue
        n += 1
        instances[box][inside] = n
        centres.append((centre, radii.mean()))
    ids = np.unique(instances[instances > 0])                            # some may be hidden entirely: renumber
    instances = np.searchsorted(np.concatenate([[0], ids]), instances).astype(np.int32)

    brightness = np.concatenate([[0.0], rng.uniform(0.45, 0.9, len(ids))])
    texture = 1 + 0.15 * _smooth(rng, shape, 1.0)
    canvas = brightness[instances] * texture
    background = 0.05 + 0.12 * (_smooth(rng, shape, 8.0) * 0.5 + 0.5).clip(0, 1)
    image = ndimage.gaussian_filter(background + canvas, BLUR)
    image = rng.poisson(np.clip(image, 0, None) * photons) / photons + rng.normal(0, 0.01, shape)
    return np.clip(image, 0, 1).astype(np.float32), instances


def nuclei_arrays(n: int, size=(48, 48, 48), seed: int = 0, part: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` volumes (n, 1, D, H, W) float32 in [0, 1] and their foreground masks (n, 1, D, H, W) float32 0/1,
    seeded (seed, part, k)."""
    made = [make_nuclei(size, seed=(seed, part, k)) for k in range(n)]
    return (np.stack([image[None] for image, _ in made]),
            np.stack([(instances > 0)[None] for _, instances in made]).astype(np.float32))


def nuclei_crops(n: int, size, seed: int = 0, part: int = 2) -> np.ndarray:
    """``n`` patches (n, 1, *size) in [-1, 1] as ``data.source=cells3d`` trains on them: two seeded random crops
    of each of n / 2 volumes of twice ``size`` per axis (at least 32), seeded (seed, part, k)."""
    full = tuple(max(32, 2 * s) for s in size)
    images, _ = nuclei_arrays((n + 1) // 2, full, seed, part)
    rng = np.random.default_rng((seed, part, 0, 1))
    crops = []
    for k in range(n):
        corner = [rng.integers(0, f - s + 1) for f, s in zip(full, size)]
        crops.append(images[k // 2][(slice(None),) + tuple(slice(c, c + s) for c, s in zip(corner, size))])
    return np.stack(crops) * 2 - 1


# ------------------------------------------------------------------------------------------ files

def write_volumes(out: str | Path, n: int = 3, size: int = 64, seed: int = 0, part: int = 2) -> Path:
    """Held-out nuclei as a paired folder: ``out/images/000000.nii.gz`` (float32, 1 mm voxels) with
    ``out/masks/000000.nii.gz`` (uint8 0/1), what training, ``sample.py --cond`` and evaluation read."""
    from .arrays import Meta, write_array

    out = Path(out)
    images, masks = nuclei_arrays(n, size, seed, part)
    meta = Meta(".nii.gz", (1.0, 1.0, 1.0))
    for kind in ("images", "masks"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        write_array(images[k], out / "images" / f"{k:06d}.nii.gz", meta)
        write_array(masks[k].astype(np.uint8), out / "masks" / f"{k:06d}.nii.gz", meta)
    return out


def write_signals(out: str | Path, n: int = 40, length: int = 256, seed: int = 0, part: int = 2) -> Path:
    """Held-out signals as a class folder: ``out/<class>/000000.npy`` (1, length) float32."""
    out = Path(out)
    signals, labels = signals_arrays(n, length, seed, part)
    for k, (signal, label) in enumerate(zip(signals, labels)):
        folder = out / SIGNAL_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{k:06d}.npy", signal)
    return out
