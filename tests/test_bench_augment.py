"""bench/bench_augment.py end to end at toy size: both arms train on the same 200 digits, differ in
train.augment_p alone, and are scored by FID (beside both floors) and memorization."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_augment  # noqa: E402

from diffunet.config import load_config  # noqa: E402


def test_two_arms_at_toy_size(tmp_path):
    out = bench_augment.main(["--steps", "2", "--num-images", "12", "--sample-steps", "2", "--seeds", "1",
                              "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "aug.json")])
    assert json.loads((tmp_path / "aug.json").read_text()) == json.loads(json.dumps(out))
    assert set(out["floors"]) == {"200 training images", "512 real digits"} and all(
        v > 0 for v in out["floors"].values())
    assert out["floors"]["200 training images"] > out["floors"]["512 real digits"]   # fewer images, higher floor
    for arm, p in (("plain", 0.0), ("augmented", 0.15)):
        (row,) = out["results"][arm]
        assert row["fid"] > 0 and 0 <= row["memorized"] <= 1 and row["threshold"] > 0
        cfg = load_config(tmp_path / "runs" / f"{arm}-seed0" / "config.yaml")
        assert cfg.train.augment_p == pytest.approx(p)
        assert (cfg.data.subset, cfg.model.augment_dim, cfg.train.max_steps) == (200, 9, 2)   # else the same
