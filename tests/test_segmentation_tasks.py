"""The segmentation tasks (deterministic and by diffusion): what a batch means, the checks before compute, the
pipeline (whole and tiled, ensembles) and whole tiny runs, through sample.py and evaluate."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from PIL import Image

import sample
from diffunet import evaluate
from diffunet import DiffunetSegmentationPipeline, UNet
from diffunet.data.cells import make_cells
from diffunet.config import ConfigError, load_config
from diffunet.data import DataError
from diffunet.model.segment_pipeline import mask_to_sample, sample_to_onehot
from diffunet.sample_folders import segment_to_folder
from diffunet.tasks import TASKS
from diffunet.tasks.segmentation import segmentation_scores
from diffunet.training.loop import train, validate

FAST = ["model.sample_size=16", "model.base_channels=8", "model.norm_groups=4", "data.num_crops=48",
        "data.holdout=8", "train.batch_size=8", "train.log_every=2", "train.warmup_steps=2", "train.eval_num_images=8",
        "train.sample_every=100", "sample.num_images=4", "sample.steps=2", "train.checkpoint_every=100"]
SEG = ["model.channel_mult=[1,2]"]
DIFF = ["model.channel_mult=[1,2]", "segment.ensemble=3"]


def cfg_of(preset, tmp_path, *overrides):
    return load_config(preset, FAST + (SEG if preset == "cells-seg" else DIFF)
                       + [f"output_dir={tmp_path / 'run'}", *overrides])


def batch_of(cfg, n=8):
    model, dataset = validate(cfg)
    items = [dataset[i] for i in range(n)]
    return model, tuple(torch.stack([torch.as_tensor(item[j]) for item in items]) for j in range(len(items[0])))


# ------------------------------------------------------------------------------------------ batches

def test_segmentation_flips_image_mask_and_weight_together(tmp_path):
    cfg = cfg_of("cells-seg", tmp_path, "data.hflip=true")
    model, batch = batch_of(cfg)
    assert len(batch) == 4                                              # unet_weighted_ce: the weight map travels
    torch.manual_seed(0)
    mask, inputs = TASKS["segmentation"].training_batch(batch, model, cfg)
    flipped = [not torch.equal(m, m0) for m, m0 in zip(mask, batch[2])]
    assert any(flipped) and not all(flipped)                            # some flipped (seeded), not all
    for x, m, w, x0, m0, w0 in zip(inputs["image"], mask, inputs["weight"], *batch[0::2], batch[3]):
        turn = (lambda t: t.flip(-1)) if not torch.equal(m, m0) else (lambda t: t)
        assert torch.equal(x, turn(x0)) and torch.equal(m, turn(m0)) and torch.equal(w, turn(w0))


def test_segmentation_loss_is_the_configured_table_entry(tmp_path):
    cfg = cfg_of("cells-seg", tmp_path, "segment.loss=ce")
    model, batch = batch_of(cfg)
    mask, inputs = TASKS["segmentation"].training_batch(batch, model, cfg)
    loss = TASKS["segmentation"].loss(model, None, mask, inputs, cfg)
    logits = model(inputs["image"]).sample
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, mask[:, 0].long()))


def test_diffusion_segmentation_denoises_the_mask_conditioned_on_the_image(tmp_path):
    cfg = cfg_of("cells-segdiff", tmp_path, "train.cond_dropout=0.5")
    model, batch = batch_of(cfg)
    x0, keywords = TASKS["segmentation_diffusion"].training_batch(batch, model, cfg)
    assert set(x0.unique().tolist()) == {-1.0, 1.0}                     # the mask as a sample: 2 m - 1
    torch.testing.assert_close(x0, batch[2] * 2 - 1)
    torch.testing.assert_close(keywords["cond"], batch[0])
    assert keywords["cond_dropped"].dtype == torch.bool


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_masks_round_trip_through_samples(classes):
    ids = torch.randint(0, classes, (4, 1, 6, 7))
    x = mask_to_sample(ids, classes)
    assert x.shape[1] == (1 if classes == 2 else classes) and set(x.unique().tolist()) <= {-1.0, 1.0}
    noisy = x + 0.4 * torch.randn_like(x).clamp(-1, 1) * 0.9            # any sample on the right side decodes back
    onehot = sample_to_onehot(noisy, classes)
    assert torch.equal(onehot.argmax(1), ids[:, 0])


# ------------------------------------------------------------------------------------------ checks

@pytest.mark.parametrize("preset, overrides, message", [
    ("cells-seg", ["model.time_condition=scale_shift"], "task=segmentation is deterministic"),
    ("cells-seg", ["model.out_channels=1"], "model.out_channels >= 2"),
    ("cells-seg", ["data.source=digits", "model.sample_size=16"], "has no masks to segment"),
    ("cells-seg", ["segment.loss=dice"], "segment.loss"),
    ("cells-segdiff", ["model.time_condition=none"], "needs a timestep"),
    ("cells-segdiff", ["model.cond_channels=0"], "conditions on the image"),
    ("cells-segdiff", ["segment.ensemble=0"], "segment.ensemble"),
])
def test_bad_segmentation_configs_fail_before_compute(tmp_path, preset, overrides, message):
    with pytest.raises((ConfigError, DataError), match=message):
        validate(cfg_of(preset, tmp_path, *overrides))


# ------------------------------------------------------------------------------------------ the pipeline

def tiny(timed: bool, padding="same") -> UNet:
    torch.manual_seed(0)
    kwargs = dict(in_channels=1, cond_channels=1) if timed else dict(in_channels=1, out_channels=2,
                                                                      time_condition="none")
    return UNet(sample_size=16, base_channels=8, channel_mult=(1, 2), norm_groups=4, attention_resolutions=(),
                num_res_blocks=1, zero_init=False, padding=padding, **kwargs).eval()


def test_deterministic_pipeline_gives_softmax_masks_of_any_size():
    pipe = DiffunetSegmentationPipeline(tiny(False), None)
    image = torch.rand(2, 1, 24, 40)
    out = pipe(image=image, output_type="pt")
    with torch.no_grad():
        want = pipe.unet(image * 2 - 1).sample.softmax(1)
    torch.testing.assert_close(out.probabilities, want)
    assert torch.equal(out.masks, want.argmax(1)) and out.std is None
    with pytest.raises(ValueError, match="deterministic model gives one mask"):
        pipe(image=image, num_samples=2)
    with pytest.raises(ValueError, match="1-channel images"):
        pipe(image=torch.rand(1, 3, 16, 16))


def test_ensemble_std_is_zero_where_samples_agree_and_seeded_per_image():
    pipe = DiffunetSegmentationPipeline(tiny(True), DDIMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 1, 16, 16)

    def run(images, seeds, n=6):
        return pipe(image=images, num_samples=n, num_inference_steps=3, eta=1.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in seeds])
    out = run(image, [1, 2])
    p = out.probabilities[:, 1]
    torch.testing.assert_close(out.std, (p * (1 - p)).sqrt())          # binary: the std of the indicator
    assert out.std.max() > 0 and torch.equal(out.masks, out.probabilities.argmax(1))
    alone = run(image[1:], [2])                                         # image 1 depends on its generator only
    torch.testing.assert_close(alone.probabilities[0], out.probabilities[1])


# ------------------------------------------------------------------------------------------ whole runs

def write_cells(folder: Path, sizes) -> dict:
    """Cell images (PNG, [0, 255]) of the given sizes under folder/, one sub-folder deep; their binary truth."""
    truth = {}
    for k, size in enumerate(sizes):
        image, instances = make_cells(size, seed=(9, k))
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / "sub" / f"cell{k}.png")
        truth[f"sub/cell{k}"] = instances > 0
    return truth


def trivial_dice(truths) -> tuple[float, float]:
    """The mean Dice (``segmentation_scores``) of an all-background and of an all-foreground mask on these binary
    truths: what a model that ignores its image scores. The cells cover about half of each image, so the second
    is ~0.7."""
    truths = [torch.from_numpy(t.astype(np.int64))[None] for t in truths]
    return tuple(float(np.mean([segmentation_scores(fill(t), t)["dice"] for t in truths]))
                 for fill in (torch.zeros_like, torch.ones_like))


def test_segmentation_run_trains_exports_and_segments_folders_by_tiles(tmp_path):
    cfg = cfg_of("cells-seg", tmp_path, "train.max_steps=30", "train.eval_every=30")
    pipeline = train(cfg)
    run = Path(cfg.output_dir)
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["scheduler"] == [None, None]                           # nothing to schedule
    card = (pipeline / "README.md").read_text()
    assert "A deterministic segmentation model (2 classes)" in card and "`diffunet_segment_pipeline.py`" in card
    assert "python sample.py path/to/this/folder --cond images/ --out masks --tile 128` segments" in card
    head = card.split("## Training")[0]                                 # no scheduler to name, no steps to take
    assert f"with {cfg.sample.steps} steps" not in head and "ddim" not in head and "auto" not in head
    pipe = DiffunetSegmentationPipeline.from_pretrained(pipeline)      # the installed class, no code from the folder
    assert type(pipe) is DiffunetSegmentationPipeline and pipe.scheduler is None
    scores = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()][-1]
    assert {"dice", "iou", "hd95"} <= set(scores) and scores["objects_truth"] > 0     # scored on the next lines
    assert (run / "samples" / "final.png").is_file()

    pipe = DiffusionPipeline.from_pretrained(pipeline, trust_remote_code=True)    # the folder's own code
    assert type(pipe).__name__ == "DiffunetSegmentationPipeline" and pipe.scheduler is None
    truth = write_cells(tmp_path / "images", [(40, 56), (33, 33)])
    assert sample.main([str(pipeline), "--cond", str(tmp_path / "images"), "--out", str(tmp_path / "whole"),
                        "--no-progress"]) == 0
    assert sample.main([str(pipeline), "--cond", str(tmp_path / "images"), "--out", str(tmp_path / "tiled"),
                        "--tile", "16", "--no-progress"]) == 0
    for key, mask in truth.items():
        whole = np.asarray(Image.open(tmp_path / "whole" / f"{key}.png"))
        tiled = np.asarray(Image.open(tmp_path / "tiled" / f"{key}.png"))
        assert whole.shape == mask.shape and set(np.unique(whole)) <= {0, 255}
        assert (whole == tiled).mean() == 1.0                           # valid padding, batch norm: exact tiles
        (tmp_path / "truth" / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "truth" / f"{key}.png")

    scores = evaluate.main([str(tmp_path / "whole"), str(tmp_path / "truth"), "--segmentation", "--json"])
    dice = [2 * ((np.asarray(Image.open(tmp_path / "whole" / f"{key}.png")) > 0) & mask).sum()
            / ((np.asarray(Image.open(tmp_path / "whole" / f"{key}.png")) > 0).sum() + mask.sum())
            for key, mask in truth.items()]
    assert scores["num_images"] == 2 and scores["dice"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert scores["dice"] > max(trivial_dice(truth.values()))         # 30 steps learn more than a constant mask


def test_segmentation_rejects_an_ensemble_of_a_deterministic_model(tmp_path, capsys):
    unet = tiny(False)
    unet.save_pretrained(tmp_path / "model")
    write_cells(tmp_path / "images", [(16, 16)])
    assert sample.main([str(tmp_path / "model"), "--cond", str(tmp_path / "images"), "--out", str(tmp_path / "o"),
                        "--num-per-cond", "2"]) == 2
    assert "deterministic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path / "model"), "--cond", str(tmp_path / "images"), "--out", str(tmp_path / "o"),
                     "--guidance-scale", "3"])
    assert "--guidance-scale: not for a deterministic segmentation model" in capsys.readouterr().err
    # one rule for every option a mode has no use for: a deterministic model has no steps, scheduler or eta
    with pytest.raises(SystemExit):             # every one given is named as typed, in the order typed
        sample.main([str(tmp_path / "model"), "--cond", str(tmp_path / "images"), "--out", str(tmp_path / "o"),
                     "--steps", "20", "--scheduler", "ddim", "--eta", "1", "--seed", "3", "--no-grid"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("python sample.py: error: --steps, --scheduler, --eta, --seed, --no-grid: "
                                              "not for a deterministic segmentation model (one forward pass, no "
                                              "scheduler)")
    with pytest.raises(ValueError, match="--steps: not for a deterministic segmentation model"):   # the API too
        segment_to_folder(tmp_path / "model", tmp_path / "images", tmp_path / "o", steps=20)
    with pytest.raises(SystemExit):                                     # nothing to segment: say what to pass
        sample.main([str(tmp_path / "model"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{tmp_path / 'model'} is a segmentation model: pass --cond DIR" in err
    Image.fromarray(np.zeros((15, 16), np.uint8)).save(tmp_path / "images" / "sub" / "odd.png")
    assert sample.main([str(tmp_path / "model"), "--cond", str(tmp_path / "images"), "--out", str(tmp_path / "o"),
                        "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "odd.png: height 15 does not fit" in err and "nearest valid heights: 14 or 16" in err and "--tile" in err


def test_diffusion_segmentation_run_writes_masks_and_std_maps(tmp_path, capsys):
    cfg = cfg_of("cells-segdiff", tmp_path, "train.max_steps=6", "train.eval_every=6")
    pipeline = train(cfg)
    scores = [json.loads(line) for line in (Path(cfg.output_dir) / "eval.jsonl").read_text().splitlines()][-1]
    assert {"dice", "iou", "hd95", "std_wrong", "std_right"} <= set(scores)
    truth = write_cells(tmp_path / "images", [(32, 48)])
    out = tmp_path / "masks"
    assert sample.main([str(pipeline), "--cond", str(tmp_path / "images"), "--out", str(out), "--num-per-cond", "3",
                        "--steps", "2", "--tile", "16", "--no-progress"]) == 0
    mask = np.asarray(Image.open(out / "sub" / "cell0.png"))
    std = np.asarray(Image.open(out / "sub" / "cell0_std.png"))
    assert mask.shape == std.shape == truth["sub/cell0"].shape
    first, stamp = mask.copy(), (out / "sub" / "cell0.png").stat().st_mtime_ns
    again = [str(pipeline), "--cond", str(tmp_path / "images"), "--out", str(out), "--num-per-cond", "3",
             "--steps", "2", "--tile", "16", "--no-progress"]
    capsys.readouterr()
    assert sample.main(again) == 0                                      # resumes: nothing to redo, nothing rewritten
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 images segmented by 1 process(es), 1 already there")
    assert (out / "sub" / "cell0.png").stat().st_mtime_ns == stamp
    (out / "sub" / "cell0_std.png").unlink()                            # an output lost: that image is redone, alike
    assert sample.main(again) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("1 images segmented by 1 process(es), 0 already there")
    assert np.array_equal(np.asarray(Image.open(out / "sub" / "cell0.png")), first)
    assert np.array_equal(np.asarray(Image.open(out / "sub" / "cell0_std.png")), std)
    Image.fromarray(truth["sub/cell0"].astype(np.uint8)).save(tmp_path / "truth.png")    # 0/1: read as ids
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth.png").rename(tmp_path / "truth" / "cell0.png")
    scores = evaluate.evaluate_segmentation(out / "sub", tmp_path / "truth")        # the std map is not a mask
    assert scores["num_images"] == 1 and scores["dice"] > max(trivial_dice([truth["sub/cell0"]]))


def test_multi_class_masks_from_a_paired_folder_train_and_come_out_as_class_ids(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for k in range(12):                                                 # 3 classes: background, left, right blob
        image = rng.uniform(0, 0.2, (16, 16))
        ids = np.zeros((16, 16), np.uint8)
        ids[3:9, 2:7], ids[8:14, 9:15] = 1, 2
        image[ids == 1], image[ids == 2] = 0.6, 0.9
        for folder, array in (("images", np.round(image * 255).astype(np.uint8)), ("masks", ids)):
            (root / folder / "a").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / "a" / f"{k}.png")
    cfg = cfg_of("cells-seg", tmp_path, f"data.source={root}", "data.holdout=2", "data.hflip=false",
                 "model.out_channels=3", "segment.loss=dice_ce", "train.max_steps=4", "train.batch_size=4")
    pipeline = train(cfg)
    assert sample.main([str(pipeline), "--cond", str(root / "images"), "--out", str(tmp_path / "out"),
                        "--no-progress"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "a" / "0.png"))
    assert written.shape == (16, 16) and set(np.unique(written)) <= {0, 1, 2}  # ids, not 0/255
    bad = np.zeros((16, 16), np.uint8)
    bad[0, 0] = 7
    Image.fromarray(bad).save(root / "masks" / "a" / "3.png")
    cfg.output_dir = str(tmp_path / "again")
    with pytest.raises(DataError, match=r"3.png has class id 7, but the model has 3 classes"):
        train(cfg)                                                      # the preflight stops it, before compute
    assert not (tmp_path / "again" / "checkpoints").exists()
