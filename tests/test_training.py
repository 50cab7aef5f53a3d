"""Training: the default run end to end, objectives, data sources, resume, and two processes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

import diffunet
from conftest import tiny
from diffunet.config import ConfigError, load_config
from diffunet.data import DataError, build_dataset
from diffunet.objectives import diffusion_loss, make_noise_scheduler
from diffunet.sampling import generate, load_model
from diffunet.training.loop import EpochSampler, train

ROOT = Path(__file__).resolve().parents[1]

# A small, fast version of the default config: same code path, seconds on a CPU.
FAST = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "model.num_heads=2",
        "train.batch_size=8", "train.log_every=2", "train.warmup_steps=2", "sample.num_images=10", "sample.steps=2"]


def fast_cfg(tmp_path, *overrides):
    return load_config("digits", FAST + [f"output_dir={tmp_path / 'run'}", *overrides])


def test_default_config_end_to_end(tmp_path):
    cfg = fast_cfg(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=2")
    pipe_dir = train(cfg)
    run = tmp_path / "run"
    assert pipe_dir == run / "pipeline"
    assert (run / "samples" / "step_000002.png").exists() and (run / "samples" / "final.png").exists()
    grid = Image.open(run / "samples" / "final.png")
    assert grid.mode == "L" and grid.size == (10 * 18 + 2, 18 + 2)          # 10 classes in one row, 16 px + 2 pad
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.train.max_steps == 4 and saved.model.base_channels == 8
    assert list((run / "logs").rglob("events.out.tfevents*"))
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, trust_remote_code=True)    # the folder's copy of the code
    assert type(pipe).__name__ == "DiffunetPipeline" and type(pipe.unet).__name__ == diffunet.UNet.__name__
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
    # the pipeline holds the EMA weights, which are what the last checkpoint's EMA says
    ema = load_file(run / "checkpoints" / "step_000004" / "ema.safetensors")
    weights = [p for p in pipe.unet.parameters()]
    assert all(torch.equal(ema[str(i)], w.data) for i, w in enumerate(weights))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_each_target_and_schedule_learns_a_fixed_batch(prediction_type, schedule):
    cfg = load_config(None, [f"diffusion.prediction_type={prediction_type}", f"diffusion.beta_schedule={schedule}",
                             "diffusion.num_train_timesteps=100"])
    sched = make_noise_scheduler(cfg.diffusion)
    model = tiny(zero_init=False, attention_resolutions=())
    x0 = torch.from_numpy(diffunet.data.digits_arrays(16)[0][:16]).permute(0, 3, 1, 2).float() / 127.5 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = diffusion_loss(model, sched, x0, weighting="min_snr" if prediction_type == "epsilon" else "mse",
                              generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])


def test_epoch_sampler_splits_batches_across_processes_and_resumes_mid_epoch():
    ranks = [EpochSampler(20, 3, seed=1, rank=r, world=2) for r in range(2)]
    its = [iter(s) for s in ranks]
    epoch0 = [i for _ in range(3) for it in its for i in next(it)]          # 3 global batches of 6 per epoch
    assert len(set(epoch0)) == 18                                            # no duplicates within an epoch
    later = [next(its[0]) for _ in range(4)]                                 # global batches 3..6 of rank 0
    resumed = iter(EpochSampler(20, 3, seed=1, rank=0, world=2, start=3))
    assert [next(resumed) for _ in range(4)] == later


def _images(folder: Path):
    rng = np.random.default_rng(0)
    (folder / "cats" / "deep").mkdir(parents=True)
    (folder / "dogs").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "cats" / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 24), dtype=np.uint8)).save(folder / "cats" / "deep" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), "RGBA").save(folder / "dogs" / "c.webp")
    Image.fromarray(rng.integers(0, 65535, (18, 18), dtype=np.uint16)).save(folder / "dogs" / "d.tiff")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("P").save(folder / "dogs" / "e.png")
    (folder / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_source(tmp_path, channels):
    _images(tmp_path / "imgs")
    cfg = load_config(None, [f"data.source={tmp_path / 'imgs'}"])
    ds = build_dataset(cfg.data, (16, 12), channels)
    assert len(ds) == 5 and ds.num_classes == 2 and ds.classes == ["cats", "dogs"]
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (channels, 16, 12) and x.min() >= -1 and x.max() <= 1
        assert label == (0 if i < 2 else 1)
    sixteen = ds[3][0]                                                      # 16-bit scaled, not clipped at 255
    assert sixteen.std() > 0.1 and (sixteen < 0.9).float().mean() > 0.5


def test_image_folder_errors_name_the_problem(tmp_path):
    cfg = load_config(None, [f"data.source={tmp_path}"])
    with pytest.raises(DataError, match="no images"):
        build_dataset(cfg.data, 16, 1)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    Image.new("L", (8, 8)).save(tmp_path / "ok.png")
    ds = build_dataset(cfg.data, 16, 1)
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(DataError, match="is not a folder"):
        build_dataset(load_config(None, ["data.source=/no/such/dir"]).data, 16, 1)


def test_local_hf_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(6)]
    ds = datasets.Dataset.from_dict({"img": images, "y": [0, 1, 2, 0, 1, 2]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "y": datasets.ClassLabel(num_classes=3)}))
    ds.save_to_disk(tmp_path / "saved")
    cfg = load_config(None, [f"data.source=hf:{tmp_path / 'saved'}", "data.image_column=img", "data.label_column=y"])
    built = build_dataset(cfg.data, 16, 3)
    assert len(built) == 6 and built.num_classes == 3
    x, y = built[4]
    assert x.shape == (3, 16, 16) and y == 1
    cfg = load_config(None, [f"data.source=hf:{tmp_path / 'saved'}"])
    with pytest.raises(DataError, match="no column 'image' .*set data.image_column"):
        build_dataset(cfg.data, 16, 3)


def test_training_on_an_image_folder(tmp_path):
    _images(tmp_path / "imgs")
    cfg = fast_cfg(tmp_path, f"data.source={tmp_path / 'imgs'}", "train.batch_size=2", "train.max_steps=2",
                   "model.num_classes=2", "data.hflip=true", "sample.num_images=2")
    pipe_dir = train(cfg)
    assert (pipe_dir / "model_index.json").exists()
    # the folder loads back as a diffusers pipeline, and its class-conditional U-Net samples each class
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, trust_remote_code=True)
    assert type(pipe.unet).__name__ == diffunet.UNet.__name__ and pipe.unet.config.num_classes == 2
    unet, sched = load_model(pipe_dir, scheduler="auto")
    images = generate(unet, sched, 4, steps=2, class_labels="all")
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all() and images.abs().max() <= 1
    assert not torch.equal(images[0], images[1])


def test_checks_run_before_any_compute(tmp_path):
    with pytest.raises(ConfigError, match="model.num_classes=10 but data.source=.* has no labels"):
        _images(tmp_path / "flat")
        for p in (tmp_path / "flat").rglob("*.*"):
            p.rename(tmp_path / "flat" / p.name)
        train(fast_cfg(tmp_path, f"data.source={tmp_path / 'flat'}"))
    with pytest.raises(DataError, match="1-channel but model.in_channels=3"):
        train(fast_cfg(tmp_path, "model.in_channels=3"))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train(fast_cfg(tmp_path, "train.batch_size=5000"))
    with pytest.raises(ConfigError, match="unknown diffusion.prediction_type 'eps'"):
        train(fast_cfg(tmp_path, "diffusion.prediction_type=eps"))
    assert not (tmp_path / "run").exists()


def _state(run: Path, step: int):
    d = run / "checkpoints" / f"step_{step:06d}"
    return load_file(d / "model.safetensors"), load_file(d / "ema.safetensors"), \
        torch.load(d / "optimizer.bin", weights_only=True)


def test_resume_continues_exactly(tmp_path):
    # a constant lr: the halves' first run stops at max_steps=3, and a cosine decay would end there
    common = ["train.checkpoint_every=3", "train.sample_every=100", "model.dropout=0.1", "data.hflip=true",
              "train.lr_scheduler=constant_with_warmup"]
    train(load_config("digits", FAST + common + [f"output_dir={tmp_path / 'straight'}", "train.max_steps=6"]))
    half = FAST + common + [f"output_dir={tmp_path / 'halves'}"]
    train(load_config("digits", half + ["train.max_steps=3"]))
    with pytest.raises(ConfigError, match="already holds checkpoints .*--resume latest"):
        train(load_config("digits", half + ["train.max_steps=6"]))
    train(load_config("digits", half + ["train.max_steps=6", "train.resume=latest"]))
    a, b = _state(tmp_path / "straight", 6), _state(tmp_path / "halves", 6)
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a[2]["state"].keys() == b[2]["state"].keys()
    for k in a[2]["state"]:
        assert all(torch.equal(a[2]["state"][k][n], b[2]["state"][k][n]) for n in a[2]["state"][k])
    state = json.loads((tmp_path / "halves" / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["ema"]["optimization_step"] == 6


def _digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


MP_SCRIPT = """
import json, sys, hashlib
from pathlib import Path
from diffunet.config import load_config
from diffunet.training.loop import Trainer
cfg = load_config("digits", sys.argv[2:])
trainer = Trainer(cfg)
trainer.train()
acc = trainer.accelerator
h = hashlib.sha256()
for t in list(acc.unwrap_model(trainer.model).parameters()) + list(trainer.ema.shadow_params):
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
Path(sys.argv[1], f"rank{acc.process_index}.json").write_text(json.dumps({"digest": h.hexdigest(),
                                                                          "world": acc.num_processes}))
