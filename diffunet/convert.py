"""diffusers' UNet2DModel of the DDPM family -> our UNet.

The DDPM family is the layout of the original DDPM checkpoints (google/ddpm-cifar10-32, -celebahq-256, -church-256,
-bedroom-256): DownBlock2D / AttnDownBlock2D levels, the up blocks mirroring them, a UNetMidBlock2D, sinusoidal
time features. The conversion is two tables: ``config_from_unet2d`` maps each UNet2DModel option to one of our
switches (or refuses it, naming it), and ``KEY_MAP`` renames each of our state-dict keys to diffusers'. The
outputs are equal to float rounding (tests/test_convert.py measures it per config).

Folders are read by ``pretrained.load_unet`` (ours, or a UNet2DModel converted here), for ``train.init_from``,
``sample.py`` and the export alike: every way a folder can be wrong is one CheckpointError line naming the file,
and no file's code ever runs.
"""

from __future__ import annotations

import inspect
import re

import torch
from diffusers import UNet2DModel

from .model.tables import as_size
from .model.unet import UNet

# Per level: UNet2DModel's block type -> whether the level has attention. Up blocks run deepest level first.
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}
TIME_CONDITION = {"default": "add", "scale_shift": "scale_shift"}      # resnet_time_scale_shift -> ours
DOWNSAMPLE = {1: "conv", 0: "conv_tf"}                                # downsample_padding -> ours

UNET2D_DEFAULTS = {name: p.default for name, p in inspect.signature(UNet2DModel.__init__).parameters.items()
                   if p.default is not inspect.Parameter.empty}

# UNet2DModel options we have no switch for, and the value under which our UNet computes the same thing.
FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D",
         "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu",
         "add_attention": True, "class_embed_type": None, "num_class_embeds": None}

# Our state-dict key -> UNet2DModel's: every (pattern, replacement) is applied in turn, module paths first, then
# the parts whose names differ. Our attention's q, k, v are one 1x1 conv (``qkv``): diffusers' to_q, to_k, to_v
# Linear weights stacked in that order, reshaped to (3C, C, 1, 1); its ``out`` is ``to_out.0`` so reshaped.
KEY_MAP = [
    (r"^time_embed\.1\.", "time_embedding.linear_1."),
    (r"^time_embed\.3\.", "time_embedding.linear_2."),
    (r"^encoder\.(\d+)\.blocks\.(\d+)\.res\.", r"down_blocks.\1.resnets.\2."),
    (r"^encoder\.(\d+)\.blocks\.(\d+)\.attention\.", r"down_blocks.\1.attentions.\2."),
    (r"^encoder\.(\d+)\.down\.", r"down_blocks.\1.downsamplers.0."),
    (r"^middle\.first\.", "mid_block.resnets.0."),
    (r"^middle\.attention\.", "mid_block.attentions.0."),
    (r"^middle\.second\.", "mid_block.resnets.1."),
    (r"^decoder\.(\d+)\.blocks\.(\d+)\.res\.", r"up_blocks.\1.resnets.\2."),
    (r"^decoder\.(\d+)\.blocks\.(\d+)\.attention\.", r"up_blocks.\1.attentions.\2."),
    (r"^decoder\.(\d+)\.up\.", r"up_blocks.\1.upsamplers.0."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"(resnets\.\d+)\.emb\.", r"\1.time_emb_proj."),
    (r"(resnets\.\d+)\.shortcut\.", r"\1.conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(attentions\.\d+)\.out\.", r"\1.to_out.0."),
]
QKV = ("to_q", "to_k", "to_v")


def their_keys(key: str) -> list[str]:
    """The UNet2DModel state-dict keys our ``key`` is made of (three for a ``qkv`` projection, else one)."""
    for pattern, replacement in KEY_MAP:
        key = re.sub(pattern, replacement, key)
    if re.search(r"attentions\.\d+\.qkv\.", key):
        return [key.replace(".qkv.", f".{name}.") for name in QKV]
    return [key]


