"""The targets of the image-conditioned tasks on held-out digits: super-resolution x4 against bicubic upsampling,
inpainting of a half-image box against RePaint (diffusers' RePaintScheduler) with an unconditional digits model.

    python train.py --config digits-sr                                                 # the two default runs
    python train.py --config digits-inpaint
    # RePaint's model: unconditional and epsilon-prediction DDPM, which RePaint needs
    python train.py --config digits-ddpm model.num_classes=null data.holdout=297 output_dir=runs/digits-uncond
    python bench/bench_image_cond.py [--sr RUN] [--inpaint RUN] [--repaint RUN] [--grids DIR] [--json FILE]

Every run must hold out the same digits (``data.holdout``: a fixed split, ``data.split_holdout``), so the
unconditional model never saw the digits it completes. The held-out digits, their conditions and the masks are
exactly those of the runs' own evaluation (``tasks.image.ImageConditioned.outputs``); scores are
``metrics.paired_scores``: PSNR, SSIM, PSNR inside the mask, and the class accuracy under the digits classifier.
The default (100 of the 297 held-out digits) takes about 1.5 minutes on 2 CPU cores, RePaint's ~8 network
calls per step most of it; ``--num 297`` scores all of them (about 4 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # run from a checkout without installing

import torch                                                            # noqa: E402
from diffusers import RePaintScheduler                                  # noqa: E402

from diffunet.config import load_config                                 # noqa: E402
from diffunet.data import build_dataset, save_grid, split_holdout, to_uint8   # noqa: E402
from diffunet.metrics import paired_scores                              # noqa: E402
from diffunet.sampling import generate, load_model                      # noqa: E402
from diffunet.tasks import task_of                                      # noqa: E402

SHOWN = 12                                                              # columns of the grids


def load_run(run: Path, steps: int | None, guidance: float | None = None):
    """(config, task, unet, training scheduler, held-out set, sampler) of a finished run folder."""
    cfg = load_config(run / "config.yaml")
    unet, scheduler = load_model(run / "pipeline", cfg.sample.scheduler)
    _, held = split_holdout(build_dataset(cfg.data, unet.image_size, unet.config.in_channels), cfg.data.holdout)
    task = task_of(cfg)
    options = task.pipeline_options(cfg)

    def sample(n, **conditions):
        return generate(unet, scheduler, n, steps=steps or cfg.sample.steps, seed=cfg.sample.seed,
                        guidance_scale=cfg.sample.guidance_scale if guidance is None else guidance,
                        batch_size=512, **options, **conditions)
    return cfg, task, unet, scheduler, held, sample


def timed(f, n: int):
    start = time.perf_counter()
    out = f()
    return out, (time.perf_counter() - start) / n * 1e3                 # ms per image


def scores_of(images, truth, labels, mask=None) -> dict:
    return paired_scores(to_uint8(images), to_uint8(truth), mask=mask, labels=labels, classifier="digits",
                         lpips=True)


def super_resolution(run: Path, num: int, steps: int | None, guidance: float | None, grids: Path | None) -> dict:
    cfg, task, unet, _, held, sample = load_run(run, steps, guidance)
    num = min(num, len(held))
    (x, y, known, out), ms = timed(lambda: task.outputs(unet, sample, held, num, cfg), num)
    rows = {"bicubic": scores_of(known["cond"], x, y), "ours": scores_of(out, x, y)}
    rows["ours"]["ms_per_image"] = ms
    if grids:
        shown = task.shown(known, x, out)
        save_grid(big(torch.cat([shown[r][:SHOWN] for r in task.rows])), grids / "super_resolution.png",
                  nrow=min(SHOWN, len(x)))
    ok = {"accuracy >= 0.90": rows["ours"]["accuracy"] >= 0.90,
          "accuracy above bicubic": rows["ours"]["accuracy"] > rows["bicubic"]["accuracy"],
          "PSNR at least bicubic's": rows["ours"]["psnr"] >= rows["bicubic"]["psnr"]}
    return {"task": "super_resolution x%d" % cfg.super_resolution.factor, "held_out": num, "rows": rows, "targets": ok}


def inpainting(run: Path, repaint_run: Path | None, num: int, steps: int | None, guidance: float | None,
               repaint_steps: int, grids: Path | None) -> dict:
    cfg, task, unet, _, held, sample = load_run(run, steps, guidance)
    num = min(num, len(held))
    (x, y, known, out), ms = timed(lambda: task.outputs(unet, sample, held, num, cfg), num)
    mask = known["mask_image"]
    rows = {"ours": scores_of(out, x, y, mask)}
    rows["ours"]["ms_per_image"] = ms
    extra = []
    if repaint_run is not None:
        rcfg, _, runet, trained, _, _ = load_run(repaint_run, None)
        if rcfg.data.holdout != cfg.data.holdout or rcfg.data.source != cfg.data.source:
            sys.exit(f"error: {repaint_run} must hold out the same data as {run} (data.holdout="
                     f"{cfg.data.holdout}, data.source={cfg.data.source})")
        scheduler = RePaintScheduler.from_config(trained.config)      # the betas it was trained with
        repainted, rms = timed(lambda: generate(runet, scheduler, len(x), steps=repaint_steps, seed=cfg.sample.seed,
                                                batch_size=512, image=known["image"], mask_image=mask,
                                                eta=1.0), len(x))
        rows["repaint"] = scores_of(repainted, x, y, mask)
        rows["repaint"]["ms_per_image"] = rms
        extra = [repainted]
    if grids:
        shown = task.shown(known, x, out)
        order = [shown[r] for r in task.rows[:-1]] + extra + [shown["truth"]]   # ..., ours, RePaint, truth
        save_grid(big(torch.cat([r[:SHOWN] for r in order])), grids / "inpainting.png", nrow=min(SHOWN, len(x)))
    ok = {"accuracy >= 0.90": rows["ours"]["accuracy"] >= 0.90}
    if "repaint" in rows:
        ok["PSNR in the mask above RePaint's"] = rows["ours"]["psnr_masked"] > rows["repaint"]["psnr_masked"]
        ok["accuracy above RePaint's"] = rows["ours"]["accuracy"] > rows["repaint"]["accuracy"]
    return {"task": f"inpainting ({cfg.inpainting.eval_mask} masks)", "held_out": num, "rows": rows, "targets": ok}


def big(images: torch.Tensor, factor: int = 4) -> "torch.Tensor":
    """Grids of 16x16 digits are unreadable at 1:1: nearest-neighbour upscaling, uint8 (N, H, W, C)."""
    return to_uint8(images.repeat_interleave(factor, -1).repeat_interleave(factor, -2))


def report(result: dict) -> None:
    print(f"\n{result['task']}, the first {result['held_out']} held-out digits")
    keys = [k for k in ("psnr", "psnr_masked", "ssim", "lpips", "accuracy", "ms_per_image")
            if any(k in row for row in result["rows"].values())]
    print(f"  {'':10s}" + "".join(f"{k:>14s}" for k in keys))
    for name, row in result["rows"].items():
        print(f"  {name:10s}" + "".join(f"{row[k]:14.4f}" if k in row else f"{'-':>14s}" for k in keys))
    for note in {n for row in result["rows"].values() for n in row.get("notes", [])}:
        print(f"  note: {note}")
    for target, passed in result["targets"].items():
        print(f"  target {target}: {'PASS' if passed else 'FAIL'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sr", type=Path, default=Path("runs/digits-sr"), help="a super_resolution run; 'none' to skip")
    p.add_argument("--inpaint", type=Path, default=Path("runs/digits-inpaint"),
                   help="an inpainting run; 'none' to skip")
    p.add_argument("--repaint", type=Path, default=Path("runs/digits-uncond"),
                   help="an unconditional (or class-conditional) epsilon run for RePaint; 'none' to skip")
    p.add_argument("--num", type=int, default=100,
                   help="the first N held-out digits (default 100: about 1.5 minutes on 2 cores; 297: all of them)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps of ours (default: each run's sample.steps)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="ours: guidance on the image condition (default: each run's sample.guidance_scale)")
    p.add_argument("--repaint-steps", type=int, default=50, help="RePaint's steps (jump length 10, 10 resamplings)")
    p.add_argument("--grids", type=Path, default=None, help="write super_resolution.png / inpainting.png here")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    runs = [r for r in (args.sr, args.inpaint) if str(r) != "none"]
    missing = [r for r in runs if not (r / "pipeline").is_dir()]
    if missing:
        sys.exit(f"error: no finished run at {', '.join(map(str, missing))}: train them first (see --help)")
    repaint = None if str(args.repaint) == "none" else args.repaint
    if repaint is not None and not (repaint / "pipeline").is_dir():
        sys.exit(f"error: no finished run at {repaint} for RePaint: train it (see --help) or pass --repaint none")
    torch.set_num_threads(torch.get_num_threads())
    print(f"bench_image_cond: torch {torch.__version__}, {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()[0]:.1f}")
    if args.grids:
        args.grids.mkdir(parents=True, exist_ok=True)
    results = []
    if str(args.sr) != "none":
        results.append(super_resolution(args.sr, args.num, args.steps, args.guidance_scale, args.grids))
    if str(args.inpaint) != "none":
        results.append(inpainting(args.inpaint, repaint, args.num, args.steps, args.guidance_scale,
                                  args.repaint_steps, args.grids))
    for r in results:
        report(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0 if all(all(r["targets"].values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