"""


def test_two_process_cpu_run_keeps_ranks_identical_and_one_writer(tmp_path):
    script = tmp_path / "mp.py"
    script.write_text(MP_SCRIPT)
    (tmp_path / "out").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(tmp_path / "out"), *FAST, f"output_dir={tmp_path / 'run'}", "train.max_steps=4",
           "train.checkpoint_every=2", "train.sample_every=2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]
    run = tmp_path / "run"
    assert result.stdout.count("pipeline written to") == 1                  # printed by the main process only
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png", "step_000002.png"]
    ckpt = run / "checkpoints" / "step_000004"
    # one writer, rank 0: the other process's RNG state travels to it and is written there
    assert sorted(p.name for p in ckpt.glob("random_states_*")) == ["random_states_0.pkl"]
    assert set(json.loads((ckpt / "rng.json").read_text())) == {"0", "1"}
    assert len(list((run / "logs").rglob("events.out.tfevents*"))) >= 1
    assert not list(run.rglob("*.tmp"))
    # resumed with two processes: still identical on both ranks
    resumed = subprocess.run(cmd[:-3] + ["train.max_steps=6", "train.checkpoint_every=2", "train.sample_every=100",
                                         "train.resume=latest"], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_000004 at step 4" in resumed.stdout
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_train_py_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), "train.lrr=1"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: command line: unknown config key 'train.lrr'; did you mean 'train.lr'?"
    shown = subprocess.run([sys.executable, str(ROOT / "train.py"), "--print-config", "train.lr=1e-4"], env=env,
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "lr: 0.0001" in shown.stdout and "source: digits" in shown.stdout


def test_bf16_autocast_gradient_accumulation_and_fast_paths(tmp_path):
    cfg = fast_cfg(tmp_path, "train.max_steps=2", "train.grad_accum=3", "train.mixed_precision=bf16",
                   "diffusion.objective=ddpm", "diffusion.loss_weighting=min_snr",
                   "diffusion.prediction_type=v_prediction",
                   "train.channels_last=true", "train.gradient_checkpointing=true")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["ema"]["optimization_step"] == 2     # 6 micro-batches, 2 updates
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert all(float(s["step"]) == 2 for s in optimizer["state"].values())
    assert all(torch.isfinite(w).all() for w in load_file(ckpt / "model.safetensors").values())


def test_periodic_evaluation_logs_fid_and_kid(tmp_path):
    cfg = fast_cfg(tmp_path, "train.max_steps=2", "train.eval_every=1", "train.eval_num_images=20")
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["fid"] > 0 and np.isfinite(line["kid_mean"]) for line in lines)
    with pytest.raises(ConfigError, match="train.eval_extractor: .*no Inception weights"):
        train(fast_cfg(tmp_path / "x", "train.eval_every=1", "train.eval_extractor=/no/such/inception.pt"))
