"""sample.py and diffunet.sampling: seeds, schedulers, guidance, class labels, files, resuming, processes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from conftest import tiny
from diffunet.errors import CheckpointError
from diffunet.data import read_image
from diffunet.model.pipeline import DiffunetPipeline, predict
from diffunet.objectives import OBJECTIVES
from diffunet.sample_folders import sample_to_folder
from diffunet.sampling import class_labels_for, generate, load_model, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TRAIN = DDPMScheduler(num_train_timesteps=100).config          # a short training schedule keeps steps cheap


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny(zero_init=False, num_classes=3).eval()        # random, not zero, weights: outputs depend on input


@pytest.fixture(scope="module")
def pipeline(model, tmp_path_factory):
    """A pipeline folder as train.py writes it."""
    path = tmp_path_factory.mktemp("pipeline")
    DiffunetPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


def folder_images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_image(p) for p in sorted(folder.iterdir()) if p.name[0].isdigit()}


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_images_do_not_depend_on_batch_size_and_extend(model, name):
    sched = make_scheduler(name, TRAIN)                         # ddpm and ddim eta=1 draw noise at every step
    kw = dict(steps=4, seed=7, class_labels="all", eta=1.0)
    whole = generate(model, sched, 5, batch_size=5, **kw)
    pieces = generate(model, sched, 5, batch_size=2, **kw)
    tail = generate(model, sched, 2, batch_size=1, start_index=3, **kw)
    # equal up to float rounding: a batched conv may sum in another order than a single-image one
    assert torch.allclose(whole, pieces, atol=1e-5) and torch.allclose(whole[3:], tail, atol=1e-5)
    assert (whole[0] - whole[1]).abs().max() > 0.1                                   # images differ
    assert (whole - generate(model, sched, 5, **dict(kw, seed=8))).abs().max() > 0.1  # seeds matter


TRAINING = {"ddpm": TRAIN, "flow": FlowMatchEulerDiscreteScheduler(num_train_timesteps=100).config,
            "edm": EDMEulerScheduler().config}      # one training scheduler per objective


# RePaint needs an image and a mask: tests/test_sample_cond.py and test_conditioning.py run it
@pytest.mark.parametrize("objective, name", [(o, n) for o in OBJECTIVES for n, s in OBJECTIVES[o].samplers.items()
                                             if not s.needs_mask])
def test_every_scheduler_runs(model, objective, name):
    sched = make_scheduler(name, TRAINING[objective])
    images = generate(model, sched, 2, steps=3, class_labels=1, guidance_scale=2.0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    assert images.abs().max() <= 1 and (images[0] - images[1]).abs().max() > 0


def test_guidance_one_is_conditional_zero_unconditional(model):
    x, t, labels = torch.randn(3, 1, 16, 16), torch.tensor(40), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, labels).sample, model(x, t, torch.full((3,), 3)).sample   # 3 = null class
        assert (cond - uncond).abs().max() > 1e-3                                       # labels matter here
        assert torch.equal(predict(model, x, t, labels, 1.0), cond)
        assert torch.equal(predict(model, x, t, labels, 0.0), uncond)
        assert torch.allclose(predict(model, x, t, labels, 3.0), uncond + 3 * (cond - uncond), atol=1e-5)
    sched = make_scheduler("ddim", TRAIN)
    unconditional = generate(model, sched, 3, steps=3, class_labels=None)
    assert torch.equal(generate(model, sched, 3, steps=3, class_labels="all", guidance_scale=0.0), unconditional)
    assert not torch.allclose(generate(model, sched, 3, steps=3, class_labels="all"), unconditional)


def test_class_labels():
    labels = class_labels_for("all", range(3, 26), 10)
    assert labels.tolist()[:3] == [3, 4, 5] and np.ptp(np.bincount(labels.numpy(), minlength=10)) <= 1
    assert class_labels_for(4, range(3), 10).tolist() == [4, 4, 4]
    assert class_labels_for(None, range(3), 10) is None
    with pytest.raises(ValueError, match="unconditional"):
        class_labels_for("all", range(3), None)
    with pytest.raises(ValueError, match="outside"):
        class_labels_for(10, range(3), 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_float32(dtype):
    torch.manual_seed(0)
    model = tiny(zero_init=False).eval()
    sched = make_scheduler("ddim", TRAIN)
    ref = generate(model, sched, 2, steps=3)
    low = generate(model.to(dtype), sched, 2, steps=3)
    assert low.dtype == torch.float32 and (low - ref).abs().max() < 0.1


def test_folder_resume_extend_and_npz(pipeline, tmp_path):
    kw = dict(steps=3, batch_size=2, seed=3, progress=False)
    full = sample_to_folder(pipeline, tmp_path / "full", 6, npz="s.npz", **kw)
    want = folder_images(full)
    assert sorted(want) == [f"{i:06d}.png" for i in range(6)] and (full / "grid.png").is_file()
    data = np.load(full / "s.npz")
    assert np.array_equal(data["images"], np.stack(list(want.values()))) and data["labels"].tolist() == [0, 1, 2, 0, 1, 2]

    part = tmp_path / "part"                           # an interrupted run: 0..3 done, 2 lost
    sample_to_folder(pipeline, part, 4, **kw)
    (part / "000002.png").unlink()
    stamp = (part / "000001.png").stat().st_mtime_ns
    sample_to_folder(pipeline, part, 6, **dict(kw, batch_size=4))          # resume, other batch size
    assert (part / "000001.png").stat().st_mtime_ns == stamp             # done images are not redone
    ext = sample_to_folder(pipeline, tmp_path / "ext", 3, start_index=3, **kw)     # the second half alone
    for name, image in folder_images(part).items():
        assert np.abs(image.astype(int) - want[name]).max() <= 1          # <= 1: float rounding at .5
    for name, image in folder_images(ext).items():
        assert np.abs(image.astype(int) - want[name]).max() <= 1


@pytest.mark.parametrize("channels,size,suffix", [(2, (8, 16), "png"), (5, (16, 8), "npy")])
def test_any_channel_count_and_non_square(tmp_path, channels, size, suffix):
    model = tiny(in_channels=channels, sample_size=size, zero_init=False)
    model.save_pretrained(tmp_path / "model")                            # a bare model folder
    out = sample_to_folder(tmp_path / "model", tmp_path / "out", 3, scheduler="euler", steps=2, objective="ddpm",
                           progress=False)
    image = read_image(out / f"000002.{suffix}")
    assert image.shape == (*size, channels) and image.dtype == np.uint8 and (out / "grid.png").is_file()


def test_bare_model_folder_takes_scheduler_and_prediction_type(tmp_path):
    tiny().save_pretrained(tmp_path)
    unet, sched = load_model(tmp_path, "unipc", prediction_type="v_prediction")
    assert type(sched).__name__ == "UniPCMultistepScheduler"
    assert sched.config.prediction_type == "v_prediction" and sched.config.num_train_timesteps == 1000
    with pytest.raises(CheckpointError, match="pipeline folder"):
        load_model(tmp_path / "nothing")


def test_pipeline_folder_keeps_training_schedule(pipeline):
    unet, sched = load_model(pipeline, "dpmpp")
    assert sched.config.num_train_timesteps == 100 and unet.config.num_classes == 3


def test_one_and_two_processes_give_the_same_images(pipeline, tmp_path):
    args = [str(pipeline), "--steps", "3", "--num-images", "7", "--seed", "5", "--no-progress"]
    one = sample_to_folder(pipeline, tmp_path / "one", 7, steps=3, seed=5, batch_size=7, progress=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(ROOT / "sample.py"), *args, "--out", str(tmp_path / "two"), "--batch-size", "2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "7 images written by 2 process(es)" in run.stdout
    a, b = folder_images(one), folder_images(tmp_path / "two")
    assert sorted(a) == sorted(b) == [f"{i:06d}.png" for i in range(7)]                # no gaps, no extras
    for name in a:
        assert np.abs(a[name].astype(int) - b[name]).max() <= 1


def test_sample_py_bad_folder_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(tmp_path / "nothing"), "--out",
                             str(tmp_path / "s")], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'} is neither a pipeline folder (model_index.json) nor a model folder "
        "(config.json); pass the <output_dir>/pipeline folder that train.py writes"]


def test_a_ddpm_pipeline_folder_from_before_samples_the_same_images(model, pipeline, tmp_path):
    DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "old")
    kw = dict(steps=3, seed=2, progress=False, grid=False)
    old = folder_images(sample_to_folder(tmp_path / "old", tmp_path / "a", 3, **kw))
    new = folder_images(sample_to_folder(pipeline, tmp_path / "b", 3, **kw))
    assert sorted(old) == sorted(new) and all(np.array_equal(old[k], new[k]) for k in old)


class _RunsCode:
    """Pickled, it calls ``Path.touch(marker)`` when unpickled: what a malicious .bin would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_sample_py_pickled_bin_weights_are_one_line_and_never_run(model, tmp_path):
    folder, marker = tmp_path / "pipe", tmp_path / "ran"
    DiffunetPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save(model.state_dict(), weights)                                # tensors only: it loads
    assert torch.equal(load_model(folder)[0].conv_in.weight, model.conv_in.weight)
    torch.save({"conv_in.weight": _RunsCode(marker)}, weights)
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(folder), "--out", str(tmp_path / "s")],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2 and not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot load {weights}: it is not a file of tensors")


