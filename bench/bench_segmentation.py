"""Segmentation peers on the embedded cells: our deterministic UNet against MONAI's UNet, same data, steps and loss.

    pip install --no-deps "monai>=1.3"                      # the bench extra (see bench/README.md): MONAI only
    python bench/bench_segmentation.py                      # ~2 minutes on 2 busy cores
    python bench/bench_segmentation.py --quick              # a ~20 s smoke run (what tests/test_bench_seg.py runs)

One process trains both networks in one hand-written loop: the same batches of ``data.cells.cells_dataset``
crops in the same order, AdamW at the same learning rate, the same number of steps, the loss
``segmentation_loss("dice_ce", ...)``; the two models take turns at every step, so a load burst on a shared
machine slows both alike. Each then predicts the held-out ``data.cells.test_images`` (512 x 512, never a
training image) whole, by tiles: ours by ``model.tiles.predict_tiled``, MONAI's by
``monai.inferers.sliding_window_inference`` at the same tile, overlap and tiles per call, scored by
``tasks.segmentation.segmentation_scores`` (Dice, IoU, HD95).
Then both inferers run on the *same* network (ours), interleaved, for tiled MPix/s. Targets of the issue:
Dice ours >= MONAI's, and predict_tiled's MPix/s >= sliding_window_inference's; PASS / FAIL, exit 1 on a FAIL.

Sections are functions (``train_peer``, ``tiled_scores``, ``throughput``) that ``main`` composes, so a model
read from a trained run folder or a diffusion model's ensemble can be one more row later.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # run from a checkout without installing

import einops                                                           # noqa: E402
import torch                                                            # noqa: E402

from diffunet import UNet                                               # noqa: E402
from diffunet.data import cells                                        # noqa: E402
from diffunet.tasks.segmentation import segmentation_loss, segmentation_scores  # noqa: E402
from diffunet.model.tiles import predict_tiled  # noqa: E402

try:
    import monai
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet as MonaiUNet
except ImportError:                                                     # the bench extra is not installed
    monai = None

QUICK = dict(steps=10, crops=50, test=1, test_size=128, repeats=2, score_block=64)    # --quick: a smoke run
Predict = Callable[[torch.Tensor], torch.Tensor]                        # (1, 1, H, W) image -> (1, 2, H, W) logits


# ------------------------------------------------------------------------------------------------ models

def build_models(base_channels: int = 8, channel_mult=(1, 2, 4, 8), monai_channels=(19, 38, 76, 152),
                 **switches) -> dict[str, torch.nn.Module]:
    """The two peers, at about the same parameter count (568k / 566k by default), both four resolutions deep.

    ``switches`` go to our UNet as they are (later: ``norm="batch"``, ``mid_attention=False``). MONAI's
    UNet halves the resolution in each level's first residual unit; ours pools after its blocks.
    """
    ours = UNet(sample_size=64, in_channels=1, out_channels=2, time_condition="none", padding="same",
                downsample="maxpool", upsample="transposed", skip="concat", attention_resolutions=(),
                base_channels=base_channels, channel_mult=tuple(channel_mult), num_res_blocks=1,
                norm_groups=min(8, base_channels), **switches)
    theirs = MonaiUNet(spatial_dims=2, in_channels=1, out_channels=2, channels=tuple(monai_channels),
                       strides=(2,) * (len(monai_channels) - 1), num_res_units=2)
    return {"ours": ours, "MONAI": theirs}


def logits(model, x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 2, H, W): ours returns an output object, MONAI's a tensor."""
    y = model(x)
    return y.sample if hasattr(y, "sample") else y


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- training

