"""time_condition="none": the U-Net without time (the 2015 segmentation network's layout), forward(sample) alone,
with every switch; the first step of the segmentation issue."""

import itertools

import pytest
import torch

from diffunet import UNet

TINY = dict(sample_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
            attention_resolutions=(), zero_init=False, time_condition="none")


def tiny(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **kw}).eval()


@pytest.mark.parametrize("downsample,upsample,skip,padding", list(itertools.product(
    ("maxpool", "avgpool", "conv", "blur"), ("transposed", "bilinear", "nearest"),
    ("concat", "concat_1x1", "add", "none"), ("same", "valid"))))
def test_every_switch_runs_without_time(downsample, upsample, skip, padding):
    model = tiny(downsample=downsample, upsample=upsample, skip=skip, padding=padding, out_channels=3)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = model(x).sample
    assert out.shape == (2, 3, 16, 16)
    assert not any(name.startswith("time_embed") or ".emb." in name for name, _ in model.named_parameters())


def test_no_time_is_smaller_and_deterministic():
    plain, timed = tiny(), tiny(time_condition="scale_shift")
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in timed.parameters())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).sample, plain(x).sample, rtol=0, atol=0)
        torch.testing.assert_close(plain(x[:1]).sample, plain(x).sample[:1])     # rows independent


def test_without_time_an_image_condition_is_concatenated():
    model = tiny(cond_channels=2)
    assert model.cond_null is None                                  # no embedding, so no null flag
    x, c = torch.randn(2, 1, 16, 16), torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        assert (model(x, cond=c).sample - model(x, cond=c + 1).sample).abs().max() > 1e-4


def test_gradient_checkpointing_and_save_load_without_time(tmp_path):
    model = tiny(padding="valid").train()
    model.enable_gradient_checkpointing()
    x = torch.randn(2, 1, 16, 16)
    model(x).sample.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval().save_pretrained(tmp_path)
    back = UNet.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).sample, model(x).sample, rtol=0, atol=0)


def test_time_errors_are_one_line_each():
    with pytest.raises(ValueError, match="time_condition='none' has no embedding to add class labels to"):
        tiny(num_classes=3)
    with pytest.raises(ValueError, match="timestep given, but this UNet was built with time_condition='none'"):
        tiny()(torch.randn(1, 1, 16, 16), 5)
    with pytest.raises(ValueError, match="this UNet is time-conditioned: pass a timestep"):
        tiny(time_condition="add")(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="time_condition"):
        tiny(time_condition="film")
