"""The embedded default data of segmentation: procedural microscopy-like cells, made from a seed, offline.

``make_cells`` draws one image and its exact instance map: bright cells on a dark, unevenly lit background
(fluorescence-like), ellipses with irregular outlines, many touching and some overlapping. The instance map
comes from the geometry, before blur and noise, so the masks are exact. Cell sizes are absolute pixels (radius
about 4-14 px at any image size): a 512x512 image holds many cells the size of those in a 64x64 crop.

``cells_arrays`` / ``cells_dataset`` are the training crops, their touching cells parted and weighted as the U-Net
paper's were (``seg_masks.carve_borders``, ``seg_masks.weight_map``), ``test_images`` a few large held-out images.

Seeds: ``make_cells(seed=...)`` takes anything ``numpy.random.default_rng`` does. The training crops of
``seed`` come from the images seeded ``(seed, 1, k)``, the test images from ``(seed, 2, k)``: never the same,
nor ``make_cells(seed=seed)`` (numpy ignores trailing zero words: ``(seed, 0, 0)`` would be ``seed``).

    python -m diffunet.cells cells_test --num 3 --size 512     # test_images as cells_test/images/, masks/ (PNG)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from .files import image_path, write_image
from .seg_masks import FOUR, carve_borders, weight_map

RADIUS = (4.0, 14.0)       # mean radius of a cell, px (absolute: independent of the image size)
ELONGATION = (1.0, 1.45)   # major/minor axis = elongation^2; area stays pi r^2
HARMONICS = 3              # outline wobbles: r(phi) = 1 + sum_{k=2..4} a_k cos(k phi + p_k)
HARMONIC_AMP = 0.07        # max amplitude a_k of each harmonic
NEIGHBOUR_P = 0.7          # chance a cell is placed against an earlier one (touching / overlapping)
MAX_OCCLUSION = 0.35       # a new cell may hide at most this fraction of an earlier cell's area (nor cut it in two)
NUCLEUS_P = 0.6            # chance a cell has a darker nucleus-like blob


def _cell_geometry(rng, cy: float, cx: float, r: float):
    """One cell's shape parameters: centre, semi-axes a >= b, orientation, outline harmonics."""
    e = rng.uniform(*ELONGATION)
    return dict(cy=cy, cx=cx, a=r * e, b=r / e, theta=rng.uniform(0, math.pi),
                amp=rng.uniform(0, HARMONIC_AMP, HARMONICS), phase=rng.uniform(0, 2 * math.pi, HARMONICS))


def _cell_box(g, shape) -> tuple[slice, slice]:
    half = math.ceil(g["a"] * (1 + g["amp"].sum())) + 1
    y0, x0 = max(int(g["cy"]) - half, 0), max(int(g["cx"]) - half, 0)
    return slice(y0, min(int(g["cy"]) + half + 2, shape[0])), slice(x0, min(int(g["cx"]) + half + 2, shape[1]))


def _cell_radial(g, box) -> np.ndarray:
    """t(x) = rho / r(phi) over the box: < 1 inside the cell, 1 on its outline."""
    dy = np.arange(box[0].start, box[0].stop)[:, None] - g["cy"]
    dx = np.arange(box[1].start, box[1].stop)[None, :] - g["cx"]
    c, s = math.cos(g["theta"]), math.sin(g["theta"])
    z = (c * dx + s * dy) / g["a"] + 1j * ((c * dy - s * dx) / g["b"])     # rho e^{i phi}, ellipse frame
    rho = np.abs(z)
    unit = z / np.maximum(rho, 1e-9)
    # cos(k phi + p) = Re(e^{ik phi} e^{ip}): powers of the unit vector, no trigonometry per pixel
    outline, power = 1.0, unit
    for a, p in zip(g["amp"], g["phase"]):              # k = 2, 3, ...
        power = power * unit
        outline = outline + a * (power * complex(math.cos(p), math.sin(p))).real
    return rho / outline


