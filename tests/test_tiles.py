"""Overlap-tile inference: valid-padding tiles stitch to the whole-image output exactly; same-padding tiles blend."""

import pytest
import torch
from torch import nn

from diffunet import UNet
from diffunet.model.tiles import hann_ramp, predict_tiled, tile_boxes

SIZE = (37, 53)


class Affine(nn.Module):
    """A per-channel scale and shift: GroupNorm with fixed statistics, a local operation."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))

    def forward(self, x):
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def local(model: UNet) -> UNet:
    """The same network with its two global operations made local: GroupNorm (statistics over the whole map)
    becomes a per-channel affine and the bottleneck's attention (over all pixels) the identity. What is left,
    convs, pools, up-samplers, skip crops and the mirror padding, is what tiling must reproduce exactly."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, Affine(child.num_channels))
    model.middle.attention = nn.Identity()
    return model.double().eval()


def unet(**overrides) -> UNet:
    kwargs = dict(sample_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  norm_groups=4, attention_resolutions=(), zero_init=False, padding="valid", time_condition="none",
                  downsample="maxpool", upsample="transposed")
    kwargs.update(overrides)
    return UNet(**kwargs)


# ------------------------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("tile", [16, 24, (8, 20), 60])
def test_valid_boxes_cover_every_pixel_once(tile):
    count = torch.zeros(SIZE, dtype=torch.int64)
    boxes = tile_boxes(SIZE, tile)
    shape = tuple(min(t, n) for t, n in zip((tile, tile) if isinstance(tile, int) else tile, SIZE))
    for (rows, cols), (r_in, c_in) in boxes:
        count[rows, cols] += 1
        assert (r_in.stop - r_in.start, c_in.stop - c_in.start) == shape            # every read box has one size
        assert r_in.start <= rows.start and rows.stop <= r_in.stop and c_in.start <= cols.start
        assert 0 <= r_in.start and r_in.stop <= SIZE[0] and 0 <= c_in.start and c_in.stop <= SIZE[1]
    assert (count == 1).all()


def test_overlapping_boxes_overlap_and_cover():
    count = torch.zeros(SIZE, dtype=torch.int64)
    for (rows, cols), read in tile_boxes(SIZE, 16, overlap=4):
        assert (rows, cols) == read and rows.stop - rows.start == 16 and cols.stop - cols.start == 16
        count[rows, cols] += 1
    assert count.min() == 1 and count.max() == 4                         # corners of four tiles
    with pytest.raises(ValueError, match="overlap must be in"):
        tile_boxes(SIZE, 16, overlap=16)


def test_hann_ramp_is_positive_and_flat_inside():
    w = hann_ramp(16, 4)
    assert (w > 0).all() and (w[4:12] == 1).all() and torch.equal(w, w.flip(0))
    assert (w[:4].diff() > 0).all()


# ---------------------------------------------------------------------------------------------- valid

@pytest.mark.parametrize("tile", [16, 24, (8, 20), 13, (11, 21)])   # 13, 11, 21: off the pooling grid
@pytest.mark.parametrize("levels", [(1, 2), (1, 2, 2)])
def test_valid_tiles_equal_the_whole_image(tile, levels):
    model = local(unet(channel_mult=levels))
    x = torch.randn(2, 1, *SIZE, dtype=torch.float64)
    whole = model(x).sample
    tiled = predict_tiled(model, x, tile)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() < 1e-10
    assert torch.equal(model(x).sample, whole)                 # forward's own geometry is left as it was


def test_valid_tiles_with_timestep_and_cond():
    model = local(unet(time_condition="scale_shift", cond_channels=2, out_channels=3))
    x, cond = torch.randn(2, 1, *SIZE, dtype=torch.float64), torch.randn(2, 2, *SIZE, dtype=torch.float64)
    t, dropped = torch.tensor([3, 700]), torch.tensor([False, True])
    for kwargs in (dict(timestep=t), dict(timestep=250, cond=cond), dict(timestep=t, cond=cond, cond_dropped=dropped)):
        whole = model(x, **kwargs).sample
        tiled = predict_tiled(model, x, 16, batch_size=3, **kwargs)
        assert tiled.shape == (2, 3, *SIZE)
        assert (tiled - whole).abs().max() < 1e-10, kwargs
    assert (predict_tiled(model, x, 16, timestep=t, cond=cond) - model(x, t).sample).abs().max() > 1e-3  # cond used
    f = lambda x, cond: model(x, 250, cond=cond).sample                    # noqa: E731 (a wrapper of the model)
    tiled = predict_tiled(f, x, 16, geometry=model, cond=cond)
    assert (tiled - model(x, 250, cond=cond).sample).abs().max() < 1e-10


