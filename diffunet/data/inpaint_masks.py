"""Inpainting masks drawn per batch, one table entry per kind (``inpainting.mask``, ``inpainting.eval_mask``): ``box``, ``stroke``
(free-form brush strokes), ``half`` (a half-image box) and ``mixed`` (one of the three per image).

One mask is (H, W) bool, True where a pixel is unknown, to be filled (diffusers' convention: white = repaint).
Each entry draws one image's mask from the generator, in stream order, and keeps some pixels of each kind.
Signals and volumes draw from ``MASKS_ND`` by the same names (a signal's ``gaps``: missing stretches).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import DataError
from ..model.tables import as_size, choose


def _uniform(g, lo: float, hi: float, n: int | None = None):
    """A float in [lo, hi) (a (n,) tensor of them if n is given) from the generator."""
    u = lo + (hi - lo) * torch.rand(n or 1, generator=g)
    return u if n else u.item()


def _randint(g, n: int) -> int:
    """An int in 0..n-1 from the generator."""
    return int(torch.randint(n, (1,), generator=g))


def box_mask(size: tuple[int, int], g) -> torch.Tensor:
    """One axis-aligned rectangle at a random place, covering 10-60 % of the image."""
    H, W = size
    area, u = _uniform(g, 0.1, 0.6), _uniform(g, 0.25, 0.75)
    # height and width fractions area**u and area**(1-u): each in [area**0.75, area**0.25], their product the area
    h = min(H, max(1, round(area ** u * H)))
    w = min(W - (h == H), max(1, round(area ** (1 - u) * W)))     # a full-height box leaves a column known
    top, left = _randint(g, H - h + 1), _randint(g, W - w + 1)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top:top + h, left:left + w] = True
    return mask


def stroke_mask(size: tuple[int, int], g) -> torch.Tensor:
    """Free-form brush strokes, as in DeepFill v2 and LaMa: random-walk polylines of random width with round ends,
    added until they cover a drawn 10-50 % of the image (they may pass it by a stroke); a stroke that would cover
    all is left out. Drawn by PIL: a distance field in torch cost 1-70 ms a mask (16x16 to 256x256)."""
    H, W = size
    target = _uniform(g, 0.1, 0.5)
    mask = np.zeros((H, W), dtype=bool)
    for _ in range(64):
        u = torch.rand(10, generator=g).tolist()
        y, x, heading = u[0] * H, u[1] * W, u[2] * 2 * math.pi
        radius = max(1.0, (0.04 + 0.06 * u[3]) * min(H, W))
        points = [(x, y)]
        for turn, length in zip(u[4:7], u[7:10]):                               # 3 segments of a random walk
            heading += (turn - 0.5) * math.pi
            x = min(max(x + (0.1 + 0.2 * length) * max(H, W) * math.cos(heading), 0), W)
            y = min(max(y + (0.1 + 0.2 * length) * max(H, W) * math.sin(heading), 0), H)
            points.append((x, y))
        canvas = Image.new("L", (W, H))
        draw = ImageDraw.Draw(canvas)
        draw.line(points, fill=255, width=round(2 * radius), joint="curve")
        for x, y in (points[0], points[-1]):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
        stroke = np.asarray(canvas) > 0
        if (mask | stroke).all():
            continue
        mask |= stroke
        if mask.mean() >= target:
            break
    if not mask.any():                          # only on images of a few pixels, where any stroke covers all
        mask.flat[_randint(g, H * W)] = True
    return torch.from_numpy(mask)


def half_mask(size: tuple[int, int], g) -> torch.Tensor:
    """The top, bottom, left or right half of the image (the smaller part where the side is odd)."""
    H, W = size
    h, w = H // 2, W // 2
    halves = [(slice(0, h), slice(None)), (slice(H - h, H), slice(None)),                  # top, bottom
              (slice(None), slice(0, w)), (slice(None), slice(W - w, W))]                  # left, right
    mask = torch.zeros(size, dtype=torch.bool)
    mask[halves[_randint(g, 4)]] = True
    return mask


def mixed_mask(size: tuple[int, int], g) -> torch.Tensor:
    """Per image, a box, strokes or a half, uniformly."""
    return (box_mask, stroke_mask, half_mask)[_randint(g, 3)](size, g)


MASKS = {"box": box_mask, "stroke": stroke_mask, "half": half_mask, "mixed": mixed_mask}   # inpainting.mask


# ------------------------------------------------------------------------------------------ signals and volumes
# The same names for 1D and 3D masks, each (*S) bool; strokes are 2D, so a signal's "stroke" is its gaps (the
# missing stretches of a recording) and a volume's a box.

def box_mask_nd(size: tuple[int, ...], g) -> torch.Tensor:
    """One axis-aligned box at a random place covering 10-60 % of the signal or volume, its share split
    unevenly across the axes; at least one sample (voxel) along the first axis stays known."""
    area, weights = _uniform(g, 0.1, 0.6), torch.rand(len(size), generator=g) + 0.2
    fractions = area ** (weights / weights.sum())
    sides = [min(n - (a == 0), max(1, round(float(f) * n))) for a, (n, f) in enumerate(zip(size, fractions))]
    mask = torch.zeros(size, dtype=torch.bool)
    mask[tuple(slice(start, start + side) for start, side in
               ((_randint(g, n - side + 1), side) for n, side in zip(size, sides)))] = True
    return mask


def gaps_mask(size: tuple[int, ...], g) -> torch.Tensor:
    """1-3 missing stretches along the first axis, each 5-20 % of it (a signal's dropouts), the rest known."""
    n = size[0]
    mask = torch.zeros(size, dtype=torch.bool)
    for _ in range(1 + _randint(g, 3)):
        length = max(1, round(_uniform(g, 0.05, 0.2) * n))
        start = _randint(g, n - length + 1)
        mask[start:start + length] = True
    if mask.all():
        mask[_randint(g, n)] = False
    return mask


def half_mask_nd(size: tuple[int, ...], g) -> torch.Tensor:
    """The first or second half along a random axis."""
    axis, second = _randint(g, len(size)), _randint(g, 2)
    n = size[axis]
    index = [slice(None)] * len(size)
    index[axis] = slice(n - n // 2, n) if second else slice(0, n // 2)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[tuple(index)] = True
    return mask


def mixed_mask_nd(size: tuple[int, ...], g) -> torch.Tensor:
    """Per sample, a box, gaps or a half, uniformly."""
    return (box_mask_nd, gaps_mask, half_mask_nd)[_randint(g, 3)](size, g)


MASKS_ND = {"box": box_mask_nd, "stroke": gaps_mask, "gaps": gaps_mask, "half": half_mask_nd, "mixed": mixed_mask_nd}


def draw_masks(name: str, batch: int, size, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``batch`` inpainting masks of the kind ``MASKS[name]``: (B, 1, H, W) float32, exactly 1. where a pixel is
    unknown (to be filled) and 0. where it is known. Drawn on the CPU from ``generator`` (a CPU generator; the
    global one if None) image after image, so one seed and batch size give the same masks; then moved to
    ``device``."""
    size = as_size(size) if isinstance(size, int) else tuple(size)
    draw = choose(MASKS if len(size) == 2 else MASKS_ND, name, "inpainting.mask")
    if min(size) < 2:
        raise DataError(f"inpainting masks need at least 2 pixels along each axis, not {'x'.join(map(str, size))}")
    masks = torch.zeros(batch, 1, *size)                                       # (B, 1, *S) float32
    for mask in masks:
        mask[0] = draw(size, generator)
    return masks.to(device)
