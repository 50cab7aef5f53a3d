"""Image conditions: UNet(cond_channels=K) and what DiffunetPipeline does with image= / mask_image= (super-resolution,
inpainting, RePaint), tiny random models on the CPU."""

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, RePaintScheduler
from PIL import Image

from diffunet import UNet
from diffunet.model.pipeline import DiffunetPipeline, inpainting_condition, upsample_condition
from diffunet.plan import format_plan

TINY = dict(sample_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
            attention_resolutions=(), zero_init=False)


def tiny(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **kw}).eval()


@pytest.mark.parametrize("downsample,upsample,skip,padding", list(itertools.product(
    ("maxpool", "avgpool", "conv", "blur"), ("transposed", "bilinear", "nearest"), ("concat", "concat_1x1", "add",
                                                                                     "none"), ("same", "valid"))))
def test_every_switch_takes_a_condition(downsample, upsample, skip, padding):
    model = tiny(cond_channels=2, downsample=downsample, upsample=upsample, skip=skip, padding=padding,
                 num_classes=3)
    x, c = torch.randn(2, 1, 16, 16), torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        out = model(x, 10, torch.tensor([0, 2]), cond=c).sample
        other = model(x, 10, torch.tensor([0, 2]), cond=c + 1).sample
    assert out.shape == x.shape
    assert (out - other).abs().max() > 1e-4                         # the condition reaches the output


def test_a_dropped_condition_is_zeros_plus_the_null_flag():
    model = tiny(cond_channels=1)
    with torch.no_grad():
        model.cond_null.normal_()
        x, c = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
        given = model(x, 5, cond=c).sample
        mixed = model(x, 5, cond=c, cond_dropped=torch.tensor([False, True, False])).sample
        none = model(x, 5).sample                                   # no condition at all: every row dropped
        zeros = model(x, 5, cond=torch.zeros_like(c)).sample        # zeros but not flagged: another input
    torch.testing.assert_close(mixed[[0, 2]], given[[0, 2]])
    torch.testing.assert_close(mixed[1], none[1])
    assert (zeros - none).abs().max() > 1e-4


def test_cond_channels_zero_is_todays_model():
    plain, zero = tiny(), tiny(cond_channels=0)
    assert plain.state_dict().keys() == zero.state_dict().keys()
    assert "cond_null" not in plain.state_dict() and "cond_null" in tiny(cond_channels=1).state_dict()
    with pytest.raises(ValueError, match="cond_channels=0"):
        plain(torch.randn(1, 1, 16, 16), 3, cond=torch.randn(1, 1, 16, 16))


def test_a_condition_of_the_wrong_shape_is_one_error():
    model = tiny(cond_channels=2)
    with pytest.raises(ValueError, match=r"cond must be \(B, cond_channels, H, W\) = \(1, 2, 16, 16\), "
                                         r"got \(1, 1, 16, 16\)"):
        model(torch.randn(1, 1, 16, 16), 3, cond=torch.randn(1, 1, 16, 16))


def test_cond_channels_saves_and_loads(tmp_path):
    model = tiny(cond_channels=1)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["cond_channels"] == 1
    back = UNet.from_pretrained(tmp_path).eval()
    x, c = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x, 7, cond=c).sample, model(x, 7, cond=c).sample, rtol=0, atol=0)


def test_the_planner_shows_the_stem_channels():
    assert "stem: 1 sample + 2 condition channels -> 8" in format_plan(tiny(cond_channels=2))
    assert "stem:" not in format_plan(tiny())


# ---------------------------------------------------------------------------------------- the pipeline

