"""Every job on signals and volumes through ``train.py``'s code path: generation, segmentation (deterministic and
by diffusion), super-resolution and inpainting in 1D and 3D from the embedded data and from files, joint
augmentation that moves a sample and its mask together, and a 3D patch run that resumes bitwise."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from diffunet.config import ConfigError, load_config
from diffunet.data.transforms import joint_augment
from diffunet.metrics.paired import cubic_upsample, linear_fill
from diffunet.training.loop import train
from diffunet.training.state import step_dir

TINY = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "model.num_heads=2",
        "model.attention_resolutions=[]", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1",
        "train.sample_every=1000", "train.phema_snapshots=0", "sample.num_images=4", "sample.steps=2"]
SIGNALS = ["model.spatial_dims=1", "model.in_channels=1", "model.out_channels=1", "model.sample_size=32", "data.source=signals", "data.num_crops=16"]
VOLUMES = ["model.spatial_dims=3", "model.in_channels=1", "model.out_channels=1", "model.sample_size=16", "data.source=cells3d", "data.num_crops=6"]
SEGMENT = ["task=segmentation", "model.out_channels=2", "model.time_condition=none", "model.norm=batch",
           "segment.loss=dice_ce", "model.mid_attention=false"]


def _run(tmp_path, name, *overrides):
    cfg = load_config(None, TINY + [f"output_dir={tmp_path / name}", *overrides])
    return train(cfg), tmp_path / name


def _scores(run):
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def _augment_cfg(**options):
    return OmegaConf.create({"flip": False, "rot90": False, "rotate": 0.0, "shift": 0, "intensity": 0.0, "p": 1.0,
                             **options})


@pytest.mark.parametrize("shape", [(3, 1, 40), (3, 1, 12, 12), (3, 1, 10, 10, 10)])
def test_joint_augmentation_moves_a_sample_and_its_mask_together(shape):
    torch.manual_seed(0)
    mask = (torch.rand(shape) > 0.7).float()
    image = mask * 2 - 1
    cfg = _augment_cfg(flip=True, rot90=True, shift=2)
    out_image, out_mask = joint_augment(cfg, [image, mask], [False, True])
    assert torch.equal(out_image, out_mask * 2 - 1)                        # exact: values only move
    assert not torch.equal(out_mask, mask)
    torch.manual_seed(0)
    torch.rand(shape)
    again = joint_augment(cfg, [image, mask], [False, True])
    assert torch.equal(again[1], out_mask)                                  # the global RNG decides


def test_rotations_and_intensity_keep_masks_as_class_ids():
    torch.manual_seed(1)
    mask = torch.zeros(4, 1, 16, 16, 16)
    mask[:, :, 4:12, 5:11, 6:10] = 1
    image = mask * 2 - 1
    out_image, out_mask = joint_augment(_augment_cfg(rotate=15.0, intensity=0.2), [image, mask], [False, True])
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    agree = ((out_image > out_image.mean((1, 2, 3, 4), keepdim=True)) == (out_mask > 0)).float().mean()
    assert agree > 0.97
    assert not torch.allclose(out_image.amax((1, 2, 3, 4)), torch.ones(4))      # the intensity moved


def test_no_augmentation_is_the_identity():
    x = torch.randn(2, 1, 8, 8, 8)
    assert torch.equal(joint_augment(_augment_cfg(p=0.0, flip=True, shift=1, rotate=5.0), [x], [False])[0], x)


def test_class_conditional_signals_train_and_sample(tmp_path):
    pipe_dir, run = _run(tmp_path, "sig", *SIGNALS, "model.num_classes=4", "train.max_steps=2",
                         "data.augment.flip=true", "data.augment.shift=2")
    grid = Image.open(run / "samples" / "final.png")
    assert grid.size[0] > 32 * 3                                            # plots of 32-sample signals, 4 across
    from diffunet.model.pipeline import DiffunetPipeline
    pipe = DiffunetPipeline.from_pretrained(pipe_dir)
    out = pipe(class_labels=[0, 3], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 1, 32)
    card = (pipe_dir / "README.md").read_text()
    assert "1-channel signals" in card and "Intensities (`data.intensity=percentile`): each file's 0.5th and 99.5th" in card


@pytest.mark.parametrize("job", [[*SIGNALS, "model.num_classes=4"], VOLUMES])
def test_generation_of_signals_and_volumes_is_scored_by_its_frechet_distance(tmp_path, job):
    _, run = _run(tmp_path, "gen", *job, "train.max_steps=2", "train.eval_every=2", "train.eval_num_images=8")
    scores = _scores(run)[-1]
    assert scores["fid"] > 0 and scores["fid_floor"] > 0
    if "data.source=signals" in job:
        assert 0 <= scores["accuracy"] <= 1                   # class-conditional: read by the held-out classifier
    else:
        assert {"fid_xy", "fid_zx", "fid_yz"} <= scores.keys()


def test_3d_segmentation_trains_on_patches_and_is_scored(tmp_path):
    _, run = _run(tmp_path, "seg", *VOLUMES, *SEGMENT, "train.max_steps=3", "train.eval_every=3",
                  "data.holdout=2", "train.eval_num_images=2", "data.augment.flip=true", "data.augment.rot90=true")
    scores = _scores(run)[-1]
    assert {"dice", "iou", "hd95", "objects", "objects_truth"} <= scores.keys() and 0 <= scores["dice"] <= 1
    grid = np.asarray(Image.open(run / "samples" / "final.png"))
    assert grid.shape[0] > 3 * 16                                           # image, truth, output rows


def test_3d_segmentation_by_diffusion_reports_its_uncertainty(tmp_path):
    _, run = _run(tmp_path, "segdiff", *VOLUMES, "task=segmentation_diffusion", "model.in_channels=1",
                  "model.cond_channels=1", "train.max_steps=2", "train.eval_every=2", "data.holdout=2",
                  "train.eval_num_images=2", "segment.ensemble=2", "model.mid_attention=false")
    scores = _scores(run)[-1]
    assert {"dice", "std_wrong", "std_right"} <= scores.keys() and scores["std_wrong"] > 0


@pytest.mark.parametrize("job", [
    [*SIGNALS, "task=inpainting", "model.cond_channels=2", "inpainting.mask=gaps", "inpainting.eval_mask=gaps"],
    [*VOLUMES, "task=super_resolution", "model.cond_channels=1", "super_resolution.factor=2"],
])
def test_image_conditioned_jobs_on_signals_and_volumes_are_scored(tmp_path, job):
    _, run = _run(tmp_path, "job", *job, "train.max_steps=2", "train.eval_every=2", "data.holdout=2",
                  "train.eval_num_images=2", "data.augment.flip=true")
    scores = _scores(run)[-1]
    assert {"psnr", "mae"} <= scores.keys()
    assert ("mae_masked" in scores) == ("task=inpainting" in job)
    assert ("ssim" in scores) == ("model.spatial_dims=3" in job)
    baselines = {"mae_masked_linear"} if "task=inpainting" in job else {"psnr_linear", "psnr_cubic", "ssim_cubic"}
    assert baselines <= scores.keys()


def test_an_ensemble_is_scored_by_its_mean_and_a_bad_size_is_refused(tmp_path):
    job = [*SIGNALS, "task=inpainting", "model.cond_channels=2", "inpainting.mask=gaps", "inpainting.eval_mask=gaps",
           "train.max_steps=1", "train.eval_every=1", "data.holdout=2", "train.eval_num_images=2"]
    _, single = _run(tmp_path, "one", *job)
    _, mean = _run(tmp_path, "three", *job, "inpainting.ensemble=3")
    # one model (same seed, one step), two scores: the mean of three samples is not the first sample
    assert _scores(mean)[-1]["mae_masked"] != _scores(single)[-1]["mae_masked"]
    assert _scores(mean)[-1]["mae_masked_linear"] == _scores(single)[-1]["mae_masked_linear"]
    with pytest.raises(ConfigError, match="inpainting.ensemble=0: evaluation averages"):
        _run(tmp_path, "zero", *job, "inpainting.ensemble=0")


def test_the_classical_baselines_are_exact_where_they_should_be():
    ramp = torch.linspace(-1, 1, 40).repeat(2, 1, 1)                       # (2, 1, 40)
    gaps = torch.zeros(2, 1, 40)
    gaps[0, 0, 5:15], gaps[1, 0, 30:40] = 1, 1
    filled = linear_fill(ramp * (1 - gaps), gaps)
    assert torch.allclose(filled[0], ramp[0], atol=1e-6)                   # inside a gap: the line, exactly
    assert torch.allclose(filled[1, 0, 30:], ramp[1, 0, 29].expand(10))    # past the last known: held
    flat = torch.full((1, 1, 4, 8, 8), 0.25)
    assert torch.allclose(cubic_upsample(flat, (8, 8, 8)), torch.full((1, 1, 8, 8, 8), 0.25), atol=1e-6)


def test_a_3d_patch_run_resumes_bitwise(tmp_path):
    common = [*VOLUMES, *SEGMENT, "train.checkpoint_every=2", "train.lr_scheduler=constant_with_warmup",
              "data.augment.flip=true", "data.augment.rotate=10", "data.augment.intensity=0.1"]
    _run(tmp_path, "straight", *common, "train.max_steps=4")
    _run(tmp_path, "halves", *common, "train.max_steps=2")
    _run(tmp_path, "halves", *common, "train.max_steps=4", "train.resume=latest")
    a, b = (load_file(tmp_path / r / "checkpoints" / "step_000004" / "model.safetensors") for r in ("straight", "halves"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_of_a_3d_patch_run_at_a_random_moment_then_resume_is_bitwise_a_straight_run(tmp_path):
    """The issue's reliability target: three train.py processes (one thread each, so the kernels sum alike), a
    straight run; a run killed with SIGKILL at a random moment after its first checkpoint; its resume. The
    resumed run's last weights equal the straight run's bit for bit."""
    root = Path(__file__).resolve().parents[1]
    common = [*TINY, *VOLUMES, *SEGMENT, "model.num_classes=null", "train.num_threads=1", "train.checkpoint_every=1",
              "train.keep_checkpoints=2", "train.lr_scheduler=constant_with_warmup", "train.max_steps=30",
              "data.augment.flip=true", "data.augment.rotate=10", "data.augment.intensity=0.1"]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")

    def launch(name, *extra):
        return subprocess.Popen([sys.executable, str(root / "train.py"), *common, f"output_dir={tmp_path / name}",
                                 *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    straight = launch("straight")
    killed = launch("killed")
    first = step_dir(tmp_path / "killed" / "checkpoints", 1)
    end = time.time() + 300
    while not (first / "model.safetensors").exists() and time.time() < end and killed.poll() is None:
        time.sleep(0.05)
    moment = random.uniform(0.0, 1.5)
    time.sleep(moment)
    killed.kill()
    assert killed.wait() == -9, "the run ended before it was killed"              # killed mid-run, not after
    assert straight.wait() == 0, straight.stderr.read()
    resumed = launch("killed", "train.resume=latest")
    assert resumed.wait() == 0, resumed.stderr.read()
    a, b = (load_file(step_dir(tmp_path / r / "checkpoints", 30) / "model.safetensors") for r in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed {moment:.2f} s after step 1"
