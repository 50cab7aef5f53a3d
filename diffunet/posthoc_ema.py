"""Post-hoc EMA of a finished run, from the command line: a pipeline folder per EMA length, or which length is
best (``training.power_ema`` holds the maths and the snapshots training writes).

    python -m diffunet.posthoc_ema runs/digits --sigma-rel 0.05 0.08 0.12      # runs/digits/phema/sigma_rel_0.080/ ...
    python -m diffunet.posthoc_ema runs/digits --sweep --draws 4   # FID of each length: phema_sweep.json/.png

The sweep scores a generation run's post-hoc EMA at each length beside its ordinary EMA (``train.ema_decay``), as
``<run>/phema_sweep.json`` and ``<run>/phema_sweep.png``. Every length is scored on the same terms: ``num_images``
samples (every class equally often, for a class-conditional model) from the same seeds, with the run's sampler
unless told otherwise, against the run's evaluation reference with ``train.eval_extractor``. ``draws`` > 1 scores
that many independent sets (sampling seeds ``sample.seed``, ``sample.seed + 1``, ...) and keeps the mean: one set
of 512 digits moves FID by up to +-30 % (docs/recipes/default.md), more than the gaps between neighbouring lengths.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from . import config, pretrained
from .cli import ArgumentParser
from .config import build_model
from .data import to_uint8
from .errors import CheckpointError, ConfigError, PosthocEMAError
from .export import CARD, write_folder
from .metrics import ExtractorUnavailable, evaluate
from .objectives import make_noise_scheduler
from .sampling import generate, make_scheduler
from .tasks import TASKS, eval_reference, task_of
from .training import state
from .training.power_ema import MAX_SIGMA_REL, SWEEP_SIGMA_RELS, check_sigma_rel, reconstruct, snapshots
from .training.state import replace_folder

# ------------------------------------------------------------------------------------------ a run's lengths

def config_and_task(run_dir: Path):
    """(config, task) of a run folder: its config.yaml."""
    cfg = config.run_config(Path(run_dir))
    return cfg, task_of(cfg)


def model_with(cfg, weights: dict[str, torch.Tensor]):
    """The run's UNet (``config.build_model``) with ``weights`` as its parameters, in eval mode; its buffers are
    the ones it is built with (a UNet has only non-persistent, fixed ones)."""
    unet = build_model(cfg)
    unet.load_state_dict(weights)
    return unet.eval()


def length_folder(out: Path, sigma_rel: float) -> Path:
    return Path(out) / f"sigma_rel_{sigma_rel:.3f}"


def write_pipelines(run_dir: Path, sigma_rels: Sequence[float], step: int | None = None,
                    out: Path | None = None) -> list[Path]:
    """One pipeline folder per length, ``<out>/sigma_rel_<s>/`` (default ``out``: ``<run>/phema``), as
    ``diffunet.export`` writes them: the run's task's pipeline of the reconstructed weights and the training noise
    scheduler, with its code and model card, each replaced atomically. ``sample.py FOLDER`` samples from one."""
    run_dir = Path(run_dir)
    cfg, task = config_and_task(run_dir)
    sigma_rels = [check_sigma_rel(s) for s in sigma_rels]
    step = snapshots(run_dir)[-1][0] if step is None else step
    used = sum(s <= step for s, _ in snapshots(run_dir))
    written = []
    for sigma_rel in sigma_rels:
        pipeline = task.pipeline(model_with(cfg, reconstruct(run_dir, sigma_rel, step)),
                                 make_noise_scheduler(cfg.diffusion), cfg)

        def write(tmp: Path) -> None:
            write_folder(tmp, pipeline, cfg, run_dir, step, None)
            with open(tmp / CARD, "a") as card:                # the card's "EMA weights" are these
                card.write(f"\n## Post-hoc EMA\n\nThe weights are a post-hoc EMA of length sigma_rel {sigma_rel:g} at "
                           f"step {step}, reconstructed from {used} snapshots of the profiles "
                           f"{', '.join(f'{s:g}' for s in cfg.train.phema_sigma_rels)} (`diffunet.posthoc_ema`); the "
                           f"training config's `ema_decay` is not theirs.\n")
        final = length_folder(out if out is not None else run_dir / "phema", sigma_rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        written.append(replace_folder(final, write))
    return written


# ------------------------------------------------------------------------------------------ the sweep

def default_ema(run: Path, cfg, step: int):
    """(the run's ordinary EMA model at ``step``, where it came from), or None where the run kept none there:
    its ``pipeline/`` at ``max_steps``, else the checkpoint of that step."""
    if step == cfg.train.max_steps and (run / "pipeline").is_dir():
        return pretrained.load_model_folder(run / "pipeline")[0], "pipeline"
    folder = state.step_dir(run / "checkpoints", step)
    if folder.is_dir():
        unet = build_model(cfg)
        state.load_ema_weights(folder, unet)
        return unet.eval(), folder.name
    return None


def sweep(run, sigma_rels: Sequence[float], step: int | None = None, num_images: int = 512,
          steps: int | None = None, scheduler: str | None = None, device=None, draws: int = 1) -> dict:
    """Score each length in ``sigma_rels`` and the run's own EMA by FID, the mean over ``draws`` sets; writes and
    returns the table (rows ``{"sigma_rel", "fid", "fids"}``, ``fids`` one per set, the ordinary EMA's row with
    ``sigma_rel`` None), the best length, and the settings."""
    run = Path(run)
    cfg, task = config_and_task(run)
    if not task.scored_by_fid:                  # FID scores samples from noise; an image-conditioned task has its own
        scored = ", ".join(name for name, entry in TASKS.items() if entry.scored_by_fid)
        raise PosthocEMAError(f"the sweep scores generation by FID (task {scored}); this run is "
                              f"task={cfg.task}: write its lengths' pipelines with --sigma-rel and score them there")
    if num_images < 2:
        raise PosthocEMAError(f"--num-images must be at least 2 for an FID (got {num_images})")
    if draws < 1:
        raise PosthocEMAError(f"--draws must be at least 1 (got {draws})")
    reference = eval_reference(cfg)
    if reference is None:
        raise PosthocEMAError(f"the run has no evaluation reference: set train.eval_reference in "
                              f"{run / 'config.yaml'} (data.source={cfg.data.source} is not a folder)")
    sigma_rels = [check_sigma_rel(s) for s in sigma_rels]
    step = snapshots(run)[-1][0] if step is None else step
    steps, scheduler = steps or cfg.sample.steps, scheduler or cfg.sample.scheduler
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        sampler = make_scheduler(scheduler, make_noise_scheduler(cfg.diffusion).config)
    except ValueError as e:
        raise PosthocEMAError(str(e)) from None

    def fid(unet, seed: int) -> float:
        images = generate(unet.to(device), sampler, num_images, steps=steps, seed=seed,
                          class_labels="all" if unet.config.num_classes else None,
                          guidance_scale=cfg.sample.guidance_scale, device=device)
        try:
            return float(evaluate(to_uint8(images), reference, cfg.train.eval_extractor, device=device,
                                  seed=cfg.sample.seed)["fid"])
        except ExtractorUnavailable as e:
            raise PosthocEMAError(f"train.eval_extractor: {e}") from None

    def score(unet, **row) -> dict:
        fids = [fid(unet, cfg.sample.seed + k) for k in range(draws)]
        return dict(row, fid=sum(fids) / draws, fids=fids)

    rows = [score(model_with(cfg, reconstruct(run, s, step)), sigma_rel=s) for s in sigma_rels]
    ordinary = default_ema(run, cfg, step)
    if ordinary is not None:
        rows.append(score(ordinary[0], sigma_rel=None, ema_decay=cfg.train.ema_decay, **{"from": ordinary[1]}))
    scored = [r for r in rows if r["sigma_rel"] is not None and math.isfinite(r["fid"])]
    best = min(scored, key=lambda r: r["fid"]) if scored else None
    table = {"run": str(run), "step": step, "num_images": num_images, "draws": draws, "scheduler": scheduler,
             "steps": steps, "extractor": str(cfg.train.eval_extractor), "reference": str(reference), "rows": rows,
             "best_sigma_rel": best["sigma_rel"] if best else None}
    (run / "phema_sweep.json").write_text(json.dumps(table, indent=1) + "\n")
    table["plot"] = str(plot(table, run / "phema_sweep.png"))
    return table


def plot(table: dict, path: Path) -> Path:
    """FID against sigma_rel (log axis), the ordinary EMA as a dashed line, the best length marked."""
    import matplotlib                       # the report / dev extras
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r for r in table["rows"] if r["sigma_rel"] is not None]
    sets = table.get("draws", 1) > 1                # the sets' min..max: how much of a gap is the sample set's
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r["sigma_rel"] for r in lengths], [r["fid"] for r in lengths], "o-", label="post-hoc EMA")
    if sets:
        ax.fill_between([r["sigma_rel"] for r in lengths], [min(r["fids"]) for r in lengths],
                        [max(r["fids"]) for r in lengths], alpha=0.15, label="min..max over the sets")
    for r in table["rows"]:
        if r["sigma_rel"] is None:
            ax.axhline(r["fid"], ls="--", color="gray", label=f"EMA decay {r['ema_decay']}")
            if sets:
                ax.axhspan(min(r["fids"]), max(r["fids"]), color="gray", alpha=0.08)
    best = next((r for r in lengths if r["sigma_rel"] == table["best_sigma_rel"]), None)
    if best is not None:
        ax.plot(best["sigma_rel"], best["fid"], "*", ms=14, color="C3",
                label=f"best: sigma_rel {best['sigma_rel']:g}")
    ax.set_xscale("log")
    ax.set_xticks([r["sigma_rel"] for r in lengths], [f"{r['sigma_rel']:g}" for r in lengths])   # the swept ones
    ax.minorticks_off()
    ax.set_xlabel("sigma_rel (EMA length)")
    ax.set_ylabel("FID")
    mean = f" (mean of {table['draws']} sets)" if sets else ""
    ax.set_title(f"step {table['step']}, {table['num_images']} images{mean}, {table['scheduler']} x {table['steps']}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def print_table(table: dict) -> None:
    sets = f"  (mean of {table['draws']} sets: min..max)" if table["draws"] > 1 else ""
    print(f"{'sigma_rel':>12}  {'FID':>9}{sets}")
    for r in table["rows"]:
        name = f"{r['sigma_rel']:.3f}" if r["sigma_rel"] is not None else f"EMA {r['ema_decay']}"
        spread = f"  ({min(r['fids']):.3f}..{max(r['fids']):.3f})" if table["draws"] > 1 else ""
        print(f"{name:>12}  {r['fid']:9.3f}{spread}")
    if table["best_sigma_rel"] is not None:
        print(f"best: sigma_rel {table['best_sigma_rel']:g}")
    print(f"written: {Path(table['run']) / 'phema_sweep.json'}, {table['plot']}")


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m diffunet.posthoc_ema",
                       description="Post-hoc EMA of a run: a pipeline folder per EMA length, or an FID sweep.")
    p.add_argument("run", help="the run's output_dir (holds config.yaml and phema_snapshots/)")
    p.add_argument("--sigma-rel", "--sigma-rels", dest="sigma_rels", type=float, nargs="+", metavar="S",
                   help=f"EMA lengths, each in (0, {MAX_SIGMA_REL:.4f}] (--sweep default: {' '.join(map(str, SWEEP_SIGMA_RELS))})")
    p.add_argument("--step", type=int, help="a snapshot's step (default: the last)")
    p.add_argument("--out", help="folder of the pipeline folders sigma_rel_<S>/ (default RUN/phema)")
    sweep_options = p.add_argument_group("sweep (--sweep): FID of every length and of the run's own EMA")
    sweep_options.add_argument("--sweep", action="store_true", help="write RUN/phema_sweep.json and .png")
    sweep_options.add_argument("--num-images", type=int, default=512)
    sweep_options.add_argument("--draws", type=int, default=1, help="FID as the mean over this many sets of "
                               "--num-images (sampling seeds sample.seed, +1, ...); one set of 512 moves by +-30 %%")
    sweep_options.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    sweep_options.add_argument("--scheduler", help="sampling scheduler (default: the run's sample.scheduler)")
    sweep_options.add_argument("--device", help="default: cuda if there is one")
    args = p.parse_args(argv)
    try:
        if args.sweep:
            print_table(sweep(args.run, args.sigma_rels or SWEEP_SIGMA_RELS, step=args.step,
                              num_images=args.num_images, steps=args.steps, scheduler=args.scheduler,
                              device=args.device, draws=args.draws))
            return 0
        if not args.sigma_rels:
            p.error("give --sigma-rel S [S ...] (or --sweep)")
        for path in write_pipelines(args.run, args.sigma_rels, args.step, args.out):
            print(f"pipeline written to {path}")
    except (PosthocEMAError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
