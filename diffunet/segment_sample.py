"""``sample.py MODEL --cond DIR --out DIR [--tile T] [--num-per-cond N]`` for a segmentation pipeline: one mask
PNG per image file, of the same relative path and stem (binary masks 0/255, multi-class masks as class ids),
and for a diffusion model's ensemble of N > 1 the uncertainty map beside it (``stem_std.png``)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import SampleConfig
from .data import load_image, match_channels, write_image
from .checkpoint import is_deterministic
from .sampling import conditions, image_generator, load_for_processes
from .segment_pipeline import DiffunetSegmentationPipeline, mask_classes


def mask_image(ids: np.ndarray, classes: int) -> np.ndarray:
    """Class ids (H, W) -> the uint8 mask file: 0/255 for a binary mask, the ids themselves for more classes."""
    return (ids * (255 if classes == 2 else 1)).astype(np.uint8)


def std_image(std: np.ndarray) -> np.ndarray:
    """The ensemble's std map (H, W), 0..0.5 -> uint8 2 * std * 255: 0 where every sample agrees, 255 where they
    split evenly (the convention of ``sampling.write_mean_std``)."""
    return np.clip(np.round(std * 2 * 255), 0, 255).astype(np.uint8)


# What a deterministic model has no use for: it has no scheduler, and one forward pass gives its one mask.
DIFFUSION_ONLY = ("scheduler", "steps", "eta", "seed", "prediction_type", "objective")


def segment_to_folder(model: str | Path, cond: str | Path, out: str | Path, *, tile: int | None = None,
                      overlap: int | None = None, num_per_cond: int = 1, scheduler: str | None = None,
                      steps: int | None = None, eta: float | None = None,
                      batch_size: int = SampleConfig.batch_size, seed: int | None = None,
                      dtype: str = SampleConfig.dtype, device: str | None = None, prediction_type: str | None = None,
                      objective: str | None = None, progress: bool = True) -> Path:
    """Masks of every image file under ``cond`` (any depth, any size; converted to the model's channels) by the
    segmentation pipeline ``model``, whole or by tiles of ``tile`` output pixels (``overlap``: "same"-padding
    models' blend width; ``batch_size`` tiles per call). A diffusion model samples ``num_per_cond`` masks per
    image (``steps`` of ``scheduler``, each None: as the run did): the file is their majority, ``stem_std.png``
    their std map. Image "a/x" draws from ``image_generator(seed, (crc32("a/x"),))``: independent of the other
    files and the processes. Existing outputs are skipped (a run resumes); under ``accelerate launch`` the images
    are split between processes. Every file is read once before any compute, so an unreadable one stops the run
    naming it. A deterministic model takes none of ``DIFFUSION_ONLY`` (nor ``num_per_cond`` > 1): one line."""
    given = dict(scheduler=scheduler, steps=steps, eta=eta, seed=seed, prediction_type=prediction_type,
                 objective=objective)
    if is_deterministic(model):
        wrong = [f"--{name.replace('_', '-')}" for name in DIFFUSION_ONLY if given[name] is not None]
        wrong += ["--num-per-cond > 1"] if num_per_cond > 1 else []
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not for a deterministic segmentation model (one forward pass, "
                             f"no scheduler, one mask per image)")
    state, unet, sched, settings = load_for_processes(model, dtype, device, scheduler=scheduler, steps=steps,
                                                      guidance_scale=1.0, prediction_type=prediction_type,
                                                      objective=objective)
    steps = settings["steps"]
    eta, seed = SampleConfig.eta if eta is None else eta, SampleConfig.seed if seed is None else seed
    deterministic = unet.config.time_condition == "none"
    pipe = DiffunetSegmentationPipeline(unet=unet, scheduler=None if deterministic else sched)
    pipe.set_progress_bar_config(disable=True)
    classes = mask_classes(unet)
    channels = unet.config.in_channels if deterministic else unet.config.cond_channels
    out, items = Path(out), conditions(cond)
    names = {key: [key + ".png"] + ([key + "_std.png"] if num_per_cond > 1 else []) for key, _, _ in items}
    for _, path, _ in items:                                   # every file checked before any compute
        match_channels(load_image(path), channels, str(path))
    todo = [i for i, (key, _, _) in enumerate(items) if not all((out / n).exists() for n in names[key])]
    state.wait_for_everyone()
    with state.split_between_processes(todo) as mine:
        for i in tqdm(mine, unit="img", disable=not (progress and state.is_local_main_process), desc="segmenting"):
            key, path, _ = items[i]
            image = torch.from_numpy(match_channels(load_image(path), channels, str(path))).permute(2, 0, 1)[None]
            try:
                result = pipe(image=image, num_samples=num_per_cond, num_inference_steps=steps, eta=eta,
                              generator=image_generator(seed, (zlib.crc32(key.encode()),)), tile=tile,
                              overlap=overlap, tile_batch_size=batch_size)
            except ValueError as e:                             # a size the network cannot take whole, say
                hint = "" if tile or "does not fit" not in str(e) else "; or pass --tile T, which takes any size"
                raise ValueError(f"{path}: {e}{hint}") from None
            target = out / names[key][0]
            target.parent.mkdir(parents=True, exist_ok=True)
            write_image(mask_image(result.masks[0], classes)[..., None], target)
            if result.std is not None:
                write_image(std_image(result.std[0])[..., None], out / names[key][1])
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"{len(todo)} images segmented by {state.num_processes} process(es), {len(items) - len(todo)} "
              f"already there: {out}")
    return out
