"""Properties of the U-Net over its whole option grid."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from diffunet import UNet
from diffunet.model.nn import DOWNSAMPLE, SKIP, UPSAMPLE, mirror_pad

GRID = list(itertools.product(DOWNSAMPLE, UPSAMPLE, SKIP, ("same", "valid")))


@pytest.mark.parametrize("down,up,skip,padding", GRID)
def test_output_shape_equals_input_shape(down, up, skip, padding):
    model = tiny(downsample=down, upsample=up, skip=skip, padding=padding, zero_init=False, in_channels=2,
                 out_channels=3, sample_size=(8, 12))
    for size in [(8, 12), (16, 16)]:
        x = torch.randn(2, 2, *size)
        y = model(x, torch.tensor([3, 700])).sample
        assert y.shape == (2, 3, *size)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_output_depends_on_time_and_class(padding):
    model = tiny(padding=padding, num_classes=10, zero_init=False).eval()
    x = torch.randn(2, 1, 16, 16)
    a = model(x, 10, torch.tensor([1, 2])).sample
    assert not torch.allclose(a, model(x, 900, torch.tensor([1, 2])).sample)
    assert not torch.allclose(a, model(x, 10, torch.tensor([3, 4])).sample)
    assert not torch.allclose(a, model(x, 10).sample)                       # no labels: the null class
    assert torch.allclose(model(x, 10, torch.tensor([10, 10])).sample, model(x, 10).sample)


def test_timestep_forms_agree():
    model = tiny(zero_init=False).eval()
    x = torch.randn(3, 1, 16, 16)
    ref = model(x, torch.tensor([250, 250, 250])).sample
    for t in (250, 250.0, torch.tensor(250), torch.tensor(250.0), torch.tensor([250.0] * 3)):
        assert torch.allclose(model(x, t).sample, ref, atol=1e-6)
    for t in (torch.tensor([250]), torch.tensor([250.0])):                   # (1,): broadcast, as UNet2DModel does
        assert torch.allclose(model(x, t).sample, ref, atol=1e-6)
    frac = model(x, 250.5).sample                                            # continuous time is used as is
    assert not torch.allclose(frac, ref)
    with pytest.raises(ValueError, match="timestep must be"):
        model(x, torch.tensor([1, 2]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_model_runs_in_its_own_dtype_without_autocast(dtype):
    model = tiny(zero_init=False, num_classes=3).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = model(x, 10, torch.tensor([0, 1])).sample
        out = model.to(dtype)(x.to(dtype), 10, torch.tensor([0, 1])).sample
    assert out.dtype == dtype and (out.double() - ref.double()).abs().max() < (1e-5 if dtype == torch.float64 else 0.1)


def test_zero_init_gives_zero_output_and_identity_branches():
    model = tiny(skip="concat_1x1")
    assert torch.count_nonzero(model(torch.randn(2, 1, 16, 16), 5).sample) == 0
    block = model.encoder[0].blocks[0].res
    x = torch.randn(2, 8, 16, 16)
    assert torch.equal(block(x, torch.randn(2, 32)), x)                      # residual branch starts as identity


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_residual_false_is_the_branch_alone(padding):
    from diffunet.model.nn import ResBlock

    kw = dict(emb_dim=32, groups=4, dropout=0.0, padding=padding, time_condition="scale_shift", zero=True)
    torch.manual_seed(1)
    res = ResBlock(8, 8, **kw, residual=True)
    torch.manual_seed(1)
    plain = ResBlock(8, 8, **kw, residual=False)
    assert plain.shortcut is None and torch.count_nonzero(plain.conv2.weight) > 0     # never zeroed: it is all
    plain.conv2.load_state_dict(res.conv2.state_dict())
    x, e = torch.randn(2, 8, 16, 16), torch.randn(2, 32)
    crop = 0 if padding == "same" else 2
    assert torch.allclose(res(x, e) - plain(x, e), x[..., crop:16 - crop, crop:16 - crop])
    model = tiny(residual=False, padding=padding, channel_mult=(1, 2, 2))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny(padding=padding,
                                                                                     channel_mult=(1, 2, 2)).parameters())
    assert model(torch.randn(2, 1, 16, 16), 5).sample.shape == (2, 1, 16, 16)


def test_concat_1x1_has_fewer_parameters_than_concat():
    def count(m):
        return sum(p.numel() for p in m.parameters())
    for kw in [dict(), dict(base_channels=64, channel_mult=(1, 2, 2, 2), norm_groups=32, attention_resolutions=())]:
        concat, reduced = count(tiny(skip="concat", **kw)), count(tiny(skip="concat_1x1", **kw))
        assert reduced < concat
    plan_c, plan_r = tiny(skip="concat").plan(), tiny(skip="concat_1x1").plan()
    for c, r in zip(plan_c, plan_r):                                         # the saving shows at every level
        assert r.skip_params > 0 == c.skip_params
        assert r.skip_params + r.decoder_params < c.decoder_params


def test_valid_padding_arithmetic_by_hand():
    # levels (1, 2), one block, maxpool, transposed conv, no padding. Per axis, for a network input n:
    # stem 3x3: n-2 | enc0 res (2 convs): n-6 | maxpool: (n-6)/2 = m | enc1 res: m-4 | middle 2 res: m-12
    # dec1 2 res: m-20 | up x2: 2m-40 = n-46 | dec0 2 res: n-54 | out 3x3: n-56.  So the margin is 28 per side,
    # n must be even, and a 32-pixel output needs n = 88, mirror-padded 28 px on each side.
    model = tiny(padding="valid", downsample="maxpool", upsample="transposed", attention_resolutions=())
    t = model.tiling(32)
    assert t.input_size == (88, 88) and t.margin == (28, 28) and t.pad == (28, 28, 28, 28) and t.crop == (0, 0)
    # a 33-pixel output: n = 89 is odd (maxpool), so n = 90, giving 34; one extra pixel goes to the end.
    t = model.tiling((33, 32))
    assert t.input_size == (90, 88) and t.pad == (28, 29, 28, 28) and t.crop == (0, 0)
    rows = model.plan(32)
    # skips at n=88: stem 86, enc0 82, pool 41, enc1 37. Decoder level 1 pops 37 and 41 at sizes 29, 25;
    # decoder level 0 pops 82 and 86 at sizes 42, 38: the widest crops are 16 and 48 pixels in total.
    assert [r.size for r in rows] == [(82, 82), (37, 37)]
    assert [r.crop for r in rows] == [(48, 48), (16, 16)]


def test_plan_matches_the_shapes_the_forward_pass_produces():
    for kw in [dict(padding="same"), dict(padding="valid", downsample="conv", upsample="bilinear")]:
        model = tiny(sample_size=(16, 24), **kw)
        seen = []
        hooks = [lvl.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
                 for lvl in model.encoder]
        model(torch.randn(1, 1, 16, 24), 1)
        for h in hooks:
            h.remove()
        assert seen == [r.size for r in model.plan()]
        assert model.plan()[0].channels == 8 and model.plan()[1].channels == 16


def test_bad_size_names_the_nearest_valid_sizes():
    model = tiny(channel_mult=(1, 2, 2, 2), attention_resolutions=())       # divisible by 8
    with pytest.raises(ValueError, match=r"height 30 .* divisible by 8; nearest valid heights: 24 or 32"):
        model(torch.randn(1, 1, 30, 16), 1)
    with pytest.raises(ValueError, match=r"width 5 .* nearest valid widths: 8"):
        model(torch.randn(1, 1, 16, 5), 1)
    with pytest.raises(ValueError, match="nearest valid heights: 8 or 16"):
        tiny(sample_size=12, channel_mult=(1, 2, 2, 2), attention_resolutions=())
    assert tiny(sample_size=12, channel_mult=(1, 2, 2, 2), attention_resolutions=(), padding="valid")


@pytest.mark.parametrize("kwargs,message", [
    (dict(skip="cat"), "unknown skip 'cat'; choose one of 'concat', 'concat_1x1', 'add', 'none'"),
    (dict(downsample="stride"), "unknown downsample 'stride'"),
    (dict(upsample="pixelshuffle"), "unknown upsample"),
    (dict(padding="reflect"), "unknown padding"),
    (dict(time_condition="film"), "unknown time_condition"),
    (dict(norm_groups=3), "norm_groups=3 must divide"),
    (dict(attention_resolutions=(5,)), r"attention_resolutions \[5\] match no level"),
    (dict(num_heads=3), "cannot be split into 3 heads"),
])
def test_bad_switches_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_class_labels_need_num_classes():
    with pytest.raises(ValueError, match="num_classes=None"):
        tiny()(torch.randn(1, 1, 16, 16), 1, torch.tensor([0]))


def test_head_dim_sets_heads():
    assert tiny(head_dim=4).middle.attention.heads == 4                      # 16 channels / 4


def test_save_load_round_trip(tmp_path):
    model = tiny(sample_size=(8, 16), num_classes=3, skip="add", padding="valid", zero_init=False).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = UNet.from_pretrained(tmp_path).eval()
    x, labels = torch.randn(2, 1, 8, 16), torch.tensor([0, 2])
    assert torch.equal(model(x, 7, labels).sample, loaded(x, 7, labels).sample)
    assert loaded.config.sample_size == [8, 16] and loaded.config.skip == "add"


@pytest.mark.parametrize("h,w", [(3, 5), (1, 5), (4, 1), (1, 1), (2, 2)])
def test_mirror_pad_matches_numpy_reflect_for_any_margin(h, w):
    x = torch.arange(2 * h * w, dtype=torch.float32).reshape(1, 2, h, w)
    for pads in [(1, 1, 2, 2), (7, 4, 13, 0), (2, 9, 1, 11), (0, 0, 0, 3), (5, 0, 0, 0)]:
        top, bottom, left, right = pads
        want = np.pad(x.numpy(), ((0, 0), (0, 0), (top, bottom), (left, right)), mode="reflect")
        assert np.array_equal(mirror_pad(x, *pads).numpy(), want), (h, w, pads)


def test_valid_padding_takes_one_pixel_sides():
    # the overlap-tile margin of a one-pixel side is that pixel repeated (mirror_pad looped forever on it)
    model = tiny(padding="valid").eval()
    for size in [(1, 1), (1, 7), (5, 1)]:
        assert model(torch.randn(2, 1, *size), 3).sample.shape == (2, 1, *size)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(zero_init=False)
    x = torch.randn(2, 1, 16, 16)

    def grads():
        model.zero_grad()
        model(x, 3).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_ddpm_checkpoints_switches():
    # "conv_tf": TensorFlow's stride-2 "SAME" padding, one zero row and column after the image and none before
    down, x = DOWNSAMPLE["conv_tf"](4, "same"), torch.randn(1, 4, 8, 8)
    w, b = down.conv.weight, down.conv.bias
    assert torch.equal(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, stride=2))
    assert not torch.allclose(down(x), F.conv2d(x, w, b, stride=2, padding=1)) and down.size(8) == 4
    # sin first, frequencies exp(-ln(10^4) i / (half - 1)); base_channels=8: 4 frequencies
    t = torch.tensor([0.0, 7.0, 999.0])
    args = t[:, None] * torch.exp(-math.log(10000.0) * torch.arange(4.0) / 3)[None]
    embed = tiny(flip_sin_to_cos=False, freq_shift=1).time_embed[0]
    assert torch.allclose(embed(t), torch.cat([args.sin(), args.cos()], dim=-1))
    norms = [m for m in tiny(norm_eps=1e-6).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 5 and all(m.eps == 1e-6 for m in norms)


def test_inputs_the_model_was_not_built_for_are_one_value_error_naming_the_config_key():
    with pytest.raises(ValueError) as e:
        tiny()(torch.randn(2, 3, 16, 16), 3)
    assert str(e.value) == ("sample must be (B, in_channels, H, W) with in_channels=1 (model.in_channels), got "
                            "(2, 3, 16, 16); give 1-channel images or set model.in_channels=3")
    with pytest.raises(ValueError, match=r"got \(1, 16, 16\); add the batch axis: sample\[None\]$"):
        tiny()(torch.randn(1, 16, 16), 3)
    with pytest.raises(ValueError) as e:
        tiny(cond_channels=1)(torch.randn(2, 1, 16, 16), 3, cond=torch.randn(2, 3, 16, 16))
    assert str(e.value).endswith("; this UNet takes cond_channels=1 (model.cond_channels): give a 1-channel "
                                 "condition or set model.cond_channels=3")
    labelled, x = tiny(num_classes=10), torch.randn(2, 1, 16, 16)
    for bad, shown in ((torch.tensor([3, 11]), 11), (torch.tensor([-1, 2]), -1)):
        with pytest.raises(ValueError) as e:
            labelled(x, 3, class_labels=bad)
        assert str(e.value) == (f"class_labels must be in 0..9 (or 10, no class), got {shown}; this UNet was built "
                                f"with num_classes=10 (model.num_classes)")
    assert labelled(x, 3, class_labels=torch.tensor([0, 10])).sample.shape == x.shape      # 10: the null class
    assert torch.equal(labelled(x, 3, class_labels=7).sample, labelled(x, 3, class_labels=torch.tensor([7, 7])).sample)
