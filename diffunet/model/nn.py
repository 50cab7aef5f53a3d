"""Building blocks of the U-Net: residual block, time conditioning, attention, resampling and skip fusion.

Every choice the U-Net offers is a small lookup table here (``DOWNSAMPLE``, ``UPSAMPLE``, ``SKIP``,
``TIME_CONDITION``, ``PADDING``, ``NORMS``): a wrong name fails at construction with the list of valid names, and
adding a variant is one entry.

Each spatial module knows its own size arithmetic (``size(n)``, per axis), so the shape planner and the
"valid"-padding geometry walk the very modules the forward pass runs, instead of a second copy of the rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .kernels import FOUR_PHASE_MIN_SIZE, Dropout, attend, nearest_up_conv
from .tables import choose


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


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop the last two axes of ``x`` to ``size`` around the center (the original U-Net's skip crop)."""
    dh, dw = x.shape[-2] - size[0], x.shape[-1] - size[1]
    if dh == 0 and dw == 0:
        return x
    return x[..., dh // 2 : dh // 2 + size[0], dw // 2 : dw // 2 + size[1]]


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect-pad by any margin, even one wider than the image (the overlap-tile strategy of the U-Net paper).

    ``F.pad(mode="reflect")`` refuses a pad as wide as the input; the margins of a deep "valid" U-Net often
    are, so we reflect repeatedly, at most ``size - 1`` pixels at a time. A one-pixel side is its own
    reflection, so it is repeated (as ``np.pad(mode="reflect")`` does).
    """
    return _mirror_pad_axis(_mirror_pad_axis(x, -1, left, right), -2, top, bottom)


def _mirror_pad_axis(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """``mirror_pad`` along one of the last two dimensions (``dim`` -1 or -2)."""
    pads = (lambda b, a: (b, a, 0, 0)) if dim == -1 else (lambda b, a: (0, 0, b, a))   # F.pad: last dim first
    if x.shape[dim] == 1:
        return F.pad(x, pads(before, after), mode="replicate") if before or after else x
    while before or after:
        n = x.shape[dim] - 1
        step = (min(before, n), min(after, n))
        x = F.pad(x, pads(*step), mode="reflect")
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
# conv pairs. Value: (channels, groups, eps) -> module; only "group" uses the groups.
NORMS = {
    "group": lambda c, groups, eps: nn.GroupNorm(groups, c, eps=eps),
    "batch": lambda c, groups, eps: nn.BatchNorm2d(c, eps=eps),
    "none": lambda c, groups, eps: nn.Identity(),
}

# "same": p = (k-1)//2 keeps the size; "valid": no padding, every 3x3 conv eats one pixel per side.
PADDING = {"same": lambda k: (k - 1) // 2, "valid": lambda k: 0}


class ResBlock(nn.Module):
    """norm-SiLU-conv, time-conditioned norm-SiLU-dropout-conv, plus a (cropped) shortcut (``norm``: ``NORMS``).

    ``residual=False`` drops the shortcut: the plain conv pair of the 2015 U-Net (its last conv is then never
    zeroed, since the block would output nothing)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, *, groups: int, dropout: float, padding: str,
                 time_condition: str, zero: bool, residual: bool = True, eps: float = 1e-5, norm: str = "group"):
        super().__init__()
        p = PADDING[padding](3)
        width, self.condition = choose(TIME_CONDITION, time_condition, "time_condition")
        make_norm = choose(NORMS, norm, "norm")
        self.norm1 = make_norm(c_in, groups, eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=p)
        self.emb = nn.Linear(emb_dim, width * c_out) if width else None
        self.norm2 = make_norm(c_out, groups, eps)          # "scale_shift" scales and shifts after it, any norm
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=p)
        if zero and residual:
            zeroed(self.conv2)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()) if residual else None
        self.pad = p

    def size(self, n: int) -> int:
        return conv_size(conv_size(n, 3, 1, self.pad), 3, 1, self.pad)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                       # (B, Cin, H, W) -> (B, Cout, H', W')
        e = None if self.emb is None else self.emb(F.silu(emb))[:, :, None, None]   # (B, E) -> (B, k*Cout, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.condition(self.norm2, h, e))))
        if self.shortcut is None:
            return h
        return center_crop(self.shortcut(x), h.shape[-2:]) + h     # "valid": the two convs ate 2 px per side


