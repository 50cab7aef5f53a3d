"""The ``norm`` and ``mid_attention`` switches: every norm builds a working U-Net, "group" is today's model."""

import pytest
import torch
from torch import nn

from conftest import tiny
from diffunet import UNet
from diffunet.config import ModelConfig
from diffunet.model.nn import NORMS, Attention

NORM_MODULES = {"group": nn.GroupNorm, "batch": nn.BatchNorm2d, "none": nn.Identity}
COMBOS = [
    dict(),
    dict(padding="valid", time_condition="none"),
    dict(time_condition="add", mid_attention=False, skip="add"),
    dict(padding="valid", attention_resolutions=(), mid_attention=False, residual=False),
    dict(time_condition="none", downsample="maxpool", upsample="transposed", mid_attention=False),
]


def forward(model, x, t=3):
    return model(x) if model.config.time_condition == "none" else model(x, t)


def warmed(model: UNet, steps: int = 3) -> UNet:
    """Train-mode passes on inputs off (0, 1), so BatchNorm's running statistics are not its initial ones."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            forward(model, 3 * torch.randn(4, model.config.in_channels, 16, 16) + 1)
    return model.eval()


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("norm", list(NORMS))
def test_every_norm_keeps_the_shape(norm, combo):
    model = tiny(norm=norm, **combo)
    for train in (True, False):
        model.train(train)
        for size in ((16, 16), (16, 24)):
            x = torch.randn(2, 1, *size)
            assert forward(model, x).sample.shape == x.shape, (train, size)


@pytest.mark.parametrize("norm", list(NORMS))
def test_every_norm_is_the_one_built(norm):
    model = tiny(norm=norm)
    norms = [n for m in model.modules() if hasattr(m, "norm1") for n in (m.norm1, m.norm2)] + [model.norm_out]
    norms += [m.norm for m in model.modules() if isinstance(m, Attention)]
    # two in each of the 8 residual blocks, one in each of the 4 attention blocks, the output norm
    assert len(norms) == 2 * 8 + 4 + 1 and all(type(n) is NORM_MODULES[norm] for n in norms)


@pytest.mark.parametrize("norm", list(NORMS))
def test_scale_shift_conditions_on_time_after_every_norm(norm):
    model = warmed(tiny(norm=norm, zero_init=False))
    x = torch.randn(2, 1, 16, 16)
    assert (model(x, 3).sample - model(x, 700).sample).abs().max() > 1e-4


def test_group_is_the_default_and_today_s_model():
    torch.manual_seed(1)
    default = tiny(zero_init=False).eval()
    torch.manual_seed(1)
    group = tiny(zero_init=False, norm="group", mid_attention=True).eval()
    keys = list(default.state_dict())
    assert list(group.state_dict()) == keys
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(default(x, 5).sample, group(x, 5).sample)
    # today's layout: 128 tensors, of which the norms' are every GroupNorm's weight and bias
    group_norms = {name for name, m in default.named_modules() if isinstance(m, nn.GroupNorm)}
    assert len(keys) == 128 and len(group_norms) == 21
    assert {k for k in keys if ".norm" in k or k.startswith("norm_out")} == {
        f"{name}.{p}" for name in group_norms for p in ("weight", "bias")}
    assert (default.config.norm, default.config.mid_attention) == ("group", True)
    assert (ModelConfig().norm, ModelConfig().mid_attention) == ("group", True)     # the config schema's defaults


def test_batch_and_none_change_only_the_norms_tensors():
    keys = {name: set(tiny(norm=name).state_dict()) for name in NORMS}
    affine = {k for k in keys["group"] if k.rsplit(".", 2)[-2].startswith("norm")}
    assert keys["none"] == keys["group"] - affine
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    stats = {f"{k.rsplit('.', 1)[0]}.{b}" for k in affine for b in buffers}
    assert keys["batch"] == keys["group"] | stats


def test_mid_attention_false_builds_no_attention_there():
    model = tiny(mid_attention=False)
    assert model.middle.attention is None
    assert not any(k.startswith("middle.attention") for k in model.state_dict())
    assert set(model.state_dict()) == {k for k in tiny().state_dict() if not k.startswith("middle.attention.")}
    plain = tiny(mid_attention=False, attention_resolutions=())
    assert not any(isinstance(m, Attention) for m in plain.modules())


def test_batch_norm_round_trip_keeps_the_running_statistics(tmp_path):
    model = warmed(tiny(norm="batch", zero_init=False, padding="valid"))
    stats = model.norm_out.running_var
    assert (stats - 1).abs().max() > 0.1 and model.norm_out.num_batches_tracked == 3   # not the initial ones
    model.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path).eval()
    assert loaded.config.norm == "batch"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 1, 16, 20)
    assert torch.equal(model(x, 7).sample, loaded(x, 7).sample)


def test_an_unknown_norm_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown norm 'layer'; choose one of 'group', 'batch', 'none'"):
        tiny(norm="layer")


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_norm_groups_are_not_checked_without_group_norm(norm):
    model = tiny(norm=norm, norm_groups=3)                      # 3 divides neither 8 nor 16 channels
    assert model(torch.randn(1, 1, 16, 16), 1).sample.shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="norm_groups=3 must divide"):
        tiny(norm="group", norm_groups=3)
