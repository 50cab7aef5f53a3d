"""diffunet.UNet inside diffusers: pipelines, schedulers, pipeline save and load, and ModelMixin's conventions as
UNet2DModel follows them."""

import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline,
                       DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DModel, UniPCMultistepScheduler)
from diffusers.models.unets.unet_2d import UNet2DOutput

import diffunet
from conftest import tiny
from diffunet.model.unet import as_size


@pytest.mark.parametrize("channels,size", [(1, 16), (3, (8, 16))])
@pytest.mark.parametrize("pipeline", [DDPMPipeline, DDIMPipeline])
def test_pipelines_run_unchanged(pipeline, channels, size):
    model = tiny(in_channels=channels, sample_size=size, zero_init=False)
    pipe = pipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=50))
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    h, w = as_size(size)
    assert out.images.shape == (2, h, w, channels)
    assert out.images.min() >= 0 and out.images.max() <= 1
    pil = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (w, h) and pil.mode == ("L" if channels == 1 else "RGB")


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMScheduler])
def test_other_schedulers_plug_into_the_ddpm_pipeline(scheduler):
    pipe = DDPMPipeline(unet=tiny(zero_init=False), scheduler=scheduler(num_train_timesteps=100))
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 1) and (images >= 0).all() and (images <= 1).all()


@pytest.mark.parametrize("scheduler", [UniPCMultistepScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_schedulers_in_the_standard_diffusers_loop(scheduler):
    # UniPC's step() takes no generator, so DDPMPipeline cannot drive it; the usual hand loop can.
    model, sched = tiny(zero_init=False).eval(), scheduler(num_train_timesteps=100)
    sched.set_timesteps(6)
    x = torch.randn(2, 1, 16, 16) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_pipeline_save_and_diffusion_pipeline_from_pretrained(tmp_path):
    model = tiny(num_classes=None, skip="concat_1x1", zero_init=False).eval()
    DDIMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, DDIMPipeline) and isinstance(loaded.unet, diffunet.UNet)
    assert loaded.unet.config.skip == "concat_1x1"
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x, 10).sample, loaded.unet.eval()(x, 10).sample)
    kw = dict(batch_size=1, num_inference_steps=3, output_type="np")
    a = DDIMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=100))(
        generator=torch.Generator().manual_seed(1), **kw).images
    b = loaded(generator=torch.Generator().manual_seed(1), **kw).images
    assert abs(a - b).max() < 1e-5                                          # same images, to float rounding


# ------------------------------------------------------------------------------------------ ModelMixin conventions
# What diffusers' own model tests (ModelTesterMixin) and its users expect of a UNet2DModel, checked on ours; where
# UNet2DModel is the reference, it is the converted twin of the same weights (diffunet.convert).

def twins(**options):
    """(UNet2DModel, our UNet converted from it): the same function, different classes."""
    kwargs = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4, attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    theirs = UNet2DModel(**dict(kwargs, **options)).eval()
    return theirs, diffunet.from_unet2d(theirs).eval()


TIMESTEP_FORMS = {
    "int": 10, "float": 10.0, "0-d int": torch.tensor(10), "0-d float": torch.tensor(10.0),
    "(1,) int": torch.tensor([10]), "(1,) float": torch.tensor([10.0]),
    "(1,) int32": torch.tensor([10], dtype=torch.int32),
    "(B,) int": torch.tensor([10] * 4), "(B,) float": torch.tensor([10.0] * 4),
}


@pytest.mark.parametrize("form", TIMESTEP_FORMS)
def test_every_timestep_form_of_unet2d_gives_its_results(form):
    theirs, ours = twins()
    x = torch.randn(4, 1, 16, 16)                                           # a batch of 4, as diffusers' tests use
    with torch.no_grad():
        ref = ours(x, torch.tensor([10, 10, 10, 10])).sample
        got, want = ours(x, TIMESTEP_FORMS[form]).sample, theirs(x, TIMESTEP_FORMS[form]).sample
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert (got - want).abs().max() < 1e-5


