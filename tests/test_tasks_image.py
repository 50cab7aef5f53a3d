"""The super_resolution and inpainting tasks: what a batch means, the checks before compute, and whole tiny runs
(grids, evaluation, the saved pipeline, exact resume)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet.config import ConfigError, load_config
from diffunet.data import split_holdout
from diffunet.model.pipeline import upsample_condition
from diffunet.sampling import generate, load_model
from diffunet.tasks import TASKS, degrade
from diffunet.training.loop import train, validate

FAST = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "train.batch_size=8",
        "train.log_every=2", "train.warmup_steps=2", "sample.num_images=6", "sample.steps=2", "data.holdout=20",
        "train.eval_num_images=12", "train.sample_every=100"]


def cfg_of(preset, tmp_path, *overrides):
    return load_config(preset, FAST + [f"output_dir={tmp_path / 'run'}", *overrides])


def batch_of(cfg, n=6):
    model, dataset = validate(cfg)
    items = [dataset[i] for i in range(n)]
    return model, (torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items]))


def test_super_resolution_conditions_on_the_area_downsampled_image(tmp_path):
    cfg = cfg_of("digits-sr", tmp_path, "data.hflip=true")
    model, batch = batch_of(cfg)
    torch.manual_seed(0)
    x0, keywords = TASKS["super_resolution"].training_batch(batch, model, cfg)
    assert set(keywords) == {"cond"}                                # no labels, no dropout flags by default
    low = degrade(x0, 4)                                            # flipped images, flipped conditions
    assert low.shape == (6, 1, 4, 4)
    torch.testing.assert_close(low, x0.reshape(6, 1, 4, 4, 4, 4).mean((3, 5)))   # each pixel its 4x4 block's mean
    torch.testing.assert_close(keywords["cond"], upsample_condition(low, (16, 16)))
    assert not torch.equal(x0, batch[0])                            # some were flipped (seeded)


def test_inpainting_conditions_on_the_masked_image_and_the_mask(tmp_path):
    cfg = cfg_of("digits-inpaint", tmp_path)
    model, batch = batch_of(cfg)
    x0, keywords = TASKS["inpainting"].training_batch(batch, model, cfg)
    cond = keywords["cond"]
    image, mask = cond[:, :1], cond[:, 1:]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (image[mask.bool()] == 0).all()
    torch.testing.assert_close(image[~mask.bool()], x0[~mask.bool()])


def test_cond_dropout_flags_about_that_fraction(tmp_path):
    cfg = cfg_of("digits-sr", tmp_path, "train.cond_dropout=0.3")
    model, batch = batch_of(cfg, 64)
    torch.manual_seed(0)
    flags = torch.cat([TASKS["super_resolution"].training_batch(batch, model, cfg)[1]["cond_dropped"]
                       for _ in range(20)])
    assert flags.dtype == torch.bool and 0.2 < flags.float().mean() < 0.4


@pytest.mark.parametrize("preset,overrides,message", [
    ("digits-sr", ["model.cond_channels=0"], "task=super_resolution needs model.cond_channels=1 .got 0.; set "
                                             "model.cond_channels=1"),
    ("digits-inpaint", ["model.cond_channels=1"], "task=inpainting needs model.cond_channels=2"),
    ("digits-sr", ["data.holdout=0"], "train.eval_every needs held-out images for task=super_resolution: set "
                                      "data.holdout"),
    ("digits-sr", ["super_resolution.factor=3"], "super_resolution.factor=3 must be at least 2 and divide the model's size 16x16"),
    ("digits-inpaint", ["inpainting.mask=boxes"], "inpainting.mask"),
    ("digits-sr", ["task=super_res"], "task"),
    ("digits-sr", ["train.cond_dropout=1.0"], r"train.cond_dropout must be in \[0, 1\)"),
    ("digits-sr", ["model.time_condition=none"], "task=super_resolution trains a diffusion model, which needs a "
                                                 "timestep"),
    ("digits", ["model.time_condition=none", "model.num_classes=null"], "task=generate trains a diffusion model"),
])
def test_bad_task_configs_stop_before_compute(tmp_path, preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg_of(preset, tmp_path, *overrides))


def test_paired_data_of_the_other_kind_is_refused(tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "data" / sub / "a.png")
    with pytest.raises(ConfigError, match="pairs its images with masks, but task=super_resolution takes conds"):
        validate(cfg_of("digits-sr", tmp_path, f"data.source={tmp_path / 'data'}", "data.holdout=0",
                        "train.eval_every=0"))


def test_a_super_resolution_run_end_to_end(tmp_path):
    cfg = cfg_of("digits-sr", tmp_path, "train.max_steps=4", "train.eval_every=4")
    pipe_dir = train(cfg)
    run = Path(cfg.output_dir)
    grid = Image.open(run / "samples" / "final.png")
    assert grid.size == (6 * 18 + 2, 4 * 18 + 2)        # 6 held-out digits x (input, bicubic, output, truth)
    scores = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert {"psnr", "ssim", "accuracy"} <= scores.keys() and 0 <= scores["accuracy"] <= 1
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert (index["task"], index["sr_factor"]) == ("super_resolution", 4)


def test_an_inpainting_run_keeps_the_known_pixels(tmp_path):
    cfg = cfg_of("digits-inpaint", tmp_path, "train.max_steps=3", "train.eval_every=3")
    pipe_dir = train(cfg)
    assert {"psnr", "psnr_masked", "ssim", "accuracy"} <= json.loads(
        (Path(cfg.output_dir) / "eval.jsonl").read_text()).keys()
    unet, scheduler = load_model(pipe_dir)
    _, held = split_holdout(validate(cfg)[1], 20)
    x = torch.stack([held[i][0] for i in range(5)])
    mask = torch.zeros(5, 1, 16, 16)
    mask[..., 3:11, 5:13] = 1
    out = generate(unet, scheduler, 5, steps=3, image=(x + 1) / 2, mask_image=mask, task="inpainting")
    keep = ~mask.bool().expand_as(x)
    to_u8 = lambda t: ((t + 1) * 127.5).round()                     # noqa: E731
    assert torch.equal(to_u8(out)[keep], to_u8(x)[keep])


def test_inpainting_resumes_exactly(tmp_path):
    """The training masks are drawn from the global RNG, which checkpoints restore: a resumed run is the same."""
    common = ["train.checkpoint_every=3", "train.eval_every=0", "inpainting.mask=mixed"]
    train(cfg_of("digits-inpaint", tmp_path / "straight", *common, "train.max_steps=6"))
    train(cfg_of("digits-inpaint", tmp_path / "halves", *common, "train.max_steps=3"))
    train(cfg_of("digits-inpaint", tmp_path / "halves", *common, "train.max_steps=6", "train.resume=latest"))
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / r / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
            for r in ("straight", "halves"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_from_a_paired_mask_folder_uses_its_masks(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        for sub, array in (("images", rng.integers(0, 256, (16, 16), dtype=np.uint8)),
                           ("masks", np.pad(np.full((4, 4), 255, np.uint8), ((i % 12, 12 - i % 12), (2, 10))))):
            (tmp_path / "data" / sub / "deep").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / "data" / sub / "deep" / f"{i:02d}.png")
    cfg = cfg_of("digits-inpaint", tmp_path, f"data.source={tmp_path / 'data'}", "data.holdout=4",
                 "train.max_steps=2", "train.eval_every=2", "train.eval_num_images=4")
    model, dataset = validate(cfg)
    image, label, mask = dataset[3]
    assert mask.shape == (1, 16, 16) and mask.sum() == 16 and label == -1
    x0, keywords = TASKS["inpainting"].training_batch(tuple(t[None] for t in (image, torch.tensor(label), mask)),
                                                      model, cfg)
    assert torch.equal(keywords["cond"][:, 1:], mask[None])
    train(cfg)
    assert "psnr_masked" in json.loads((Path(cfg.output_dir) / "eval.jsonl").read_text())


def test_the_image_conditioned_bench_runs_end_to_end(tmp_path, capsys):
    """A smoke run of bench/bench_image_cond.py on three tiny runs (no numbers asserted: the targets are the
    bench's business), so that a change of the task or pipeline API cannot break it unnoticed."""
    import importlib.util
    import sys

    runs = {}
    for name, preset, extra in (("sr", "digits-sr", []), ("inpaint", "digits-inpaint", []),
                                ("uncond", "digits-ddpm", ["model.num_classes=null", "data.holdout=20"])):
        cfg = load_config(preset, FAST + [f"output_dir={tmp_path / name}", "train.max_steps=2", "train.eval_every=0",
                                          *extra])
        train(cfg)
        runs[name] = tmp_path / name
    path = Path(__file__).parents[1] / "bench" / "bench_image_cond.py"
    spec = importlib.util.spec_from_file_location("bench_image_cond", path)
    bench = sys.modules["bench_image_cond"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--sr", str(runs["sr"]), "--inpaint", str(runs["inpaint"]), "--repaint", str(runs["uncond"]),
                "--num", "6", "--steps", "2", "--repaint-steps", "10", "--grids", str(tmp_path / "grids"),
                "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "super_resolution x4, the first 6 held-out digits" in out and "repaint" in out
    results = json.loads((tmp_path / "b.json").read_text())
    assert [set(r["rows"]) for r in results] == [{"bicubic", "ours"}, {"ours", "repaint"}]
    assert Image.open(tmp_path / "grids" / "inpainting.png").size == (6 * 66 + 2, 5 * 66 + 2)   # 5 rows, 64 px


def test_a_bad_mask_row_of_a_hf_dataset_stops_before_any_compute(tmp_path):
    datasets = pytest.importorskip("datasets")
    from diffunet.data import DataError

    good = np.zeros((16, 16), np.uint8)
    good[4:12, 4:12] = 255
    bad = good.copy()
    bad[0, 0] = 128
    rows = {"image": [Image.fromarray(np.full((16, 16), 200, np.uint8))] * 12,
            "mask": [Image.fromarray(good)] * 11 + [Image.fromarray(bad)]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
                               ).save_to_disk(tmp_path / "hf")
    cfg = cfg_of("digits-inpaint", tmp_path, f"data.source=hf:{tmp_path / 'hf'}", "data.mask_column=mask",
                 "data.label_column=null", "data.holdout=2", "train.eval_num_images=2", "train.max_steps=2")
    with pytest.raises(DataError, match=r"hf\[11\]\.mask has values other than 0/255 or 0/1 \(e\.g\. 128\)"):
        train(cfg)
    assert not (Path(cfg.output_dir) / "checkpoints").exists()
    train(cfg_of("digits-inpaint", tmp_path / "skip", f"data.source=hf:{tmp_path / 'hf'}", "data.mask_column=mask",
                 "data.label_column=null", "data.holdout=2", "train.eval_num_images=2", "train.max_steps=2",
                 "data.bad_images=skip"))
