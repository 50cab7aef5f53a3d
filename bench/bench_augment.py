"""EDM's non-leaky augmentation on a small dataset: the digits model trained on 200 digits (preset digits-200-aug,
``data.subset=200``) with and without ``train.augment_p``, same steps and seeds, then FID and memorization of its
samples.

    python bench/bench_augment.py                                       # a quick look: 300 steps, 256 samples
    python bench/bench_augment.py --steps 1500 --num-images 512 --seeds 2 # docs/generation.md's measurement: the preset's steps

FID is ``metrics.evaluate`` against the full embedded digits (1,797) with the offline digits extractor; beside it
the floors: the FID of the 200 training images themselves and of 512 real digits (a fixed draw), each against the
full set. A model that replays its 200 images reaches the first floor, and FID alone would call that good; the
memorization column (``diffunet.metrics.memorization``, against the 200 training images) tells a replay from a
model: the fraction of samples nearer a training image than 95 % of the training images are to their nearest
other.
Both arms build the model with ``model.augment_dim=9``, so they start from the same weights (the map starts at
zero and stays there without augmentation): they differ in ``train.augment_p`` alone. Sampling passes no labels.
Each run trains in-process through ``diffunet.training.loop.train`` (the default: about 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # run from a checkout without installing

import numpy as np                                                      # noqa: E402
import torch                                                            # noqa: E402

from diffunet.config import load_config                                 # noqa: E402
from diffunet.data import build_dataset, take_subset, to_uint8          # noqa: E402
from diffunet.metrics.memorization import memorization  # noqa: E402
from diffunet.metrics import evaluate                                   # noqa: E402
from diffunet.sampling import generate, load_model                      # noqa: E402
from diffunet.training.loop import train  # noqa: E402

PRESET = "digits-200-aug"
REAL_FLOOR = 512                                                        # real digits in the second floor


def stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])    # (N, 1, 16, 16) in [-1, 1]


def fid(images: torch.Tensor) -> float:
    return evaluate(to_uint8(images), "digits", "digits")["fid"]


def run(arm: str, p: float, seed: int, args, root: Path) -> dict:
    """Train one arm at one seed, sample, score."""
    overrides = [f"output_dir={root / f'{arm}-seed{seed}'}", f"train.max_steps={args.steps}", f"train.seed={seed}",
                 f"train.augment_p={p}", f"train.warmup_steps={min(100, args.steps // 5)}",
                 f"train.checkpoint_every={args.steps}", f"train.sample_every={args.steps}",
                 "sample.num_images=10", f"sample.steps={args.sample_steps}", "train.log_every=50"]
    start = time.perf_counter()
    pipeline = train(load_config(PRESET, overrides))
    seconds = time.perf_counter() - start
    unet, scheduler = load_model(pipeline)
    samples = generate(unet, scheduler, args.num_images, steps=args.sample_steps, seed=seed, class_labels="all",
                       batch_size=256)
    return dict(fid=fid(samples), **memorization(samples, args.train_images), train_s=seconds,
                total_s=time.perf_counter() - start)


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:8.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:8.3f}        "


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per run (the preset: 1500)")
    ap.add_argument("--num-images", type=int, default=256, help="samples per run for FID and memorization")
    ap.add_argument("--seeds", type=int, default=1, help="runs per arm, train.seed = sample seed = 0 .. N-1")
    ap.add_argument("--p", type=float, default=None, help="train.augment_p of the augmented arm (the preset's)")
    ap.add_argument("--sample-steps", type=int, default=10, help="sampling steps (the preset's sampler)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(PRESET)
    p = cfg.train.augment_p if args.p is None else args.p
    full = build_dataset(cfg.data, (16, 16), 1)
    args.train_images = stack(take_subset(full, cfg.data.subset))      # the 200 the runs train on
    real = stack(full)[np.random.RandomState(0).permutation(len(full))[:REAL_FLOOR]]
    floors = {f"{cfg.data.subset} training images": fid(args.train_images), f"{REAL_FLOOR} real digits": fid(real)}

    results = {"plain": [], "augmented": []}
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as tmp:
        root = args.out or Path(tmp)
        for seed in range(args.seeds):
            for arm, arm_p in (("plain", 0.0), ("augmented", p)):
                results[arm].append(run(arm, arm_p, seed, args, root))

    print(f"\npreset {PRESET}: {cfg.data.subset} digits, {args.steps} steps, {args.num_images} samples "
          f"({args.sample_steps} sampling steps), {args.seeds} seed(s), augment_p {p} vs 0; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("FID floors (against all 1,797 digits): "
          + ", ".join(f"{name} {value:.3f}" for name, value in floors.items()))
    print(f"{'arm':10} {'FID':>18} {'memorized':>18} {'median dist':>18} {'threshold':>9} {'train s':>8}")
    for arm, rows in results.items():
        col = {k: [r[k] for r in rows] for k in rows[0]}
        print(f"{arm:10} {spread(col['fid']):>18} {spread(col['memorized']):>18} "
              f"{spread(col['median_distance']):>18} {col['threshold'][0]:9.3f} "
              f"{statistics.fmean(col['train_s']):8.1f}")
    out = dict(preset=PRESET, steps=args.steps, num_images=args.num_images, seeds=args.seeds, augment_p=p,
               sample_steps=args.sample_steps, floors=floors, results=results)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