class Attention(nn.Module):
    """Multi-head self-attention over all pixels (``attend``: SDPA's fused kernels, or matmuls for few tokens)."""

    def __init__(self, channels: int, heads: int, groups: int, zero: bool, eps: float = 1e-5, norm: str = "group"):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention over {channels} channels cannot be split into {heads} heads; "
                             f"choose num_heads/head_dim that divide {channels}")
        self.heads = heads
        self.norm = choose(NORMS, norm, "norm")(channels, groups, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        if zero:
            zeroed(self.out)

    def size(self, n: int) -> int:
        return n

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        height = x.shape[-2]
        # The 1x1 convs run as matmuls over pixel tokens, so that q, k, v come out with the head dim contiguous:
        # SDPA's fused kernels need that (the former "b (three h d) x y" split had stride H*W there and fell back
        # to the slow math path), and a matmul beats a 1x1 conv on CPU. The weights keep their conv shapes
        # (C', C, 1, 1), so checkpoints load unchanged. In channels_last the first rearrange is free.
        tokens = rearrange(self.norm(x), "b c x y -> b (x y) c")                  # (B, C, H, W) -> (B, H*W, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)         # (B, H*W, 3C)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)  # each (B, heads, H*W, C/heads)
        o = rearrange(attend(q, k, v), "b h n d -> b n (h d)")                    # (B, H*W, C)
        o = F.linear(o, self.out.weight.flatten(1), self.out.bias)
        return x + rearrange(o, "b (x y) c -> b c x y", x=height)                 # (B, H*W, C) -> (B, C, H, W)


# ----------------------------------------------------------------------------------------- resampling
# Every resampler keeps the channel count: (B, C, H, W) -> (B, C, H/2, W/2) down, (B, C, 2H, 2W) up.

class Pool(nn.Module):
    def __init__(self, pool, channels: int, padding: str):
        super().__init__()
        self.pool = pool(2)

    def size(self, n: int) -> int:
        return conv_size(n, 2, 2)

    def forward(self, x):
        return self.pool(x)


class StridedConv(nn.Module):
    """A 3x3 stride-2 conv: the network learns its own anti-alias filter instead of discarding 3 of 4 pixels.

    ``pad_end``: TensorFlow's "SAME" padding for stride 2, one zero row and column after the image and none
    before, instead of one on each side; the original DDPM checkpoints were trained so (diffusers'
    ``downsample_padding=0``). With "valid" padding there is nothing to pad either way."""

    def __init__(self, channels: int, padding: str, pad_end: bool = False):
        super().__init__()
        self.pad = PADDING[padding](3)
        self.pad_end = (0, self.pad, 0, self.pad) if pad_end and self.pad else None
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.pad_end else self.pad)

    def size(self, n: int) -> int:
        return conv_size(n + self.pad, 3, 2) if self.pad_end else conv_size(n, 3, 2, self.pad)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad_end) if self.pad_end else x)


class BlurPool(nn.Module):
    """A fixed binomial [1, 2, 1]^2 / 16 low-pass, then subsampling (Zhang 2019, "Making CNNs shift-invariant")."""

    def __init__(self, channels: int, padding: str):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16).expand(channels, 1, 3, 3).clone(),
                             persistent=False)
        self.pad = PADDING[padding](3)

    def size(self, n: int) -> int:
        return conv_size(n, 3, 2, self.pad)

    def forward(self, x):
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, padding=self.pad, groups=x.shape[1])


