"""3D segmentation peers on the embedded nuclei: the cells3d-seg preset's UNet against MONAI's BasicUNet, same
patches, steps and loss; then our tiled inference against MONAI's sliding window on one network.

    pip install --no-deps "monai>=1.3"             # the bench extra (bench/README.md)
    python bench/bench_volumes.py                  # ~3 minutes on 2 cores (AVX2)
    python bench/bench_volumes.py --steps 400      # the preset's steps
    python bench/bench_volumes.py --quick          # a smoke run (tests/test_bench_volumes.py)

One process trains both networks in one hand-written loop on the same 32^3 patches of the same 64^3 volumes
(``data.synthetic.nuclei_arrays``, seed (0, 1, k)): positions from ``data.patches.patch_box`` with the preset's
``pos_ratio`` 0.5, the same flips, AdamW at the preset's learning rate, ``segmentation_loss("dice_ce")``; the two
take turns at every step, so load on a shared machine slows both alike. Each then segments the held-out volumes
(seed (0, 2, k), never a training volume) whole, scored by ``tasks.segmentation.segmentation_scores`` (Dice,
IoU, HD95 in voxels). Ours is also run by tiles (``predict_tiled``) to say how far whole and tiled agree. Last,
both inferers (ours: ``model.tiles.predict_tiled``; MONAI's ``sliding_window_inference``, gaussian) run the
*same* network (ours), interleaved, on a larger volume: voxels/s. Targets of issue #33: Dice >= 0.90, Dice ours
>= MONAI's, tiled voxels/s ours >= MONAI's; PASS / FAIL, exit 1 on a FAIL.

``--padding`` prints the trade-off of the two paddings for the preset: seconds per training step and per
output voxel of "same" against "valid" at the same output patch, the measure behind the preset's choice.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # run from a checkout without installing

import numpy as np                                                      # noqa: E402
import torch                                                            # noqa: E402

from diffunet.config import model_from_preset                           # noqa: E402
from diffunet.data.patches import patch_box                             # noqa: E402
from diffunet.data.synthetic import nuclei_arrays                       # noqa: E402
from diffunet.model.tiles import predict_tiled                          # noqa: E402
from diffunet.tasks.segmentation import segmentation_loss, segmentation_scores  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))                # its neighbour, bench_segmentation.py
from bench_segmentation import logits, parameters, train_in_turns       # noqa: E402

try:
    import monai
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import BasicUNet
except ImportError:                                                     # the bench extra is not installed
    monai = None

QUICK = dict(steps=6, volumes=4, test=1, big=48, repeats=1)


def build_models(features=(8, 8, 16, 32, 64, 8)) -> dict:
    """The preset's network (387,506 parameters) and MONAI's BasicUNet at ``features`` (360,426 by default)."""
    ours = model_from_preset("cells3d-seg", zero_init=False)
    theirs = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=tuple(features))
    return {"ours": ours, "MONAI": theirs}


def batches(images, masks, steps: int, batch_size: int, patch: int, pos_ratio: float, seed: int):
    """``steps`` batches of (B, 1, p, p, p) patches and masks, positions and flips from (seed, step, place)."""
    for step in range(steps):
        xs, ms = [], []
        for place in range(batch_size):
            rng = np.random.default_rng((seed, step, place))
            k = int(rng.integers(len(images)))
            box = (slice(None),) + patch_box(images.shape[2:], (patch,) * 3, (seed, step, place, 0), masks[k, 0] > 0,
                                             pos_ratio)
            x, m = images[k][box], masks[k][box]
            for axis in range(1, 4):                                     # the preset's data.augment.flip
                if rng.random() < 0.5:
                    x, m = np.flip(x, axis), np.flip(m, axis)
            xs.append(np.ascontiguousarray(x)), ms.append(np.ascontiguousarray(m))
        yield torch.from_numpy(np.stack(xs)) * 2 - 1, torch.from_numpy(np.stack(ms))




@torch.no_grad()
def scores_of(predict, images, masks) -> dict:
    preds = torch.cat([predict(torch.from_numpy(x)[None] * 2 - 1).argmax(1) for x in images])
    return segmentation_scores(preds, torch.from_numpy(masks[:, 0]).long(), 2, dims=3)


def tiled_ours(model, tile: int, overlap: int, batch_size: int):
    return lambda x: predict_tiled(model, x, tile, overlap=overlap, batch_size=batch_size)


def tiled_monai(model, tile: int, overlap: int, batch_size: int):
    return lambda x: sliding_window_inference(x, roi_size=(tile,) * 3, sw_batch_size=batch_size,
                                              predictor=lambda t: logits(model, t), overlap=overlap / tile,
                                              mode="gaussian")


@torch.no_grad()
def throughput(inferers: dict, volume: torch.Tensor, repeats: int) -> dict:
    """Median voxels/s of each inferer on ``volume``, one warm-up each, then ``repeats`` interleaved rounds, the
    order reversed every other round (neither always runs after the other's frees)."""
    times = {name: [] for name in inferers}
    for f in inferers.values():
        f(volume)
    for r in range(repeats):
        for name, f in list(inferers.items())[::-1 if r % 2 else 1]:
            start = time.perf_counter()
            f(volume)
            times[name].append(time.perf_counter() - start)
    return {name: volume[0, 0].numel() / statistics.median(t) for name, t in times.items()}


def padding_tradeoff(patch: int, batch_size: int, repeats: int = 3) -> None:
    """Seconds per training step of the preset with "same" and "valid" padding, at the same output patch."""
    rows = {}
    for padding in ("same", "valid"):
        model = model_from_preset("cells3d-seg", padding=padding, zero_init=False)
        size = model.tiling(patch).input_size[0]             # valid: what forward() mirror-pads the patch to
        x = torch.randn(batch_size, 1, *(patch,) * 3)
        out_side = logits(model, x).shape[-1]
        target = torch.randint(0, 2, (batch_size, 1, *(out_side,) * 3)).float()
        opt = torch.optim.AdamW(model.parameters())
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            loss = segmentation_loss("dice_ce", logits(model, x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        s = statistics.median(times[1:])
        rows[padding] = (size, out_side, s, s / (batch_size * out_side ** 3) * 1e6)
    print(f"\npadding trade-off, batch {batch_size}: {'input':>7s}{'output':>8s}{'s/step':>9s}{'us/out voxel':>14s}")
    for padding, (size, out, s, per) in rows.items():
        print(f"  {padding:28s}{size:5d}^3{out:6d}^3{s:9.3f}{per:14.3f}")
    print(f"  valid / same per output voxel: {rows['valid'][3] / rows['same'][3]:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="training steps of each model (the preset: 400)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--volumes", type=int, default=32, help="64^3 training volumes")
    p.add_argument("--test", type=int, default=3, help="held-out 64^3 volumes")
    p.add_argument("--big", type=int, default=96, help="side of the volume of the throughput comparison")
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--overlap", type=int, default=8, help="voxels (MONAI: overlap / tile)")
    p.add_argument("--tile-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--padding", action="store_true", help="also time 'same' against 'valid' padding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if monai is None:
        sys.exit('error: MONAI is not installed: pip install --no-deps "monai>=1.3" (see bench/README.md)')
    torch.manual_seed(args.seed)
    wall = time.perf_counter()
    print(f"bench_volumes: torch {torch.__version__}, MONAI {monai.__version__}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}; {args.steps} steps of {args.batch_size} patches of 32^3")
    data = nuclei_arrays(args.volumes, 64, seed=args.seed, part=1)
    test = nuclei_arrays(args.test, 64, seed=args.seed, part=2)
    models = build_models()
    params = {name: parameters(m) for name, m in models.items()}
    step_s = train_in_turns(models, batches(*data, args.steps, args.batch_size, 32, 0.5, args.seed), args.lr)
    ours, theirs = models["ours"].eval(), models["MONAI"].eval()    # inference: BatchNorm's running statistics
    scores = {"ours": scores_of(lambda x: logits(ours, x), *test), "MONAI": scores_of(lambda x: logits(theirs, x), *test),
              "ours, tiled": scores_of(tiled_ours(ours, args.tile, args.overlap, args.tile_batch), *test)}
    with torch.no_grad():
        x = torch.from_numpy(test[0][:1]) * 2 - 1
        whole, tiled = logits(ours, x).softmax(1), tiled_ours(ours, args.tile, args.overlap, args.tile_batch)(x).softmax(1)
    agree = float((whole.argmax(1) == tiled.argmax(1)).float().mean())
    big = torch.from_numpy(nuclei_arrays(1, args.big, seed=args.seed, part=3)[0]) * 2 - 1
    vox = throughput({"predict_tiled": tiled_ours(ours, args.tile, args.overlap, args.tile_batch),
                      "sliding_window_inference": tiled_monai(ours, args.tile, args.overlap, args.tile_batch)},
                     big, args.repeats)

    print(f"\n{'model':14s}{'parameters':>12s}{'train s/step':>14s}{'Dice':>9s}{'IoU':>9s}{'HD95 vox':>10s}")
    for name, s in scores.items():
        base = name.split(",")[0]
        print(f"{name:14s}{params[base]:12,d}{step_s[base]:14.3f}{s['dice']:9.4f}{s['iou']:9.4f}{s['hd95']:10.2f}")
    print(f"whole vs tiled (tile {args.tile}, overlap {args.overlap}, same padding: blended): max |p| difference "
          f"{float((whole - tiled).abs().max()):.2e}, voxels with the same class {agree:.4%}")
    print(f"\ntiled inference of our UNet on a {args.big}^3 volume, tile {args.tile}, overlap {args.overlap}, "
          f"{args.tile_batch} tiles per call, median of {args.repeats}")
    for name, v in vox.items():
        print(f"  {name:26s}{v / 1e6:8.3f} Mvoxel/s")
    ratio = vox["predict_tiled"] / vox["sliding_window_inference"]
    print(f"  {'ratio':26s}{ratio:8.2f}x")
    targets = {"Dice ours >= 0.90": scores["ours"]["dice"] >= 0.90,
               "Dice ours >= MONAI": scores["ours"]["dice"] >= scores["MONAI"]["dice"],
               "tiled voxels/s ours >= MONAI sliding window": ratio >= 1.0}
    print()
    for target, passed in targets.items():
        print(f"target {target}: {'PASS' if passed else 'FAIL'}")
    if args.padding:
        padding_tradeoff(32, args.batch_size)
    print(f"wall {time.perf_counter() - wall:.0f} s, load {os.getloadavg()[0]:.1f}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