def _place_cells(rng, shape, coverage: float, max_tries: int):
    """Cells placed one by one until ``coverage`` of the image is covered; later cells occlude earlier ones.

    Returns the instance map (ids 1..n, contiguous) and each cell's (geometry, box, t over the box), index id - 1."""
    instances = np.zeros(shape, np.int32)
    cells, area = [], []                         # geometry of each kept cell; its visible pixel count
    covered, target = 0, coverage * shape[0] * shape[1]
    for _ in range(max_tries):
        if covered >= target:
            break
        r = rng.uniform(*RADIUS)
        if cells and rng.random() < NEIGHBOUR_P:       # against an earlier cell: touching or overlapping
            g0 = cells[rng.integers(len(cells))][0]
            angle, dist = rng.uniform(0, 2 * math.pi), (math.sqrt(g0["a"] * g0["b"]) + r) * rng.uniform(0.8, 1.0)
            cy, cx = g0["cy"] + dist * math.sin(angle), g0["cx"] + dist * math.cos(angle)
            if not (0 <= cy < shape[0] and 0 <= cx < shape[1]):
                continue
        else:
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        g = _cell_geometry(rng, cy, cx, r)
        box = _cell_box(g, shape)
        if (box[0].stop - box[0].start) * (box[1].stop - box[1].start) < 0.5 * math.pi * r * r:
            continue                                    # cut off by the image edge: skip the pixel work
        t = _cell_radial(g, box)
        inside = t <= 1
        if inside.sum() < 0.5 * math.pi * r * r:        # mostly outside the image
            continue
        hidden = np.bincount(instances[box][inside], minlength=len(cells) + 1)[1:]
        if np.any(hidden > MAX_OCCLUSION * np.asarray(area, dtype=np.int64)):
            continue
        before = instances[box].copy()
        instances[box][inside] = len(cells) + 1
        occluded = np.flatnonzero(hidden)
        if any(ndimage.label(instances[cells[i][1]] == i + 1, FOUR)[1] > 1 for i in occluded):
            instances[box] = before                     # it would cut an earlier cell in two: ids stay one blob
            continue
        for i in occluded:
            area[i] -= hidden[i]
        covered += int((before[inside] == 0).sum())
        cells.append((g, box, t))
        area.append(int(inside.sum()))
    return instances, cells


def _smooth_field(rng, shape, waves: int = 3) -> np.ndarray:
    """A smooth random field in [0, 1] varying over the whole image: a sum of products of low-frequency
    cosines (at most ``waves`` half-periods across), separable so it costs one outer product per term."""
    y, x = (np.linspace(0, math.pi, n)[:, None] for n in shape)
    field = np.zeros(shape)
    for _ in range(waves):
        fy, fx = rng.uniform(0.3, waves, 2)
        py, px = rng.uniform(0, 2 * math.pi, 2)
        field += rng.normal() * np.cos(fy * y + py) @ np.cos(fx * x + px).T
    return (field - field.min()) / max(np.ptp(field), 1e-6)


