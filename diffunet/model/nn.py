"""Building blocks of the U-Net: residual block, time conditioning, attention, resampling and skip fusion.

Every choice the U-Net offers is a small lookup table here (``DOWNSAMPLE``, ``UPSAMPLE``, ``SKIP``,
``TIME_CONDITION``, ``PADDING``, ``NORMS``): a wrong name fails at construction with the list of valid names, and
adding a variant is one entry.

Every module works in 1, 2 or 3 spatial dimensions (``dims``: signals (B, C, L), images (B, C, H, W), volumes
(B, C, D, H, W)); the layers come from the per-dimensionality tables ``CONV``, ``CONV_TRANSPOSED``, ``BATCH_NORM``,
``MAX_POOL`` and ``AVG_POOL``, so 2D builds exactly the layers it always did. A resampler halves (or keeps) each
axis by its own factor (``factors``, one per axis: (1, 2, 2) leaves the depth of a thick-slice volume alone).

Each spatial module knows its own size arithmetic (``size(n, axis)``), so the shape planner and the
"valid"-padding geometry walk the very modules the forward pass runs, instead of a second copy of the rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .kernels import FOUR_PHASE_MIN_SIZE, FUNCTIONAL_CONV, Conv3d, Dropout, attend, nearest_up_conv
from .tables import choose


# The layers of each dimensionality: signals, images, volumes.
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: Conv3d}      # Conv3d: nn.Conv3d with a faster CPU backward
CONV_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
# "bilinear" names the interpolation of its dimensionality: linear along a signal, trilinear in a volume
LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


class SizeError(ValueError):
    """A spatial size that an operation cannot take exactly (it would drop a row or column)."""


def zeroed(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias: a residual branch that ends in it starts as the identity (ADM, EDM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def conv_size(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling along one axis; refuses sizes it would not map exactly.

    Exact means: padded ("same"), the size divides by the stride (out = n / stride); unpadded ("valid"), the
    windows tile the input with no leftover row, so features stay centred and center-cropping stays aligned.
    """
    span = n + 2 * padding - kernel
    if span < 0 or (n if padding else span) % stride:
        raise SizeError(f"size {n} does not fit kernel {kernel}, stride {stride}, padding {padding}")
    return span // stride + 1


