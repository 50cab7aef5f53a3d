"""Which EMA length is best: FID of a generation run's post-hoc EMA at each length, beside its ordinary EMA
(``train.ema_decay``), as ``<run>/phema_sweep.json`` and ``<run>/phema_sweep.png``. The command line is
``python -m diffunet.posthoc_ema RUN --sweep`` (``diffunet.posthoc_ema.main``).

Every length is scored on the same terms: ``num_images`` samples (every class equally often, for a
class-conditional model) from the same seeds, with the run's sampler unless told otherwise, against the run's
evaluation reference with ``train.eval_extractor``. ``draws`` > 1 scores that many independent sets (sampling seeds
``sample.seed``, ``sample.seed + 1``, ...) and keeps the mean: one set of 512 digits moves FID by up to +-30 %
(docs/recipes/default.md), more than the gaps between neighbouring lengths.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from . import checkpoint as ckpt
from .config import build_model
from .data import to_uint8
from .metrics import ExtractorUnavailable, evaluate
from .objectives import make_noise_scheduler
from .posthoc_ema import PosthocEMAError, check_sigma_rel, model_with, reconstruct, run_config, snapshots
from .sampling import generate, make_scheduler
from .tasks import eval_reference

SWEEP_TASKS = ("generate",)                 # FID scores samples from noise; an image-conditioned task has its own


def default_ema(run: Path, cfg, step: int):
    """(the run's ordinary EMA model at ``step``, where it came from), or None where the run kept none there:
    its ``pipeline/`` at ``max_steps``, else the checkpoint of that step."""
    if step == cfg.train.max_steps and (run / "pipeline").is_dir():
        return ckpt.load_model_folder(run / "pipeline")[0], "pipeline"
    folder = ckpt.step_dir(run / "checkpoints", step)
    if folder.is_dir():
        unet = build_model(cfg)
        ckpt.load_ema_weights(folder, unet)
        return unet.eval(), folder.name
    return None


def sweep(run, sigma_rels: Sequence[float], step: int | None = None, num_images: int = 512,
          steps: int | None = None, scheduler: str | None = None, device=None, draws: int = 1) -> dict:
    """Score each length in ``sigma_rels`` and the run's own EMA by FID, the mean over ``draws`` sets; writes and
    returns the table (rows ``{"sigma_rel", "fid", "fids"}``, ``fids`` one per set, the ordinary EMA's row with
    ``sigma_rel`` None), the best length, and the settings."""
    run = Path(run)
    cfg, _ = run_config(run)
    if cfg.task not in SWEEP_TASKS:
        raise PosthocEMAError(f"the sweep scores generation by FID (task {', '.join(SWEEP_TASKS)}); this run is "
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