def exact(norm: str, **overrides) -> UNet:
    """A real UNet with the switches that make tiles exact, in float64 and eval mode: the norm "batch" (fitted
    running statistics, a per-channel affine in eval) or "none", and no attention, in the blocks or the bottleneck."""
    model = unet(**{"channel_mult": (1, 2, 2), "norm": norm, "mid_attention": False, **overrides}).double()
    timed = model.config.time_condition != "none"
    with torch.no_grad():                                   # train-mode passes: running statistics off (0, 1)
        for _ in range(3):
            x = 3 * torch.randn(4, 1, 40, 40, dtype=torch.float64) + 1
            kwargs = dict(cond=torch.randn(4, model.config.cond_channels, 40, 40, dtype=torch.float64)
                          ) if model.config.cond_channels else {}
            model(x, 100, **kwargs) if timed else model(x)
    if norm == "batch":
        assert (model.norm_out.running_var - 1).abs().max() > 0.1         # statistics the tiles must not re-estimate
    return model.eval()


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_valid_tiles_of_a_real_unet_are_exact_with_local_switches(norm):
    model = exact(norm)
    x = torch.randn(1, 1, 100, 90, dtype=torch.float64)                     # larger than the tile, not a multiple
    whole = model(x).sample
    assert (predict_tiled(model, x, 40) - whole).abs().max() < 1e-10
    assert whole.abs().max() > 1e-3                                         # not a vacuous comparison


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_valid_tiles_of_a_real_timed_unet_with_cond_are_exact(norm):
    model = exact(norm, time_condition="scale_shift", cond_channels=2, out_channels=3)
    x, cond = torch.randn(2, 1, 100, 90, dtype=torch.float64), torch.randn(2, 2, 100, 90, dtype=torch.float64)
    t = torch.tensor([3, 700])
    whole = model(x, t, cond=cond).sample
    tiled = predict_tiled(model, x, 40, timestep=t, cond=cond)
    assert tiled.shape == (2, 3, 100, 90) and (tiled - whole).abs().max() < 1e-10
    assert (whole - model(x, 250, cond=cond).sample).abs().max() > 1e-4    # the timestep reaches the blocks


@pytest.mark.parametrize("switches", [dict(mid_attention=True), dict(attention_resolutions=(8,))],
                         ids=["mid_attention", "attention_resolutions"])
def test_valid_tiles_with_attention_are_not_exact_even_with_batch_norm(switches):
    """Attention over all pixels sees the tile, not the image: the switch that must be off with a local norm."""
    model = exact("batch", **switches)
    x = torch.randn(1, 1, 100, 90, dtype=torch.float64)
    assert (predict_tiled(model, x, 40) - model(x).sample).abs().max() > 1e-6


def test_valid_tiles_of_a_groupnorm_unet_are_close_not_equal():
    """GroupNorm's statistics are the tile's, not the image's: the one reason a real UNet's tiles are not exact."""
    model = unet().double().eval()
    x = torch.randn(1, 1, *SIZE, dtype=torch.float64)
    diff = (predict_tiled(model, x, 24) - model(x).sample).abs().max()
    assert diff > 1e-6


def test_batch_size_does_not_change_the_result():
    model = local(unet())
    x = torch.randn(2, 1, *SIZE, dtype=torch.float64)
    ref = predict_tiled(model, x, 16, batch_size=1)
    for batch_size in (2, 5, 100):
        assert torch.equal(predict_tiled(model, x, 16, batch_size=batch_size), ref)
    same = local(unet(padding="same"))
    ref = predict_tiled(same, x[..., :36, :52], 16, batch_size=1)
    assert torch.equal(predict_tiled(same, x[..., :36, :52], 16, batch_size=4), ref)


def test_output_keeps_dtype_and_device():
    model = unet().float().eval()
    y = predict_tiled(model, torch.randn(1, 1, *SIZE), 16)
    assert y.dtype == torch.float32 and y.device.type == "cpu" and y.shape == (1, 1, *SIZE)
    assert not y.requires_grad


# ----------------------------------------------------------------------------------------------- same

def test_same_tiles_blend_without_seams():
    model = local(unet(padding="same"))
    x = torch.randn(1, 1, 48, 64, dtype=torch.float64)
    whole = model(x).sample
    blended = predict_tiled(model, x, 16, overlap=6)
    naive = predict_tiled(model, x, 16, overlap=0)                      # butted tiles: zero padding at each seam
    inner = (..., slice(4, -4), slice(4, -4))
    err_blended, err_naive = ((y - whole)[inner].abs() for y in (blended, naive))
    assert err_blended.mean() < 0.6 * err_naive.mean()
    assert err_blended.max() < err_naive.max()
    assert (predict_tiled(model, x, 16) - whole)[inner].abs().mean() < err_naive.mean()   # default overlap: 4


def test_same_tile_that_does_not_fit_names_the_nearest():
    model = local(unet(padding="same", channel_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="nearest valid heights: 12 or 16"):
        predict_tiled(model, torch.randn(1, 1, 40, 40, dtype=torch.float64), 14)


def test_valid_refuses_an_overlap():
    with pytest.raises(ValueError, match="overlap is for padding='same'"):
        predict_tiled(local(unet()), torch.randn(1, 1, *SIZE, dtype=torch.float64), 16, overlap=4)
