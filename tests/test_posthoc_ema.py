"""Post-hoc EMA: the power-function maths, reconstruction on a trajectory whose EMA is its own profile, the
snapshots a run writes (and an exact resume of them), the pipeline-folder CLI, the FID sweep, the error lines."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffunet import posthoc_ema
from diffunet.training import power_ema as phema
from diffunet.errors import CheckpointError
from diffunet.config import ConfigError, load_config
from diffunet.posthoc_ema import MAX_SIGMA_REL, PosthocEMAError, reconstruct
from diffunet.training.power_ema import PowerEMA, exp_to_std, solve_coefficients, std_to_exp
from diffunet.sampling import generate, load_model
from diffunet.training.loop import Interrupted, Trainer, TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "model.num_heads=2",
        "train.batch_size=8", "train.log_every=2", "train.warmup_steps=2", "sample.num_images=4", "sample.steps=2",
        "train.max_steps=6", "train.checkpoint_every=100", "train.sample_every=100", "train.phema_snapshots=3"]


def cfg_for(out: Path, *overrides):
    return load_config("digits", FAST + [f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 6-step run with snapshots at steps 2, 4, 6."""
    out = tmp_path_factory.mktemp("phema") / "run"
    train(cfg_for(out))
    return out


# ------------------------------------------------------------------------------------------ the maths

def test_std_to_exp_and_exp_to_std_are_inverse():
    sigma = np.array([0.005, 0.02, 0.05, 0.10, 0.20, 0.28, MAX_SIGMA_REL])
    assert np.allclose(exp_to_std(std_to_exp(sigma)), sigma, rtol=1e-10, atol=0)
    gamma = np.array([0.0, 0.5, 6.94, 16.97, 100.0, 1e4])
    assert np.allclose(std_to_exp(exp_to_std(gamma)), gamma, rtol=1e-7, atol=1e-9)
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.01) and std_to_exp(0.10) == pytest.approx(6.94, abs=0.01)


def test_coefficients_pick_a_tracked_profile_and_sum_to_one():
    steps, sigmas = [10, 10, 20, 20, 30, 30], [0.05, 0.1] * 3
    x = solve_coefficients(steps, sigmas, 30, 0.1)
    assert np.allclose(x, np.eye(6)[5], atol=1e-8)
    assert solve_coefficients(steps, sigmas, 30, 0.07).sum() == pytest.approx(1.0)


def one_hot_trajectory(sigma_rels, steps: int, snapshot_at, folder: Path | None = None):
    """Parameter w at step t is e_t: the EMA's weights are its profile over the steps."""
    w = torch.nn.Parameter(torch.zeros(steps, dtype=torch.float64))
    ema = PowerEMA([("w", w)], sigma_rels)
    for t in range(1, steps + 1):
        w.data.zero_()
        w.data[t - 1] = 1
        ema.update([w])
        if folder is not None and t in snapshot_at:
            ema.snapshot(folder / phema.SNAPSHOT_DIR, t)
    return ema


def test_the_profile_of_a_power_ema_is_its_discrete_power_function():
    gamma = float(std_to_exp(0.1))
    ema = one_hot_trajectory([0.1], 50, ())
    tau = np.arange(1, 51)
    want = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / 50 ** (gamma + 1)
    assert np.allclose(ema.profiles[0][0].numpy(), want, atol=1e-7)


def test_reconstruction_on_a_one_hot_trajectory(tmp_path):
    T, snaps = 400, {50 * k for k in range(1, 9)}
    tracked = one_hot_trajectory([0.05, 0.10], T, snaps, tmp_path)
    for k, sigma in enumerate([0.05, 0.10]):                    # a tracked length at the last snapshot: itself
        got = reconstruct(tmp_path, sigma)["w"]
        assert (got - tracked.profiles[k][0].float()).abs().max() < 1e-6
    for sigma in (0.06, 0.075, 0.09):                           # in between: near a PowerEMA run at that length
        direct = one_hot_trajectory([sigma], T, ()).profiles[0][0].float()
        got = reconstruct(tmp_path, sigma)["w"]
        # measured (L2, relative): 1.2%, 1.3%, 0.6%; the nearest tracked profile is 15%, 23%, 9% off
        error = (got - direct).norm() / direct.norm()
        nearest = min((p[0].float() - direct).norm() / direct.norm() for p in tracked.profiles)
        assert error < 0.02 and error < nearest / 5
    mid = reconstruct(tmp_path, 0.10, step=200)["w"]           # an earlier snapshot: only what came before it
    assert mid[200:].abs().max() < 1e-6 and mid.sum() == pytest.approx(1.0, abs=1e-5)


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    a = PowerEMA([("a", params[0]), ("b", params[1])])
    b = PowerEMA([("a", params[0]), ("b", params[1])])
    for _ in range(3):
        a.update(params)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        a.update(params), b.update(params)
    assert b.step == 5 and all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))
    with pytest.raises(PosthocEMAError, match=r"sigma_rels \[0.05, 0.1\] .* this run \[0.05, 0.2\]"):
        PowerEMA([("a", params[0]), ("b", params[1])], (0.05, 0.2)).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------------------------ training

