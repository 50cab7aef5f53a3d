"""sample.py --cond and diffunet.sample_folders.sample_conditioned: image-conditioned models (super-resolution,
inpainting, RePaint) sampled from a folder of conditions; tiny random pipeline folders on the CPU."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

import sample
from conftest import tiny
from diffunet.errors import CheckpointError
from diffunet.pretrained import pipeline_options
from diffunet.data import read_image
from diffunet.model.pipeline import DiffunetPipeline
from diffunet.sample_folders import sample_conditioned, sample_to_folder

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------------------------------- sample.py --cond

def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def lows(root: Path, names=("a/x.png", "b/c/y.png", "z.png"), size=(4, 4), seed=0) -> Path:
    """Low-resolution conditions of a x4 super-resolution model at any depth (different content each)."""
    rng = np.random.default_rng(seed)
    for name in names:
        write(root / name, rng.integers(0, 256, size, dtype=np.uint8))
    return root


def files(folder: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(folder).as_posix(): read_image(p) for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def sr(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("sr"), "super_resolution", 4, cond_channels=1)


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("inpaint"), "inpainting", cond_channels=2)


KW = dict(steps=3, progress=False)


def test_one_output_per_condition_under_its_relative_path(sr, tmp_path):
    cond = lows(tmp_path / "cond")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(cond / "b" / "rgb.jpg")    # RGB and JPEG: one gray channel
    assert sample.main([str(sr), "--cond", str(cond), "--out", str(tmp_path / "out"), "--steps", "2",
                        "--no-progress"]) == 0
    out = files(tmp_path / "out")
    assert sorted(out) == ["a/x.png", "b/c/y.png", "b/rgb.png", "grid.png", "z.png"]
    assert all(image.shape == (16, 16, 1) for name, image in out.items() if name != "grid.png")
    assert out["grid.png"].shape == (2 * 18 + 2, 4 * 18 + 2, 1)           # rows: condition, output; 4 columns


def test_sr_model_without_its_condition_is_the_pipelines_error(sr, tmp_path):
    with pytest.raises(ValueError, match=r"this pipeline \(super_resolution\) needs image="):
        sample_to_folder(sr, tmp_path / "out", 2, **KW)


def test_several_outputs_per_condition_with_their_mean_and_std(sr, tmp_path):
    out = sample_conditioned(sr, lows(tmp_path / "cond", ["x.png"]), tmp_path / "out", num_per_cond=3, **KW)
    got = files(out)
    assert sorted(got) == ["grid.png", "x_0.png", "x_1.png", "x_2.png", "x_mean.png", "x_std.png"]
    stack = np.stack([got[f"x_{k}.png"] for k in range(3)]).astype(float)
    assert (stack[0] != stack[1]).mean() > 0.5                             # each output its own noise
    assert np.abs(got["x_mean.png"] - stack.mean(0)).max() <= 0.5          # within rounding
    assert np.abs(got["x_std.png"] - 2 * stack.std(0)).max() <= 0.5        # std doubled: 255 = the largest spread
    assert got["x_std.png"].max() > 0


def test_outputs_depend_neither_on_batch_size_nor_on_other_files(sr, tmp_path):
    cond = lows(tmp_path / "cond")
    one = files(sample_conditioned(sr, cond, tmp_path / "one", num_per_cond=2, batch_size=1, grid=False, **KW))
    three = files(sample_conditioned(sr, cond, tmp_path / "three", num_per_cond=2, batch_size=3, grid=False, **KW))
    assert sorted(one) == sorted(three) and len(one) == 12
    assert all(np.array_equal(one[name], three[name]) for name in one)    # bitwise
    alone = tmp_path / "alone" / "b" / "c"                               # the same file, its siblings gone
    alone.mkdir(parents=True)
    shutil.copy(cond / "b/c/y.png", alone / "y.png")
    by_itself = files(sample_conditioned(sr, tmp_path / "alone", tmp_path / "alone_out", num_per_cond=2, grid=False,
                                         **KW))
    assert len(by_itself) == 4 and all(np.array_equal(by_itself[name], one[name]) for name in by_itself)


def test_resume_writes_only_what_is_missing(sr, tmp_path, capsys):
    cond, out = lows(tmp_path / "cond"), tmp_path / "out"
    sample_conditioned(sr, cond, out, num_per_cond=2, **KW)
    before = files(out)
    (out / "a/x_1.png").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if "_mean" not in p.name and "_std" not in p.name
              and p.name != "grid.png"}
    capsys.readouterr()
    sample_conditioned(sr, cond, out, num_per_cond=2, batch_size=4, **KW)
    assert "1 images written by 1 process(es), 5 already there" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    after = files(out)
    assert sorted(after) == sorted(before) and all(np.array_equal(after[n], before[n]) for n in before)


def masks_for(root: Path, names, hole=(slice(4, 12), slice(2, 9)), ones=False, size=(16, 16)) -> Path:
    for name in names:
        mask = np.zeros(size, np.uint8)
        mask[hole] = 1 if ones else 255
        write(root / Path(name).with_suffix(".png"), mask)
    return root


def test_inpainting_keeps_the_condition_outside_the_mask(inpaint, tmp_path):
    names = ["a/x.png", "y.png"]
    cond = lows(tmp_path / "cond", names, size=(16, 16))
    masks = masks_for(tmp_path / "masks", names[:1])
    masks_for(masks, names[1:], ones=True)                                 # a 0/1 mask file: its 1s are white
    out = files(sample_conditioned(inpaint, cond, tmp_path / "out", mask=masks, **KW))
    keep = read_image(masks / "a/x.png")[..., 0] == 0
    for name in names:
        truth = read_image(cond / name)
        assert np.array_equal(out[name][keep], truth[keep])               # exactly
        assert (out[name][~keep] != truth[~keep]).mean() > 0.5             # the hole is generated
    assert out["grid.png"].shape[0] == 3 * 18 + 2                         # condition, mask, output


def run_main(args, capsys) -> tuple[int, str]:
    code = sample.main([*map(str, args), "--steps", "2", "--no-progress"])
    return code, capsys.readouterr().err.strip()


def test_masks_are_needed_paired_and_named(inpaint, tmp_path, capsys):
    cond = lows(tmp_path / "cond", ["a/x.png", "y.png"], size=(16, 16))
    code, err = run_main([inpaint, "--cond", cond, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith("error: this inpainting pipeline fills masks: pass --mask DIR")
    masks = masks_for(tmp_path / "masks", ["a/x.png", "a/z.png"])
    code, err = run_main([inpaint, "--cond", cond, "--mask", masks, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == f"error: {cond / 'y.png'} has no file of the same relative path and stem under {masks}"
    (cond / "y.png").unlink()
    code, err = run_main([inpaint, "--cond", cond, "--mask", masks, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err == f"error: {masks / 'a/z.png'} has no file of the same relative path and stem under " \
                                f"{cond}"
    (masks / "a/z.png").unlink()
    write(masks / "a/x.png", np.full((16, 16), 128, np.uint8))             # checked as training's masks are
    code, err = run_main([inpaint, "--cond", cond, "--mask", masks, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith(f"error: {masks / 'a/x.png'} has values other than 0/255 or 0/1")
    assert not (tmp_path / "out").exists()


def test_another_aspect_ratio_stops_before_sampling_naming_the_file(sr, tmp_path, capsys):
    cond = lows(tmp_path / "cond", ["a.png"])
    lows(cond, ["z.png"], size=(4, 8))
    code, err = run_main([sr, "--cond", cond, "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {cond / 'z.png'}: image is 4x8, but this model takes 4x4 (another aspect ratio)")
    assert not list(tmp_path.joinpath("out").rglob("*.png"))              # not even a.png: checked first


def test_another_size_is_resized_with_a_warning_naming_the_file(sr, tmp_path):
    cond = lows(tmp_path / "cond", ["big.png"], size=(8, 8))
    lows(cond, ["small.png", "full.png"])
    write(cond / "full.png", np.zeros((16, 16), np.uint8))                # the model's size: taken as upsampled
    with pytest.warns(UserWarning, match=f"{cond / 'big.png'}: image is 8x8; resized to the model's 4x4") as caught:
        out = files(sample_conditioned(sr, cond, tmp_path / "out", batch_size=3, **KW))
    assert len(caught) == 1 and sorted(out) == ["big.png", "full.png", "grid.png", "small.png"]
    for name in ("big2.png", "big3.png"):                               # several: said once, with the count
        lows(cond, [name], size=(8, 8))
    with pytest.warns(UserWarning) as caught:
        sample_conditioned(sr, cond, tmp_path / "out", batch_size=3, **KW)
    assert [str(w.message) for w in caught] == [
        f"{cond / 'big.png'}: image is 8x8; resized to the model's 4x4 (2 more of the 5 files too)"]


def test_conditions_of_any_size_are_sampled_by_tiles(sr, inpaint, tmp_path):
    """--tile: every condition keeps its size and aspect ratio (no resizing, no warning), sizes mix in one run."""
    cond = lows(tmp_path / "cond", ["big.png"], size=(8, 8))
    lows(cond, ["small.png"])
    lows(cond, ["wide.png"], size=(6, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                      # nothing resized
        out = files(sample_conditioned(sr, cond, tmp_path / "out", tile=16, batch_size=3, **KW))
    assert {name: image.shape[:2] for name, image in out.items() if name != "grid.png"} == {
        "big.png": (32, 32), "small.png": (16, 16), "wide.png": (24, 40)}
    assert out["grid.png"].shape == (2 * 34 + 2, 34 + 2, 1)                 # the first condition's size only
    holes = lows(tmp_path / "holes", ["x.png"], size=(24, 40))
    masks = masks_for(tmp_path / "masks", ["x.png"], size=(24, 40))
    filled = files(sample_conditioned(inpaint, holes, tmp_path / "filled", mask=masks, tile=16, **KW))["x.png"]
    keep = read_image(masks / "x.png")[..., 0] == 0
    assert np.array_equal(filled[keep], read_image(holes / "x.png")[keep])


def test_repaint_inpaints_with_an_unconditional_model(tmp_path, capsys):
    model = save_pipeline(tmp_path / "uncond", scheduler=DDPMScheduler(num_train_timesteps=100))
    cond = lows(tmp_path / "cond", ["x.png"], size=(16, 16))
    masks = masks_for(tmp_path / "masks", ["x.png"])
    code, err = run_main([model, "--cond", cond, "--out", tmp_path / "out", "--scheduler", "repaint"], capsys)
    assert code == 2 and "generate pipeline with RePaint fills masks: pass --mask" in err
    code, err = run_main([model, "--cond", cond, "--out", tmp_path / "nomask"], capsys)
    assert code == 2 and "takes no image condition" in err                 # no RePaint: the pipeline's error
    out = sample_conditioned(model, cond, tmp_path / "out", mask=masks, scheduler="repaint", steps=10,
                             progress=False)
    keep = read_image(masks / "x.png")[..., 0] == 0
    got, truth = read_image(out / "x.png"), read_image(cond / "x.png")
    assert np.array_equal(got[keep], truth[keep]) and (got[~keep] != truth[~keep]).mean() > 0.5


def test_options_of_the_other_mode_are_refused_by_name(sr, tmp_path, capsys):
    for args, message in ((["--cond", tmp_path, "--num-images", "3"], "--num-images: not with --cond"),
                          (["--mask", tmp_path, "--num-per-cond", "2"], "--mask, --num-per-cond: only with --cond")):
        with pytest.raises(SystemExit) as stop:
            sample.parse([str(sr), "--out", str(tmp_path / "out"), *map(str, args)])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_two_processes_split_the_work_and_write_the_same_files(sr, tmp_path):
    """As test_sampling's two-process run: accelerate launch, over gloo where there is no GPU."""
    cond = lows(tmp_path / "cond")
    one = files(sample_conditioned(sr, cond, tmp_path / "one", num_per_cond=2, **KW))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(ROOT / "sample.py"), str(sr), "--cond", str(cond), "--out", str(tmp_path / "two"),
                          "--num-per-cond", "2", "--steps", "3", "--batch-size", "2", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "6 images written by 2 process(es)" in run.stdout
    two = files(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 3 * 4 + 1                    # outputs, mean, std, grid
    for name in one:
        assert np.abs(one[name].astype(int) - two[name]).max() <= 1               # float rounding at .5 only


def test_files_that_would_write_one_output_are_refused(sr, tmp_path, capsys):
    cond = lows(tmp_path / "cond", ["a/x.png", "a/x.jpg"])
    code, err = run_main([sr, "--cond", cond, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith(f"error: {cond / 'a/x.jpg'} and {cond / 'a/x.png'} have the same stem")
    cond = lows(tmp_path / "cond2", ["grid.png", "x.png", "x_mean.png", "x_0.png"])
    code, err = run_main([sr, "--cond", cond, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith(f"error: {cond / 'grid.png'} and the grid would both write")
    assert not (tmp_path / "out").exists()
    out = files(sample_conditioned(sr, cond, tmp_path / "out", num_per_cond=2, **KW))   # x_mean_0 is not x_mean
    assert len(out) == 4 * 4 + 1 and "x_mean_mean.png" in out and "grid_std.png" in out
