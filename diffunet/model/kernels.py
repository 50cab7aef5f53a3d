"""CPU kernels the building blocks call: ``Dropout`` (cheaper CPU dropout), ``attend`` (attention by the faster
route for the device), ``nearest_up_conv`` (nearest 2x upsampling + 3x3 conv at the low resolution, in 1D, 2D and
3D), ``Conv3d`` (whose backward pass takes the faster layout on a CPU). ``nn.py``
builds the architecture from these; nothing here knows the U-Net. Travels inside exported folders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ------------------------------------------------------------------------------------------ CPU kernels

def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p, training=True)`` with a mask from half the random draws, for CPU tensors.

    Written here because torch's CPU dropout draws one 32-bit Mersenne-Twister number per element, which made
    dropout 6-7 % of a ddpm-cifar10 training step on 2 cores; each draw's two 16-bit halves give two keep/drop
    decisions instead (P(drop) = p to 1/65536), and ``where`` keeps only the boolean mask for the backward pass, as
    torch's kernel does. About 1.6-1.9x faster forward + backward. Same generator, so seeds and RNG-state replay
    (resume, activation checkpointing) work as before."""
    n = x.numel()
    draws = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_(-2**31, 2**31 - 1)
    keep = draws.view(torch.int16)[:n] >= -32768 + round(p * 65536)
    return torch.where(keep.as_strided(x.shape, x.stride()), x, 0).mul_(1 / (1 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` that takes ``cpu_dropout`` for dense CPU tensors in training (GPUs keep torch's fused kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        if self.training and 0 < self.p < 1 and x.device.type == "cpu" and dense and not self.inplace:
            return cpu_dropout(x, self.p)
        return super().forward(x)


# A 3x3x3 convolution's backward pass on a CPU is 2.7-3.7x its forward in oneDNN's default (NCDHW) layout; the
# weight gradient is most of it. In channels_last_3d the same backward runs 1.03-1.8x faster from 16^3 positions up
# (measured on an AVX2 EPYC: 32 channels at 32^3 153 -> 127 ms, the 96-to-32 decoder conv 488 -> 440 ms, the
# 32-to-1 output conv 57 -> 32 ms; 1.03x at 16^3, 1.09x at 48^3), counting the layout copies, while the forward
# pass is fastest as it is (bench/bench_nd.py: 3D training 1.16x -> 1.21x MONAI's).
# So the forward stays in the caller's layout and only the backward changes layout. Below this many positions, for
# 1x1 and strided convs and for a single input channel it is no faster (0.55-1.03x), so they keep torch's path.
CHANNELS_LAST_BACKWARD_POSITIONS = 16**3


class _ChannelsLastBackwardConv3d(torch.autograd.Function):
    """``F.conv3d`` whose backward pass runs in channels_last_3d and hands back tensors in the caller's layout."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv3d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        layout = torch.channels_last_3d
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=layout), x.contiguous(memory_format=layout),
            weight.contiguous(memory_format=layout), [weight.shape[0]] if ctx.has_bias else None,
            [1, 1, 1], list(ctx.padding), [1, 1, 1], False, [0, 0, 0], 1, needs)
        gx = None if gx is None else gx.contiguous(memory_format=_layout_of(x))
        gw = None if gw is None else gw.contiguous()
        return gx, gw, gb, None


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:                                       # torch < 2.4 names it per device
        return torch.is_autocast_cpu_enabled()


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last_3d


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters, same state dict, same outputs) whose backward pass takes the faster layout on
    a CPU in fp32 (see ``CHANNELS_LAST_BACKWARD_POSITIONS``). Elsewhere, and under autocast, torch's own path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and not _cpu_autocast() and self.in_channels > 1 and self.groups == 1
                and self.stride == (1, 1, 1) and self.dilation == (1, 1, 1) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and max(self.kernel_size) > 1
                and x[0, 0].numel() >= CHANNELS_LAST_BACKWARD_POSITIONS):
            return _ChannelsLastBackwardConv3d.apply(x, self.weight, self.bias, self.padding)
        return super().forward(x)


# In bf16/fp16 on a CPU, up to this many tokens (16x16 pixels), attention runs faster as matmul, softmax,
# matmul than through SDPA's tiled kernel (about 1.7x forward + backward; the scores are only heads x 256 x 256
# per image). In fp32, above it, and always on GPUs, SDPA's fused kernels win, and they never store the
# (tokens x tokens) scores: that is the memory-efficient path at large resolutions. bench/bench_unet.py measures it.
CPU_MATMUL_ATTENTION_TOKENS = 256


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) tensors, by the faster route for this device, dtype and N."""
    if q.device.type != "cpu" or q.dtype == torch.float32 or q.shape[-2] > CPU_MATMUL_ATTENTION_TOKENS:
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)                 # (B, heads, N, N)
    return scores.softmax(-1) @ v                                          # CPU softmax sums in fp32 for bf16 too


# Nearest 2x upsampling repeats every input row twice, so a 3x3 conv over the upsampled image reads, for output row
# 2i + a (a = 0, 1: the row's phase), only two distinct input rows, each under a sum of the kernel's rows r0, r1, r2:
# with padding 1, phase 0 reads rows i-1, i with (r0, r1 + r2) and phase 1 rows i, i+1 with (r0 + r1, r2);
# unpadded ("valid"), both phases read rows i, i+1, phase 0 with (r0 + r1, r2) and phase 1 with (r0, r1 + r2).
# The same holds along every axis: 2 phases along a signal, 4 in an image, 8 in a volume.

# Below this input size the phased conv is not faster on CPU (measured there in 2D: 1.0x at 4x4, 1.4-2x from 8x8
# up; not tuned on GPUs).
FOUR_PHASE_MIN_SIZE = 8

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}     # by spatial dims


def fold_taps(weight: torch.Tensor, dim: int, padding: int) -> torch.Tensor:
    """Sum a kernel's 3 taps along ``dim`` into the 2 that each output phase reads: (..., 3, ...) -> (2, ..., 2, ...),
    the phase first. Slices and adds on the weight's own device (no constant table to copy there every step)."""
    r0, r1, r2 = weight.unbind(dim)
    phases = [torch.stack([r0, r1 + r2], dim), torch.stack([r0 + r1, r2], dim)]
    return torch.stack(phases if padding else phases[::-1])


def phase_kernel(weight: torch.Tensor, padding: int) -> torch.Tensor:
    """(C, C_in, 3, ...) -> (2^N C, C_in, 2, ...): the 2-tap kernel of each output phase (phase per axis, first
    axis slowest, then channel). The taps are summed in fp32 at least and rounded to the weight's dtype once (bf16
    weights lose no more)."""
    exact = weight.to(torch.promote_types(weight.dtype, torch.float32))
    dims = weight.ndim - 2
    for axis in range(dims):                          # each fold puts its phase first: the last axis's ends first
        exact = fold_taps(exact, 2 * axis + 2, padding)                      # axis's taps, moved by earlier folds
    kernel = exact.permute(*reversed(range(dims)), *range(dims, exact.ndim))      # (2, ..., C, C_in, 2, ...)
    return kernel.reshape(-1, weight.shape[1], *(2,) * dims).to(weight.dtype)


def nearest_up_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """``convNd(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding)`` for a 3x3(x3) ``weight``,
    computed at the input's resolution: one 2-tap conv with 2^N output phases, then the phases interleaved.

    2^N instead of 3^N multiply-adds per output position (4 of 9 in an image, 8 of 27 in a volume; with padding 1
    the 2-tap conv covers one extra row per axis, which the phases drop: (H+1)(W+1)/HW more, 13 % at 16x16), and
    the backward pass keeps ``x`` rather than its 2^N times larger upsampled copy. Equal up to float rounding; the
    output has the plain path's dtype and memory format."""
    b, dims, c = x.shape[0], x.ndim - 2, weight.shape[0]
    memory_format = CHANNELS_LAST.get(x.ndim)
    channels_last = memory_format is not None and x.is_contiguous(memory_format=memory_format) and not x.is_contiguous()
    kernel = phase_kernel(weight, padding)
    if channels_last:
        kernel = kernel.contiguous(memory_format=memory_format)
    phases = FUNCTIONAL_CONV[dims](x, kernel, None if bias is None else bias.expand(2**dims, c).reshape(-1),
                                     padding=padding)
    # phases[n, (a_1 .. a_N, k), a_1*padding + r_1, ...] is output position (n, k, 2 r_1 + a_1, ...): one strided
    # view (B, C, r_1, 2, r_2, 2, ...) of it, then a single copy into place.
    sizes = [n - 1 + padding for n in x.shape[2:]]
    sn, sk, *spatial = phases.stride()
    shape, strides = [b, c], [sn, sk]
    for axis, (n, step) in enumerate(zip(sizes, spatial)):
        shape += [n, 2]
        strides += [step, 2 ** (dims - 1 - axis) * c * sk + padding * step]     # to the next phase along this axis
    view = phases.as_strided(shape, strides)
    axes = " ".join(f"r{i} a{i}" for i in range(dims))
    merged = " ".join(f"(r{i} a{i})" for i in range(dims))
    if channels_last:
        return rearrange(view, f"n k {axes} -> n {merged} k").movedim(-1, 1)
    return rearrange(view, f"n k {axes} -> n k {merged}")
