"""Non-leaky augmentation (Karras et al. 2022, EDM, appendix; NVlabs/edm ``training/augment.py``).

A model trained on a few hundred images memorizes them. Augmenting the training images multiplies the data, but a
diffusion model would then learn to generate flipped, shifted, recoloured images too ("leaking"). EDM's remedy:
tell the model what was done. Each training image gets a label vector describing its augmentation, the model takes
it as one more conditioning input (``UNet(augment_dim=AUGMENT_DIM)``, added to the time embedding), and sampling
passes zeros: "not augmented". The augmented images then teach the shared weights shapes and strokes without
the samples inheriting the augmentations.

``augment(x, p)`` draws the labels, ``transform(x, labels)`` applies what they describe; labels of zeros are the
identity, so a label is non-zero exactly where its op applied. The ops are EDM's set, scaled to what small images
can take: integer geometry (exact, pixels only move), isotropic scaling, brightness and contrast; no hue or
saturation, so that ``AUGMENT_DIM`` is the same for gray and RGB images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSLATE_MAX = 1 / 8               # integer translation: up to this fraction of each side (EDM's translate_int_max)
SCALE_STD = 0.2                     # isotropic scaling: log2 s ~ N(0, SCALE_STD^2)
BRIGHTNESS_STD = 0.2                # brightness: x + b, b ~ N(0, BRIGHTNESS_STD^2) (images in [-1, 1])
CONTRAST_STD = 0.5                  # contrast: x * c, log2 c ~ N(0, CONTRAST_STD^2), about 0 (mid-gray)

# the labels of rot90 by k = 1, 2, 3 quarter turns: (cos - 1, sin), exact (float cos(pi) is not exactly -1)
ROT90 = torch.tensor([[-1.0, 1.0], [-2.0, 0.0], [-1.0, -1.0]])


def _ones(n, size, g):
    return torch.ones(n, 1)


def _rot90(n, size, g):
    """k in {1, 2, 3} quarter turns; square images only (a quarter turn swaps H and W)."""
    if size[0] != size[1]:
        return None
    return ROT90[torch.randint(0, 3, (n,), generator=g, device=g.device if g else "cpu").cpu()]


def _translate(n, size, g):
    """(tx / W, ty / H) for integer shifts up to TRANSLATE_MAX of each side, never (0, 0): drawn from the other
    (2 mx + 1)(2 my + 1) - 1 shifts; None if the image is too small to shift."""
    (h, w), device = size, g.device if g else "cpu"
    my, mx = int(h * TRANSLATE_MAX), int(w * TRANSLATE_MAX)
    if mx == my == 0:
        return None
    nx, ny = 2 * mx + 1, 2 * my + 1
    i = torch.randint(0, nx * ny - 1, (n,), generator=g, device=device).cpu()
    i = i + (i >= (nx * ny) // 2).long()                        # skip the centre: no shift
    return torch.stack([(i % nx - mx) / w, (i // nx - my) / h], dim=1)


def _normal(std):
    return lambda n, size, g: torch.randn(n, 1, generator=g, device=g.device if g else "cpu").cpu() * std


# name: (label columns, draw(n, (H, W), generator) -> (n, columns): the labels of n applied ops, none all zero;
# None where the op cannot apply at this size). The order is the label layout.
OPS = {
    "xflip":      (1, _ones),                   # 1
    "yflip":      (1, _ones),                   # 1
    "rot90":      (2, _rot90),                  # cos(k pi/2) - 1, sin(k pi/2)
    "translate":  (2, _translate),              # tx / W, ty / H (integer pixels)
    "scale":      (1, _normal(SCALE_STD)),      # log2 s
    "brightness": (1, _normal(BRIGHTNESS_STD)), # b
    "contrast":   (1, _normal(CONTRAST_STD)),   # log2 c
}
AUGMENT_DIM = sum(columns for columns, _ in OPS.values())      # 9, whatever the channel count
COLUMNS: dict[str, slice] = {}
_at = 0
for _name, (_columns, _) in OPS.items():
    COLUMNS[_name], _at = slice(_at, _at + _columns), _at + _columns


def augment(x: torch.Tensor, p: float, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented images, labels (B, AUGMENT_DIM)) of a batch ``x`` (B, C, H, W) in [-1, 1]: each op of ``OPS``
    applied to each image with probability ``p``; an image's labels are zero where an op did not apply, all zero
    for an image left as it was. Every draw is made for every image whatever ``p`` (on the CPU, from
    ``generator`` or the global RNG), so a seed gives the same augmentations on any device."""
    if not 0 <= p <= 1:
        raise ValueError(f"augment: p must be in [0, 1] (got {p})")
    n, size = x.shape[0], tuple(x.shape[-2:])
    device = generator.device if generator is not None else "cpu"
    labels = torch.zeros(n, AUGMENT_DIM)
    for name, (_, draw) in OPS.items():
        applied = torch.rand(n, generator=generator, device=device).cpu() < p
        values = draw(n, size, generator)
        if values is not None:
            labels[:, COLUMNS[name]] = torch.where(applied[:, None], values, 0.0)
    labels = labels.to(x.device)
    return transform(x, labels), labels