def pipe_of(task="generate", sr_factor=1, scheduler=None, **kw) -> DiffunetPipeline:
    channels = {"super_resolution": 1, "inpainting": 2}.get(task, 0)
    pipe = DiffunetPipeline(tiny(cond_channels=channels, **kw), scheduler or DDIMScheduler(), task=task,
                            sr_factor=sr_factor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_super_resolution_upsamples_the_input_it_is_given():
    pipe = pipe_of("super_resolution", 4)
    low = torch.rand(3, 1, 4, 4)
    out = pipe(image=low, num_inference_steps=3, generator=gens(3), output_type="pt").images
    assert out.shape == (3, 1, 16, 16)
    # the condition the model saw is the bicubic upsampling the training side builds
    seen = {}
    pipe.unet.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    pipe(image=low, num_inference_steps=1, generator=gens(3), output_type="pt")
    torch.testing.assert_close(seen["cond"], upsample_condition(low * 2 - 1, (16, 16)))
    # another seed, another output; another input, another output
    again = pipe(image=low, num_inference_steps=3, generator=gens(3, 9), output_type="pt").images
    assert (again - out).abs().max() > 0
    pil = [Image.fromarray((np.asarray(x[0]) * 255).astype(np.uint8), "L") for x in low]
    assert pipe(image=pil, num_inference_steps=2, generator=gens(3)).images[0].size == (16, 16)


def test_an_input_of_another_size_is_resized_with_a_warning_or_refused():
    pipe = pipe_of("super_resolution", 4)
    with pytest.warns(UserWarning, match="image is 8x8; resized to the model's 4x4"):
        pipe(image=torch.rand(1, 1, 8, 8), num_inference_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # the model's own size is taken as the upsampled input
        pipe(image=torch.rand(1, 1, 16, 16), num_inference_steps=1)
    with pytest.raises(ValueError, match="image is 4x8, but this model takes 4x4 .another aspect ratio."):
        pipe(image=torch.rand(1, 1, 4, 8), num_inference_steps=1)


def test_inpainting_keeps_the_known_pixels_exactly():
    pipe = pipe_of("inpainting")
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (4, 16, 16), dtype=np.uint8)
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[:, 4:12, 2:9] = 255
    images = [Image.fromarray(t, "L") for t in truth]
    mask_images = [Image.fromarray(m, "L") for m in masks]
    out = pipe(image=images, mask_image=mask_images, num_inference_steps=3, generator=gens(4))
    got = np.stack([np.asarray(im) for im in out.images])
    keep = masks == 0
    assert (got[keep] == truth[keep]).all()                          # exactly, after the final paste
    assert (got[~keep] != truth[~keep]).mean() > 0.5                 # the hole is generated, not copied
    as_np = pipe(image=images, mask_image=mask_images, num_inference_steps=3, generator=gens(4),
                 output_type="np").images
    assert (np.round(as_np[..., 0] * 255).astype(np.uint8)[keep] == truth[keep]).all()


def test_inpainting_needs_a_mask_and_super_resolution_takes_none():
    with pytest.raises(ValueError, match="needs image= and mask_image="):
        pipe_of("inpainting")(image=torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="mask_image= given, but a super_resolution model takes no mask"):
        pipe_of("super_resolution", 4)(image=torch.rand(1, 1, 4, 4), mask_image=torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="takes no image condition"):
        pipe_of()(image=torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="needs a UNet with cond_channels=2, this one has 1"):
        DiffunetPipeline(tiny(cond_channels=1), DDIMScheduler(), task="inpainting")(
            image=torch.rand(1, 1, 16, 16), mask_image=torch.ones(1, 1, 16, 16))


def test_guidance_on_the_image_condition():
    pipe = pipe_of("super_resolution", 4)
    with torch.no_grad():
        pipe.unet.cond_null.normal_()
    low = torch.rand(2, 1, 4, 4)
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out.sample)), with_kwargs=True)
    pipe(image=low, num_inference_steps=1, generator=gens(2), guidance_scale=3.0, output_type="latent")
    (kw, out), = calls                                              # one batched call: conditional and dropped
    assert kw["cond_dropped"].tolist() == [False, False, True, True]
    cond, uncond = out.chunk(2)
    calls.clear()
    pipe(image=low, num_inference_steps=1, generator=gens(2), guidance_scale=0.0, output_type="latent")
    (kw, out0), = calls
    assert kw["cond_dropped"].tolist() == [True, True]
    torch.testing.assert_close(out0, uncond)


def test_the_task_travels_with_the_saved_pipeline(tmp_path):
    pipe_of("super_resolution", 4).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert (index["task"], index["sr_factor"]) == ("super_resolution", 4)
    back = DiffunetPipeline.from_pretrained(tmp_path)
    assert (back.config.task, back.config.sr_factor) == ("super_resolution", 4)
    with pytest.raises(ValueError, match="unknown task 'segment'"):
        DiffunetPipeline(tiny(), DDIMScheduler(), task="segment")


# ---------------------------------------------------------------------------------------- RePaint

def test_repaint_inpaints_with_an_unconditional_model():
    pipe = pipe_of(scheduler=RePaintScheduler.from_config(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config))
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, out: calls.append(1))
    truth = torch.rand(2, 1, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8] = 1                                              # the top half is generated
    out = pipe(image=truth, mask_image=mask, num_inference_steps=20, generator=gens(2), output_type="pt").images
    keep = mask == 0
    torch.testing.assert_close(out[keep], truth[keep], atol=1 / 255, rtol=0)   # exactly up to the uint8-free pt path
    assert len(calls) > 20                                          # RePaint's jumps: more calls than steps
    with pytest.raises(ValueError, match="RePaint pipeline .generate. needs image= and mask_image="):
        pipe(image=truth)


def test_repaint_refuses_a_model_that_does_not_predict_noise():
    config = DDPMScheduler(prediction_type="v_prediction").config
    pipe = pipe_of(scheduler=RePaintScheduler.from_config(config))
    with pytest.raises(ValueError, match="needs an epsilon-prediction model; this one predicts v_prediction"):
        pipe(image=torch.rand(1, 1, 16, 16), mask_image=torch.ones(1, 1, 16, 16), num_inference_steps=5)


def test_inpainting_condition_zeroes_the_hole_and_adds_the_mask():
    x = torch.rand(1, 2, 4, 4) * 2 - 1
    m = torch.zeros(1, 1, 4, 4)
    m[..., 1:3, 1:3] = 1
    c = inpainting_condition(x, m)
    assert c.shape == (1, 3, 4, 4)
    assert (c[:, :2][m.expand(1, 2, 4, 4).bool()] == 0).all() and (c[:, 2:] == m).all()
    torch.testing.assert_close(c[:, :2][~m.expand(1, 2, 4, 4).bool()], x[~m.expand(1, 2, 4, 4).bool()])