def train_peer(models: dict, data, steps: int, batch_size: int, lr: float, seed: int = 0) -> dict[str, float]:
    """Train every model in ``models`` in place on the same batches, in the same order, turn by turn.

    ``data`` is a cells dataset (image in [-1, 1], label, mask 0/1, weight). Returns each model's seconds per
    step (its own forward, loss, backward and AdamW step only)."""
    generator = torch.Generator().manual_seed(seed)

    def batches():
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if len(order) < batch_size:                                  # epochs of a fixed random order
                order = torch.cat([order, torch.randperm(len(data), generator=generator)])
            idx, order = order[:batch_size], order[batch_size:]
            yield data.images[idx], data.masks[idx]                      # (B, 1, 64, 64) each

    return train_in_turns(models, batches(), lr)


def train_in_turns(models: dict, batches, lr: float) -> dict[str, float]:
    """Train every model in ``models`` in place on each (image, mask) batch of ``batches``, turn by turn, with
    AdamW at ``lr`` and the ``dice_ce`` loss; each model's seconds per step (its own forward, loss, backward and
    step only). bench_volumes.py trains its 3D peers with it too."""
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=lr) for name, m in models.items()}
    seconds, steps = dict.fromkeys(models, 0.0), 0
    for m in models.values():
        m.train()
    for x, mask in batches:
        steps += 1
        for name, m in models.items():
            start = time.perf_counter()
            loss = segmentation_loss("dice_ce", logits(m, x), mask)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            seconds[name] += time.perf_counter() - start
    for m in models.values():
        m.eval()
    return {name: s / max(steps, 1) for name, s in seconds.items()}


# ------------------------------------------------------------------------------------------- inferers

def tiled_ours(model, tile: int, overlap: int, batch_size: int) -> Predict:
    return lambda image: predict_tiled(model, image, tile, overlap=overlap, batch_size=batch_size)


def tiled_monai(model, tile: int, overlap: int, batch_size: int, mode: str = "gaussian") -> Predict:
    """MONAI's sliding window at the same tile and overlap (as a fraction of the tile), ``batch_size`` per call."""
    net = lambda x: logits(model, x)                                     # noqa: E731
    return lambda image: sliding_window_inference(image, roi_size=(tile, tile), sw_batch_size=batch_size,
                                                  predictor=net, overlap=overlap / tile, mode=mode)


@torch.no_grad()
def tiled_scores(predict: Predict, images, block: int = 128) -> dict:
    """Dice, IoU, HD95 of ``predict``'s argmax over the held-out (image [0, 1], instances) pairs.

    Each image is predicted whole; the scores are over the whole image, or over its ``block`` x ``block``
    squares (Dice and IoU then means over squares)."""
    preds, truths = [], []
    for image, instances in images:
        x = torch.from_numpy(image)[None, None] * 2 - 1                   # the training crops' [-1, 1]
        preds.append(predict(x).argmax(1)[0])                             # (1, 2, H, W) -> (H, W)
        truths.append(torch.from_numpy(instances > 0).long())
    pred, truth = torch.stack(preds), torch.stack(truths)                 # (N, H, W)
    if block:                                                             # (N, H, W) -> (N H/b W/b, b, b)
        pred, truth = (einops.rearrange(t, "n (h b1) (w b2) -> (n h w) b1 b2", b1=block, b2=block)
                       for t in (pred, truth))
    return segmentation_scores(pred, truth)


