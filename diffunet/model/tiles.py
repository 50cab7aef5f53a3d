"""Overlap-tile inference: run a U-Net on an image of any size, a tile at a time, in memory bounded by the tile.

The same in every dimensionality: a signal's tiles are segments, a volume's are boxes; below, "image" and
"pixel" stand for the input and its positions along each axis.

"valid" padding (the 2015 U-Net's overlap-tile strategy): each output tile reads an input tile enlarged by the
network's margin on every side, cut from the whole image mirror-padded exactly as ``UNet.forward`` pads it. The
tiles' outputs do not overlap, and the stitched result is ``model(image)`` up to float rounding *for a network
whose every operation is local*: its convs, pools, transposed / nearest up-samplers and skip crops are
("bilinear" is not quite: it clamps at the tile's border, ~1e-5 off). Two things in the default ``UNet`` are
not: GroupNorm normalizes over the whole feature map and attention attends over all pixels, so the tiles see
their own statistics and tiled output is close to, not equal to, the whole-image one. A ``UNet`` built with
``norm="batch"`` (in eval mode: fixed running statistics, a per-channel affine) or ``norm="none"``, no attention
at any tiled resolution (``attention_resolutions=()``) and ``mid_attention=False`` is local throughout, and its
tiles are exact. Every read starts on the pooling grid (shifts of 2^(levels-1)), the one grid on which a valid
U-Net is shift-equivariant (per axis: the product of that axis's down factors).

"same" padding: every conv zero-pads its own input, so a pixel near a tile border sees zeros where the whole
image has neighbours; no choice of input tile makes that exact. Tiles therefore overlap by ``overlap`` pixels and
are blended with a separable raised-cosine (Hann) window, a ramp over the overlap along each axis, normalized by
the sum of the weights: a tile's border pixels, the worst ones, count least, and seams fade out.
"""

from __future__ import annotations

import itertools
import math

import torch

from .nn import mirror_pad
from .tables import as_size
from .unet import Tiling, UNet

Box = tuple[slice, ...]            # one slice per axis: (rows, cols) in an image