def test_a_run_writes_atomic_loadable_snapshots(run):
    files = sorted(p.name for p in (run / phema.SNAPSHOT_DIR).iterdir())
    assert files == ["phema-000002.safetensors", "phema-000004.safetensors", "phema-000006.safetensors"]
    assert not list(run.rglob("*.tmp"))
    with safe_open(run / phema.SNAPSHOT_DIR / "phema-000006.safetensors", "pt") as f:
        meta = f.metadata()
        names = json.loads(meta["names"])
        assert meta["step"] == "6" and json.loads(meta["sigma_rels"]) == [0.05, 0.1]
        assert set(f.keys()) == {f"{k}.{n}" for k in range(2) for n in names}
        weights = load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
        assert set(names) == set(weights)                                   # every parameter, no buffers
        assert all(f.get_tensor(f"0.{n}").shape == weights[n].shape for n in names)
    state = json.loads((run / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["phema"]["step"] == 6 and (run / "checkpoints" / "step_000006" / "phema.safetensors").is_file()


def test_resume_from_a_mid_run_checkpoint_gives_the_same_snapshots(run, tmp_path):
    out = tmp_path / "halves"
    trainer = Trainer(cfg_for(out))
    after_step = trainer._after_step

    def stop_at_3(meter, bar):                                  # as if SIGTERM arrived during step 3
        after_step(meter, bar)
        if trainer.step == 3:
            trainer.signal = signal.SIGTERM
    trainer._after_step = stop_at_3
    with pytest.raises(Interrupted, match="at step 3"):
        trainer.train()
    assert sorted(p.name for p in (out / phema.SNAPSHOT_DIR).iterdir()) == ["phema-000002.safetensors"]
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    train(cfg_for(out, "train.resume=latest"))
    for step in (2, 4, 6):
        name = f"phema-{step:06d}.safetensors"
        a, b = load_file(run / phema.SNAPSHOT_DIR / name), load_file(out / phema.SNAPSHOT_DIR / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_without_the_checkpoints_post_hoc_ema_is_refused(run, tmp_path):
    import shutil
    shutil.copytree(run / "checkpoints", tmp_path / "run" / "checkpoints")
    with pytest.raises(ConfigError, match="train.phema_sigma_rels: sigma_rel 0.3 is outside"):
        train(cfg_for(tmp_path / "x", "train.phema_sigma_rels=[0.05,0.3]"))
    with pytest.raises(CheckpointError, match="cannot resume .* exactly: the saved post-hoc EMA tracks"):
        train(cfg_for(tmp_path / "run", "train.resume=latest", "train.max_steps=8",
                      "train.phema_sigma_rels=[0.05,0.2]"))


# ------------------------------------------------------------------------------------------ the command line

def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "diffunet.posthoc_ema", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_pipeline_folders_that_sample(run, tmp_path):
    done = cli(run, "--sigma-rel", "0.08", "0.12")
    assert done.returncode == 0, done.stderr[-2000:]
    folders = [run / "phema" / "sigma_rel_0.080", run / "phema" / "sigma_rel_0.120"]
    assert all((f / "model_index.json").is_file() for f in folders)
    assert "post-hoc EMA of length sigma_rel 0.08 at step 6, reconstructed from 3 snapshots" in \
        (folders[0] / "README.md").read_text()
    unet, sched = load_model(folders[0], scheduler="auto")
    want = reconstruct(run, 0.08)
    assert all(torch.equal(p, want[n]) for n, p in unet.named_parameters())
    images = generate(unet, sched, 3, steps=2, class_labels="all")
    assert images.shape == (3, 1, 16, 16) and torch.isfinite(images).all()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    sampled = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(folders[1]), "--out", str(tmp_path / "s"),
                              "--num-images", "2", "--steps", "2"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert (tmp_path / "s" / "000001.png").is_file()


def test_sweep_writes_a_table_and_a_plot(run, capsys):
    pytest.importorskip("matplotlib")
    assert posthoc_ema.main([str(run), "--sweep", "--sigma-rels", "0.05", "0.1", "0.2", "--num-images", "20"]) == 0
    done = capsys.readouterr()
    table = json.loads((run / "phema_sweep.json").read_text())
    assert [r["sigma_rel"] for r in table["rows"]] == [0.05, 0.1, 0.2, None]     # the lengths, then the run's EMA
    assert all(r["fid"] > 0 for r in table["rows"]) and table["rows"][-1]["from"] == "pipeline"
    assert table["best_sigma_rel"] in (0.05, 0.1, 0.2) and table["num_images"] == 20 and table["steps"] == 2
    assert (run / "phema_sweep.png").stat().st_size > 1000
    assert f"best: sigma_rel {table['best_sigma_rel']:g}" in done.out


def test_sweep_draws_average_independent_sets(run):
    pytest.importorskip("matplotlib")
    from diffunet.posthoc_ema import sweep
    one = sweep(run, [0.1], num_images=20)
    two = sweep(run, [0.1], num_images=20, draws=2)
    for a, b in zip(one["rows"], two["rows"]):                  # the length's row, then the run's EMA
        assert len(b["fids"]) == 2 and b["fid"] == pytest.approx(sum(b["fids"]) / 2)
        assert b["fids"][0] == pytest.approx(a["fid"], rel=1e-4)  # set 1 is the one-set sweep's: the same seed
        assert b["fids"][1] != pytest.approx(b["fids"][0], rel=1e-3)   # set 2 is other samples
    assert two["draws"] == 2 and json.loads((run / "phema_sweep.json").read_text())["draws"] == 2
    with pytest.raises(PosthocEMAError, match="--draws must be at least 1"):
        sweep(run, [0.1], draws=0)


def test_error_lines(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    train(cfg_for(empty, "train.max_steps=1", "train.phema_snapshots=0"))
    with pytest.raises(CheckpointError, match="holds no phema state .*turn phema off"):
        train(cfg_for(empty, "train.max_steps=2", "train.resume=latest"))
    cases = [((empty, "--sigma-rel", "0.1"), "holds no post-hoc EMA snapshots"),
             ((run, "--sigma-rel", "0.5"), r"sigma_rel 0.5 is outside \(0, 0.2887\]"),
             ((run, "--sigma-rel", "0.1", "--step", "3"), "has no snapshot at step 3; it has steps 2, 4, 6"),
             ((tmp_path / "nothing", "--sigma-rel", "0.1"), "config.yaml is missing")]
    capsys.readouterr()                                         # the trainings' output
    for args, message in cases:
        assert posthoc_ema.main(list(map(str, args))) == 2
        done = capsys.readouterr()
        assert done.err.count("\n") == 1, done.err
        assert done.err.startswith("error: ") and re.search(message, done.err), done.err
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    snapshot = damaged / phema.SNAPSHOT_DIR / "phema-000004.safetensors"
    snapshot.write_bytes(snapshot.read_bytes()[:200])                 # cut short, as by a full disk elsewhere
    assert posthoc_ema.main([str(damaged), "--sigma-rel", "0.1"]) == 2
    done = capsys.readouterr()
    assert done.err.count("\n") == 1 and re.search(r"^error: post-hoc EMA snapshot .*phema-000004.safetensors cannot "
                                                   r"be read \(SafetensorError: .*\); move it out of", done.err), done.err
    snapshot.unlink()                                                 # as the line says: the others still serve
    assert posthoc_ema.main([str(damaged), "--sigma-rel", "0.1"]) == 0
    with pytest.raises(PosthocEMAError, match="the sweep scores generation .* task=inpainting"):
        (tmp_path / "inp").mkdir()
        (tmp_path / "inp" / "config.yaml").write_text((run / "config.yaml").read_text().replace(
            "task: generate", "task: inpainting"))
        from diffunet.posthoc_ema import sweep
        sweep(tmp_path / "inp", [0.1])
    with pytest.raises(ConfigError, match="train.phema_snapshots must be at least 0"):
        train(cfg_for(tmp_path / "bad", "train.phema_snapshots=-1"))


def test_a_failed_snapshot_stops_the_run_with_one_line(tmp_path, monkeypatch):
    write = PowerEMA.snapshot

    def full_disk(self, folder, step=None):
        if step == 4:
            raise OSError(28, "No space left on device")
        return write(self, folder, step)
    monkeypatch.setattr(PowerEMA, "snapshot", full_disk)
    with pytest.raises(TrainingError, match=r"could not write post-hoc EMA snapshot phema-000004 \(.*No space left "
                                            r"on device\); every earlier snapshot in .* is intact"):
        train(cfg_for(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run" / phema.SNAPSHOT_DIR).iterdir()) == ["phema-000002.safetensors"]


def test_a_snapshot_cut_short_leaves_neither_a_snapshot_nor_a_temporary_file(tmp_path, monkeypatch):
    params = [torch.nn.Parameter(torch.randn(3, 4))]
    ema = PowerEMA([("a", params[0])])
    ema.update(params)
    kept = ema.snapshot(tmp_path, step=1)

    def cut_short(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(phema, "save_file", cut_short)
    with pytest.raises(OSError, match="No space left"):
        ema.snapshot(tmp_path, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]       # step 1 intact, no step 2, no .tmp
