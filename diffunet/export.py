"""A pipeline folder that loads without diffunet installed, with a model card: what ``train.py`` writes as
``<output_dir>/pipeline``, and what ``python -m diffunet.export`` makes of a run.

    python -m diffunet.export runs/digits OUT                       # the run's pipeline/ (its final EMA weights)
    python -m diffunet.export runs/digits OUT --checkpoint latest   # or a checkpoint's EMA weights

How the code travels. diffusers (0.42) loads a component whose ``model_index.json`` entry is ``["<module>",
"<Class>"]`` from ``<component>/<module>.py``, and a pipeline whose ``_class_name`` is such a pair from
``<folder>/<module>.py``, when asked with ``trust_remote_code=True``. It copies that file into its module cache
with the files it names in relative imports, but not the files those import in turn. So beside each such entry
the folder gets ``diffunet/model/`` (the network and the pipelines, which import only torch, diffusers, einops
and each other), copied byte for byte into a sub-package ``diffunet_<hash>/``, and a generated entry file that
names every module of it. The copies
are the package's own files (nothing to keep in step by hand); the content hash in the name keeps two folders
with different code apart in one process, where diffusers puts every local folder's modules under one name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from diffusers import DiffusionPipeline
from omegaconf import DictConfig, OmegaConf

from . import __version__
from . import pretrained
from .training import state
from .cli import ArgumentParser
from .config import build_model, run_config
from .errors import CheckpointError, ConfigError
from .model.unet import KINDS
from .objectives import OBJECTIVES, make_noise_scheduler, sampler_name
from .sampling import make_scheduler
from .tasks import task_of

MODEL = Path(__file__).resolve().parent / "model"
MODEL_PACKAGE = "diffunet.model."
CARD, GRID = "README.md", "samples.png"

ENTRY = '''"""{what} of diffunet {version}, for diffusers' custom-code loader (``trust_remote_code=True``); written by
``diffunet.export``. diffusers copies into its module cache only the files named in this file's relative imports,
so every module the class needs is named here: diffunet's own modules, unchanged, in
``{package}/``."""

{imports}
'''


# ------------------------------------------------------------------------------------------ the code

def model_modules() -> list[str]:
    """The modules of ``diffunet/model/``, the code an exported folder carries (it imports only torch, diffusers,
    einops and itself: tests/test_imports.py), sorted."""
    return sorted(path.stem for path in MODEL.glob("*.py") if path.stem != "__init__")


def _write_code(folder: Path, package: str, names: list[str], module: str, class_name: str) -> str:
    """``diffunet/model/`` as ``folder/<package>/``, plus the entry file that names every module of it and imports
    ``class_name`` from ``module``; returns the entry's module name, the first half of the ``model_index.json``
    pair."""
    (folder / package).mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(MODEL / f"{name}.py", folder / package / f"{name}.py")
    imports = [f"from .{package}.{name} import __name__ as _" for name in names if name != module]
    imports.append(f"from .{package}.{module} import {class_name}")
    entry = f"diffunet_{module}"
    (folder / f"{entry}.py").write_text(ENTRY.format(what=class_name, version=__version__, package=package,
                                                     imports="\n".join(imports)))
    return entry


def make_portable(folder: Path, pipeline_class: type) -> list[str]:
    """Put the code of every diffunet class in saved pipeline ``folder`` into it (``diffunet/model/``, whose
    classes they all are) and point ``model_index.json`` at those copies; returns the modules copied. Classes from
    diffusers stay as they are."""
    index_file = Path(folder) / "model_index.json"
    index = json.loads(index_file.read_text())
    places = {key: value for key, value in index.items()       # component folder -> [module, class]
              if isinstance(value, list) and str(value[0]).startswith(MODEL_PACKAGE)}
    if pipeline_class.__module__.startswith(MODEL_PACKAGE):
        places["_class_name"] = [pipeline_class.__module__, pipeline_class.__name__]
    modules = model_modules()
    digest = hashlib.sha256(b"".join(m.encode() + b"\0" + (MODEL / f"{m}.py").read_bytes() for m in modules))
    package = f"diffunet_{digest.hexdigest()[:10]}"         # one name for all: the pipeline sees the unet's classes
    for key, (module, class_name) in places.items():
        where = Path(folder) if key == "_class_name" else Path(folder) / key
        index[key] = [_write_code(where, package, modules, module.removeprefix(MODEL_PACKAGE), class_name), class_name]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return modules


# ------------------------------------------------------------------------------------------ the model card

def last_metrics(run: Path, step: int) -> dict | None:
    """The last evaluation ``eval.jsonl`` logged at or before ``step``, or None."""
    found = None
    if (run / "eval.jsonl").is_file():
        for line in (run / "eval.jsonl").read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue                                    # a line cut short by a crash
            if isinstance(entry, dict) and entry.get("step", step + 1) <= step:
                found = entry
    return found


def intensity_line(cfg) -> str:
    """What a signal or volume model's card says of its inputs' intensities (``data.intensity``)."""
    mode, (lo, hi) = str(cfg.data.intensity), cfg.data.intensity_range
    how = {"percentile": f"each file's {lo:g}th and {hi:g}th percentiles (per channel) to -1 and 1, clipped",
           "fixed": f"the values {lo:g} and {hi:g} to -1 and 1, clipped", "none": "as stored (in [-1, 1])"}[mode]
    return (f"Intensities (`data.intensity={mode}`): {how}; `sample.py` maps its inputs the same way and its "
            f"outputs back to their inputs' units.")


def model_card(cfg: DictConfig, unet, step: int, metrics: dict | None, grid: bool, modules: list[str],
               entry: str) -> str:
    """README.md of a pipeline folder: what the model is, how to load it, its data, steps, metrics and samples,
    and the full config."""
    c, d, t, s = unet.config, cfg.diffusion, cfg.train, cfg.sample
    size, kind = "x".join(map(str, unet.image_size)), KINDS[unet.dims]
    task = task_of(cfg)
    what, usage = task.card(cfg, unet)
    deterministic = not unet.timed
    schedule = "" if deterministic else f", with its training noise schedule ({OBJECTIVES[d.objective].describe(d)})"
    pipeline_class = "DiffunetSegmentationPipeline" if task.segments else "DiffunetPipeline"
    how = (f"`{sampler_name(s.scheduler, make_noise_scheduler(d).config)}` with {s.steps} steps"
           f"{f', guidance {s.guidance_scale:g}' if s.guidance_scale != 1 and not task.segments else ''}")
    params = sum(p.numel() for p in unet.parameters())
    lines = [
        "---", "library_name: diffusers", "tags:", "- diffunet", "- diffusion",
        f"- {'class-conditional' if c.num_classes else 'unconditional'}-image-generation", "---", "",
        f"# diffunet U-Net: `{cfg.data.source}`, {size}",
        "",
        f"{what} on {size} {kind}: diffunet's U-Net ({params / 1e6:.2f}M parameters, EMA weights) trained for "
        f"{step} steps on `{cfg.data.source}`{schedule}.",
        "",
        *([intensity_line(cfg), ""] if unet.dims != 2 else []),
        "## Load it",
        "",
        f"The folder carries its code: the entry files `{entry}.py` and `unet/diffunet_unet.py` and, "
        f"beside them, diffunet {__version__}'s own {', '.join(f'`{m}.py`' for m in modules)}, unchanged. It "
        "needs torch, diffusers and einops, not diffunet; diffusers runs that code when asked with "
        "`trust_remote_code=True`:",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        usage,
        "```",
        "",
        f"With diffunet installed, `{pipeline_class}.from_pretrained(\"path/to/this/folder\")` (from `diffunet`) "
        f"loads it without running any code from the folder, and `python sample.py path/to/this/folder "
        f"{task.sample_arguments}` {'segments' if task.segments else 'samples'} with it"
        f"{'' if deterministic else ' as the run did (' + how + '; --scheduler, --steps change it)'}.",
        "",
        "## Samples",
        "",
        (f"![samples]({GRID})\n\nEMA weights at step {step}{'' if deterministic else ', ' + how}"
         f"{', one class per column' if c.num_classes else ''}." if grid else "No sample grid was saved at this step."),
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        names = [k for k in metrics if k != "step"]
        lines += [f"At step {metrics['step']}, on {t.eval_num_images} EMA samples (`{t.eval_extractor}` features):", "",
                  "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                  "| " + " | ".join(f"{metrics[k]:.4g}" for k in names) + " |"]
    else:
        lines.append("None logged (`train.eval_every` was 0)." if not t.eval_every else "None logged by this step.")
    lines += [
        "",
        "## Training",
        "",
        "| data | steps | batch (per process) | lr | schedule | precision | EMA decay |",
        "|---|---|---|---|---|---|---|",
        f"| `{cfg.data.source}` | {step} | {t.batch_size} x {t.grad_accum} | {t.lr:g} | {t.lr_scheduler}, "
        f"{t.warmup_steps} warm-up | {t.mixed_precision} | {t.ema_decay} |",
        "",
        "The whole config (saved as `config.yaml`, `python train.py --config config.yaml` trains it again):",
        "",
        "```yaml",
        OmegaConf.to_yaml(cfg).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_folder(folder: Path, pipeline: DiffusionPipeline, cfg: DictConfig, run: Path, step: int,
                 grid: Path | None) -> Path:
    """The portable pipeline folder: ``save_pretrained``, the code (``make_portable``), the sample grid and the
    model card. ``folder`` must not exist yet (see ``training.state.replace_folder``). ``pipeline`` holds the
    training scheduler: the U-Net's config records it (``pretrained.record_scheduler``: what the model predicts,
    from which any sampler is made), and ``scheduler/`` becomes the run's sampler (``sample.scheduler``), so that a
    plain ``pipe()`` samples as the run did. The pipeline's class and keywords are recorded in the U-Net's config
    too (``pretrained.record_pipeline``), so that a ``unet/`` copied out alone still says which job it does."""
    if pipeline.scheduler is not None:
        pretrained.record_scheduler(pipeline.unet, pipeline.scheduler)
        pipeline.scheduler = make_scheduler(cfg.sample.scheduler, pipeline.scheduler.config)
    pretrained.record_pipeline(pipeline)
    pipeline.save_pretrained(folder)
    modules = make_portable(folder, type(pipeline))
    if grid is not None:
        shutil.copyfile(grid, Path(folder) / GRID)
    entry = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"][0]   # make_portable's
    card = model_card(cfg, pipeline.unet, step, last_metrics(Path(run), step), grid is not None, modules, entry)
    (Path(folder) / CARD).write_text(card)
    return Path(folder)


# ------------------------------------------------------------------------------------------ a run's folder

def export(run: Path, out: Path, checkpoint: str | None = None, force: bool = False) -> Path:
    """Write the portable folder of run ``run`` to ``out``: from its ``pipeline/`` or, with ``checkpoint``
    ("latest" or a folder), from that checkpoint's EMA weights. Refuses a non-empty ``out`` unless ``force``."""
    run, out = Path(run), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} exists and is not empty; choose another folder or pass --force to replace it")
    cfg = run_config(run)
    if checkpoint is None and (run / "pipeline").is_dir():
        unet, _ = pretrained.load_model_folder(run / "pipeline")
        step = cfg.train.max_steps                          # the pipeline is written when the loop reaches it
    else:
        path = state.find_resume(checkpoint or "latest", run / "checkpoints")
        if path is None:
            raise CheckpointError(f"{run} has neither a pipeline/ folder nor a checkpoint")
        unet = build_model(cfg)
        step = state.load_ema_weights(path, unet)
        unet.eval()
    grids = [run / "samples" / f"step_{step:06d}.png"] + ([run / "samples" / "final.png"]
                                                          if step == cfg.train.max_steps else [])
    grid = next((g for g in grids if g.is_file()), None)
    pipeline = task_of(cfg).pipeline(unet, make_noise_scheduler(cfg.diffusion), cfg)
    return state.replace_folder(out, lambda tmp: write_folder(tmp, pipeline, cfg, run, step, grid))


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m diffunet.export",
                       description="Write a run's model as a pipeline folder that loads without diffunet "
                                   "(trust_remote_code=True), with a model card.")
    p.add_argument("run", help="the run's output_dir (holds config.yaml, pipeline/, checkpoints/)")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--checkpoint", help="'latest' or a checkpoint folder (default: the run's pipeline/)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        path = export(args.run, args.out, args.checkpoint, args.force)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pipeline written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
