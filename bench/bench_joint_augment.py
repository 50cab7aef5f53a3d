"""Joint augmentation for image-conditioned jobs: the digits inpainting model (preset digits-inpaint) trained with
and without ``data.augment`` (small rotations and shifts applied to the digit and its mask together), same steps
and seeds, then both asked to complete half-masked held-out digits, as they are and moved (rotated by up to 10
degrees and shifted by up to one pixel), and their outputs classified by the offline digits classifier.

    python bench/bench_joint_augment.py                 # a quick look: 300 training steps per arm
    python bench/bench_joint_augment.py --steps 1500    # the preset's steps: docs/image-conditioned.md's numbers

The measured need (issue #33): at 1,500 steps without augmentation the model completes the held-out digits to
93 % class accuracy but the moved ones to 75 %, their truths reading at 94 %. The moved digits are drawn once,
seeded, by ``data.transforms.joint_augment`` with probability 1 (every digit rotated and shifted), and their
masks (``inpainting.eval_mask``: a half-image box) are the same for both arms. Accuracy is against the true
labels; "truth" is the classifier's accuracy on the uncut digits themselves, the ceiling.
Each arm trains in-process through ``diffunet.training.loop.train`` (the default: about 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # run from a checkout without installing

import torch                                                            # noqa: E402

from diffunet.config import AugmentConfig, load_config                  # noqa: E402
from diffunet.data import build_dataset, split_holdout, to_uint8        # noqa: E402
from diffunet.data.inpaint_masks import draw_masks                      # noqa: E402
from diffunet.data.transforms import joint_augment                      # noqa: E402
from diffunet.metrics import classify                                   # noqa: E402
from diffunet.model.pipeline import DiffunetPipeline                    # noqa: E402
from diffunet.training.loop import train                                # noqa: E402

PRESET = "digits-inpaint"
ARMS = {"plain": [], "augmented": ["data.augment.rotate=10", "data.augment.shift=1"]}


def held_out(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The preset's held-out digits (N, 1, 16, 16) in [-1, 1] and their labels: what its runs never train on."""
    _, held = split_holdout(build_dataset(cfg.data, (16, 16), 1), cfg.data.holdout)
    return torch.stack([held[i][0] for i in range(len(held))]), torch.tensor([held[i][1] for i in range(len(held))])


def moved(x: torch.Tensor, degrees: float, pixels: int, seed: int) -> torch.Tensor:
    """``x`` with every image rotated by up to ``degrees`` and shifted by up to ``pixels``, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return joint_augment(AugmentConfig(rotate=degrees, shift=pixels, p=1.0), [x], [False])[0]


def accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    return (classify(to_uint8(images), "digits") == labels).float().mean().item()


def complete(pipe, x: torch.Tensor, mask: torch.Tensor, seed: int, steps: int) -> torch.Tensor:
    """The pipeline's fill of ``x`` (in [-1, 1]) where ``mask`` is 1, in [-1, 1]."""
    generator = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(len(x))]
    out = pipe(image=(x + 1) / 2, mask_image=mask, generator=generator, num_inference_steps=steps,
               output_type="pt").images
    return out * 2 - 1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per arm (the preset: 1500)")
    ap.add_argument("--sample-steps", type=int, default=20, help="DDIM steps (the preset: 50)")
    ap.add_argument("--degrees", type=float, default=10.0, help="largest rotation of the moved digits")
    ap.add_argument("--pixels", type=int, default=1, help="largest shift of the moved digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    cfg = load_config(PRESET)
    x, y = held_out(cfg)
    tests = {"as they are": x, f"moved ({args.degrees:g} deg, {args.pixels} px)": moved(x, args.degrees, args.pixels,
                                                                                       args.seed)}
    mask = draw_masks(cfg.inpainting.eval_mask, len(x), (16, 16), generator=torch.Generator().manual_seed(args.seed))
    truth = {name: accuracy(images, y) for name, images in tests.items()}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-joint-augment-") as tmp:
        root = args.out or Path(tmp)
        for arm, extra in ARMS.items():
            overrides = [f"output_dir={root / arm}", f"train.max_steps={args.steps}", f"train.seed={args.seed}",
                         f"train.warmup_steps={min(100, args.steps // 5)}", f"train.checkpoint_every={args.steps}",
                         f"train.sample_every={args.steps}", "train.eval_every=0", "train.log_every=100", *extra]
            start = time.perf_counter()
            pipe = DiffunetPipeline.from_pretrained(str(train(load_config(PRESET, overrides))))
            seconds = time.perf_counter() - start
            results[arm] = {name: accuracy(complete(pipe, images, mask, args.seed, args.sample_steps), y)
                            for name, images in tests.items()}
            results[arm]["train_s"] = seconds

    print(f"\npreset {PRESET}: {args.steps} steps per arm, {len(x)} held-out digits with half masks, DDIM "
          f"{args.sample_steps} steps; augmented arm: {' '.join(ARMS['augmented'])}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'class accuracy':22}" + "".join(f"{name:>26}" for name in tests) + f"{'train s':>9}")
    print(f"{'truth (uncut)':22}" + "".join(f"{truth[name]:26.3f}" for name in tests))
    for arm, row in results.items():
        print(f"{arm:22}" + "".join(f"{row[name]:26.3f}" for name in tests) + f"{row['train_s']:9.1f}")
    out = dict(preset=PRESET, steps=args.steps, sample_steps=args.sample_steps, truth=truth, results=results)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
