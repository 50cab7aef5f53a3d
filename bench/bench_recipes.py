"""The recipe table (issue #15): which objective x schedule x loss weighting reaches the digits' quality floor
soonest, and at how few sampling steps; with the peer, lucidrains' denoising-diffusion-pytorch, in the same run.

    python bench/bench_recipes.py                        # smoke-sized: 2 recipes, 300 steps, 1 seed (~2-3 min)
    python bench/bench_recipes.py --full                 # every recipe, 500/1000/1500 steps, 3 seeds, 512 samples
    python bench/bench_recipes.py --recipes flow edm --checkpoints 500 1000 --seeds 0 1 --num-images 512
    python bench/bench_recipes.py --peer --recipes uncond-flow --checkpoints 500 1000 1500   # against lucidrains

Each recipe is a list of config overrides on the default preset (configs/digits.yaml) after ``TABLE``, the
training settings the committed table (docs/recipes) was measured with, so that it stays reproducible when the
preset changes; ``--set`` overrides both (``--set train.lr=2e-3 train.lr_scheduler=cosine train.ema_decay=0.99``
is today's default run). Each is trained in this process by ``diffunet.training.loop.train``; the EMA weights
of each checkpoint are sampled with the objective's default sampler (``sample.scheduler=auto``: DPM-Solver++(2M) on
its noise levels, one network evaluation per step) at
each ``--sampling-steps``, ``--num-images`` images per class-balanced set, and scored by FID with the project's
own extractor (the offline digits classifier, ``diffunet.metrics``). The floor printed beside them is the FID of
``--num-images`` real digits against the full set: what a perfect model scores at that sample size.

Training time per checkpoint is the run's step rate times its steps (the run's start-up, its final grid and its
pipeline are excluded); sampling time is per ``--num-images`` images. Times move with the machine's load (printed
with them): compare them within one run. ``--out DIR`` writes recipes.json, recipes.md and recipes.png there.
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

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffunet.training import state as ckpt                                            # noqa: E402
from diffunet.config import build_model, load_config                               # noqa: E402
from diffunet.data import digits_arrays, to_uint8                                  # noqa: E402
from diffunet.metrics import evaluate                                              # noqa: E402
from diffunet.objectives import make_noise_scheduler, sampler_name                 # noqa: E402
from diffunet.sampling import generate, make_scheduler                             # noqa: E402
from diffunet.training.loop import train  # noqa: E402

UNCOND = ["model.num_classes=null", "train.label_dropout=0"]
EPS, V = "diffusion.prediction_type=epsilon", "diffusion.prediction_type=v_prediction"
DDPM, FLOW, EDM = (f"diffusion.objective={o}" for o in ("ddpm", "flow", "edm"))
COSINE, SIGMOID = "diffusion.beta_schedule=cosine", "diffusion.beta_schedule=sigmoid"
# the table's training settings (the digits preset's before docs/recipes/default.md): a constant lr, so that the
# 500- and 1,000-step checkpoints of a 1,500-step run are what 500- and 1,000-step runs would be
TABLE = ["train.lr=1e-3", "train.lr_scheduler=constant_with_warmup", "train.ema_decay=0.995"]
RECIPES = {                         # name -> overrides of configs/digits.yaml + TABLE (each names its objective)
    "eps-cosine": [DDPM, EPS, COSINE],                                     # the default until #15
    "eps-cosine-minsnr": [DDPM, EPS, COSINE, "diffusion.loss_weighting=min_snr"],
    "v-sigmoid": [DDPM, V, SIGMOID],                                       # lucidrains' defaults
    "flow": [FLOW, "diffusion.time_sampling=logit_normal"],                # the default since #15
    "flow-uniform": [FLOW, "diffusion.time_sampling=uniform"],
    "edm": [EDM],
    # unconditional twins, for the peer (lucidrains' GaussianDiffusion has no class labels)
    "uncond-eps-cosine": [DDPM, EPS, COSINE, *UNCOND],
    "uncond-flow": [FLOW, "diffusion.time_sampling=logit_normal", *UNCOND],
    "uncond-v-sigmoid": [DDPM, V, SIGMOID, *UNCOND],
}
SMOKE = dict(recipes=["eps-cosine", "flow"], checkpoints=[300], seeds=[0], num_images=256, sampling_steps=[10, 20])
FULL = dict(recipes=[r for r in RECIPES if not r.startswith("uncond")], checkpoints=[500, 1000, 1500],
            seeds=[0, 1, 2], num_images=512, sampling_steps=[10, 20, 50])


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def floor(num_images: int, draws: int = 1) -> float:
    """FID of ``num_images`` real digits against all 1,797: the mean over ``draws`` fixed random draws."""
    images = digits_arrays(16)[0]
    picks = (np.random.default_rng(d).choice(len(images), num_images, replace=False) for d in range(draws))
    return statistics.mean(evaluate(images[pick], "digits", "digits")["fid"] for pick in picks)


def fid_of(unet, config, sampler: str, steps: int, num_images: int, classes, draws: int = 1) -> tuple[float, float]:
    """(FID, seconds) of ``num_images`` EMA samples with ``sampler`` at ``steps``: the mean FID over ``draws``
    independent sets (sampling seeds 1..draws), the seconds one set takes."""
    fids, seconds = [], 0.0
    for seed in range(1, draws + 1):
        start = time.perf_counter()
        images = generate(unet, make_scheduler(sampler, config), num_images, steps=steps, seed=seed,
                          class_labels=classes, batch_size=num_images)
        seconds += time.perf_counter() - start
        fids.append(evaluate(to_uint8(images), "digits", "digits")["fid"])
    return statistics.mean(fids), seconds / draws


def run_recipe(name: str, seed: int, args, work: Path) -> list[dict]:
    """Train recipe ``name`` with ``seed`` to the last checkpoint; one row per (checkpoint, sampling steps)."""
    out = work / f"{name}-{seed}"
    last = max(args.checkpoints)
    cfg = load_config("digits", [*TABLE, *RECIPES[name], f"output_dir={out}", f"train.seed={seed}",
                                 f"train.max_steps={last}", f"train.checkpoint_every={min(args.checkpoints)}",
                                 f"train.sample_every={last + 1}", "train.keep_checkpoints=100",
                                 "sample.num_images=10", "sample.steps=10", *args.set])
    if args.rescore:
        trained_as(out, cfg)
        wall = None
    else:
        start = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - start
    rate = _steps_per_second(out) or (last / wall if wall else float("nan"))
    config = make_noise_scheduler(cfg.diffusion).config
    sampler = sampler_name(args.sampler, config)
    classes = "all" if cfg.model.num_classes else None
    rows = []
    for step in args.checkpoints:
        unet = build_model(cfg)
        ckpt.load_ema_weights(ckpt.step_dir(out / "checkpoints", step), unet)
        unet.eval()
        for steps in args.sampling_steps:
            fid, seconds = fid_of(unet, config, sampler, steps, args.num_images, classes, args.draws)
            rows.append(dict(recipe=name, seed=seed, step=step, sampler=sampler, sampling_steps=steps, fid=fid,
                             train_s=step / rate, sample_s=seconds, run_wall_s=wall, set=args.set))
            print(f"  {name} seed {seed} step {step} {sampler}-{steps}: FID {fid:.3f} "
                  f"(train {step / rate:.0f} s, sample {seconds:.1f} s, {load()})", flush=True)
    return rows


def trained_as(out: Path, cfg) -> None:
    """--rescore: the run in ``out`` must be this recipe's, trained to the last checkpoint; else one clear line."""
    last = ckpt.step_dir(out / "checkpoints", cfg.train.max_steps)
    if not last.is_dir():
        raise SystemExit(f"--rescore: {last} is missing; train this recipe and seed into --work first "
                         f"(the same call without --rescore)")
    saved = load_config(out / "config.yaml")
    for key in ("model", "diffusion", "train"):
        a, b = (OmegaConf.to_container(c[key]) for c in (saved, cfg))
        a.pop("mixed_precision", None), b.pop("mixed_precision", None)         # saved resolved, "auto" asked
        if a != b:
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise SystemExit(f"--rescore: {out} was trained with other {key}.{diff[0]} ({a.get(diff[0])!r}, "
                             f"asked {b.get(diff[0])!r}); pass the --set it was trained with")