@torch.no_grad()
def throughput(inferers: dict[str, Predict], image: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median MPix/s of each inferer on ``image`` (1, C, H, W): one warm-up call each, then ``repeats`` rounds in
    which every inferer runs once, in turn, so load on a shared machine hits them alike."""
    times = {name: [] for name in inferers}
    for f in inferers.values():
        f(image)
    for _ in range(repeats):
        for name, f in inferers.items():
            start = time.perf_counter()
            f(image)
            times[name].append(time.perf_counter() - start)
    pixels = image.shape[-2] * image.shape[-1] / 1e6
    return {name: pixels / statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------ report

def report(params, step_s, scores, mpix, args) -> dict[str, bool]:
    print(f"\n{'model':8s}{'parameters':>12s}{'train s/step':>14s}{'Dice':>9s}{'IoU':>9s}{'HD95 px':>9s}")
    for name in scores:
        s = scores[name]
        print(f"{name:8s}{params[name]:12,d}{step_s[name]:14.4f}{s['dice']:9.4f}{s['iou']:9.4f}{s['hd95']:9.2f}")
    print(f"\ntiled inference of our UNet on a {args.test_size}x{args.test_size} image, tile {args.tile}, overlap "
          f"{args.overlap}, {args.tile_batch} tiles per call, median of {args.repeats}")
    for name, v in mpix.items():
        print(f"  {name:26s}{v:8.3f} MPix/s")
    ours, theirs = mpix["predict_tiled"], mpix["sliding_window_inference"]
    print(f"  {'ratio':26s}{ours / theirs:8.2f}x")
    targets = {"Dice ours >= MONAI": scores["ours"]["dice"] >= scores["MONAI"]["dice"],
               "tiled MPix/s ours >= MONAI sliding window": ours >= theirs}
    print()
    for target, passed in targets.items():
        print(f"target {target}: {'PASS' if passed else 'FAIL'}")
    return targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="training steps of each model")
    p.add_argument("--batch-size", type=int, default=8, help="training crops per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of both")
    p.add_argument("--crops", type=int, default=1000, help="64x64 training crops (cells.cells_dataset)")
    p.add_argument("--test", type=int, default=3, help="held-out test images (cells.test_images)")
    p.add_argument("--test-size", type=int, default=512, help="side of the test images")
    p.add_argument("--tile", type=int, default=64, help="tile side of both inferers")
    p.add_argument("--overlap", type=int, default=16, help="overlap in pixels (MONAI: overlap / tile)")
    p.add_argument("--tile-batch", type=int, default=4, help="tiles per network call (MONAI's sw_batch_size)")
    p.add_argument("--score-block", type=int, default=0,
                   help="score squares of this side of each whole-image prediction (0: whole images)")
    p.add_argument("--mode", default="gaussian", choices=["gaussian", "constant"], help="MONAI's blending")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of the throughput comparison")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a ~20 s smoke run: few steps, crops and one small image")
    args = p.parse_args(argv)
    if args.quick:                                                   # new defaults: options given still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if monai is None:
        sys.exit('error: MONAI is not installed: pip install --no-deps "monai>=1.3" (see bench/README.md)')
    if args.score_block and args.test_size % args.score_block:
        sys.exit(f"error: --score-block {args.score_block} must divide --test-size {args.test_size} (or be 0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall = time.perf_counter()
    print(f"bench_segmentation: torch {torch.__version__}, MONAI {monai.__version__}, {torch.get_num_threads()} "
          f"threads, load {os.getloadavg()[0]:.1f}; {args.steps} steps of {args.batch_size} crops, lr {args.lr}")

    data = cells.cells_dataset(args.crops, crop=64, seed=args.seed)
    test = cells.test_images(args.test, args.test_size, seed=args.seed)
    models = build_models()
    params = {name: parameters(m) for name, m in models.items()}
    step_s = train_peer(models, data, args.steps, args.batch_size, args.lr, args.seed)

    ours, theirs = models["ours"], models["MONAI"]
    scores = {"ours": tiled_scores(tiled_ours(ours, args.tile, args.overlap, args.tile_batch), test,
                                   args.score_block),
              "MONAI": tiled_scores(tiled_monai(theirs, args.tile, args.overlap, args.tile_batch, args.mode),
                                    test, args.score_block)}
    image = torch.from_numpy(test[0][0])[None, None] * 2 - 1
    mpix = throughput({"predict_tiled": tiled_ours(ours, args.tile, args.overlap, args.tile_batch),
                       "sliding_window_inference": tiled_monai(ours, args.tile, args.overlap, args.tile_batch,
                                                               args.mode)}, image, args.repeats)
    targets = report(params, step_s, scores, mpix, args)
    print(f"wall {time.perf_counter() - wall:.0f} s, load {os.getloadavg()[0]:.1f}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