def center_crop(x: torch.Tensor, size) -> torch.Tensor:
    """Crop the last ``len(size)`` axes of ``x`` to ``size`` around the center (the original U-Net's skip crop)."""
    excess = [n - s for n, s in zip(x.shape[-len(size):], size)]
    if not any(excess):
        return x
    return x[(...,) + tuple(slice(d // 2, d // 2 + s) for d, s in zip(excess, size))]


def mirror_pad(x: torch.Tensor, *pads: int) -> torch.Tensor:
    """Reflect-pad by any margin, even one wider than the image (the overlap-tile strategy of the U-Net paper).

    ``pads`` = (before, after) per axis, for the last ``len(pads) // 2`` axes in order: (top, bottom, left,
    right) for an image, (front, back, top, bottom, left, right) for a volume. ``F.pad(mode="reflect")`` refuses
    a pad as wide as the input, and 3D reflection only exists for 5-D batches; the margins of a deep "valid"
    U-Net often are that wide, so we reflect one axis at a time, at most ``size - 1`` pixels at a time. A
    one-pixel side is its own reflection, so it is repeated (as ``np.pad(mode="reflect")`` does).
    """
    axes = len(pads) // 2
    for i in reversed(range(axes)):                                     # the last axis first, as before
        x = _mirror_pad_axis(x, i - axes, pads[2 * i], pads[2 * i + 1])
    return x


def _mirror_pad_axis(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """``mirror_pad`` along one dimension (``dim`` negative): reflected as a (N, C, length) batch."""
    if not before and not after:
        return x
    moved = x.movedim(dim, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])                        # 1-D reflection: any tensor rank
    flat = _reflect_last(flat, before, after)
    return flat.reshape(*moved.shape[:-1], flat.shape[-1]).movedim(-1, dim)


def _reflect_last(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Reflect the last axis of (N, 1, L) by ``before`` and ``after``, at most L - 1 at a time."""
    if x.shape[-1] == 1:
        return F.pad(x, (before, after), mode="replicate")
    while before or after:
        n = x.shape[-1] - 1
        step = (min(before, n), min(after, n))
        x = F.pad(x, step, mode="reflect")
        before, after = before - step[0], after - step[1]
    return x


# ----------------------------------------------------------------------------------------------- time

# How each residual block takes the time (and class) embedding ``e``: as a scale and shift of the normalized
# features (ADM's AdaGN, the default), added before the norm (DDPM), or not at all ("none": a deterministic U-Net,
# the 2015 segmentation network, with no embedding). Value: (width factor of e, apply).
TIME_CONDITION = {
    "scale_shift": (2, lambda norm, h, e: norm(h) * (1 + e.chunk(2, dim=1)[0]) + e.chunk(2, dim=1)[1]),
    "add": (1, lambda norm, h, e: norm(h + e)),
    "none": (0, lambda norm, h, e: norm(h)),
}

# The norm before each conv of a residual block, before attention and before the output conv. GroupNorm (ADM,
# DDPM) takes its statistics over the whole feature map, so a tile of an image sees other ones; BatchNorm in eval
# mode is a fixed per-channel affine map, local like a conv, so tiles are exact; "none": the 2015 U-Net's plain
# conv pairs. Value: (channels, groups, eps, dims) -> module; only "group" uses the groups.
NORMS = {
    "group": lambda c, groups, eps, dims: nn.GroupNorm(groups, c, eps=eps),
    "batch": lambda c, groups, eps, dims: BATCH_NORM[dims](c, eps=eps),
    "none": lambda c, groups, eps, dims: nn.Identity(),
}

# "same": p = (k-1)//2 keeps the size; "valid": no padding, every 3x3 conv eats one pixel per side.
PADDING = {"same": lambda k: (k - 1) // 2, "valid": lambda k: 0}


class ResBlock(nn.Module):
    """norm-SiLU-conv, time-conditioned norm-SiLU-dropout-conv, plus a (cropped) shortcut (``norm``: ``NORMS``).

    ``residual=False`` drops the shortcut: the plain conv pair of the 2015 U-Net (its last conv is then never
    zeroed, since the block would output nothing)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, *, groups: int, dropout: float, padding: str,
                 time_condition: str, zero: bool, residual: bool = True, eps: float = 1e-5, norm: str = "group",
                 dims: int = 2):
        super().__init__()
        p = PADDING[padding](3)
        width, self.condition = choose(TIME_CONDITION, time_condition, "time_condition")
        make_norm, conv = choose(NORMS, norm, "norm"), CONV[dims]
        self.norm1 = make_norm(c_in, groups, eps, dims)
        self.conv1 = conv(c_in, c_out, 3, padding=p)
        self.emb = nn.Linear(emb_dim, width * c_out) if width else None
        self.norm2 = make_norm(c_out, groups, eps, dims)    # "scale_shift" scales and shifts after it, any norm
        self.dropout = Dropout(dropout)
        self.conv2 = conv(c_out, c_out, 3, padding=p)
        if zero and residual:
            zeroed(self.conv2)
        self.shortcut = (conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()) if residual else None
        self.pad, self.spatial = p, (None,) * dims

    def size(self, n: int, axis: int = 0) -> int:
        return conv_size(conv_size(n, 3, 1, self.pad), 3, 1, self.pad)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                       # (B, Cin, *S) -> (B, Cout, *S')
        e = None if self.emb is None else self.emb(F.silu(emb))[(..., *self.spatial)]   # (B, E) -> (B, k*Cout, 1..)
        h = self.conv2(self.dropout(F.silu(self.condition(self.norm2, h, e))))
        if self.shortcut is None:
            return h
        return center_crop(self.shortcut(x), h.shape[2:]) + h      # "valid": the two convs ate 2 px per side


class Attention(nn.Module):
    """Multi-head self-attention over all positions (``attend``: SDPA's fused kernels, or matmuls for few tokens):
    the pixels of an image, the voxels of a volume, the samples of a signal, flattened into one sequence."""

    def __init__(self, channels: int, heads: int, groups: int, zero: bool, eps: float = 1e-5, norm: str = "group",
                 dims: int = 2):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention over {channels} channels cannot be split into {heads} heads; "
                             f"choose num_heads/head_dim that divide {channels}")
        self.heads = heads
        self.norm = choose(NORMS, norm, "norm")(channels, groups, eps, dims)
        self.qkv = CONV[dims](channels, 3 * channels, 1)
        self.out = CONV[dims](channels, channels, 1)
        if zero:
            zeroed(self.out)

    def size(self, n: int, axis: int = 0) -> int:
        return n

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # The 1x1 convs run as matmuls over position tokens, so that q, k, v come out with the head dim contiguous:
        # SDPA's fused kernels need that (the former "b (three h d) x y" split had stride H*W there and fell back
        # to the slow math path), and a matmul beats a 1x1 conv on CPU. The weights keep their conv shapes
        # (C', C, 1, ...), so checkpoints load unchanged. In channels_last the first rearrange is free.
        tokens = rearrange(self.norm(x), "b c ... -> b (...) c")                  # (B, C, *S) -> (B, N, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)         # (B, N, 3C)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)  # each (B, heads, N, C/heads)
        o = rearrange(attend(q, k, v), "b h n d -> b n (h d)")                    # (B, N, C)
        o = F.linear(o, self.out.weight.flatten(1), self.out.bias)
        return x + rearrange(o, "b n c -> b c n").unflatten(2, x.shape[2:])     # (B, N, C) -> (B, C, *S)


# ----------------------------------------------------------------------------------------- resampling
# Every resampler keeps the channel count and divides (down) or multiplies (up) each axis by its factor, 1 or 2:
# (B, C, H, W) -> (B, C, H/2, W/2) down and (B, C, 2H, 2W) up at the default factors (2, 2). Where a factor is 1
# the axis passes through (kernel 1 along it), as the first levels of a thick-slice volume's U-Net do.

def _kernels(factors: tuple[int, ...], k: int) -> tuple[int, ...]:
    """A resampling kernel's extent per axis: ``k`` where the axis is resampled, 1 where it passes through."""
    return tuple(k if f > 1 else 1 for f in factors)


class Pool(nn.Module):
    def __init__(self, pool, channels: int, padding: str, factors: tuple[int, ...] = (2, 2)):
        super().__init__()
        self.factors = factors
        self.pool = pool[len(factors)](factors)

    def size(self, n: int, axis: int = 0) -> int:
        f = self.factors[axis]
        return conv_size(n, f, f)

    def forward(self, x):
        return self.pool(x)


class StridedConv(nn.Module):
    """A 3x3 stride-2 conv: the network learns its own anti-alias filter instead of discarding 3 of 4 pixels.

    ``pad_end``: TensorFlow's "SAME" padding for stride 2, one zero row and column after the image and none
    before, instead of one on each side; the original DDPM checkpoints were trained so (diffusers'
    ``downsample_padding=0``). With "valid" padding there is nothing to pad either way."""

    def __init__(self, channels: int, padding: str, pad_end: bool = False, factors: tuple[int, ...] = (2, 2)):
        super().__init__()
        self.factors, self.kernel = factors, _kernels(factors, 3)
        self.pads = tuple(PADDING[padding](k) for k in self.kernel)
        # F.pad's order: the last axis first, (before, after) each
        self.pad_end = tuple(x for p in reversed(self.pads) for x in (0, p)) if pad_end and any(self.pads) else None
        self.conv = CONV[len(factors)](channels, channels, self.kernel, stride=factors,
                                       padding=0 if self.pad_end else self.pads)

    def size(self, n: int, axis: int = 0) -> int:
        k, f, p = self.kernel[axis], self.factors[axis], self.pads[axis]
        return conv_size(n + p, k, f) if self.pad_end else conv_size(n, k, f, p)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad_end) if self.pad_end else x)


