"""Super-resolution of volumes larger than the model, by blended tiles at every step (``DiffunetPipeline(tile=)``).

    python train.py --config cells3d-sr                # the model: 32^3, through-plane x2 (about 10 minutes)
    python bench/bench_tiled_sr.py [--pipeline runs/cells3d-sr/pipeline] [--size 64] [--num 2] [--tile 32]
                                   [--panel docs/images/volumes-sr-tiled.png]

Held-out embedded nuclei volumes of ``--size``^3 (never trained on) are thick-sliced as the run was trained
(``super_resolution.factors``: area averaging) and super-resolved whole, by tiles of ``--tile`` output voxels:

- ``blended``: the network runs on overlapping tiles at every step and their outputs blend (Hann ramps over a
  quarter of the tile, MultiDiffusion): one sample of the whole volume;
- ``tiles apart``: the same with no overlap, each tile its own sample, as cutting the volume and pasting the
  outputs would give.

Printed: PSNR and SSIM of each against the truth, and of trilinear and tricubic upsampling, and the seam measure:
the mean squared error on the voxels next to a tile border (the two planes either side) over the error elsewhere
(1.0: no seam; methods without tiles show the level at the same places). Wall time per volume, under the load
this run measures.

And the bound no method reaches (``oracle``): the truth carries photon noise, and thick slices keep only the mean
of each pair's noise, not its difference. An oracle that knows the noise-free volume and adds the known pair means
of the noise back has an error of that unknowable difference alone; any super-resolution of the thick slices
errs at least as much.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffunet import DiffunetPipeline
from diffunet.data.synthetic import make_nuclei, nuclei_arrays
from diffunet.metrics.paired import array_scores, cubic_upsample
from diffunet.model.pipeline import upsample_condition
from diffunet.model.tiles import tile_boxes
from diffunet.tasks.image import degrade


def border_planes(size: int, tile: int, overlap: int) -> np.ndarray:
    """Positions along one axis that sit next to a tile border of ``tile_boxes`` (within 2 voxels)."""
    near = np.zeros(size, bool)
    for out_box, _ in tile_boxes((size,), (tile,), overlap):
        for edge in (out_box[0].start, out_box[0].stop):
            if 0 < edge < size:
                near[max(0, edge - 2):edge + 2] = True
    return near


def seam_ratio(out: torch.Tensor, truth: torch.Tensor, tile: int, overlap: int) -> float:
    err = ((out - truth) ** 2)[:, 0].numpy()                                        # (N, D, H, W)
    near = [border_planes(n, tile, overlap) for n in err.shape[1:]]
    border = near[0][:, None, None] | near[1][None, :, None] | near[2][None, None, :]
    return float(err[:, border].mean() / err[:, ~border].mean())


@torch.no_grad()                                          # a decorator: callers (the smoke test) keep autograd
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="runs/cells3d-sr/pipeline")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num", type=int, default=2)
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="default: as the run sampled")
    p.add_argument("--panel", type=Path, default=None, help="write a PNG: central xz planes of truth, tricubic, "
                                                           "blended and tiles apart")
    args = p.parse_args(argv)
    pipe = DiffunetPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    factors = pipe.input_factors
    images, _ = nuclei_arrays(args.num, (args.size,) * 3, seed=0, part=2)         # held out: never trained on
    truth = torch.from_numpy(images) * 2 - 1                                       # [-1, 1], as training saw them
    low = degrade(truth, factors)
    size = tuple(truth.shape[2:])
    clean = torch.from_numpy(np.stack([make_nuclei((args.size,) * 3, seed=(0, 2, k), photons=1e12)[0][None]
                                       for k in range(args.num)])) * 2 - 1         # the same volumes, noise-free
    oracle = clean + F.interpolate(degrade(truth - clean, factors), size=size, mode="nearest")
    rows, outputs = {}, {"trilinear": upsample_condition(low, size), "tricubic": cubic_upsample(low, size),
                         "oracle": oracle}
    for name, overlap in (("blended", args.tile // 4), ("tiles apart", 0)):
        start = time.perf_counter()
        outputs[name] = torch.cat([
            pipe(image=(low[i:i + 1] + 1) / 2, tile=args.tile, overlap=overlap, num_inference_steps=args.steps,
                 generator=torch.Generator().manual_seed(i), output_type="latent").images.clamp(-1, 1)
            for i in range(len(low))])
        rows[name] = {"s/volume": (time.perf_counter() - start) / len(low),
                      "seam": seam_ratio(outputs[name], truth, args.tile, overlap or 0)}
    print(f"{args.num} held-out volumes of {args.size}^3, input {'x'.join(map(str, low.shape[2:]))} "
          f"(factors {list(factors)}), model {'x'.join(map(str, pipe.unet.image_size))}, tiles of {args.tile}")
    print(f"{'':14s} {'PSNR':>7s} {'SSIM':>7s} {'seam':>6s} {'s/volume':>9s}")
    for name, out in outputs.items():
        scores = array_scores(out, truth)
        row = rows.setdefault(name, {"seam": seam_ratio(out, truth, args.tile, args.tile // 4)})
        row.update(psnr=scores["psnr"], ssim=scores["ssim"])
        wall = f"{row['s/volume']:9.1f}" if "s/volume" in row else f"{'':9s}"
        print(f"{name:14s} {row['psnr']:7.2f} {row['ssim']:7.4f} {row['seam']:6.2f} {wall}")
    if args.panel:
        from diffunet.data import save_grid, to_uint8
        planes = [outputs[k][0, :, :, args.size // 2] for k in ("tricubic", "blended", "tiles apart")]
        panel = torch.stack([truth[0, :, :, args.size // 2], *planes])               # (4, 1, D, H): xz planes
        args.panel.parent.mkdir(parents=True, exist_ok=True)
        save_grid(to_uint8(F.interpolate(panel, scale_factor=4, mode="nearest")), args.panel,
                  nrow=4)
        print(f"panel: {args.panel} (truth, tricubic, blended, tiles apart; central planes across the slices)")
    return rows


if __name__ == "__main__":
    main()
