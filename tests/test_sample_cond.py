"""sample.py --cond and diffunet.sampling.sample_conditioned: image-conditioned models (super-resolution,
inpainting, RePaint) sampled from a folder of conditions; tiny random pipeline folders on the CPU."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import tiny
from diffunet.checkpoint import CheckpointError, pipeline_options
from diffunet.pipeline import DiffunetPipeline

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(zero_init=False, attention_resolutions=())             # random weights: outputs depend on inputs


def save_pipeline(folder, task="generate", sr_factor=1, cond_channels=0, scheduler=None, **kw):
    torch.manual_seed(0)
    unet = tiny(cond_channels=cond_channels, **SMALL, **kw).eval()
    DiffunetPipeline(unet, scheduler or DDIMScheduler(num_train_timesteps=100), task=task,
                     sr_factor=sr_factor).save_pretrained(folder)
    return folder


def test_pipeline_options_read_the_task_or_default(tmp_path):
    sr = save_pipeline(tmp_path / "sr", "super_resolution", 4, cond_channels=1)
    assert pipeline_options(sr) == {"task": "super_resolution", "sr_factor": 4}
    tiny().save_pretrained(tmp_path / "bare")                             # a bare model folder: no pipeline
    assert pipeline_options(tmp_path / "bare") == {"task": "generate", "sr_factor": 1}
    old = save_pipeline(tmp_path / "old")                                # a folder from before image conditions
    index = json.loads((old / "model_index.json").read_text())
    del index["task"], index["sr_factor"]
    (old / "model_index.json").write_text(json.dumps(index))
    assert pipeline_options(old) == {"task": "generate", "sr_factor": 1}
    (old / "model_index.json").write_text(json.dumps(dict(index, task="segment")))
    with pytest.raises(CheckpointError, match=r"model_index.json names task 'segment'"):
        pipeline_options(old)