def make_cells(size: int | tuple[int, int] = (64, 64), seed=0, coverage: float = 0.5,
               blur: float = 1.0, photons: tuple[float, float] = (150.0, 400.0),
               read_noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """One microscopy-like image and its exact instance map, the same arrays bit for bit for the same seed.

    size:      (H, W) or one int for a square
    seed:      anything ``numpy.random.default_rng`` takes (an int, a tuple of ints)
    coverage:  fraction of the image the cells cover (placement stops there)
    blur:      sigma (px) of the Gaussian optical blur, applied after the masks are fixed
    photons:   range of the photon count at intensity 1 (Poisson shot noise; fewer is noisier)
    read_noise: std of the additive Gaussian read noise
    Returns image (H, W) float32 in [0, 1] and instances (H, W) int32: 0 background, 1..n one id per cell.
    """
    shape = (size, size) if isinstance(size, int) else tuple(size)
    rng = np.random.default_rng(seed)
    instances, cells = _place_cells(rng, shape, coverage, max_tries=max(200, shape[0] * shape[1] // 20))

    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    texture /= max(texture.std(), 1e-6)                     # smooth N(0, 1) noise: cytoplasm texture
    canvas = np.zeros(shape)
    for i, (g, box, t) in enumerate(cells, start=1):
        visible = instances[box] == i                 # never empty: a later cell hides <= 35 % of what is left
        value = rng.uniform(0.4, 0.85) * (1 + rng.uniform(0.05, 0.2) * texture[box])
        value = value * (1 - 0.55 * np.clip((t - 0.78) / 0.22, 0, 1))        # darker thin membrane at the border
        if rng.random() < NUCLEUS_P:                                         # darker soft-edged nucleus blob
            rn = rng.uniform(0.3, 0.5) * math.sqrt(g["a"] * g["b"])
            oy, ox = rng.uniform(-0.25, 0.25, 2) * g["b"]
            dy, dx = np.ogrid[box[0], box[1]]
            tn = np.hypot(dy - g["cy"] - oy, dx - g["cx"] - ox) / rn
            value = value * (1 - rng.uniform(0.3, 0.55) / (1 + np.exp(6 * (tn - 1))))
        canvas[box][visible] = np.broadcast_to(value, visible.shape)[visible]

    illumination = 0.75 + 0.35 * _smooth_field(rng, shape)                   # uneven lighting of the cells
    background = 0.04 + 0.14 * _smooth_field(rng, shape)                     # and of the background
    image = ndimage.gaussian_filter(background + illumination * canvas, blur)
    n_photons = rng.uniform(*photons)
    image = rng.poisson(np.clip(image, 0, None) * n_photons) / n_photons + rng.normal(0, read_noise, shape)
    return np.clip(image, 0, 1).astype(np.float32), instances


def cells_arrays(n: int = 1000, crop: int = 64, seed: int = 0, source: int = 256, stride: int | None = None,
                 w0: float = 10.0, sigma: float = 5.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` training crops as numpy arrays, each (n, 1, crop, crop) float32: image in [0, 1], mask 0/1, weight.

    The crops tile images of ``source`` x ``source`` px seeded (seed, 1, k), k = 0, 1, ..., row by row every
    ``stride`` px. The default ``crop // 2`` (half-overlapping, as random crops would) takes 49 crops of 64 from
    each 256 image: 1,000 crops in ~2.6 s on 2 busy cores; ``stride=crop`` (no overlap, 16 per image, three
    times the distinct cells) takes ~5.5 s. Touching cells are parted by a one-pixel border
    (``carve_borders``); the weight map is computed on each crop's own instances (a cell cut by the crop edge is
    still a cell)."""
    stride = stride or crop // 2
    across = (source - crop) // stride + 1
    images, masks, weights = (np.empty((n, 1, crop, crop), np.float32) for _ in range(3))
    for j in range(n):
        k, c = divmod(j, across * across)
        if c == 0:
            image, instances = make_cells(source, seed=(seed, 1, k))
            instances = carve_borders(instances)
        y, x = (stride * v for v in divmod(c, across))
        window = np.s_[y:y + crop, x:x + crop]
        images[j, 0], masks[j, 0] = image[window], instances[window] > 0
        weights[j, 0] = weight_map(instances[window], w0, sigma)
    return images, masks, weights


class CellsDataset(Dataset):
    """Items (image (1, H, W) in [-1, 1], label -1, mask (1, H, W) 0/1, weight (1, H, W)), all float32 tensors
    but the label: the (image, label) pair every dataset of the toolkit yields, then the target mask and the
    paper's loss weight of each pixel."""

    condition = "masks"     # what a PairedFolder of images/ and masks/ says: the third element is the mask

    def __init__(self, images: np.ndarray, masks: np.ndarray, weights: np.ndarray):
        self.images = torch.from_numpy(images) * 2 - 1
        self.masks, self.weights = torch.from_numpy(masks), torch.from_numpy(weights)
        self.num_classes = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], -1, self.masks[i], self.weights[i]


def cells_dataset(n: int = 1000, crop: int = 64, seed: int = 0, **kwargs) -> CellsDataset:
    """``cells_arrays`` as a torch Dataset (see ``CellsDataset`` for the items)."""
    return CellsDataset(*cells_arrays(n, crop, seed, **kwargs))


def test_images(n: int = 3, size: int = 512, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` held-out (image, instances) pairs of ``size`` x ``size``, seeded (seed, 2, k): never a training image.
    The instances are ``carve_borders``'d, as the training crops' masks are: ``instances > 0`` is the truth."""
    return [(image, carve_borders(instances)) for image, instances in
            (make_cells(size, seed=(seed, 2, k)) for k in range(n))]


test_images.__test__ = False    # a data helper, not a test: pytest must not collect it where it is imported

MIN_SIZE = 2 * math.ceil(RADIUS[1])                 # smaller images hold no whole cell


def write_test_images(out: str | Path, n: int = 3, size: int = 512, seed: int = 0) -> Path:
    """``test_images`` as a paired folder: ``out/images/000000.png`` (8-bit gray) with ``out/masks/000000.png``
    (0/255, white = cell), what training, ``sample.py --cond`` and ``evaluate --segmentation`` read."""
    out = Path(out)
    for kind in ("images", "masks"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    for k, (image, instances) in enumerate(test_images(n, size, seed)):
        write_image(np.round(image * 255).astype(np.uint8)[..., None], image_path(out / "images", k, 1))
        write_image(np.where(instances > 0, 255, 0).astype(np.uint8)[..., None], image_path(out / "masks", k, 1))
    return out