class TransposedConv(nn.Module):
    """The original U-Net's 2x2 "up-convolution": learned, exact doubling, prone to checkerboard patterns."""

    def __init__(self, channels: int, padding: str):
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, 2, stride=2)

    def size(self, n: int) -> int:
        return 2 * n

    def forward(self, x):
        return self.conv(x)


class InterpolateConv(nn.Module):
    """Fixed interpolation to twice the size, then a 3x3 conv (Odena et al. 2016: no checkerboard by design).

    "nearest" runs as ``nearest_up_conv`` from ``FOUR_PHASE_MIN_SIZE`` inputs up (same weights, same outputs to
    float rounding; 1.4-2x faster per upsampler on CPU); ``four_phase = False`` runs the plain path instead."""

    four_phase = True

    def __init__(self, mode: str, channels: int, padding: str):
        super().__init__()
        self.mode = mode
        self.pad = PADDING[padding](3)
        self.conv = nn.Conv2d(channels, channels, 3, padding=self.pad)

    def size(self, n: int) -> int:
        return conv_size(2 * n, 3, 1, self.pad)

    def forward(self, x):
        if self.four_phase and self.mode == "nearest" and min(x.shape[-2:]) >= FOUR_PHASE_MIN_SIZE:
            return nearest_up_conv(x, self.conv.weight, self.conv.bias, self.pad)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode=self.mode))


DOWNSAMPLE = {
    "maxpool": lambda c, padding: Pool(nn.MaxPool2d, c, padding),
    "avgpool": lambda c, padding: Pool(nn.AvgPool2d, c, padding),
    "conv": StridedConv,
    "conv_tf": lambda c, padding: StridedConv(c, padding, pad_end=True),
    "blur": BlurPool,
}

UPSAMPLE = {
    "transposed": TransposedConv,
    "bilinear": lambda c, padding: InterpolateConv("bilinear", c, padding),
    "nearest": lambda c, padding: InterpolateConv("nearest", c, padding),
}


# ------------------------------------------------------------------------------------------ skip fusion
# The decoder takes the encoder's features at its own resolution: the U-Net's "secret passage" that carries
# the fine detail the bottleneck cannot, and a short path for gradients back to the early layers.
# Each fusion crops the skip to the decoder's size first (only "valid" padding ever needs it).

class Concat(nn.Module):
    """Stack the skip on the decoder's channels: (B, C, H, W) + (B, S, H, W) -> (B, C+S, H, W)."""

    def __init__(self, c: int, c_skip: int):
        super().__init__()
        self.out_channels = c + c_skip

    def forward(self, h, skip):
        return torch.cat([h, center_crop(skip, h.shape[-2:])], dim=1)


class ConcatProject(Concat):
    """Concatenate, then a 1x1 conv back to C channels: (B, C+S, H, W) -> (B, C, H, W).

    The 3x3 convolutions that follow then read C instead of C+S channels, which saves about 9*S*C_out weights
    per block for (C+S)*C spent here: the seed's way to fuse the skip without paying for it in every 3x3 conv.
    """

    def __init__(self, c: int, c_skip: int):
        super().__init__(c, c_skip)
        self.project = nn.Conv2d(c + c_skip, c, 1)
        self.out_channels = c

    def forward(self, h, skip):
        return self.project(super().forward(h, skip))


class Add(nn.Module):
    """Add the skip to the decoder's features (1x1-projected when its channel count differs)."""

    def __init__(self, c: int, c_skip: int):
        super().__init__()
        self.project = nn.Conv2d(c_skip, c, 1) if c_skip != c else nn.Identity()
        self.out_channels = c

    def forward(self, h, skip):
        return h + center_crop(self.project(skip), h.shape[-2:])


class NoSkip(nn.Module):
    """No skip at all: the encoder-decoder the seed argues against, kept as the ablation."""

    def __init__(self, c: int, c_skip: int):
        super().__init__()
        self.out_channels = c

    def forward(self, h, skip):
        return h


SKIP = {"concat": Concat, "concat_1x1": ConcatProject, "add": Add, "none": NoSkip}
