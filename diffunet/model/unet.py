"""The U: encoder, bottleneck, decoder, the skip stack between them, "valid"-padding geometry, and the shape planner.

Layout (DDPM / ADM): a stem conv, then per level ``num_res_blocks`` residual blocks and a downsampler (all but the
deepest level), a bottleneck (res, attention, res; ``mid_attention=False``: res, res), and a mirror decoder with
``num_res_blocks + 1`` blocks per level and an upsampler. The stem, every encoder block and every downsampler push
their output on the skip stack; every decoder block pops one and fuses it (``skip``) before its convolutions.

A pipeline folder written by a bare ``save_pretrained`` names this module's path in its ``model_index.json``
(``diffunet.model.unet``); folders saved before the move into ``model/`` name ``diffunet.unet``, which
``diffunet/__init__.py`` maps here for a release.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .nn import (CONV, DOWNSAMPLE, NORMS, PADDING, SKIP, UPSAMPLE, Attention, ResBlock, SizeError, conv_size,
                 mirror_pad, zeroed)
from .tables import as_size, choose


# The axes of each dimensionality, as errors and the planner name them.
AXES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}
LETTERS = {1: "L", 2: "H, W", 3: "D, H, W"}
KINDS = {1: "signals", 2: "images", 3: "volumes"}


def _count(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


class Block(nn.Module):
    """A residual block, then self-attention at the resolutions that ask for it."""

    def __init__(self, res: ResBlock, attention: Attention | None):
        super().__init__()
        self.res, self.attention = res, attention

    def size(self, n: int, axis: int = 0) -> int:
        return self.res.size(n)

    def forward(self, x, emb):
        h = self.res(x, emb)
        return self.attention(h) if self.attention is not None else h


class EncoderLevel(nn.Module):
    """Blocks at one resolution, then (except at the deepest level) a downsampler. Returns the features and
    what it pushes on the skip stack: each block's output and the downsampler's."""

    def __init__(self, blocks: list[Block], down: nn.Module | None):
        super().__init__()
        self.blocks, self.down = nn.ModuleList(blocks), down

    def forward(self, h, emb):
        pushed = []
        for block in self.blocks:
            h = block(h, emb)
            pushed.append(h)
        if self.down is not None:
            h = self.down(h)                                # (B, C, H, W) -> (B, C, H/2, W/2) at factors 2
            pushed.append(h)
        return h, pushed


class Middle(nn.Module):
    """The bottleneck: residual block, self-attention (or none), residual block, at the coarsest resolution."""

    def __init__(self, first: ResBlock, attention: Attention | None, second: ResBlock):
        super().__init__()
        self.first, self.attention, self.second = first, attention, second

    def size(self, n: int, axis: int = 0) -> int:
        return self.second.size(self.first.size(n))

    def forward(self, h, emb):
        h = self.first(h, emb)
        return self.second(self.attention(h) if self.attention is not None else h, emb)


class DecoderLevel(nn.Module):
    """Blocks at one resolution, each fusing one popped skip first, then (except at the finest) an upsampler."""

    def __init__(self, fuses: list[nn.Module], blocks: list[Block], up: nn.Module | None):
        super().__init__()
        self.fuses, self.blocks, self.up = nn.ModuleList(fuses), nn.ModuleList(blocks), up

    def forward(self, h, emb, skips):
        for fuse, block, skip in zip(self.fuses, self.blocks, skips):
            h = block(fuse(h, skip), emb)                   # skip cropped to h's size, then fused
        if self.up is not None:
            h = self.up(h)                                  # (B, C, H, W) -> (B, C, 2H, 2W) at factors 2
        return h


def resolve_factors(down_factors, levels: int, dims: int) -> list[tuple[int, ...]]:
    """``down_factors`` as one tuple of per-axis factors per downsampling; a one-line error for a wrong one."""
    if down_factors is None:
        return [(2,) * dims] * (levels - 1)
    example = "[1, 2, 2]" if dims == 3 else "[1, 2]" if dims == 2 else "2"
    entries = list(down_factors)
    if len(entries) != levels - 1:
        raise ValueError(f"down_factors has {len(entries)} entries; a U-Net of {levels} levels (channel_mult) "
                         f"downsamples {levels - 1} times: give {levels - 1} entries, each 2 or one factor per axis "
                         f"such as {example}")
    factors = []
    for entry in entries:
        f = (int(entry),) * dims if isinstance(entry, (int, float)) else tuple(int(x) for x in entry)
        shown = entry if isinstance(entry, (int, float)) else list(entry)
        if len(f) != dims or not set(f) <= {1, 2}:
            raise ValueError(f"down_factors entry {shown} is not "
                             f"1 or 2 on each of the {dims} axes {AXES[dims]}; give 2 or a list of {dims} such as "
                             f"{example}")
        factors.append(f)
    return factors


def _level_sizes(size: tuple[int, ...], factors: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The feature size at each level, per axis, for an input of ``size``."""
    sizes = [size]
    for f in factors:
        sizes.append(tuple(n // k for n, k in zip(sizes[-1], f)))
    return sizes


def _attention_levels(size, factors, resolutions, levels) -> set[int]:
    """The levels with attention blocks: ``levels`` as given, or those whose first axis has a size in
    ``resolutions``."""
    count = len(factors) + 1
    if levels is not None:
        wrong = sorted(set(levels) - set(range(count)))
        if wrong:
            raise ValueError(f"attention_levels {wrong} are not levels of this U-Net; its levels are 0..{count - 1}")
        return set(levels)
    heights = [s[0] for s in _level_sizes(size, factors)]
    unknown = set(resolutions) - set(heights)
    if unknown:
        raise ValueError(f"attention_resolutions {sorted(unknown)} match no level; "
                         f"feature {'heights' if len(size) == 2 else 'sizes along the first axis'} at sample_size "
                         f"are {heights} (or name the levels: attention_levels)")
    return {i for i, h in enumerate(heights) if h in resolutions}


@dataclass(frozen=True)
class Tiling:
    """How the network covers an input of ``output_size`` (one size per axis: (rows, cols) for an image).

    With "valid" padding every 3x3 conv eats a pixel per side, so the input is mirror-padded to ``input_size``
    (``pad`` = before, after per axis: top, bottom, left, right for an image) and the network's output is
    cropped at ``crop`` (offsets per axis) to ``output_size``. ``margin`` is what the network consumes on each
    side. With "same" padding all are trivial.
    """

    output_size: tuple[int, ...]
    input_size: tuple[int, ...]
    margin: tuple[int, ...]
    pad: tuple[int, ...]
    crop: tuple[int, ...]


@dataclass
class Axis:
    """Sizes along one axis through the network, for a network input of ``input`` pixels."""

    input: int
    encoder: list[int]          # per level, after its blocks
    decoder: list[int]          # per level (finest first), after its blocks
    crop: list[int]             # per level (finest first), the most a skip is cropped by, in total
    output: int


@dataclass
class PlanRow:
    level: int
    channels: int
    size: tuple[int, ...]       # encoder feature size at this level, per axis (rows, cols for an image)
    encoder_params: int         # blocks + downsampler
    skip_params: int            # fusion of the skips (1x1 projections)
    decoder_params: int         # blocks + upsampler, fusion excluded
    crop: tuple[int, ...]       # pixels cropped from the widest skip at this level, per axis ("valid" only)
    attention: bool


class UNet(ModelMixin, ConfigMixin):
    """A time-conditioned U-Net denoiser; every keyword below is a switch, and the keywords are the schema."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: Any = 32,                          # the size the model is built for: one int (every axis)
                                                        # or one per axis, (H, W) / (D, H, W) / (L,)
        spatial_dims: int = 2,                          # 1 signals (B, C, L), 2 images, 3 volumes (B, C, D, H, W)
        in_channels: int = 3,                           # 1 gray, 3 RGB, any count for scientific data
        out_channels: Optional[int] = None,             # None: same as in_channels
        cond_channels: int = 0,                         # an image condition's channels, concatenated to the sample
                                                        # at the stem (SR3, Palette); 0: none
        base_channels: int = 64,                        # channels of the first level
        channel_mult: Tuple[int, ...] = (1, 2, 2, 2),   # channels per level = base_channels * mult; levels = len
        down_factors: Any = None,                       # per downsampling (levels - 1 entries), 1 or 2 per axis:
                                                        # 2 (every axis) or e.g. [1, 2, 2] (a volume's depth kept);
                                                        # None: 2 on every axis at every level
        num_res_blocks: int = 2,                        # residual blocks per encoder level (decoder: one more)
        dropout: float = 0.0,                           # inside each residual block
        norm: str = "group",                            # "group" (GroupNorm) | "batch" (BatchNorm: local in eval,
                                                        # tiles exact) | "none" (the 2015 U-Net's plain convs)
        norm_groups: int = 32,                          # GroupNorm groups (norm="group"); must divide all channels
        norm_eps: float = 1e-5,                         # norm epsilon (the DDPM checkpoints: 1e-6)
        attention_resolutions: Tuple[int, ...] = (16,), # feature sizes along the first axis (the height of an
                                                        # image, at sample_size) with attention blocks
        attention_levels: Optional[Tuple[int, ...]] = None,  # or the levels (0: finest) with attention blocks,
                                                        # instead of attention_resolutions (anisotropic factors)
        mid_attention: bool = True,                     # bottleneck attention (False: res, res; exact tiles)
        num_heads: int = 4,                             # attention heads ...
        head_dim: Optional[int] = None,                 # ... or channels per head (overrides num_heads)
        downsample: str = "conv",                       # "maxpool" | "avgpool" | "conv" | "conv_tf" (strided) | "blur"
        upsample: str = "nearest",                      # "transposed" | "bilinear" | "nearest" (then a 3x3 conv)
        skip: str = "concat",                           # "concat" | "concat_1x1" | "add" | "none"
        padding: str = "same",                          # "same": p=(k-1)//2 ; "valid": none, skips center-cropped
        time_condition: str = "scale_shift",            # "scale_shift" (AdaGN) | "add" (DDPM) | "none" (no time:
                                                        # a deterministic U-Net, forward(sample) alone)
        flip_sin_to_cos: bool = True,                   # time features cos first (False: sin first, as DDPM)
        freq_shift: float = 0,                          # frequencies exp(-ln(1e4) i / (half - shift)) (DDPM: 1)
        num_classes: Optional[int] = None,              # class-conditional; id num_classes is the "null" class
        augment_dim: int = 0,                           # augmentation labels added to the embedding (EDM's
                                                        # non-leaky augmentation: diffunet.data.augment.AUGMENT_DIM);
                                                        # 0: none
        zero_init: bool = True,                         # residual branches and output conv start at zero
        residual: bool = True,                          # False: blocks without shortcut (the 2015 U-Net's conv pairs)
    ):
        super().__init__()
        for name, table in (("downsample", DOWNSAMPLE), ("upsample", UPSAMPLE), ("skip", SKIP), ("padding", PADDING),
                            ("norm", NORMS)):
            choose(table, locals()[name], name)
        if spatial_dims not in AXES:
            raise ValueError(f"spatial_dims must be 1 (signals), 2 (images) or 3 (volumes), got {spatial_dims!r}")
        dims, size = spatial_dims, as_size(sample_size, spatial_dims)
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1:
            raise ValueError("a U-Net needs at least one level (channel_mult) and one block per level (num_res_blocks)")
        self.factors = factors = resolve_factors(down_factors, levels, dims)
        chans = [base_channels * m for m in channel_mult]
        if norm == "group" and any(c % norm_groups for c in chans):      # the other norms have no groups
            raise ValueError(f"norm_groups={norm_groups} must divide every level's channels {chans}; "
                             f"pick a divisor of {base_channels}")
        self.attention_at = _attention_levels(size, factors, attention_resolutions, attention_levels)
        out_channels = out_channels or in_channels
        timed = time_condition != "none"
        if not timed and num_classes:
            raise ValueError("time_condition='none' has no embedding to add class labels to; set num_classes=None")
        if not timed and augment_dim:
            raise ValueError("time_condition='none' has no embedding to add augmentation labels to; set augment_dim=0")
        if augment_dim < 0:
            raise ValueError(f"augment_dim must be 0 (none) or the labels' width (got {augment_dim})")
        emb_dim = 4 * base_channels
        pad = PADDING[padding](3)
        res = functools.partial(ResBlock, emb_dim=emb_dim, groups=norm_groups, dropout=dropout, padding=padding,
                                time_condition=time_condition, zero=zero_init, residual=residual, eps=norm_eps,
                                norm=norm, dims=dims)

        def attn(c):
            return Attention(c, c // head_dim if head_dim else num_heads, norm_groups, zero_init, eps=norm_eps,
                             norm=norm, dims=dims)

        def block(c_in, c_out, level):
            return Block(res(c_in, c_out), attn(c_out) if level in self.attention_at else None)

        # diffusers' sinusoidal features (UNet2DModel's flip_sin_to_cos and freq_shift): fp32 under autocast too
        self.time_embed = nn.Sequential(Timesteps(base_channels, flip_sin_to_cos, downscale_freq_shift=freq_shift),
                                        nn.Linear(base_channels, emb_dim),
                                        nn.SiLU(), nn.Linear(emb_dim, emb_dim)) if timed else None
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        # EDM's map_augment: what augmented a training image, so that samples (labels zero) are not augmented
        self.map_augment = nn.Linear(augment_dim, emb_dim, bias=False) if augment_dim else None
        if self.map_augment is not None and zero_init:
            zeroed(self.map_augment)                     # training starts as the model without augmentation
        # the flag of a dropped image condition (zeros in its channels), added to the embedding: guidance on it
        self.cond_null = nn.Parameter(torch.zeros(emb_dim)) if cond_channels and timed else None
        self.conv_in = CONV[dims](in_channels + cond_channels, chans[0], 3, padding=pad)

        skip_chans, c = [chans[0]], chans[0]
        self.encoder = nn.ModuleList()
        for i, c_out in enumerate(chans):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(c, c_out, i))
                c = c_out
                skip_chans.append(c)
            down = DOWNSAMPLE[downsample](c, padding, factors[i]) if i < levels - 1 else None
            if down is not None:
                skip_chans.append(c)
            self.encoder.append(EncoderLevel(blocks, down))

        # attention over all pixels makes every output pixel depend on the whole image: off, tiles can be exact
        self.middle = Middle(res(c, c), attn(c) if mid_attention else None, res(c, c))

        self.decoder = nn.ModuleList()
        for i in reversed(range(levels)):
            fuses, blocks = [], []
            for _ in range(num_res_blocks + 1):
                fuse = SKIP[skip](c, skip_chans.pop(), dims)
                fuses.append(fuse)
                blocks.append(block(fuse.out_channels, chans[i], i))
                c = chans[i]
            up = UPSAMPLE[upsample](c, padding, factors[i - 1]) if i > 0 else None
            self.decoder.append(DecoderLevel(fuses, blocks, up))

        self.norm_out = NORMS[norm](c, norm_groups, norm_eps, dims)
        self.conv_out = CONV[dims](c, out_channels, 3, padding=pad)
        if zero_init:
            zeroed(self.conv_out)
        self.gradient_checkpointing = False
        self._tilings: dict[tuple[int, ...], Tiling] = {}
        self.tiling(sample_size)  # a sample_size the network cannot take fails here, at construction

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, sample: torch.Tensor, timestep=None, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, *, cond: torch.Tensor | None = None,
                cond_dropped: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None):
        """Predict from ``sample`` (B, C, H, W), (B, C, L) or (B, C, D, H, W) (``spatial_dims``) at ``timestep``:
        the forms UNet2DModel takes, a number, a 0-d, a (1,) or a (B,) tensor, int or float, on any device. Unlike UNet2DModel, a fractional Python float is used as
        is (UNet2DModel truncates a Python number to an int; it keeps tensors' fractions, as we do).

        ``cond`` (B, cond_channels, *spatial): the image condition of a model built with ``cond_channels``; None, or
        the rows where ``cond_dropped`` (B,) bool is True, stand for "no condition": zeros and the null flag.
        ``augment_labels`` (B, augment_dim): what augmented each training image (``diffunet.data.augment``), for a
        model built with ``augment_dim``; None: zeros, "not augmented", which is how it samples.
        A model with ``time_condition="none"`` takes no timestep (``model(sample)``)."""
        self._check_sample(sample)
        emb = self._embedding(sample, timestep, class_labels)             # (B, 4*base), or None: no time
        emb = self._augmentation(sample, augment_labels, emb)
        x, emb = self._condition(sample, cond, cond_dropped, emb)         # (B, C, *S) -> (B, C + K, *S)

        tiling = self.tiling(sample.shape[2:])
        x = mirror_pad(x, *tiling.pad) if any(tiling.pad) else x

        h = self.conv_in(x)
        skips = [h]                                                     # the skip stack: pushed down, popped up
        for level in self.encoder:
            h, pushed = self._run(level, h, emb)
            skips += pushed
        h = self._run(self.middle, h, emb)
        for level in self.decoder:
            h = self._run(level, h, emb, [skips.pop() for _ in level.fuses])
        h = self.conv_out(F.silu(self.norm_out(h)))

        out = h[(...,) + tuple(slice(c, c + n) for c, n in zip(tiling.crop, tiling.output_size))]
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def _check_sample(self, sample: torch.Tensor) -> None:
        """(B, in_channels, *spatial) with ``spatial_dims`` axes, or one line saying what to give or set."""
        c, dims = self.config.in_channels, self.dims
        if sample.ndim == dims + 2 and sample.shape[1] == c:              # shapes only: no sync
            return
        kind = KINDS[dims]
        if sample.ndim == dims + 2:
            fix = f"give {c}-channel {kind} or set model.in_channels={sample.shape[1]}"
        elif sample.ndim == dims + 1 and sample.shape[0] == c:           # one unbatched input
            fix = "add the batch axis: sample[None]"
        elif sample.ndim - 2 in KINDS and sample.shape[1] == c:
            fix = (f"this is a {dims}D model (model.spatial_dims={dims}) and this looks like a batch of "
                   f"{sample.ndim - 2}D {KINDS[sample.ndim - 2]}; give {kind} or build the model with "
                   f"spatial_dims={sample.ndim - 2}")
        else:
            fix = f"give a batch of {kind}"
        raise ValueError(f"sample must be (B, in_channels, {LETTERS[dims]}) with in_channels={c} (model.in_channels), "
                         f"got {tuple(sample.shape)}; {fix}")

    def _embedding(self, sample, timestep, class_labels) -> torch.Tensor | None:
        """The time (and class) embedding the blocks take; None for a model without time (``time_condition``
        "none"), which takes no timestep."""
        batch = sample.shape[0]
        if self.time_embed is None:
            if timestep is not None:
                raise ValueError("timestep given, but this UNet was built with time_condition='none' (no time)")
            if class_labels is not None:
                raise ValueError("class_labels given, but this UNet was built with num_classes=None")
            return None
        if timestep is None:
            raise ValueError("this UNet is time-conditioned: pass a timestep (or build it with "
                             "time_condition='none')")
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0 or t.shape == (1,):                              # one timestep for the whole batch
            t = t.reshape(()).expand(batch)
        elif t.shape != (batch,):
            raise ValueError(f"timestep must be a number, a 0-d or (1,) tensor, or a ({batch},) tensor, "
                             f"got shape {tuple(t.shape)}")
        # sinusoids in fp32, then the dtype of the layer they feed (UNet2DModel casts to the model's; under autocast
        # that stays fp32): ModelMixin.dtype would walk every submodule, looking for casting hooks, on every call
        sinusoids, mlp = self.time_embed[0], self.time_embed[1:]
        emb = mlp(sinusoids(t).to(mlp[0].weight.dtype))                  # (B,) -> (B, 4*base)
        if self.class_embed is not None:
            if class_labels is None:                                    # unconditional: the "null" class
                class_labels = torch.full((batch,), self.null_class, device=sample.device)
            class_labels = torch.as_tensor(class_labels)
            if class_labels.device.type == "cpu":            # a range check on a GPU tensor would sync
                self._check_labels(class_labels)
            emb = emb + self.class_embed(class_labels.to(sample.device).long())
        elif class_labels is not None:
            raise ValueError("class_labels given, but this UNet was built with num_classes=None")
        return emb

    def _check_labels(self, labels: torch.Tensor) -> None:
        """Class ids in 0..num_classes (num_classes: the null class); nn.Embedding's own error names nothing."""
        n = self.null_class
        outside = labels[(labels < 0) | (labels > n)]
        if outside.numel():
            raise ValueError(f"class_labels must be in 0..{n - 1} (or {n}, no class), got {int(outside[0])}; this "
                             f"UNet was built with num_classes={n} (model.num_classes)")

    def _augmentation(self, sample, labels, emb):
        """The embedding plus the augmentation labels' projection; None labels add nothing (zeros map to zero)."""
        if labels is None:
            return emb
        k, batch = self.config.augment_dim, sample.shape[0]
        if self.map_augment is None:
            raise ValueError("augment_labels given, but this UNet was built with augment_dim=0")
        if labels.shape != (batch, k):
            raise ValueError(f"augment_labels must be (B, augment_dim) = {(batch, k)}, got {tuple(labels.shape)}")
        return emb + self.map_augment(labels.to(emb.device, self.map_augment.weight.dtype)).to(emb.dtype)

    def _condition(self, sample, cond, dropped, emb):
        """The stem's input: ``sample`` with the image condition concatenated (zeros where dropped), and the
        embedding with the null flag added where it was dropped."""
        k, batch = self.config.cond_channels, sample.shape[0]
        if not k:
            if cond is not None:
                raise ValueError("cond given, but this UNet was built with cond_channels=0")
            return sample, emb
        spatial = sample.shape[2:]
        if cond is None:
            cond, dropped = sample.new_zeros(batch, k, *spatial), torch.ones(batch, dtype=torch.bool)
        if cond.shape != (batch, k, *spatial):
            fix = (f"; this UNet takes cond_channels={k} (model.cond_channels): give a {k}-channel condition or set "
                   f"model.cond_channels={cond.shape[1]}" if cond.ndim == sample.ndim and cond.shape[1] != k else "")
            raise ValueError(f"cond must be (B, cond_channels, {LETTERS[self.dims]}) = {(batch, k, *spatial)}, "
                             f"got {tuple(cond.shape)}{fix}")
        cond = cond.to(sample.device, sample.dtype)
        if dropped is not None:
            dropped = dropped.to(sample.device).bool()
            cond = cond.masked_fill(dropped.view(-1, *(1,) * (cond.ndim - 1)), 0)
            if emb is not None:                                         # no time, no flag: zeros only
                emb = emb + dropped[:, None].to(emb.dtype) * self.cond_null.to(emb.dtype)
        return torch.cat([sample, cond], dim=1), emb

    def _run(self, module, *args):
        """Run one level, through activation checkpointing when it is on (one level at a time)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    # ------------------------------------------------------------------------------------------ geometry

    def _axis(self, n: int, axis: int = 0) -> Axis:
        """Walk ``axis`` of a network input of ``n`` pixels through the modules; SizeError if one cannot take it."""
        pad = PADDING[self.config.padding](3)
        stem = conv_size(n, 3, 1, pad)
        skips, encoder, decoder, crop = [stem], [], [], []
        m = stem
        for level in self.encoder:
            for block in level.blocks:
                m = block.size(m, axis)
                skips.append(m)
            encoder.append(m)
            if level.down is not None:
                m = level.down.size(m, axis)
                skips.append(m)
        m = self.middle.size(m, axis)
        for level in self.decoder:
            widest = 0
            for block in level.blocks:
                widest = max(widest, skips.pop() - m)
                m = block.size(m, axis)
            decoder.append(m)
            crop.append(widest)
            if level.up is not None:
                m = level.up.size(m, axis)
        out = conv_size(m, 3, 1, pad)
        if out < 1 or min(crop) < 0:
            raise SizeError(f"size {n} leaves no output")
        return Axis(n, encoder, decoder[::-1], crop[::-1], out)

    def _fits(self, n: int, target: int, axis: int = 0) -> bool:
        try:
            output = self._axis(n, axis).output
        except SizeError:
            return False
        return output >= target if self.valid else output == n

    @property
    def dims(self) -> int:
        """The spatial axes of the data: 1 signals (B, C, L), 2 images (B, C, H, W), 3 volumes (B, C, D, H, W)."""
        return self.config.spatial_dims

    @property
    def timed(self) -> bool:
        """Whether the network takes a timestep: a diffusion denoiser (``time_condition`` other than "none"), not
        a deterministic one (the 2015 U-Net's segmentation)."""
        return self.config.time_condition != "none"

    @property
    def valid(self) -> bool:
        """Whether convolutions are unpadded (``padding="valid"``): outputs smaller than inputs, skips cropped,
        tiles exact."""
        return self.config.padding == "valid"

    @property
    def null_class(self) -> int | None:
        """The class id meaning "no label" (unconditional, and label dropout for guidance); None without classes."""
        return self.config.num_classes or None

    @property
    def image_size(self) -> tuple[int, ...]:
        """The size the model is built for, one int per axis: (H, W) of an image, (D, H, W), (L,)."""
        return as_size(self.config.sample_size, self.dims)

    @property
    def divisors(self) -> tuple[int, ...]:
        """Per axis, what a "same"-padding input size must divide by: the product of that axis's down factors."""
        return tuple(math.prod(f[a] for f in self.factors) for a in range(self.dims))

    def tiling(self, size) -> Tiling:
        """The input size and margins this model needs to produce an output of ``size`` (int, or one per axis).

        "same": the input is the output, and each axis must be divisible by its ``divisors`` (2^(levels-1) at
        the default factors). "valid": the smallest network input whose output covers ``size``, mirror-padded
        around the input.
        """
        size = as_size(size, self.dims)
        if size not in self._tilings:
            margin, pad, crop, inputs = [], [], [], []
            for axis, out in enumerate(size):
                n, f = self._tile_axis(out, axis)
                consumed, extra = (n - f) // 2, f - out
                before = consumed + extra // 2
                inputs.append(n)
                margin.append(consumed)
                pad += [before, n - out - before]
                crop.append(extra // 2)
            self._tilings[size] = Tiling(size, tuple(inputs), tuple(margin), tuple(pad), tuple(crop))
        return self._tilings[size]

    @contextlib.contextmanager
    def fixed_tiling(self, tiling: Tiling):
        """Meanwhile, forward() takes inputs of ``tiling.input_size`` with ``tiling``'s padding and crop instead
        of its own: ``tiles.predict_tiled`` cuts its tiles from the image already mirror-padded as a whole, and a
        tile must not be padded again. The model's own geometry is restored on exit."""
        key = tiling.input_size
        before = self._tilings.get(key)
        self._tilings[key] = tiling
        try:
            yield
        finally:
            if before is None:
                self._tilings.pop(key, None)
            else:
                self._tilings[key] = before

    def _tile_axis(self, out: int, axis: int) -> tuple[int, int]:
        """(network input, network output) for ``axis`` of an input of ``out`` pixels."""
        name = AXES[self.dims][axis]
        limit = out + 64 * 2 ** len(self.encoder) + 4096
        if self.valid:
            for n in range(out, limit):
                if self._fits(n, out, axis):
                    return n, self._axis(n, axis).output
            raise ValueError(f"no input size up to {limit} gives a {name} of {out} with this valid-padding U-Net")
        if self._fits(out, out, axis):
            return out, out
        below = next((n for n in range(out - 1, 0, -1) if self._fits(n, n, axis)), None)
        above = next(n for n in range(out + 1, limit) if self._fits(n, n, axis))
        nearest = f"{below} or {above}" if below else f"{above}"
        levels, divisor = len(self.encoder), self.divisors[axis]
        rule = (f"{levels} levels each side must be divisible by {divisor}" if len(set(self.divisors)) == 1 else
                f"these down_factors the {name} must be divisible by {divisor}")
        raise ValueError(f"{name} {out} does not fit this U-Net: with padding='same' and {rule}; nearest valid "
                         f"{name}s: {nearest} (or use padding='valid')")

    def plan(self, size=None) -> list[PlanRow]:
        """Level by level: channels, feature size, parameters of encoder / skip fusion / decoder, and the crop."""
        tiling = self.tiling(self.config.sample_size if size is None else size)
        axes = [self._axis(n, a) for a, n in enumerate(tiling.input_size)]
        rows = []
        for i, enc in enumerate(self.encoder):
            dec = self.decoder[len(self.decoder) - 1 - i]
            fuse_params = _count(*dec.fuses)
            rows.append(PlanRow(
                level=i,
                channels=self.config.base_channels * self.config.channel_mult[i],
                size=tuple(a.encoder[i] for a in axes),
                encoder_params=_count(enc),
                skip_params=fuse_params,
                decoder_params=_count(dec) - fuse_params,
                crop=tuple(a.crop[i] for a in axes),
                attention=i in self.attention_at,
            ))
        return rows