def _steps_per_second(run: Path) -> float | None:
    """Training steps per second of a finished run, from its tensorboard img_per_s (the loop alone)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents*")).parent))
        events.Reload()
        rates = [e.value for e in events.Scalars("img_per_s")][1:]          # the first includes the warm-up
        batch = load_config(run / "config.yaml").train.batch_size
        return statistics.median(rates) / batch if rates else None
    except (StopIteration, KeyError, ImportError):
        return None


# ---------------------------------------------------------------------------------------------- the peer

def peer_rows(args, work: Path) -> list[dict]:
    """lucidrains' GaussianDiffusion + Unet with their defaults (v-prediction, sigmoid schedule, their Trainer's
    Adam lr 1e-4 betas (0.9, 0.99), EMA 0.995 every 10 steps, grad-norm clip 1), at our width (dim 32, mults
    (1, 2, 2)), on the same digits (same upsampling), batch 64, DDIM at each --sampling-steps."""
    ddp = import_peer()
    from ema_pytorch import EMA

    images = torch.from_numpy(digits_arrays(16)[0]).permute(0, 3, 1, 2).float() / 255     # [0, 1]: they normalize
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        unet = ddp.Unet(dim=32, dim_mults=(1, 2, 2), channels=1)
        diffusion = ddp.GaussianDiffusion(unet, image_size=16, timesteps=1000)
        opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
        ema = EMA(diffusion, beta=0.995, update_every=10)
        print(f"  peer: {sum(p.numel() for p in unet.parameters()):,} parameters", flush=True)
        g = torch.Generator().manual_seed(seed)
        start, step = time.perf_counter(), 0
        for stop in sorted(args.checkpoints):
            while step < stop:
                batch = images[torch.randint(len(images), (64,), generator=g)]
                loss = diffusion(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                ema.update()
                step += 1
            train_s = time.perf_counter() - start
            for steps in args.sampling_steps:
                model = ema.ema_model
                model.sampling_timesteps, model.is_ddim_sampling = steps, True
                t0 = time.perf_counter()
                with torch.no_grad():
                    fake = torch.cat([model.sample(batch_size=b) for b in _chunks(args.num_images, 512)])
                seconds = time.perf_counter() - t0
                fake = (fake.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                fid = evaluate(fake, "digits", "digits")["fid"]
                rows.append(dict(recipe="peer:lucidrains", seed=seed, step=stop, sampler="ddim",
                                 sampling_steps=steps, fid=fid, train_s=train_s, sample_s=seconds, set=[]))
                print(f"  peer seed {seed} step {stop} ddim-{steps}: FID {fid:.3f} (train {train_s:.0f} s, "
                      f"sample {seconds:.1f} s, {load()})", flush=True)
            start = time.perf_counter() - train_s                          # sampling is not training time
    return rows


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def import_peer():
    """denoising_diffusion_pytorch, installed without its dependencies (bench/README.md). It imports torchvision
    at module level for its image-folder Trainer only, which this bench does not use; torchvision's wheel would
    pull a CUDA torch, so an empty stand-in module takes its place for the import."""
    import types
    stand_in = {}
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            tv = types.ModuleType("torchvision")
            tv.transforms, tv.utils = types.ModuleType("torchvision.transforms"), types.ModuleType("torchvision.utils")
            stand_in = {"torchvision": tv, "torchvision.transforms": tv.transforms, "torchvision.utils": tv.utils}
            sys.modules.update(stand_in)
    try:
        import denoising_diffusion_pytorch
    except ImportError as e:
        raise SystemExit(f"--peer needs denoising-diffusion-pytorch: pip install --no-deps "
                         f"denoising-diffusion-pytorch ema-pytorch ({e})") from None
    finally:    # gone once imported: a later find_spec("torchvision") (HF datasets does one) must see none
        for name in stand_in:
            sys.modules.pop(name, None)
    return denoising_diffusion_pytorch


# ---------------------------------------------------------------------------------------------- report

def earlier_rows(path: Path, fid_floor: float, overrides: list[str]) -> list[dict]:
    """The rows of an earlier run's recipes.json, checked (before any training) to share this run's floor and
    ``--set`` (a row without one was run with none)."""
    before = json.loads(path.read_text())
    if abs(before["floor"] - fid_floor) > 1e-3 * fid_floor:           # features sum in thread-dependent order
        raise SystemExit(f"--merge {path}: its floor {before['floor']:.3f} is not this run's {fid_floor:.3f}; "
                         f"run with the --num-images it was run with")
    other = next((r.get("set", []) for r in before["rows"] if r.get("set", []) != overrides), None)
    if other is not None:
        raise SystemExit(f"--merge {path}: its rows were trained with --set {' '.join(other) or '(none)'}, this run "
                         f"with {' '.join(overrides) or '(none)'}; run with the --set they were run with")
    return before["rows"]


def summarize(rows: list[dict], fid_floor: float) -> list[dict]:
    """Mean and spread (min..max over seeds) of FID per (recipe, step, sampling steps), and the fastest seed's
    training and sampling seconds: a merged table's seeds may come from machines 3x apart in speed, and the
    shortest time is the one least slowed by load (timeit's convention)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["step"], r["sampling_steps"]), []).append(r)
    table = []
    for (recipe, step, steps), rs in groups.items():
        fids = [r["fid"] for r in rs]
        table.append(dict(recipe=recipe, step=step, sampler=rs[0]["sampler"], sampling_steps=steps,
                          fid=statistics.mean(fids), fid_min=min(fids), fid_max=max(fids), seeds=len(rs),
                          vs_floor=statistics.mean(fids) / fid_floor,
                          train_s=min(r["train_s"] for r in rs), sample_s=min(r["sample_s"] for r in rs)))
    return table


def markdown(table: list[dict], fid_floor: float, num_images: int, draws: int = 1) -> str:
    sets = f", the mean of {draws} sets" if draws > 1 else ""
    lines = [f"FID of {num_images} samples (digits extractor{sets}); floor (real images{sets}) {fid_floor:.3f}. "
             f"Seconds: the fastest seed's.", "",
             "| recipe | train steps | sampler | sampling steps | seeds | FID mean (min..max) | / floor | train s "
             "| sample s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(table, key=lambda r: (r["recipe"], r["step"], r["sampling_steps"])):
        lines.append(f"| {r['recipe']} | {r['step']} | {r['sampler']} | {r['sampling_steps']} | {r['seeds']} "
                     f"| {r['fid']:.3f} ({r['fid_min']:.3f}..{r['fid_max']:.3f}) | {r['vs_floor']:.2f} "
                     f"| {r['train_s']:.0f} | {r['sample_s']:.1f} |")
    return "\n".join(lines) + "\n"


def spread(ax, rows: list[dict], x: str, color) -> None:
    """The seeds' min..max: a band along a line, an error bar where a line has one point."""
    xs, lo, hi = [r[x] for r in rows], [r["fid_min"] for r in rows], [r["fid_max"] for r in rows]
    if len(rows) > 1:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
    else:
        ax.errorbar(xs, [r["fid"] for r in rows], yerr=[[r["fid"] - a for r, a in zip(rows, lo)],
                    [b - r["fid"] for r, b in zip(rows, hi)]], color=color, capsize=4, lw=1.5)


def plot(table: list[dict], fid_floor: float, path: Path) -> None:
    """FID against training steps (the most sampling steps) and against sampling steps (the last checkpoint).
    Steps, not seconds: every recipe runs the same network, so a step costs the same in each, while a merged
    table's seeds may come from machines 3x apart (the table gives the seconds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    most, last = max(r["sampling_steps"] for r in table), max(r["step"] for r in table)
    for recipe in sorted({r["recipe"] for r in table}):
        rs = sorted((r for r in table if r["recipe"] == recipe and r["sampling_steps"] == most),
                    key=lambda r: r["step"])
        line, = left.plot([r["step"] for r in rs], [r["fid"] for r in rs], "o-", label=recipe)
        spread(left, rs, "step", line.get_color())
        rs = sorted((r for r in table if r["recipe"] == recipe and r["step"] == last), key=lambda r: r["sampling_steps"])
        right.plot([r["sampling_steps"] for r in rs], [r["fid"] for r in rs], "o-", color=line.get_color())
        spread(right, rs, "sampling_steps", line.get_color())
    fids = [r[k] for r in table for k in ("fid_min", "fid_max")] + [fid_floor]
    for ax in (left, right):
        ax.axhline(fid_floor, color="k", ls="--", lw=1, label="floor (real images)")
        ax.set_yscale("log")
        if max(fids) < 10 * min(fids):      # under a decade: plain numbers, not 2.4x10^-1
            lo, hi = min(fids), max(fids)
            ticks = [v for v in matplotlib.ticker.MaxNLocator(8).tick_values(lo, hi) if lo <= v <= hi]
            ax.set_yticks(ticks, [f"{v:.2f}" for v in ticks])
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("FID (digits extractor)")
        ax.grid(alpha=0.3)
    left.set_xlabel(f"training steps of 64 images ({most} sampling steps)")
    left.set_xticks(sorted({r["step"] for r in table}))
    right.set_xlabel(f"sampling steps (network evaluations), at {last} training steps")
    right.set_xscale("log")
    steps = sorted({r["sampling_steps"] for r in table})
    right.set_xticks(steps, [str(n) for n in steps])
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", action="store_true", help="every recipe, 500/1000/1500 steps, 3 seeds, 512 samples")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES))
    p.add_argument("--checkpoints", nargs="+", type=int, help="training steps scored (the last is trained to)")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--num-images", type=int)
    p.add_argument("--sampling-steps", nargs="+", type=int)
    p.add_argument("--sampler", default="auto", help="sample.scheduler for every recipe (default: its objective's)")
    p.add_argument("--peer", action="store_true", help="also lucidrains' denoising-diffusion-pytorch")
    p.add_argument("--no-recipes", action="store_true", help="with --peer: the peer only")
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every recipe, e.g. train.lr=2e-3")
    p.add_argument("--merge", type=Path, help="an earlier run's recipes.json: its rows join this run's (a recipe "
                   "and seed run here again replace them); same --num-images")
    p.add_argument("--out", type=Path, help="write recipes.json, recipes.md and recipes.png here")
    p.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--draws", type=int, default=1, help="FID (and the floor) as the mean over this many sets of "
                   "--num-images; one set's FID moves by +-30 %% at 512 (docs/recipes)")
    p.add_argument("--rescore", action="store_true", help="score the runs already trained in --work (same "
                   "recipes, seeds and --set), do not train")
    args = p.parse_args(argv)
    for key, value in (FULL if args.full else SMOKE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.checkpoints = sorted(args.checkpoints)
    if args.rescore and not args.work:
        p.error("--rescore scores the runs in --work; pass --work DIR")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}")
    fid_floor = floor(args.num_images, args.draws)
    print(f"floor: FID of {args.num_images} real digits against all 1,797 (mean of {args.draws} draws): "
          f"{fid_floor:.3f}", flush=True)
    earlier = earlier_rows(args.merge, fid_floor, args.set) if args.merge else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in ([] if args.no_recipes else args.recipes):
            for seed in args.seeds:
                rows += run_recipe(name, seed, args, work)
        if args.peer:
            rows += peer_rows(args, work)
    here = {(r["recipe"], r["seed"]) for r in rows}                   # a recipe and seed run again replace
    rows = [r for r in earlier if (r["recipe"], r["seed"]) not in here] + rows
    table = summarize(rows, fid_floor)
    text = markdown(table, fid_floor, args.num_images, args.draws)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "recipes.json").write_text(json.dumps(dict(floor=fid_floor, rows=rows, table=table), indent=1))
        (args.out / "recipes.md").write_text(text)
        plot(table, fid_floor, args.out / "recipes.png")
        print(f"wrote {args.out}/recipes.json, recipes.md, recipes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
