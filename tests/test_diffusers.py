"""diffunet.UNet inside diffusers: pipelines, schedulers, pipeline save and load."""

import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline,
                       DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler)

import diffunet
from conftest import tiny
from diffunet.unet import as_size


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