def test_per_sample_and_fractional_tensor_timesteps_match_unet2d():
    theirs, ours = twins()
    x = torch.randn(4, 1, 16, 16)
    for t in (torch.tensor([0, 5, 500, 999]), torch.tensor([10.5]), torch.tensor([0.25, 1.5, 2.0, 999.9])):
        with torch.no_grad():
            assert (ours(x, t).sample - theirs(x, t).sample).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"timestep must be .* a \(4,\) tensor, got shape \(2,\)"):
        ours(x, torch.tensor([1, 2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_timestep_on_another_device_than_the_model():
    _, ours = twins()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        ref = ours(x, 10).sample
        assert torch.allclose(ours(x, torch.tensor([10], device="cuda")).sample, ref)
        gpu = ours.cuda()(x.cuda(), torch.tensor(10)).sample.cpu()
    assert torch.allclose(gpu, ref, atol=1e-4)


def test_return_dict_false_is_the_same_output_as_a_tuple():
    _, ours = twins()
    x = torch.randn(2, 1, 16, 16)
    out, tup = ours(x, 3), ours(x, 3, return_dict=False)
    assert isinstance(out, UNet2DOutput) and isinstance(tup, tuple) and len(tup) == 1
    assert torch.equal(out.sample, tup[0]) and torch.equal(out[0], tup[0]) and torch.equal(out.to_tuple()[0], tup[0])


def test_determinism_in_eval_and_under_a_seed_in_training():
    model = tiny(zero_init=False, dropout=0.3).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, 7).sample, model(x, 7).sample)
        model.train()
        torch.manual_seed(1)
        a = model(x, 7).sample
        torch.manual_seed(1)
        assert torch.equal(a, model(x, 7).sample) and not torch.equal(a, model(x, 7).sample)


SAVES = {  # save_pretrained keywords -> from_pretrained keywords, and the weight files the folder must hold
    "safetensors": ({}, {}, ["diffusion_pytorch_model.safetensors"]),
    "bin": (dict(safe_serialization=False), {}, ["diffusion_pytorch_model.bin"]),
    "variant": (dict(variant="fp16"), dict(variant="fp16"), ["diffusion_pytorch_model.fp16.safetensors"]),
    "sharded": (dict(max_shard_size="20KB"), {}, ["diffusion_pytorch_model.safetensors.index.json"]),
    "sharded variant": (dict(max_shard_size="20KB", variant="fp16"), dict(variant="fp16"),
                        ["diffusion_pytorch_model.safetensors.index.fp16.json"]),
}


@pytest.mark.parametrize("save", SAVES)
def test_save_and_load_variants_and_shards_give_the_same_model(tmp_path, save):
    save_kw, load_kw, files = SAVES[save]
    model = tiny(zero_init=False, num_classes=3).eval()
    model.save_pretrained(tmp_path, **save_kw)
    assert all((tmp_path / f).is_file() for f in files), sorted(p.name for p in tmp_path.iterdir())
    if "sharded" in save:
        assert len(list(tmp_path.glob("diffusion_pytorch_model*-of-*.safetensors"))) > 1
    loaded = diffunet.UNet.from_pretrained(tmp_path, **load_kw).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded(x, 5, torch.tensor([0, 2])).sample, model(x, 5, torch.tensor([0, 2])).sample)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-5), (torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_dtype_round_trips_and_forward_in_that_dtype_as_unet2d(tmp_path, dtype, atol):
    theirs, ours = twins()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = ours(x, 10).sample
        for model in (theirs, ours):                                        # no autocast: the model's own dtype
            out = model.to(dtype)(x.to(dtype), torch.tensor([10])).sample
            assert model.dtype == dtype and out.dtype == dtype and (out.float() - ref).abs().max() < atol
    ours.save_pretrained(tmp_path)
    for kw in (dict(torch_dtype=dtype), {}):
        loaded = diffunet.UNet.from_pretrained(tmp_path, **kw)
        assert loaded.dtype == kw.get("torch_dtype", torch.float32)
        assert all(torch.equal(a.to(dtype), b) for a, b in zip(loaded.parameters(), ours.parameters()))
    back = ours.float()
    assert back.dtype == torch.float32 and back.device == torch.device("cpu")


def test_gradient_checkpointing_switches_and_takes_a_custom_function():
    model = tiny(zero_init=False)
    calls = []

    def checkpoint(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)

    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    assert model.is_gradient_checkpointing
    model(torch.randn(2, 1, 16, 16), 3).sample.sum().backward()
    assert calls == ["EncoderLevel", "EncoderLevel", "Middle", "DecoderLevel", "DecoderLevel"]
    with torch.no_grad():                                                   # nothing to recompute without grads
        model(torch.randn(2, 1, 16, 16), 3)
    assert len(calls) == 5
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


ATTENTION_CALLS = {  # ModelMixin's attention switches: ours must do what UNet2DModel does (work, or refuse)
    "set_attention_backend": ("native",), "reset_attention_backend": (),
    "enable_xformers_memory_efficient_attention": (), "disable_xformers_memory_efficient_attention": (),
    "set_default_attn_processor": (), "fuse_qkv_projections": (), "unfuse_qkv_projections": (),
}
# The one difference: our attention always runs through SDPA, memory-efficient kernel included, so asking for
# xformers switches nothing (UNet2DModel would switch to xformers, or raise where it is not installed).
OURS_DIFFER = {"enable_xformers_memory_efficient_attention": "ok"}


def test_attention_switches_behave_as_on_unet2d():
    x, models = torch.randn(2, 1, 16, 16), twins()
    with torch.no_grad():
        before = [model(x, 3).sample for model in models]
    for name, args in ATTENTION_CALLS.items():                              # one after the other, on the same models
        results = []
        for model, out in zip(models, before):
            try:
                getattr(model, name)(*args)
                results.append("ok")
            except (AttributeError, ModuleNotFoundError, ValueError) as e:
                results.append(type(e).__name__)
            with torch.no_grad():
                assert torch.allclose(model(x, 3).sample, out, atol=1e-6), name
        theirs, ours = results
        assert ours == OURS_DIFFER.get(name, theirs), f"{name}: UNet2DModel {theirs}, ours {ours}"


def test_from_config_and_config_attributes_as_unet2d():
    model = tiny(zero_init=False)
    again = diffunet.UNet.from_config(model.config)
    assert again.config == model.config and again.state_dict().keys() == model.state_dict().keys()
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
