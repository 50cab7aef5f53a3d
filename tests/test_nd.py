"""One U-Net for signals, images and volumes (``spatial_dims``): every switch in 1D and 3D, anisotropic down
factors, exact overlap-tile in N-D, and 2D bitwise the network it was before."""

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from omegaconf import OmegaConf
from safetensors.torch import save_file

from diffunet import DiffunetPipeline, DiffunetSegmentationPipeline, UNet, export
from diffunet.config import build_model
from diffunet.errors import DataError
from diffunet.plan import format_plan
from diffunet.training.loop import validate
from diffunet.model.tiles import predict_tiled
from diffunet.objectives import make_noise_scheduler
from diffunet.tasks import task_of
from test_export import python
from test_training import fast_cfg

OLD_CODE = Path(__file__).parent / "fixtures" / "run-703f466" / "pipeline" / "unet" / "diffunet_f40fb7278a"
DOWN = ["maxpool", "avgpool", "conv", "conv_tf", "blur"]
UP = ["transposed", "bilinear", "nearest"]
SKIP = ["concat", "concat_1x1", "add", "none"]
NORM = ["group", "batch", "none"]
TIME = ["scale_shift", "add", "none"]


def _old_unet_class():
    """The UNet class of the fixture run's exported folder: the 2D network's code from before N-D."""
    name = "old_diffunet_code"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, OLD_CODE / "__init__.py",
                                                      submodule_search_locations=[str(OLD_CODE)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
    return importlib.import_module(f"{name}.unet").UNet


def _switches(i: int, down: str, up: str, pad: str) -> dict:
    """Switch values for grid point ``i``: skip, norm and time condition rotate through their values."""
    time = TIME[i % 3]
    return dict(downsample=down, upsample=up, padding=pad, skip=SKIP[i % 4], norm=NORM[(i // 3) % 3],
                time_condition=time, num_classes=3 if time != "none" else None, cond_channels=i % 2, zero_init=False,
                base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, in_channels=2)


def _inputs(model: UNet, size, seed: int) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, *size, generator=g)
    kwargs = {}
    if model.timed:
        kwargs = dict(timestep=torch.tensor([3, 500]), class_labels=torch.tensor([0, 2]))
    if model.config.cond_channels:
        kwargs.update(cond=torch.randn(2, 1, *size, generator=g), cond_dropped=torch.tensor([True, False]))
    return x, kwargs


GRID_2D = [(i, down, up, pad) for i, (down, up, pad) in enumerate(itertools.product(DOWN, UP, ["same", "valid"]))]


@pytest.mark.parametrize("i,down,up,pad", GRID_2D)
def test_2d_is_bitwise_the_network_from_before_n_d(i, down, up, pad):
    """Same seed, same switches: the old code (the fixture folder's copy) and spatial_dims=2 build the same
    parameters under the same keys and compute the same outputs, whole and tiled, bit for bit."""
    old_cls = _old_unet_class()
    kw = _switches(i, down, up, pad)
    kw.update(sample_size=(16, 24) if pad == "same" else 12, attention_resolutions=(8,) if pad == "same" else ())
    torch.manual_seed(i)
    old = old_cls(**kw).eval()
    torch.manual_seed(i)
    new = UNet(**kw, spatial_dims=2).eval()
    assert list(old.state_dict()) == list(new.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    x, kwargs = _inputs(new, new.image_size, i)
    with torch.no_grad():
        assert torch.equal(old(x, **kwargs).sample, new(x, **kwargs).sample)
    for size in (new.image_size, (40, 36)):                     # the geometry tiles and the planner read
        assert old.tiling(size).__dict__ == new.tiling(size).__dict__
        assert [r.__dict__ for r in old.plan(size)] == [r.__dict__ for r in new.plan(size)]


GRID_ND = [(dims, i, down, up, pad) for dims in (1, 3)
           for i, (down, up, pad) in enumerate(itertools.product(DOWN, UP, ["same", "valid"]))]


@pytest.mark.parametrize("dims,i,down,up,pad", GRID_ND)
def test_every_switch_in_1d_and_3d(dims, i, down, up, pad):
    """Each down- and up-sampler in both paddings, with skip, norm, time condition, classes and an image
    condition rotating: the output has the input's shape, conditioning changes it, and every weight gets a
    gradient."""
    kw = _switches(i, down, up, pad)
    size = (24 if dims == 1 else (8, 12, 8)) if pad == "same" else (14 if dims == 1 else 4)
    if dims == 3 and pad == "valid":            # a valid 3D U-Net of 3 levels reads 141^3 for 12^3: two levels
        kw["channel_mult"] = (1, 2)
    model = UNet(**kw, spatial_dims=dims, sample_size=size, attention_resolutions=(),
                 attention_levels=(1,) if pad == "same" else None, mid_attention=pad == "same")
    x, kwargs = _inputs(model, model.image_size, i)
    y = model(x, **kwargs).sample
    assert y.shape == x.shape
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    if model.timed:
        with torch.no_grad():
            other = model(x, **{**kwargs, "class_labels": torch.tensor([1, 1])}).sample
        assert not torch.equal(other, y.detach())


@pytest.mark.parametrize("dims", [1, 3])
def test_valid_tiles_equal_the_whole_input_in_float64(dims):
    """A local valid-padding U-Net (no norm, no attention) run by tiles gives the whole input's output to float64
    rounding, for a size no tile divides."""
    torch.manual_seed(0)
    model = UNet(sample_size=12, spatial_dims=dims, in_channels=1, base_channels=2, channel_mult=(1, 2),
                 num_res_blocks=1, norm="none", attention_resolutions=(), mid_attention=False, padding="valid",
                 downsample="maxpool", upsample="transposed", zero_init=False).double().eval()
    size = (45,) if dims == 1 else (7, 10, 5)
    image = torch.randn(1, 1, *size, dtype=torch.float64)
    with torch.no_grad():
        whole = model(image, 5).sample
        tiled = predict_tiled(model, image, 8 if dims == 1 else (3, 4, 4), timestep=5, batch_size=4)
    assert whole.shape == image.shape
    assert (whole - tiled).abs().max() < 1e-12


@pytest.mark.parametrize("dims", [1, 3])
def test_same_padding_tiles_blend_to_a_partition_of_unity(dims):
    """The Hann windows of overlapping N-D tiles are normalized by their sum: a position-wise network comes out
    exactly, and a real model's blend covers every position."""
    model = UNet(sample_size=8, spatial_dims=dims, in_channels=1, base_channels=4, channel_mult=(1, 2),
                 num_res_blocks=1, norm_groups=2, attention_resolutions=())
    size = (50,) if dims == 1 else (20, 18, 22)
    image = torch.randn(1, 1, *size)
    doubled = predict_tiled(lambda x, **_: 2 * x, image, 8, overlap=3, geometry=model)
    assert torch.allclose(doubled, 2 * image, atol=1e-6)
    with torch.no_grad():
        out = predict_tiled(model.eval(), image, 8, timestep=5)
    assert out.shape == image.shape and torch.isfinite(out).all()


def test_anisotropic_factors_keep_an_axis_through_the_first_levels():
    """(1, 2, 2) then 2: the depth halves once, height and width twice; the plan and the divisibility rule say so
    per axis."""
    model = UNet(sample_size=(4, 16, 12), spatial_dims=3, in_channels=1, base_channels=8, channel_mult=(1, 2, 2),
                 num_res_blocks=1, norm_groups=4, down_factors=[[1, 2, 2], 2], attention_levels=(2,))
    assert model.divisors == (2, 4, 4)
    assert [r.size for r in model.plan()] == [(4, 16, 12), (4, 8, 6), (2, 4, 3)]
    assert [r.attention for r in model.plan()] == [False, False, True]
    x = torch.randn(1, 1, 6, 8, 20)
    assert model(x, 1).sample.shape == x.shape
    with pytest.raises(ValueError, match=r"^depth 5 does not fit this U-Net: with padding='same' and these "
                                         r"down_factors the depth must be divisible by 2; nearest valid depths: "
                                         r"4 or 6 \(or use padding='valid'\)$"):
        model.tiling((5, 8, 8))
    with pytest.raises(ValueError, match="width 10 .* divisible by 4; nearest valid widths: 8 or 12"):
        model.tiling((4, 8, 10))


def test_anisotropic_valid_tiles_are_exact_on_the_per_axis_grid():
    torch.manual_seed(1)
    model = UNet(sample_size=4, spatial_dims=3, in_channels=1, base_channels=2, channel_mult=(1, 2),
                 num_res_blocks=1, norm="none", attention_resolutions=(), mid_attention=False, padding="valid",
                 down_factors=[[1, 2, 2]], zero_init=False).double().eval()
    assert model.divisors == (1, 2, 2)
    assert model.tiling(4).margin[0] < model.tiling(4).margin[1]      # the depth is never halved: less to read
    image = torch.randn(1, 1, 5, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        whole = model(image, 3).sample
        tiled = predict_tiled(model, image, (2, 4, 4), timestep=3)
    assert whole.shape == image.shape and (whole - tiled).abs().max() < 1e-12


@pytest.mark.parametrize("dims", [1, 3])
def test_save_and_load_in_every_dimensionality(dims, tmp_path):
    model = UNet(sample_size=8, spatial_dims=dims, in_channels=1, base_channels=8, channel_mult=(1, 2),
                 num_res_blocks=1, norm_groups=4, attention_levels=(1,), zero_init=False).eval()
    model.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 1, *model.image_size)
    with torch.no_grad():
        assert torch.equal(model(x, 10).sample, loaded(x, 10).sample)
    assert loaded.dims == dims


@pytest.mark.parametrize("kw,x_shape,message", [
    (dict(spatial_dims=3), (2, 1, 8, 8),
     r"^sample must be \(B, in_channels, D, H, W\) with in_channels=1 \(model.in_channels\), got \(2, 1, 8, 8\); "
     r"this is a 3D model \(model.spatial_dims=3\) and this looks like a batch of 2D images; give volumes or build "
     r"the model with spatial_dims=2$"),
    (dict(spatial_dims=2), (2, 1, 8, 8, 8),
     r"^sample must be \(B, in_channels, H, W\) .* a batch of 3D volumes; give images or build the model with "
     r"spatial_dims=3$"),
    (dict(spatial_dims=1), (1, 8), r"^sample must be \(B, in_channels, L\) .*; add the batch axis: sample\[None\]$"),
])
def test_input_of_another_dimensionality_is_one_line(kw, x_shape, message):
    model = UNet(sample_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 norm_groups=4, attention_resolutions=(), **kw)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(x_shape), 1)


@pytest.mark.parametrize("kw,message", [
    (dict(spatial_dims=4), r"^spatial_dims must be 1 \(signals\), 2 \(images\) or 3 \(volumes\), got 4$"),
    (dict(spatial_dims=3, down_factors=[2]),
     r"^down_factors has 1 entries; a U-Net of 3 levels \(channel_mult\) downsamples 2 times: give 2 entries, each "
     r"2 or one factor per axis such as \[1, 2, 2\]$"),
    (dict(spatial_dims=3, down_factors=[[1, 2], 2]),
     r"^down_factors entry \[1, 2\] is not 1 or 2 on each of the 3 axes \('depth', 'height', 'width'\); give 2 or a "
     r"list of 3 such as \[1, 2, 2\]$"),
    (dict(spatial_dims=2, down_factors=[3, 2]), r"^down_factors entry 3 is not 1 or 2 on each of the 2 axes"),
    (dict(spatial_dims=3, sample_size=[8, 8]), r"^size \[8, 8\] has 2 axes where 3 are needed; give one int or 3$"),
    (dict(spatial_dims=3, attention_levels=(5,)), r"^attention_levels \[5\] are not levels of this U-Net; its levels "
                                                  r"are 0..2$"),
])
def test_a_wrong_dimensionality_switch_is_one_line(kw, message):
    kw = {"sample_size": 8, **kw}
    with pytest.raises(ValueError, match=message):
        UNet(in_channels=1, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4,
             attention_resolutions=(), **kw)


# ------------------------------------------------------------------------------------------------ pipelines

def _tiny(dims: int, size: int, **kw) -> UNet:
    base = dict(sample_size=size, spatial_dims=dims, in_channels=1, base_channels=8, channel_mult=(1, 2),
                num_res_blocks=1, norm_groups=4, attention_resolutions=(), zero_init=False)
    return UNet(**{**base, **kw}).eval()


@pytest.mark.parametrize("dims,size", [(1, 16), (3, 8)])
def test_pipelines_return_channels_first_arrays_and_refuse_pil(dims, size):
    pipe = DiffunetPipeline(_tiny(dims, size, in_channels=2, num_classes=3), DDIMScheduler())
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=2).images          # default: "np" beyond 2D
    assert isinstance(images, np.ndarray) and images.shape == (3, 2, *(size,) * dims)
    assert 0 <= images.min() and images.max() <= 1
    assert pipe(batch_size=2, num_inference_steps=2, output_type="pt").images.shape == (2, 2, *(size,) * dims)
    kind = {1: "signals", 3: "volumes"}[dims]
    shape = {1: "L", 3: "D, H, W"}[dims]
    with pytest.raises(ValueError, match=rf"^output_type='pil' makes images, and this model makes {dims}D {kind}: "
                                         rf"use output_type='np' or 'pt' \(\(B, C, {shape}\) arrays\)$"):
        pipe(batch_size=1, num_inference_steps=1, output_type="pil")


@pytest.mark.parametrize("dims,size", [(1, 16), (3, 8)])
def test_image_conditioned_pipelines_in_n_d(dims, size):
    """Super-resolution takes the smaller input and inpainting keeps the known positions exactly, as in 2D."""
    sr = DiffunetPipeline(_tiny(dims, size, cond_channels=1), DDIMScheduler(), task="super_resolution", sr_factor=2)
    low = torch.rand(2, 1, *(size // 2,) * dims)
    assert sr(image=low, num_inference_steps=2).images.shape == (2, 1, *(size,) * dims)
    fill = DiffunetPipeline(_tiny(dims, size, cond_channels=2), DDIMScheduler(), task="inpainting")
    image = torch.rand(2, 1, *(size,) * dims)
    mask = (torch.rand(2, 1, *(size,) * dims) > 0.5).float()
    out = fill(image=image, mask_image=mask, num_inference_steps=2, output_type="pt").images
    assert torch.allclose(out[mask == 0], image[mask == 0], atol=1e-6)
    with pytest.raises(ValueError, match=rf"^image must be \(B, C, .*\) .* for this {dims}D model, got shape"):
        fill(image=torch.rand(2, 1, 4, 4) if dims != 2 else torch.rand(2, 4), mask_image=mask, num_inference_steps=1)


@pytest.mark.parametrize("dims,size", [(1, 16), (3, 8)])
def test_conditions_larger_than_the_model_are_sampled_by_blended_tiles(dims, size):
    """tile=: the network runs on tiles at every step and their outputs blend (MultiDiffusion): any input size,
    one tile as large as the input is the plain call, and the blend is what removes the seams."""
    torch.manual_seed(0)
    local = dict(norm="none", mid_attention=False, cond_channels=1)       # a network that takes any size whole
    sr = DiffunetPipeline(_tiny(dims, size, **local), DDIMScheduler(), task="super_resolution", sr_factor=2)

    def run(low, **kw):
        return sr(image=low, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="latent", **kw).images

    n = 2 * size if dims == 1 else 6                        # outputs of 64 positions, of 12^3 (8 tiles) in 3D
    small, large = torch.rand(1, 1, *(size // 2,) * dims), torch.rand(1, 1, *(n,) * dims)
    assert torch.allclose(run(small, tile=size), run(small), atol=1e-5)              # one tile: the whole
    blended = run(large, tile=size, overlap=size // 2)
    assert blended.shape == (1, 1, *(2 * n,) * dims)
    assert torch.allclose(run(large, tile=size, overlap=size // 2, tile_batch_size=1), blended, atol=1e-5)
    whole = run(large, tile=2 * n)                                                       # the network on all of it
    seams = (run(large, tile=size, overlap=0) - whole).abs().mean()
    assert (blended - whole).abs().mean() < 0.5 * seams, ((blended - whole).abs().mean(), seams)

    fill = DiffunetPipeline(_tiny(dims, size, cond_channels=2), DDIMScheduler(), task="inpainting")
    image = torch.rand(2, 1, *(size + size // 2,) * dims)
    mask = (torch.rand_like(image) > 0.5).float()
    out = fill(image=image, mask_image=mask, tile=size, num_inference_steps=2, output_type="pt").images
    assert out.shape == image.shape and torch.allclose(out[mask == 0], image[mask == 0], atol=1e-6)
    generate = DiffunetPipeline(_tiny(dims, size), DDIMScheduler())
    with pytest.raises(ValueError, match=r"^tile= is for super-resolution and inpainting models with padding='same'"):
        generate(batch_size=1, tile=size, num_inference_steps=1)


@pytest.mark.parametrize("dims,size", [(1, 16), (3, 8)])
def test_segmentation_in_n_d_whole_tiled_and_by_diffusion(dims, size):
    seg = DiffunetSegmentationPipeline(_tiny(dims, size, out_channels=2, time_condition="none", padding="valid",
                                            norm="batch", mid_attention=False), None)
    volume = torch.rand(1, 1, *(size + 3,) * dims)
    whole, tiled = seg(volume), seg(volume, tile=size // 2)
    assert whole.masks.shape == (1, *(size + 3,) * dims) and whole.probabilities.shape == (1, 2, *(size + 3,) * dims)
    assert np.abs(whole.probabilities - tiled.probabilities).max() < 1e-5       # valid padding: exact tiles
    diffusion = DiffunetSegmentationPipeline(_tiny(dims, size, cond_channels=1), DDIMScheduler())
    out = diffusion(torch.rand(2, 1, *(size,) * dims), num_samples=3, num_inference_steps=2)
    assert out.masks.shape == out.std.shape == (2, *(size,) * dims)


def test_an_exported_3d_folder_loads_where_diffunet_is_not_installed(tmp_path):
    cfg = fast_cfg(tmp_path, "model.spatial_dims=3", "model.sample_size=8", "model.attention_resolutions=[]",
                   "model.attention_levels=[1]", "model.zero_init=false", "model.down_factors=[[1,2,2]]")
    run = Path(cfg.output_dir)
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    pipeline = task_of(cfg).pipeline(build_model(cfg).eval(), make_noise_scheduler(cfg.diffusion), cfg)
    export.write_folder(run / "pipeline", pipeline, cfg, run, 0, None)
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = pipeline.unet(x, torch.tensor([3, 700]), torch.tensor([1, 10])).sample
    save_file({"x": x, "out": expected}, run / "probe.safetensors")
    result = python(f"""
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
pipe = DiffusionPipeline.from_pretrained("{run / 'pipeline'}", trust_remote_code=True)
p = load_file("{run / 'probe.safetensors'}")
with torch.no_grad():
    out = pipe.unet.eval()(p["x"], torch.tensor([3, 700]), torch.tensor([1, 10])).sample
print("difference", float((out - p["out"]).abs().max()))
print("samples", pipe(class_labels=[1, 2], num_inference_steps=2).images.shape)
print("diffunet imported:", "diffunet" in sys.modules)
""", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "samples (2, 1, 8, 8, 8)" in lines and "diffunet imported: False" in lines
    assert float(next(line for line in lines if line.startswith("difference")).split()[1]) < 1e-5


def test_train_py_refuses_a_3d_model_on_image_data_before_any_compute(tmp_path):
    cfg = fast_cfg(tmp_path, "model.spatial_dims=3", "model.sample_size=8", "model.attention_resolutions=[]")
    with pytest.raises(DataError, match=r"^data.source=digits holds 2D samples but the model is 3D "
                                        r"\(model.spatial_dims=3\); use data.source=cells3d, or set "
                                        r"model.spatial_dims=2$"):
        validate(cfg)
    assert not (tmp_path / "run").exists()


def test_the_plan_prints_sizes_and_factors_per_axis():
    model = UNet(sample_size=(4, 16, 12), spatial_dims=3, in_channels=1, base_channels=8, channel_mult=(1, 2, 2),
                 num_res_blocks=1, norm_groups=4, down_factors=[[1, 2, 2], 2], attention_levels=(2,))
    lines = format_plan(model).splitlines()
    assert lines[0].startswith("UNet 3D same padding")
    assert lines[1] == "down factors per level (depth, height, width): 1x2x2, 2x2x2; sizes divide by 2x4x4"
    assert [line.split()[2] for line in lines[3:6]] == ["4x16x12", "4x8x6", "2x4x3"]
