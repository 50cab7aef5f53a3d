"""Reliability (issue 7): nothing lost, nothing silently wrong, no code run from a downloaded file."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffunet.training.loop as training
from diffunet.training import state as ckpt
from diffunet import objectives
from diffunet.errors import CheckpointError
from diffunet.data import DataError
from diffunet.errors import TrainingError
from diffunet.training.loop import train
from test_training import FAST, ROOT, fast_cfg

MARKER = "/tmp/diffunet-pwned"


def run_dir_steps(run: Path) -> list[int]:
    return [s for s, _ in ckpt.complete_steps(run / "checkpoints")]


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


# 1. exact resume is in test_training.py::test_resume_continues_exactly; here: what cannot be exact is refused.
def test_inexact_resume_is_refused_unless_allowed(tmp_path):
    train(fast_cfg(tmp_path, "train.max_steps=2"))
    with pytest.raises(CheckpointError, match=r"cannot be exact \(batch_size 8 -> 4\).*allow_inexact_resume"):
        train(fast_cfg(tmp_path, "train.max_steps=4", "train.resume=latest", "train.batch_size=4"))
    train(fast_cfg(tmp_path, "train.max_steps=4", "train.resume=latest", "train.batch_size=4",
                   "train.allow_inexact_resume=true"))
    assert run_dir_steps(tmp_path / "run")[-1] == 4


def _launch(tmp_path, *overrides):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAST, f"output_dir={tmp_path / 'run'}",
                             *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# 2. kill -9 during training: resume from the last complete checkpoint, losing at most one interval.
def test_kill_9_resumes_from_the_last_complete_checkpoint(tmp_path):
    proc = _launch(tmp_path, "train.max_steps=100000", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                   "train.sample_every=100000")
    _wait_for(lambda: len(run_dir_steps(tmp_path / "run")) >= 2 and max(run_dir_steps(tmp_path / "run")) >= 6)
    proc.kill()
    proc.wait()
    last = max(run_dir_steps(tmp_path / "run"))
    trainer = training.Trainer(fast_cfg(tmp_path, f"train.max_steps={last + 2}", "train.resume=latest"))
    assert trainer.resume_from == ckpt.step_dir(tmp_path / "run" / "checkpoints", last)
    trainer.train()
    assert max(run_dir_steps(tmp_path / "run")) == last + 2


# 3. A half-written checkpoint (killed while saving) is never taken as latest.
def test_half_written_checkpoints_are_never_latest(tmp_path):
    train(fast_cfg(tmp_path, "train.max_steps=2"))
    root = tmp_path / "run" / "checkpoints"
    good = ckpt.step_dir(root, 2)
    partial = ckpt.tmp_dir(root, 4)                                          # killed before sealing
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    unsealed = ckpt.step_dir(root, 6)                                        # a folder with no manifest
    unsealed.mkdir()
    (unsealed / "model.safetensors").write_bytes(b"half")
    assert ckpt.latest_valid(root) == good
    train(fast_cfg(tmp_path, "train.max_steps=4", "train.resume=latest"))
    assert not partial.exists()                                              # swept after the next good save
    assert run_dir_steps(tmp_path / "run") == [2, 4]


# 4. A damaged file is found by its checksum: skipped for the previous good checkpoint, refused if alone.
def test_corrupted_checkpoint_is_skipped_or_refused(tmp_path, capsys):
    train(fast_cfg(tmp_path, "train.max_steps=4", "train.checkpoint_every=2"))
    root = tmp_path / "run" / "checkpoints"
    damaged = ckpt.step_dir(root, 4) / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])                         # truncated
    trainer = training.Trainer(fast_cfg(tmp_path, "train.max_steps=6", "train.resume=latest"))
    assert trainer.resume_from == ckpt.step_dir(root, 2)
    assert "skipping damaged checkpoint" in capsys.readouterr().out and "step_000004" in damaged.parent.name
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        train(fast_cfg(tmp_path, "train.max_steps=6", f"train.resume={ckpt.step_dir(root, 4)}"))
    two = ckpt.step_dir(root, 2) / "optimizer.bin"
    two.write_bytes(b"\0" + two.read_bytes()[1:])                            # same size, flipped content
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        train(fast_cfg(tmp_path, "train.max_steps=6", "train.resume=latest"))


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


# 5. Loading never runs code from a file: checkpoints and pipeline folders.
def test_malicious_pickles_are_refused(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    train(fast_cfg(tmp_path, "train.max_steps=2"))
    good = ckpt.step_dir(tmp_path / "run" / "checkpoints", 2)
    evil = ckpt.tmp_dir(tmp_path / "run" / "checkpoints", 2)
    os.rename(good, evil)
    (evil / ckpt.MANIFEST).unlink()
    torch.save({"state": Evil(), "param_groups": []}, evil / "optimizer.bin")
    ckpt.seal(evil, good)                                                    # a valid manifest: checksums pass
    with pytest.raises(CheckpointError, match="refusing to load .* could run code"):
        train(fast_cfg(tmp_path, "train.max_steps=4", "train.resume=latest"))
    assert not os.path.exists(MARKER)

    from diffusers import DiffusionPipeline
    from diffunet.sampling import load_model
    unet = tmp_path / "run" / "pipeline" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with open(unet / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(CheckpointError, match="cannot load .*diffusion_pytorch_model.bin: it is not a file of tensors"):
        load_model(tmp_path / "run" / "pipeline")
    with pytest.raises(Exception):      # the folder's own code (trusted here) reads weights with weights_only too
        DiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", trust_remote_code=True)
    assert not os.path.exists(MARKER)


# 6. SIGTERM / SIGINT: a checkpoint, then a clean exit.
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, sig, code):
    proc = _launch(tmp_path, "train.max_steps=100000", "train.checkpoint_every=3", "train.sample_every=100000")
    _wait_for(lambda: run_dir_steps(tmp_path / "run"))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {sig.name} at step" in err and "--resume latest" in err
    last = max(run_dir_steps(tmp_path / "run"))
    assert f"step_{last:06d}" in err and last % 3 != 0 or "step_" in err      # the stop's own checkpoint
    ckpt.verify(ckpt.step_dir(tmp_path / "run" / "checkpoints", last))
    train(fast_cfg(tmp_path, f"train.max_steps={last + 1}", "train.resume=latest"))


# 7. Disk full while saving: one clear error, the last good checkpoint intact and loadable.
def test_disk_full_while_saving(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = training.Accelerator.save_state

    def full_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(training.Accelerator, "save_state", full_disk)
    with pytest.raises(TrainingError, match=r"could not write checkpoint step_000004 \(\[Errno 28\] No space left "
                                            r"on device\); the last good checkpoint .*step_000002 is intact"):
        train(fast_cfg(tmp_path, "train.max_steps=6", "train.checkpoint_every=2"))
    root = tmp_path / "run" / "checkpoints"
    assert run_dir_steps(tmp_path / "run") == [2] and not list(root.glob(".*tmp"))
    ckpt.verify(ckpt.step_dir(root, 2))
    monkeypatch.setattr(training.Accelerator, "save_state", real)
    train(fast_cfg(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.resume=latest"))


def _nan_at(monkeypatch, bad_calls):
    calls = {"n": 0}
    real = objectives.training_loss

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] in bad_calls else value

    monkeypatch.setattr(objectives, "training_loss", loss)


# 8. Non-finite loss: the step is skipped (state unchanged) and counted; K in a row stop the run.
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    train(fast_cfg(tmp_path / "clean", "train.max_steps=2"))
    _nan_at(monkeypatch, {2})
    train(fast_cfg(tmp_path / "one", "train.max_steps=2"))
    state = json.loads((tmp_path / "one" / "run" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["batches_seen"] == 3
    assert "non-finite loss or gradient at step 2, step skipped (1 in a row)" in capsys.readouterr().out

    _nan_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(TrainingError, match=r"3 non-finite losses/gradients in a row before step 3; checkpoint "
                                            r".*step_000002 holds the weights from before the first"):
        train(fast_cfg(tmp_path / "stop", "train.max_steps=10", "train.max_bad_steps=3", "train.checkpoint_every=5"))
    kept = weights(tmp_path / "stop" / "run" / "checkpoints" / "step_000002")
    clean = weights(tmp_path / "clean" / "run" / "checkpoints" / "step_000002")
    assert all(torch.equal(kept[k], clean[k]) for k in clean)


# 10. Bad images in a folder: found by a preflight before training; strict stops, skip warns once.
def _bad_folder(root: Path) -> list[str]:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"good{i}.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).convert("P").save(root / "palette.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16)).save(root / "sixteen.png")
    (root / "empty.png").write_bytes(b"")
    jpeg = root / "truncated.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:600])
    png = root / "truncated.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:300])
    (root / "text.webp").write_text("this is not an image")
    Image.new("L", (3000, 3000)).save(root / "huge.png")                     # over the pixel limit set below
    return ["empty.png", "huge.png", "text.webp", "truncated.jpg", "truncated.png"]


def test_bad_images_strict_and_skip(tmp_path, monkeypatch, capsys):
    bad = _bad_folder(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)
    common = [f"data.source={tmp_path / 'imgs'}", "model.num_classes=null", "train.batch_size=2", "train.max_steps=2",
              "model.in_channels=3", "sample.num_images=2"]
    with pytest.raises(DataError, match=r"5 unreadable image\(s\) under .*imgs, first .*empty\.png.*data.bad_images=skip"):
        train(fast_cfg(tmp_path, *common))
    assert not (tmp_path / "run").exists()                                   # stopped before any compute
    train(fast_cfg(tmp_path, *common, "data.bad_images=skip"))
    out = capsys.readouterr().out
    assert out.count("skipping 5 unreadable image(s)") == 1
    assert all(name in out for name in bad[:3])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images .* found under .*empty"):
        train(fast_cfg(tmp_path / "x", f"data.source={tmp_path / 'empty'}", "model.num_classes=null"))


# 11. Two processes: identical after training and after resume; a failure on one rank stops both.
MP_FAIL = """
import sys
import diffunet.data as data
from diffunet.config import load_config
from diffunet.training.loop import Trainer
trainer = Trainer(load_config("digits", sys.argv[1:]))
if trainer.accelerator.process_index == 1:
    calls = {"n": 0}
    real = data.ImageFolder.__getitem__
    def flaky(self, i):
        calls["n"] += 1
        if calls["n"] > 4:
            raise data.DataError(f"cannot read image {self.files[i]}: simulated failure on rank 1")
        return real(self, i)
    data.ImageFolder.__getitem__ = flaky
trainer.train()
"""


def test_a_failure_on_one_process_stops_all_with_its_message(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(16):
        Image.new("L", (16, 16), color=i * 10).save(root / f"{i}.png")
    script = tmp_path / "fail.py"
    script.write_text(MP_FAIL)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *FAST,
           f"data.source={root}", "model.num_classes=null", "train.batch_size=2", "train.max_steps=50",
           f"output_dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "simulated failure on rank 1" in result.stderr
    assert "another process failed: cannot read image" in result.stderr        # rank 0 says why it stopped
