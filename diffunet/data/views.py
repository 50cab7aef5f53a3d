"""Pictures of signals and volumes, for sample grids and panels: what a person looks at to see that a 1D or 3D
model does its job (``pictures``: any batch to (N, C, H, W) images in [-1, 1], which ``save_grid`` then lays out).

- a signal (C, L) is a line plot, one panel per channel stacked, ``PLOT_HEIGHT`` px tall, L px wide;
- a volume (C, D, H, W) is its three central planes side by side: the (H, W) plane at D/2, (D, W) at H/2 and
  (D, H) at W/2, the layout of MONAI's and ITK-SNAP's three views.

Drawn here in a few lines of numpy rather than with matplotlib, which stays an optional extra of the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PLOT_HEIGHT = 48            # px per channel of a signal's plot
GAP = 2                     # px between the planes of a volume


def signal_picture(x: torch.Tensor, height: int = PLOT_HEIGHT) -> torch.Tensor:
    """(N, C, L) in [-1, 1] -> (N, 1, C * height, L): white lines on black, a vertical stroke joining each
    sample to the next, so steep edges stay visible."""
    n, c, length = x.shape
    rows = ((1 - x.clamp(-1, 1)) / 2 * (height - 1)).round().long()       # +1 at the top row
    lo = torch.minimum(rows, torch.cat([rows[..., 1:], rows[..., -1:]], -1))
    hi = torch.maximum(rows, torch.cat([rows[..., 1:], rows[..., -1:]], -1))
    y = torch.arange(height).view(1, 1, height, 1)
    lit = (y >= lo[:, :, None]) & (y <= hi[:, :, None])                   # (N, C, height, L)
    return (lit.float() * 2 - 1).reshape(n, 1, c * height, length)


def volume_picture(x: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C, max(H, D), W + W + H + 2 GAP): the three central planes, black between."""
    n, c, d, h, w = x.shape
    planes = [x[:, :, d // 2], x[:, :, :, h // 2], x[:, :, :, :, w // 2]]  # (H, W), (D, W), (D, H)
    tall = max(d, h)
    padded = [F.pad(p, (0, GAP if i < 2 else 0, 0, tall - p.shape[-2]), value=-1) for i, p in enumerate(planes)]
    return torch.cat(padded, dim=-1)


def pictures(x: torch.Tensor) -> torch.Tensor:
    """A batch of images, signals or volumes as (N, C, H, W) images in [-1, 1]."""
    return {3: signal_picture, 4: lambda images: images, 5: volume_picture}[x.ndim](x)
