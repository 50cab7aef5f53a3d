"""Joint augmentation (``data.augment``): random flips, quarter turns, small rotations and shifts applied to a
sample, its condition and its mask together, and intensity changes to the sample and its image-like partners, in
1D, 2D and 3D: what MONAI's dictionary transforms (``RandFlipd``, ``RandRotate90d``, ``RandAffined``,
``RandScaleIntensityd``, ``RandShiftIntensityd``) do to a dict of keys, here on a whole batch on its device.

Unlike EDM's non-leaky augmentation (``data.augment``'s neighbour ``augment.py``, ``train.augment_p``), nothing
tells the model what was done: the transforms teach invariances (a rotated digit is still to be completed, a
flipped volume still segmented). For generation they leak into the samples; there use ``train.augment_p``.

Every draw comes from torch's global CPU generator, which a checkpoint saves, and is made for every sample
whatever the probability, so a resumed run transforms exactly as a straight one.

Geometry is one affine map per sample through ``affine_grid`` + ``grid_sample`` (reflection at the borders).
Masks are sampled by nearest neighbour, so they keep their class ids; samples without a rotation too, so flips,
quarter turns and integer shifts move values exactly. A signal (B, C, L) goes through as a (B, C, 1, L) image whose
only axis is time: flips and shifts, no turns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def active(cfg) -> bool:
    """Whether ``data.augment`` asks for any transform."""
    return bool(cfg.flip or cfg.rot90 or cfg.rotate > 0 or cfg.shift > 0 or cfg.intensity > 0)


def _rotation(angles: torch.Tensor, dims: int) -> torch.Tensor:
    """(B, n) angles -> (B, dims, dims): 2D one angle; 3D about the three axes in turn."""
    b = angles.shape[0]
    if dims == 2:
        c, s = angles[:, 0].cos(), angles[:, 0].sin()
        return torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)
    out = torch.eye(3).repeat(b, 1, 1)
    for axis in range(3):
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3).repeat(b, 1, 1)
        c, s = angles[:, axis].cos(), angles[:, axis].sin()
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        out = out @ r
    return out


def _quarter_turns(b: int, size: tuple[int, ...], applied: torch.Tensor) -> torch.Tensor:
    """(B, d, d): a quarter turn by k in {1, 2, 3} in one plane of equal sides, drawn per sample (identity where
    not ``applied`` or where no plane has equal sides)."""
    d = len(size)
    planes = [(i, j) for i in range(d) for j in range(i + 1, d) if size[i] == size[j]]
    plane = torch.randint(0, max(len(planes), 1), (b,))
    k = torch.randint(1, 4, (b,))
    out = torch.eye(d).repeat(b, 1, 1)
    if not planes:
        return out
    for n in range(b):
        if applied[n]:
            i, j = planes[int(plane[n])]
            c, s = round(math.cos(k[n] * math.pi / 2)), round(math.sin(k[n] * math.pi / 2))
            out[n, i, i], out[n, i, j], out[n, j, i], out[n, j, j] = c, -s, s, c
    return out


def joint_augment(cfg, tensors: list[torch.Tensor], masks: list[bool]) -> list[torch.Tensor]:
    """``tensors`` (each (B, C_k, *S), one batch) transformed alike, as ``cfg`` (``data.augment``) asks; those
    flagged in ``masks`` by nearest neighbour and without intensity changes."""
    if not active(cfg):
        return tensors
    x = tensors[0]
    b, dims, size = x.shape[0], x.ndim - 2, tuple(x.shape[2:])
    p = cfg.p
    # the draws, every one for every sample, in a fixed order
    flip_on = torch.rand(b, dims) < p
    turn_on = torch.rand(b) < p
    turns = _quarter_turns(b, size, turn_on & bool(cfg.rot90) & (dims > 1))
    rotate_on = (torch.rand(b) < p) & (cfg.rotate > 0) & (dims > 1)
    angles = (torch.rand(b, 3) * 2 - 1) * math.radians(cfg.rotate) * rotate_on[:, None]
    shift_on = torch.rand(b) < p
    shifts = torch.stack([torch.randint(-cfg.shift, cfg.shift + 1, (b,)) for _ in range(dims)], 1) * shift_on[:, None]
    intensity_on = torch.rand(b) < p
    scale = torch.exp(torch.randn(b) * cfg.intensity * intensity_on)
    offset = torch.randn(b) * cfg.intensity * intensity_on

    # the map from output to input voxel coordinates (about the centre), axis order (D, H, W) / (H, W) / (L,)
    linear = torch.diag_embed(1 - 2 * (flip_on & bool(cfg.flip)).float())
    if dims > 1:
        half = torch.tensor(size, dtype=torch.float32) / 2
        rotation = torch.diag(1 / half) @ _rotation(angles[:, :1 if dims == 2 else 3], dims) @ torch.diag(half)
        linear = linear @ turns @ rotation
    moved = (linear - torch.eye(dims)).abs().amax((1, 2)) > 1e-6
    moved |= shifts.any(1)
    out = list(tensors)
    if moved.any():
        shift = -2 * shifts.float() / torch.tensor(size, dtype=torch.float32)     # in [-1, 1] units, inverted
        flat = dims == 1
        if flat:                                        # a signal as a one-row image: only its width moves
            linear = torch.diag_embed(torch.stack([torch.ones(b), linear[:, 0, 0]], 1))     # axes (1, L)
            shift = torch.cat([torch.zeros(b, 1), shift], 1)
            axes = 2
        else:
            axes = dims
        reverse = list(range(axes))[::-1]               # affine_grid orders coordinates (x, y[, z]): W first
        theta = torch.cat([linear[:, reverse][:, :, reverse], shift[:, reverse, None]], 2)
        rotated = angles.abs().amax(1) > 0
        for k, (t, is_mask) in enumerate(zip(tensors, masks)):
            src = t.unsqueeze(2) if flat else t
            grid = F.affine_grid(theta.to(src.device, src.dtype), list(src.shape), align_corners=False)
            exact = F.grid_sample(src, grid, mode="nearest", padding_mode="reflection", align_corners=False)
            if not is_mask and rotated.any():
                smooth = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
                exact = torch.where(rotated.to(src.device).view(-1, *(1,) * (src.ndim - 1)), smooth, exact)
            keep = moved.to(src.device).view(-1, *(1,) * (src.ndim - 1))
            out[k] = torch.where(keep, exact, src).squeeze(2) if flat else torch.where(keep, exact, src)
    if cfg.intensity > 0:
        for k, is_mask in enumerate(masks):
            if not is_mask:
                view = (-1,) + (1,) * (out[k].ndim - 1)
                out[k] = out[k] * scale.to(out[k]).view(view) + offset.to(out[k]).view(view)
    return out