class BlurPool(nn.Module):
    """A fixed binomial [1, 2, 1] low-pass along each halved axis, then subsampling (Zhang 2019, "Making CNNs
    shift-invariant"); [1, 2, 1]^2 / 16 in an image."""

    def __init__(self, channels: int, padding: str, factors: tuple[int, ...] = (2, 2)):
        super().__init__()
        kernel = torch.ones(())
        for f in factors:                                   # outer product of the per-axis taps
            kernel = kernel[..., None] * (torch.tensor([1.0, 2.0, 1.0]) if f > 1 else torch.ones(1))
        self.register_buffer("kernel", (kernel / kernel.sum()).expand(channels, 1, *kernel.shape).clone(),
                             persistent=False)
        self.factors = factors
        self.pads = tuple(PADDING[padding](k) for k in _kernels(factors, 3))
        self.conv = FUNCTIONAL_CONV[len(factors)]

    def size(self, n: int, axis: int = 0) -> int:
        f = self.factors[axis]
        return conv_size(n, 3 if f > 1 else 1, f, self.pads[axis])

    def forward(self, x):
        return self.conv(x, self.kernel.to(x.dtype), stride=self.factors, padding=self.pads, groups=x.shape[1])


class TransposedConv(nn.Module):
    """The original U-Net's 2x2 "up-convolution": learned, exact doubling, prone to checkerboard patterns."""

    def __init__(self, channels: int, padding: str, factors: tuple[int, ...] = (2, 2)):
        super().__init__()
        self.factors = factors
        self.conv = CONV_TRANSPOSED[len(factors)](channels, channels, factors, stride=factors)

    def size(self, n: int, axis: int = 0) -> int:
        return self.factors[axis] * n

    def forward(self, x):
        return self.conv(x)