def tile_boxes(size, tile, overlap: int = 0) -> list[tuple[Box, Box]]:
    """The tiles of an input of ``size`` (one size per axis), each as (output box, read box), in its pixels.

    The read box is the ``tile`` (one size per axis, or an int) the network sees, and every read box has that
    size. With ``overlap=0``
    tiles start every ``tile`` pixels, the last one in each axis shifted back to end at the image border, and
    the output boxes cover every pixel exactly once (the shifted tile writes only what its predecessor left).
    With an overlap, tiles are spread evenly from border to border, neighbours sharing at least ``overlap``
    pixels; the output box is the read box, and pixels in the overlaps are blended.
    An axis shorter than the tile is one tile of the image's length.
    """
    size = tuple(size)
    axes = []
    for n, t in zip(size, as_size(tile, len(size))):
        t = min(t, n)
        if not 0 <= overlap < t:
            raise ValueError(f"overlap must be in [0, tile) = [0, {t}), got {overlap}")
        if overlap:                                 # spread evenly: every overlap is at least ``overlap``
            k = -(-(n - t) // (t - overlap)) + 1
            starts = [i * (n - t) // max(k - 1, 1) for i in range(k)]
        else:
            starts = list(range(0, n - t, t)) + [n - t]
        reads = [slice(s, s + t) for s in starts]
        stops = [s + t for s in starts]             # no overlap: each writes from where its predecessor stopped
        outs = reads if overlap else [slice(a, b) for a, b in zip([0] + stops[:-1], stops)]
        axes.append(list(zip(outs, reads)))
    return [tuple(zip(*boxes)) for boxes in itertools.product(*axes)]


def hann_ramp(n: int, overlap: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """(n,) weights: 1 inside, a raised-cosine ramp over ``overlap`` pixels at each end, never 0."""
    w = torch.ones(n, dtype=dtype, device=device)
    if overlap:
        i = torch.arange(overlap, dtype=dtype, device=device)
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / overlap)     # (0, 1): a border pixel still counts
        w[:overlap] = ramp
        w[n - overlap:] = torch.minimum(w[n - overlap:], ramp.flip(0))
    return w


@torch.no_grad()
def predict_tiled(model, image: torch.Tensor, tile, *, overlap: int | None = None, batch_size: int = 4,
                  geometry: UNet | None = None, **forward_kwargs) -> torch.Tensor:
    """``model(image, **forward_kwargs).sample`` for an ``image`` (B, C, *spatial) of any size, by tiles of ``tile``
    (an int, or one size per axis: (h, w) in an image) output pixels, ``batch_size`` tiles per network call.

    ``forward_kwargs`` are passed to every call: a tensor shaped like the image, (B, K, *spatial) (``cond``), is
    tiled with it; one with B rows (a (B,) ``timestep``, ``class_labels``, ``cond_dropped``) follows each tile;
    anything else (a number) is passed as is. ``overlap`` ("same" padding only; default a quarter of the tile)
    is the blended width between neighbouring tiles. A tile the network cannot take raises ``model.tiling``'s
    ValueError, which names the nearest valid sizes. Returns (B, C_out, *spatial) on the image's device and dtype.

    ``model`` is a UNet, or any callable ``f(x, **forward_kwargs)`` that runs one (a wrapper, a compiled
    module, a lambda closing over a timestep); then ``geometry`` is that UNet, whose tiling and padding rule.
    """
    geometry = model if geometry is None else geometry
    size = tuple(image.shape[2:])
    tile = tuple(min(t, n) for t, n in zip(as_size(tile, len(size)), size))
    if geometry.valid:
        if overlap:
            raise ValueError("overlap is for padding='same'; valid-padding tiles read their margin and never overlap")
        return _valid(model, geometry, image, tile, batch_size, forward_kwargs)
    geometry.tiling(tile)                                              # a tile the network cannot take fails here
    overlap = min(tile) // 4 if overlap is None else overlap
    return _same(model, image, tile, overlap, batch_size, forward_kwargs)


# ----------------------------------------------------------------------------------------------- "same"

def _same(model, image, tile, overlap, batch_size, kwargs):
    size = image.shape[2:]
    weight = None
    for t in tile:                                                                    # outer product: (h, w)
        ramp = hann_ramp(t, overlap, dtype=image.dtype, device=image.device)
        weight = ramp if weight is None else weight[..., None] * ramp
    total = image.new_zeros(size)                                                     # (H, W)
    out = None
    for batch, y in _batched(model, image, tile_boxes(size, tile, overlap), batch_size, kwargs):
        for (_, box), y_tile in zip(batch, y):                                        # (B, C_out, h, w)
            if out is None:
                out = image.new_zeros(image.shape[0], y_tile.shape[1], *size)
            out[(..., *box)].addcmul_(weight, y_tile.to(image.dtype))                 # over the whole read box
            total[box].add_(weight)                   # (in place on the views: no temporary, no copy back)
    return out.div_(total)


# ---------------------------------------------------------------------------------------------- "valid"

def _valid(model, geometry, image, tile, batch_size, kwargs):
    """Cut each tile's network input from the image mirror-padded as forward() pads the whole of it.

    A valid U-Net is shift-equivariant only for shifts of its pooling grid, ``stride`` per axis (2^(levels-1) at
    the default factors), so each read starts on that grid, in padded coordinates, and is ``stride - 1`` pixels
    longer than the tile needs.
    """
    size = tuple(image.shape[2:])
    whole = geometry.tiling(size)
    strides = geometry.divisors
    net = geometry.tiling(tuple(t + s - 1 for t, s in zip(tile, strides)))  # every tile's network input and margin
    if net.margin != whole.margin:
        raise ValueError(f"margins differ between tile {net.margin} and image {whole.margin}: not a valid U-Net")
    # pixel r of an axis is the whole network's output r + crop, which reads padded pixels [r + crop, r + crop + 2m]
    boxes = []                                                        # (output box, read box in padded pixels)
    for out_box, _ in tile_boxes(size, tile):
        starts = [(o.start + c) // s * s for o, c, s in zip(out_box, whole.crop, strides)]
        boxes.append((out_box, tuple(slice(a, a + n) for a, n in zip(starts, net.input_size))))
    # reads past forward()'s padding only feed network outputs beyond the image, which are dropped: zeros do
    far = [max(max(box[1][i].stop for box in boxes) - whole.input_size[i], 0) for i in range(len(size))]

    def pad(x):                                                       # (B, K, H, W) -> (B, K, H + p, W + p)
        x = mirror_pad(x, *whole.pad) if any(whole.pad) else x
        return torch.nn.functional.pad(x, tuple(p for f in reversed(far) for p in (0, f)))

    padded = pad(image)
    kwargs = {k: pad(v) if _image_shaped(v, image) else v for k, v in kwargs.items()}
    core = Tiling(tuple(n - 2 * m for n, m in zip(net.input_size, net.margin)), net.input_size, net.margin,
                  (0,) * (2 * len(size)), (0,) * len(size))
    out = None
    with geometry.fixed_tiling(core):                                 # tiles are padded already
        for batch, y in _batched(model, padded, boxes, batch_size, kwargs):
            for (out_box, read_box), y_tile in zip(batch, y):
                if out is None:
                    out = image.new_zeros(image.shape[0], y_tile.shape[1], *size)
                # network output position of the tile's first pixel, per axis
                starts = [o.start + c - r.start for o, c, r in zip(out_box, whole.crop, read_box)]
                take = tuple(slice(a, a + o.stop - o.start) for a, o in zip(starts, out_box))
                out[(..., *out_box)] = y_tile[(..., *take)].to(image.dtype)
    return out


# ------------------------------------------------------------------------------------------------ shared

def _image_shaped(v, image) -> bool:
    return (torch.is_tensor(v) and v.ndim == image.ndim and v.shape[0] == image.shape[0]
            and v.shape[2:] == image.shape[2:])


def _batched(model, source, boxes, batch_size, kwargs):
    """Yield (boxes, outputs) for ``batch_size`` boxes at a time, each output (B, C_out, *tile).

    ``source`` (B, C, *spatial) is what the read boxes index (the image, or the padded image); ``kwargs`` shaped
    like it are cut with it, (B,) ones repeated for each tile in the call, the rest passed as they are.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    b = source.shape[0]
    tiled = {k for k, v in kwargs.items() if _image_shaped(v, source)}
    per_row = {k for k, v in kwargs.items() if k not in tiled and torch.is_tensor(v) and v.ndim >= 1
               and v.shape[0] == b}
    for i in range(0, len(boxes), batch_size):
        batch = boxes[i:i + batch_size]
        x = torch.cat([source[(..., *box)] for _, box in batch])                  # (k*B, C, h, w), tile-major
        call = {k: torch.cat([v[(..., *box)] for _, box in batch]) if k in tiled
                else torch.cat([v] * len(batch)) if k in per_row else v for k, v in kwargs.items()}
        y = model(x, **call)
        y = y.sample if hasattr(y, "sample") else y[0] if isinstance(y, tuple) else y
        yield batch, y.split(b)