def transform(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) augmented as ``labels`` (B, AUGMENT_DIM) describe; zero labels leave an image as it was.

    Geometry is one affine map per image (flip, quarter turn, scale, shift) through ``affine_grid`` +
    ``grid_sample`` with reflection padding (EDM pads by reflection too). Images that were not scaled are sampled
    with ``nearest``: their pixel centres land on pixel centres, so flips, quarter turns and shifts are exact.
    Then brightness and contrast: c (x + b), as EDM's colour matrix."""
    if labels.shape != (x.shape[0], AUGMENT_DIM):
        raise ValueError(f"augment labels must be (B, {AUGMENT_DIM}) = {(x.shape[0], AUGMENT_DIM)}, "
                         f"got {tuple(labels.shape)}")
    lab = labels.float()
    col = {name: lab[:, s] for name, s in COLUMNS.items()}      # (B, columns) each

    # affine_grid's theta maps output coordinates to input ones, both in [-1, 1] (x: columns, y: rows)
    flip = torch.diag_embed(torch.stack([1 - 2 * col["xflip"][:, 0], 1 - 2 * col["yflip"][:, 0]], dim=1))
    angle = torch.atan2(col["rot90"][:, 1], col["rot90"][:, 0] + 1)          # k pi/2, from (cos - 1, sin)
    cos, sin = angle.cos().round(), angle.sin().round()                         # exact quarter turns
    rotate = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # as torch.rot90's k
    scale = torch.exp2(-col["scale"][:, 0])[:, None, None]                     # the inverse map shrinks by s
    shift = 2 * col["translate"]                                               # (tx/W, ty/H) -> [-1, 1] units
    a = flip @ rotate * scale                                                   # (B, 2, 2)
    theta = torch.cat([a, -(a @ shift[:, :, None])], dim=2)                     # in = A (out - t): (B, 2, 3)
    moved = (lab[:, :COLUMNS["scale"].stop] != 0).any(1)
    out = x
    if moved.any():
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)   # (B, H, W, 2)
        out = F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)
        scaled = col["scale"][:, 0] != 0
        if scaled.any():
            out[scaled] = F.grid_sample(x[scaled], grid[scaled], mode="bilinear", padding_mode="reflection",
                                        align_corners=False)
        out = torch.where(moved[:, None, None, None], out, x)

    b = col["brightness"][:, 0].to(x.dtype)[:, None, None, None]
    c = torch.exp2(col["contrast"][:, 0]).to(x.dtype)[:, None, None, None]
    coloured = (col["brightness"][:, 0] != 0) | (col["contrast"][:, 0] != 0)
    return torch.where(coloured[:, None, None, None], (out + b) * c, out) if coloured.any() else out