# ------------------------------------------------------------------------------------------ issue 30: as the run did

def test_sample_py_samples_as_the_run_did_unless_told(model, tmp_path, capsys):
    """A pipeline folder's recorded sample.* (scheduler, steps, guidance) are sample.py's defaults: the same
    images as asking for them, other images than the old fixed defaults (ddim, 50 steps, guidance 1)."""
    import sample

    folder = tmp_path / "pipeline"
    DiffunetPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=100), sample_scheduler="dpmpp",
                     sample_steps=3, sample_guidance_scale=2.0).save_pretrained(folder)
    args = ["--num-images", "3", "--no-progress", "--no-grid"]
    assert sample.main([str(folder), "--out", str(tmp_path / "run"), *args]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line == (f"sampling with dpmpp (DPMSolverMultistepScheduler), 3 steps, guidance 2 (--scheduler, --steps, "
                    f"--guidance-scale: the run's sample.* in {folder.resolve() / 'model_index.json'})")
    assert sample.main([str(folder), "--out", str(tmp_path / "told"), "--scheduler", "dpmpp", "--steps", "3",
                        "--guidance-scale", "2", *args]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("guidance 2")      # nothing taken from the run
    assert sample.main([str(folder), "--out", str(tmp_path / "old"), "--scheduler", "ddim", "--steps", "50",
                        "--guidance-scale", "1", *args]) == 0
    run, told, old = (folder_images(tmp_path / name) for name in ("run", "told", "old"))
    assert all(np.array_equal(run[k], told[k]) for k in run)
    assert any(not np.array_equal(run[k], old[k]) for k in run)


def test_sample_py_errors_are_one_line(pipeline, tmp_path, capsys):
    import sample

    for argv, message in [([str(pipeline), "--out", "x", "--steps", "x"], "argument --steps: invalid int value"),
                          ([str(pipeline), "--out", "x", "--mask", "m"], "--mask: only with --cond"),
                          ([str(pipeline), "--out", "x", "--dtype", "False"], "argument --dtype: invalid choice")]:
        with pytest.raises(SystemExit) as e:
            sample.parse(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and "usage:" not in err and message in err, err
    help_text = subprocess.run([sys.executable, str(ROOT / "sample.py"), "-h"], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    assert "--dtype {auto,no,bf16,fp16,fp32,float32,bfloat16,float16}" in help_text and "False" not in help_text
