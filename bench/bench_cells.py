"""The segmentation targets, from trained runs, on held-out cells.

    python train.py --config cells-seg                                              # ~1-2 min
    python train.py --config cells-seg segment.loss=ce output_dir=runs/cells-seg-ce
    python train.py --config cells-segdiff                                          # ~5 min
    python bench/bench_cells.py [--crops 64] [--diffusion-crops 16] [--panel docs/images/segmentation.png]

Scored on two held-out sets that no run trained on: the runs' own ``data.holdout`` crops (64 x 64, the split is
fixed: ``data.split_holdout``) and ``data.cells.test_images`` (512 x 512, seeds never used for training), segmented
by overlap-tile (``--tile``). Printed: Dice / IoU / HD95 of each model, the objects (4-connected components)
per image against the truth's, and the diffusion ensemble's mean std on wrong and on right pixels. Targets:
Dice >= 0.90 (deterministic), the border-weighted loss nearer the truth's object count than plain CE, diffusion
Dice within 0.03 of the deterministic model's, std on wrong pixels >= 2x that on right ones. MONAI's peers are
bench/bench_segmentation.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # run from a checkout without installing

import numpy as np                                                      # noqa: E402
import torch                                                            # noqa: E402

from diffunet import DiffunetSegmentationPipeline                       # noqa: E402
from diffunet.pretrained import load_model_folder  # noqa: E402
from diffunet.config import build_model, load_config                    # noqa: E402
from diffunet.data import build_dataset, cells, save_grid, seg_masks, split_holdout  # noqa: E402
from diffunet.sampling import image_generator, make_scheduler           # noqa: E402
from diffunet.tasks.segmentation import segmentation_scores  # noqa: E402
from diffunet.tasks import task_of                                      # noqa: E402


def load(run: Path, scheduler: str) -> tuple[DiffunetSegmentationPipeline, object]:
    unet, train_scheduler = load_model_folder(run / "pipeline")
    sched = None if train_scheduler is None else make_scheduler(scheduler, train_scheduler)
    pipe = DiffunetSegmentationPipeline(unet, sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_config(run / "config.yaml")


def segment(pipe, images: list[np.ndarray], args, tile=None):
    """(masks, std maps or None) of images (H, W) in [0, 1]: 32 crops a call, or one large image a call by tiles;
    image i seeded by (seed, i) alone."""
    masks, stds, chunk = [], [], 1 if tile else 32
    for lo in range(0, len(images), chunk):
        batch = torch.from_numpy(np.stack(images[lo:lo + chunk]))[:, None]
        diffusion = pipe.scheduler is not None
        same = pipe.unet.config.padding == "same"                       # valid tiles never overlap
        out = pipe(image=batch, tile=tile, overlap=args.overlap if tile and same else None,
                   num_samples=args.ensemble if diffusion else 1, num_inference_steps=args.steps,
                   generator=[image_generator(args.seed, (i,)) for i in range(lo, lo + len(batch))],
                   output_type="pt")
        masks += list(out.masks)
        stds += list(out.std) if out.std is not None else [None] * len(batch)
    return masks, stds


def scores(masks, truths, stds) -> dict:
    row = segmentation_scores(torch.stack(masks), torch.stack(truths))
    row["objects"] = np.mean([seg_masks.count_objects(m.numpy()) for m in masks])
    row["objects_truth"] = np.mean([seg_masks.count_objects(t.numpy()) for t in truths])
    if stds[0] is not None:
        wrong = torch.stack([m != t for m, t in zip(masks, truths)])
        std = torch.stack(stds)
        row["std_wrong"], row["std_right"] = float(std[wrong].mean()), float(std[~wrong].mean())
    return row


def held_crops(cfg, n: int):
    """The first ``n`` of the run's held-out crops: images (H, W) in [0, 1] and truth masks."""
    dataset = build_dataset(cfg.data, cfg.model.sample_size, **task_of(cfg).dataset_options(cfg, build_model(cfg)))
    _, held = split_holdout(dataset, cfg.data.holdout)
    items = [held[i] for i in range(min(n, len(held)))]
    return [((it[0][0] + 1) / 2).numpy() for it in items], [it[2][0].long() for it in items]