def config_from_unet2d(config) -> dict:
    """Our ``UNet`` keywords for a UNet2DModel config (options it omits take UNet2DModel's defaults); a ValueError
    naming the first option or block type that has no counterpart."""
    cfg = {**UNET2D_DEFAULTS, **config}
    for key, want in FIXED.items():
        if cfg[key] != want:
            raise ValueError(f"UNet2DModel option {key}={cfg[key]!r} has no counterpart in diffunet's UNet "
                             f"(it converts {key}={want!r})")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for types, table in ((down, DOWN_BLOCKS), (up, UP_BLOCKS)):
        unknown = [t for t in types if t not in table]
        if unknown:
            raise ValueError(f"UNet2DModel block type {unknown[0]} cannot be converted; diffunet converts "
                             f"{', '.join(table)}")
    attention = [DOWN_BLOCKS[t] for t in down]
    if [UP_BLOCKS[t] for t in reversed(up)] != attention:
        raise ValueError(f"UNet2DModel up_block_types {up} do not mirror down_block_types {down} "
                         "(our UNet has attention at the same levels on both sides)")
    chans = list(cfg["block_out_channels"])
    if any(c % chans[0] for c in chans):
        raise ValueError(f"UNet2DModel block_out_channels {chans} are not multiples of the first "
                         "(our channel_mult is an integer per level)")
    if cfg["time_embedding_dim"] not in (None, 4 * chans[0]):
        raise ValueError(f"UNet2DModel option time_embedding_dim={cfg['time_embedding_dim']} has no counterpart "
                         f"(our time embedding is 4 x block_out_channels[0] = {4 * chans[0]} wide)")
    shift = cfg["resnet_time_scale_shift"]
    if shift not in TIME_CONDITION:
        raise ValueError(f"UNet2DModel option resnet_time_scale_shift={shift!r} cannot be converted; diffunet "
                         f"converts {', '.join(map(repr, TIME_CONDITION))}")
    # the mid block's attention has a GroupNorm only where this resolves to a group count (ours always has one)
    attn_groups = cfg["attn_norm_num_groups"] or (cfg["norm_num_groups"] if shift == "default" else None)
    if attn_groups != cfg["norm_num_groups"]:
        raise ValueError(f"UNet2DModel option attn_norm_num_groups={cfg['attn_norm_num_groups']} (with "
                         f"resnet_time_scale_shift={shift!r}) has no counterpart: our attention norms use "
                         f"norm_num_groups={cfg['norm_num_groups']}")
    padding = cfg["downsample_padding"]
    if padding not in DOWNSAMPLE:
        raise ValueError(f"UNet2DModel option downsample_padding={padding} cannot be converted (0 or 1)")
    if cfg["sample_size"] is None:
        raise ValueError("UNet2DModel has no sample_size; set it in its config (our attention levels are "
                         "placed by feature height)")
    height = as_size(cfg["sample_size"])[0]
    head_dim = cfg["attention_head_dim"]           # None: one head as wide as the block (the DDPM checkpoints)
    return dict(
        sample_size=cfg["sample_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        cond_channels=0, base_channels=chans[0], channel_mult=[c // chans[0] for c in chans],
        num_res_blocks=cfg["layers_per_block"], dropout=cfg["dropout"],
        norm="group", norm_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"],
        attention_resolutions=[height // 2**i for i, a in enumerate(attention) if a], mid_attention=True,
        num_heads=1, head_dim=head_dim, downsample=DOWNSAMPLE[padding], upsample="nearest", skip="concat",
        padding="same", time_condition=TIME_CONDITION[shift], flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"], num_classes=None, augment_dim=0, zero_init=False, residual=True)


def state_dict_from_unet2d(theirs: dict[str, torch.Tensor], model: UNet) -> dict[str, torch.Tensor]:
    """``model``'s state dict made of a UNet2DModel's (``KEY_MAP``); a ValueError for a missing, left-over or
    misshapen key."""
    out, used = {}, set()
    for key, ours in model.state_dict().items():
        names = their_keys(key)
        missing = [n for n in names if n not in theirs]
        if missing:
            raise ValueError(f"the UNet2DModel weights have no {missing[0]} (for our {key})")
        value = torch.cat([theirs[n] for n in names]) if len(names) > 1 else theirs[names[0]]
        if value.numel() != ours.numel():
            raise ValueError(f"UNet2DModel weight {names[0]} has shape {tuple(value.shape)}, our {key} "
                             f"{tuple(ours.shape)}")
        out[key] = value.reshape(ours.shape)
        used.update(names)
    left = sorted(set(theirs) - used)
    if left:
        raise ValueError(f"UNet2DModel weight {left[0]} has no place in our UNet ({len(left)} unused)")
    return out


def from_unet2d(model: UNet2DModel) -> UNet:
    """Our UNet with the architecture and weights of a UNet2DModel: same dtype, outputs equal to float rounding;
    ValueError (one line) for a model that cannot be mapped. A folder holding one is read by
    ``diffunet.from_unet2d`` (``pretrained.load_unet``)."""
    if not isinstance(model, UNet2DModel):
        raise TypeError(f"convert.from_unet2d takes a UNet2DModel, got {type(model).__name__}: read a folder with "
                        f"diffunet.from_unet2d")
    unet = UNet(**config_from_unet2d(model.config))
    unet.load_state_dict(state_dict_from_unet2d(model.state_dict(), unet))
    return unet.to(model.dtype).train(model.training)
