"""bench/bench_signals.py, bench/bench_joint_augment.py and bench/bench_tiled_sr.py end to end at toy size: every
arm trains (or reads its run), samples and is scored; the moved digits really move, the peer's samples come back
in the data's range, and the oracle bound of super-resolution sits above the interpolations."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_joint_augment  # noqa: E402
import bench_signals  # noqa: E402
import bench_tiled_sr  # noqa: E402
from test_nd_jobs import VOLUMES, _run  # noqa: E402


def test_the_joint_augmentation_bench_at_toy_size(tmp_path):
    out = bench_joint_augment.main(["--steps", "2", "--sample-steps", "2", "--json", str(tmp_path / "r.json")])
    assert set(out["results"]) == {"plain", "augmented"}
    for row in out["results"].values():
        assert all(0 <= row[name] <= 1 for name in out["truth"])
    assert out["truth"]["as they are"] > 0.95                       # the classifier reads the uncut digits
    assert json.loads((tmp_path / "r.json").read_text())["steps"] == 2
    x = torch.linspace(-1, 1, 2 * 16 * 16).view(2, 1, 16, 16)
    moved = bench_joint_augment.moved(x, 10.0, 1, seed=0)
    assert not torch.equal(moved, x) and torch.equal(moved, bench_joint_augment.moved(x, 10.0, 1, seed=0))


def test_the_signals_bench_at_toy_size(tmp_path):
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        pytest.skip("the peer is a bench extra (bench/README.md)")
    out = bench_signals.main(["--steps", "2", "--num-samples", "8", "--out", str(tmp_path)])
    rows = out["results"]
    assert set(rows) == {"ours", "ours, unconditional", "lucidrains Unet1D"}
    assert 0 <= rows["ours"]["accuracy"] <= 1 and "accuracy" not in rows["lucidrains Unet1D"]
    for row in rows.values():
        assert row["fid"] > 0 and sum(row["classes"]) == pytest.approx(1.0)
    assert abs(rows["ours"]["params"] - rows["lucidrains Unet1D"]["params"]) < 0.05 * rows["ours"]["params"]


def test_the_tiled_super_resolution_bench_at_toy_size(tmp_path):
    pipe, _ = _run(tmp_path, "sr", *VOLUMES, "task=super_resolution", "model.cond_channels=1",
                   "super_resolution.factors=[2,1,1]", "train.max_steps=1")
    rows = bench_tiled_sr.main(["--pipeline", str(pipe), "--size", "24", "--num", "1", "--tile", "16",
                                "--steps", "2", "--panel", str(tmp_path / "panel.png")])
    assert set(rows) == {"trilinear", "tricubic", "oracle", "blended", "tiles apart"}
    assert rows["oracle"]["psnr"] > rows["tricubic"]["psnr"] > rows["trilinear"]["psnr"]
    assert all(row["seam"] > 0 and 0 < row["ssim"] <= 1 for row in rows.values())
    assert rows["blended"]["s/volume"] > 0 and (tmp_path / "panel.png").is_file()