class InterpolateConv(nn.Module):
    """Fixed interpolation to twice the size, then a 3x3 conv (Odena et al. 2016: no checkerboard by design).

    "nearest" runs as ``nearest_up_conv`` from ``FOUR_PHASE_MIN_SIZE`` inputs up where every axis doubles (2, 4 or
    8 phases: same weights, same outputs to float rounding; 1.4-2x faster per upsampler on CPU in 2D); ``four_phase
    = False`` runs the plain path instead. "bilinear" is linear along a signal and trilinear in a volume."""

    four_phase = True

    def __init__(self, mode: str, channels: int, padding: str, factors: tuple[int, ...] = (2, 2)):
        super().__init__()
        dims = len(factors)
        self.mode = LINEAR_MODE[dims] if mode == "bilinear" else mode
        self.factors = factors
        self.scale = 2.0 if all(f == 2 for f in factors) else tuple(float(f) for f in factors)
        self.phased = mode == "nearest" and all(f == 2 for f in factors)
        self.pad = PADDING[padding](3)
        self.conv = CONV[dims](channels, channels, 3, padding=self.pad)

    def size(self, n: int, axis: int = 0) -> int:
        return conv_size(self.factors[axis] * n, 3, 1, self.pad)

    def forward(self, x):
        if self.four_phase and self.phased and min(x.shape[2:]) >= FOUR_PHASE_MIN_SIZE:
            return nearest_up_conv(x, self.conv.weight, self.conv.bias, self.pad)
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode=self.mode))


# Value: (channels, padding, factors) -> module.
DOWNSAMPLE = {
    "maxpool": lambda c, padding, factors=(2, 2): Pool(MAX_POOL, c, padding, factors),
    "avgpool": lambda c, padding, factors=(2, 2): Pool(AVG_POOL, c, padding, factors),
    "conv": lambda c, padding, factors=(2, 2): StridedConv(c, padding, factors=factors),
    "conv_tf": lambda c, padding, factors=(2, 2): StridedConv(c, padding, pad_end=True, factors=factors),
    "blur": BlurPool,
}

UPSAMPLE = {
    "transposed": TransposedConv,
    "bilinear": lambda c, padding, factors=(2, 2): InterpolateConv("bilinear", c, padding, factors),
    "nearest": lambda c, padding, factors=(2, 2): InterpolateConv("nearest", c, padding, factors),
}


# ------------------------------------------------------------------------------------------ skip fusion
# The decoder takes the encoder's features at its own resolution: the U-Net's "secret passage" that carries
# the fine detail the bottleneck cannot, and a short path for gradients back to the early layers.
# Each fusion crops the skip to the decoder's size first (only "valid" padding ever needs it).

class Concat(nn.Module):
    """Stack the skip on the decoder's channels: (B, C, *S) + (B, K, *S) -> (B, C+K, *S)."""

    def __init__(self, c: int, c_skip: int, dims: int = 2):
        super().__init__()
        self.out_channels = c + c_skip

    def forward(self, h, skip):
        return torch.cat([h, center_crop(skip, h.shape[2:])], dim=1)


class ConcatProject(Concat):
    """Concatenate, then a 1x1 conv back to C channels: (B, C+K, *S) -> (B, C, *S).

    The 3x3 convolutions that follow then read C instead of C+K channels, which saves about 9*K*C_out weights
    per block for (C+K)*C spent here: the seed's way to fuse the skip without paying for it in every 3x3 conv.
    """

    def __init__(self, c: int, c_skip: int, dims: int = 2):
        super().__init__(c, c_skip)
        self.project = CONV[dims](c + c_skip, c, 1)
        self.out_channels = c

    def forward(self, h, skip):
        return self.project(super().forward(h, skip))


class Add(nn.Module):
    """Add the skip to the decoder's features (1x1-projected when its channel count differs)."""

    def __init__(self, c: int, c_skip: int, dims: int = 2):
        super().__init__()
        self.project = CONV[dims](c_skip, c, 1) if c_skip != c else nn.Identity()
        self.out_channels = c

    def forward(self, h, skip):
        return h + center_crop(self.project(skip), h.shape[2:])


class NoSkip(nn.Module):
    """No skip at all: the encoder-decoder the seed argues against, kept as the ablation."""

    def __init__(self, c: int, c_skip: int, dims: int = 2):
        super().__init__()
        self.out_channels = c

    def forward(self, h, skip):
        return h


SKIP = {"concat": Concat, "concat_1x1": ConcatProject, "add": Add, "none": NoSkip}
