"""DiffunetPipeline: the one sampling loop, as diffusers calls it: loading, labels and guidance, a generator per
image, output types, schedulers swapped with from_config, image conditions."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import diffunet
from conftest import tiny
from diffunet.model.pipeline import DiffunetPipeline
from diffunet.sampling import generate, image_generator, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = DDPMScheduler(num_train_timesteps=100)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = tiny(zero_init=False, num_classes=3).eval()          # random weights: outputs depend on the input
    pipe = DiffunetPipeline(unet=model, scheduler=make_scheduler("ddim", TRAIN.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(n, seed=0, start=0):
    return [image_generator(seed, i) for i in range(start, start + n)]


def test_diffusion_pipeline_from_pretrained_returns_it(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is DiffunetPipeline and isinstance(loaded.unet, diffunet.UNet)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[0, 2], num_inference_steps=3, output_type="pt")
    assert torch.allclose(pipe(generator=seeded(2), **kw).images, loaded(generator=seeded(2), **kw).images,
                          atol=1e-6)


def test_generator_list_gives_the_images_of_sampling_generate(pipe):
    kw = dict(class_labels=[0, 1, 2, 0], guidance_scale=2.0, num_inference_steps=3, eta=1.0)   # eta 1: noisy steps
    images = pipe(generator=seeded(4, seed=5, start=3), output_type="latent", **kw).images
    want = generate(pipe.unet, pipe.scheduler, 4, steps=3, seed=5, start_index=3, class_labels="all",
                    guidance_scale=2.0, eta=1.0, batch_size=3)
    assert torch.allclose(images.clamp(-1, 1), want, atol=1e-5)
    # image i depends on generator i only: alone, or beside other images, it comes out the same
    alone = pipe(generator=seeded(1, seed=5, start=5), output_type="latent", **dict(kw, class_labels=[2])).images
    assert torch.allclose(alone, images[2:3], atol=1e-5)
    assert (images[0] - images[1]).abs().max() > 0.1


def test_class_labels_and_guidance(pipe):
    kw = dict(num_inference_steps=3, output_type="latent")
    unconditional = pipe(batch_size=3, generator=seeded(3), **kw).images
    assert torch.equal(pipe(class_labels=[0, 1, 2], guidance_scale=0.0, generator=seeded(3), **kw).images,
                       unconditional)                                       # w = 0: the null class
    conditional = pipe(class_labels=[0, 1, 2], generator=seeded(3), **kw).images
    guided = pipe(class_labels=[0, 1, 2], guidance_scale=3.0, generator=seeded(3), **kw).images
    assert (conditional - unconditional).abs().max() > 1e-3 and (guided - conditional).abs().max() > 1e-3
    one_class = pipe(batch_size=3, class_labels=1, generator=seeded(3), **kw).images     # one id for all
    assert torch.equal(one_class, pipe(class_labels=[1, 1, 1], generator=seeded(3), **kw).images)
    with pytest.raises(ValueError, match=r"class labels must be in 0\.\.2"):
        pipe(class_labels=[0, 3], **kw)
    with pytest.raises(ValueError, match="ambiguous: 4 batch_size, 2 class_labels"):
        pipe(batch_size=4, class_labels=[0, 1], **kw)
    with pytest.raises(ValueError, match="unconditional"):
        DiffunetPipeline(unet=tiny(), scheduler=pipe.scheduler)(class_labels=[0], **kw)


def test_output_types(pipe):
    kw = dict(class_labels=[0, 1], num_inference_steps=2)
    latent = pipe(generator=seeded(2), output_type="latent", **kw).images
    pt = pipe(generator=seeded(2), output_type="pt", **kw).images
    np_images = pipe(generator=seeded(2), output_type="np", **kw).images
    pil = pipe(generator=seeded(2), **kw).images
    assert latent.shape == pt.shape == (2, 1, 16, 16) and np_images.shape == (2, 16, 16, 1)
    assert torch.allclose(pt, (latent / 2 + 0.5).clamp(0, 1)) and pt.min() >= 0 and pt.max() <= 1
    assert np.allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (16, 16)
    assert np.array_equal(np.asarray(pil[1]), (np_images[1, ..., 0] * 255).round().astype(np.uint8))
    (images,) = pipe(generator=seeded(2), output_type="pt", return_dict=False, **kw)
    assert torch.equal(images, pt)
    with pytest.raises(ValueError, match="unknown output_type 'tensor'"):
        pipe(output_type="tensor", **kw)


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_any_scheduler_swaps_in_with_from_config(pipe, scheduler):
    swapped = DiffunetPipeline(unet=pipe.unet, scheduler=scheduler.from_config(pipe.scheduler.config))
    swapped.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[0, 1], num_inference_steps=4, output_type="latent")
    images = swapped(generator=seeded(2), **kw).images
    assert swapped.scheduler.config.num_train_timesteps == 100 and torch.isfinite(images).all()
    assert (images - pipe(generator=seeded(2), **kw).images).abs().max() > 1e-3
    name = "dpmpp" if scheduler is DPMSolverMultistepScheduler else "euler"
    want = generate(pipe.unet, make_scheduler(name, TRAIN.config), 2, steps=4, seed=0, class_labels="all")
    assert torch.allclose(images.clamp(-1, 1), want, atol=1e-5)


def test_image_condition_on_a_model_without_one_is_one_clear_error(pipe):
    with pytest.raises(ValueError, match="image= given, but this model takes no image condition"):
        pipe(image=torch.zeros(1, 1, 16, 16), num_inference_steps=2)
    with pytest.raises(ValueError, match="image= and mask_image= given"):
        generate(pipe.unet, pipe.scheduler, 2, steps=2, image=torch.zeros(2, 1, 16, 16),
                 mask_image=torch.ones(2, 1, 16, 16))


def test_the_progress_bar_is_diffusers(capsys):
    pipe = DiffunetPipeline(unet=tiny(), scheduler=make_scheduler("ddim", TRAIN.config))
    pipe(num_inference_steps=3, output_type="np")
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(num_inference_steps=3, output_type="np")
    assert "3/3" not in capsys.readouterr().err