def panel(path: Path, image, truth, mask, std) -> Path:
    """One row: image / truth / prediction / uncertainty (4 std, so 0.25 is white), 8-bit gray."""
    tiles = [image, truth.float().numpy(), mask.float().numpy(), np.clip(std.numpy() * 4, 0, 1)]
    row = np.stack([np.round(t * 255).astype(np.uint8)[..., None] for t in tiles])
    return save_grid(row, path, nrow=4, pad=4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seg", default="runs/cells-seg", help="the deterministic run (segment.loss=unet_weighted_ce)")
    p.add_argument("--ce", default="runs/cells-seg-ce", help="the same with segment.loss=ce")
    p.add_argument("--diffusion", default="runs/cells-segdiff", help="the diffusion run")
    p.add_argument("--crops", type=int, default=64, help="held-out 64x64 crops scored (deterministic models)")
    p.add_argument("--diffusion-crops", type=int, default=16, help="... and of them, by the diffusion ensemble")
    p.add_argument("--test", type=int, default=3, help="512x512 test images (deterministic models)")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--overlap", type=int, default=32, help="'same'-padding models only")
    p.add_argument("--ensemble", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--panel", type=Path, default=None, help="write image / truth / prediction / std of test image 0")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    tests = cells.test_images(args.test, 512)
    test_images, test_truth = [t[0] for t in tests], [torch.from_numpy(t[1] > 0).long() for t in tests]
    rows = {}
    for name, run in (("weighted CE", args.seg), ("plain CE", args.ce), ("diffusion", args.diffusion)):
        if not (Path(run) / "pipeline").is_dir():
            print(f"{name}: {run}/pipeline missing, skipped (see the commands above)")
            continue
        pipe, cfg = load(Path(run), args.scheduler)
        images, truths = held_crops(cfg, args.crops if pipe.scheduler is None else args.diffusion_crops)
        start = time.perf_counter()
        masks, stds = segment(pipe, images, args)
        rows[f"{name}, crops"] = dict(scores(masks, truths, stds), s=time.perf_counter() - start)
        if pipe.scheduler is None or args.panel:
            start = time.perf_counter()
            shown = slice(None) if pipe.scheduler is None else slice(0, 1)
            masks, stds = segment(pipe, test_images[shown], args, tile=args.tile)
            rows[f"{name}, 512 tiled"] = dict(scores(masks, test_truth[shown], stds), s=time.perf_counter() - start)
            if args.panel and pipe.scheduler is not None:
                print(f"panel: {panel(args.panel, test_images[0], test_truth[0], masks[0], stds[0])}")
    keys = ["dice", "iou", "hd95", "objects", "objects_truth", "std_wrong", "std_right", "s"]
    print(f"{'model, set':28s}" + "".join(f"{k:>14s}" for k in keys))
    for name, row in rows.items():
        print(f"{name:28s}" + "".join(f"{row[k]:14.4f}" if k in row else f"{'':14s}" for k in keys))

    checks = []
    seg, ce, diff = (rows.get(f"{n}, crops") for n in ("weighted CE", "plain CE", "diffusion"))
    if seg:
        checks.append(("deterministic Dice >= 0.90 (crops)", seg["dice"] >= 0.90, f"{seg['dice']:.4f}"))
    big_seg, big_ce = rows.get("weighted CE, 512 tiled"), rows.get("plain CE, 512 tiled")
    if big_seg and big_ce:
        off_seg = abs(big_seg["objects"] - big_seg["objects_truth"])
        off_ce = abs(big_ce["objects"] - big_ce["objects_truth"])
        checks.append(("weighted CE nearer the true object count than CE (512)", off_seg < off_ce,
                       f"|{big_seg['objects']:.1f} - {big_seg['objects_truth']:.1f}| vs "
                       f"|{big_ce['objects']:.1f} - {big_ce['objects_truth']:.1f}|"))
    if seg and diff:
        checks.append(("diffusion Dice within 0.03 of deterministic (crops)", diff["dice"] >= seg["dice"] - 0.03,
                       f"{diff['dice']:.4f} vs {seg['dice']:.4f}"))
        ratio = diff["std_wrong"] / max(diff["std_right"], 1e-12)
        checks.append(("diffusion std on wrong pixels >= 2x right", ratio >= 2, f"{ratio:.1f}x"))
    for what, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {value}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
