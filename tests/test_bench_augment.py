"""bench/bench_augment.py end to end at toy size: both arms train on the same 200 digits, differ in
train.augment_p alone, and are scored by FID (beside both floors) and memorization."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_augment  # noqa: E402

from diffunet.config import load_config  # noqa: E402
from diffunet.data import build_dataset, take_subset  # noqa: E402
from diffunet.metrics.memorization import memorization  # noqa: E402


def test_two_arms_at_toy_size(tmp_path, monkeypatch):
    """The plain arm's samples are swapped for its first training images (a model that replays its data; the 200
    taken here as training takes them); the augmented arm's are its own, a 2-step model's near-noise. The bench
    must call the first all memorized, at distance 0, and score it a better FID than the second, which copies
    nothing."""
    cfg = load_config(bench_augment.PRESET)
    train = take_subset(build_dataset(cfg.data, (16, 16), 1), cfg.data.subset)
    images = torch.stack([torch.as_tensor(train[i][0]) for i in range(len(train))])     # (200, 1, 16, 16), [-1, 1]
    calls = []

    def generate(*args, **kwargs):
        samples = real_generate(*args, **kwargs)                         # the bench's own sampling still runs
        calls.append(len(samples))
        if len(calls) == 1:                                              # plain, seed 0: the first run
            return images[:len(samples)].to(samples.dtype)
        return samples
    real_generate = bench_augment.generate
    monkeypatch.setattr(bench_augment, "generate", generate)
    out = bench_augment.main(["--steps", "2", "--num-images", "12", "--sample-steps", "2", "--seeds", "1",
                              "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "aug.json")])
    assert calls == [12, 12]
    assert json.loads((tmp_path / "aug.json").read_text()) == json.loads(json.dumps(out))
    assert set(out["floors"]) == {"200 training images", "512 real digits"}
    assert out["floors"]["200 training images"] > out["floors"]["512 real digits"]   # fewer images, higher floor
    (replay,), (model,) = out["results"]["plain"], out["results"]["augmented"]
    assert replay["memorized"] == 1.0 and replay["median_distance"] == 0.0         # scored against what it trained on
    assert model["memorized"] == 0.0 and model["median_distance"] > model["threshold"]
    assert replay["threshold"] == model["threshold"] == memorization(images, images)["threshold"]   # the 200's scale
    assert replay["fid"] < model["fid"]
    for arm, p in (("plain", 0.0), ("augmented", 0.15)):
        cfg = load_config(tmp_path / "runs" / f"{arm}-seed0" / "config.yaml")
        assert cfg.train.augment_p == pytest.approx(p)
        assert (cfg.data.subset, cfg.model.augment_dim, cfg.train.max_steps) == (200, 9, 2)   # else the same
