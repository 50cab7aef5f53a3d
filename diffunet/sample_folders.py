"""The folders ``sample.py`` writes, one function per mode, each one keyword per option:

- ``sample_to_folder``: numbered images of a generating model (``out/000042.png``), a grid and an .npz;
- ``sample_conditioned`` (``--cond DIR``): outputs of an image-conditioned model (super-resolution, inpainting,
  or RePaint with any epsilon model), one or N per condition file, named and seeded by its relative path;
- ``segment_to_folder`` (``--cond DIR``, a segmentation pipeline): one mask PNG per image file, and for a
  diffusion model's ensemble of N > 1 the uncertainty map beside it (``stem_std.png``).

All three are one resumable job (``fill_folder``): outputs whose files exist are skipped, so an interrupted run
resumes without duplicates or gaps, and under ``accelerate launch`` the missing ones are split between the
processes. ``RUNNERS`` says which one a folder and its options take. The seeds and the loop are
``diffunet.sampling``'s.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import SampleConfig
from .data import (PIL_MODES, DataError, image_path, load_image, match_channels, read_image, save_grid, to_uint8,
                   write_image)
from .model.pipeline import DiffunetPipeline, ResizeWarning
from .model.segment_pipeline import DiffunetSegmentationPipeline, mask_classes
from .objectives import SAMPLERS
from .pretrained import is_deterministic, pipeline_options
from .sampling import (class_labels_for, conditions, image_generator, load_for_processes, pipe_batches,
                       pipeline_for, read_batch, read_condition, same_size_batches)

GRID_MAX = 100                                          # images shown in grid.png
GRID_COLUMNS = 8                                        # conditions shown in a conditioned run's grid.png


def fill_folder(state, out: Path, wanted: list, outputs: Callable, work: Callable, *, desc: str = "sampling",
                progress: bool = True, made: str = "written", finish: Callable | None = None) -> Path:
    """The resumable folder job of every mode: of the ``wanted`` items, those missing an output file
    (``outputs(item)``: its paths under ``out``) are listed by every process before any writes, split between
    the processes (contiguous, disjoint chunks) and made by ``work(share)``, which yields the number of images
    it finished at a time (the progress bar counts them); then the main process runs ``finish(missing)`` and
    says in one line how many were ``made``, by how many processes, and how many were already there."""
    todo = [item for item in wanted if not all(path.exists() for path in outputs(item))]
    state.wait_for_everyone()                                   # every process lists the folder before any writes
    with state.split_between_processes(todo) as mine:
        show = progress and state.is_local_main_process
        with tqdm(total=len(mine), unit="img", disable=not show, desc=desc) as bar:
            for done in work(mine):
                bar.update(done)
    state.wait_for_everyone()
    if state.is_main_process:
        if finish is not None:
            finish(todo)
        print(f"{len(todo)} images {made} by {state.num_processes} process(es), "
              f"{len(wanted) - len(todo)} already there: {out}")
    return out


# ------------------------------------------------------------------------------------------- sample.py

def sample_to_folder(model: str | Path, out: str | Path, num_images: int = SampleConfig.num_images, *,
                     scheduler: str | None = None, steps: int | None = None,
                     eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size,
                     seed: int = SampleConfig.seed, start_index: int = 0, classes=None,
                     guidance_scale: float | None = None, dtype: str = SampleConfig.dtype,
                     device: str | None = None, prediction_type: str | None = None, objective: str | None = None,
                     npz: str | None = None, grid: bool = True, progress: bool = True) -> Path:
    """Images start_index .. start_index + num_images - 1 of ``model`` (see ``sampling.load_model``) as
    ``out/000042.png``, plus ``out/grid.png`` and, with ``npz``, an .npz (path relative to ``out``) of the range:
    ``images`` (N, H, W, C) uint8, ``indices`` and, for class-conditional models, ``labels``.

    Indices whose file exists are skipped, so an interrupted run resumes without duplicates or gaps. Under
    ``accelerate launch`` the missing indices are split into contiguous, disjoint chunks, one per process.
    A class-conditional model with ``classes=None`` samples a balanced set ("all"). ``scheduler``, ``steps`` and
    ``guidance_scale`` left at None sample as the run did (``sampling.load_for_processes``); ``objective`` and
    ``prediction_type`` say what a bare model folder that records no scheduler predicts (``load_model``)."""
    state, unet, sched, settings = load_for_processes(model, dtype, device, scheduler=scheduler, steps=steps,
                                                      guidance_scale=guidance_scale,
                                                      prediction_type=prediction_type, objective=objective)
    pipe = pipeline_for(unet, sched, **pipeline_options(model))
    if classes is None and unet.config.num_classes:
        classes = "all"
    out, channels = Path(out), unet.config.in_channels
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(range(start_index, start_index + num_images))

    def work(mine: list[int]) -> Iterator[int]:
        for idx, _, images in pipe_batches(pipe, mine, seed=seed, classes=classes, steps=settings["steps"],
                                           guidance_scale=settings["guidance_scale"], eta=eta,
                                           batch_size=batch_size):
            for i, image in zip(idx, to_uint8(images)):
                write_image(image, image_path(out, i, channels))
            yield len(idx)

    def finish(todo: list[int]) -> None:
        if grid or npz:
            images = np.stack([read_image(image_path(out, i, channels)) for i in wanted])
        if grid:
            save_grid(images[:GRID_MAX], out / "grid.png")
        if npz:
            arrays = dict(images=images, indices=np.asarray(wanted))
            labels = class_labels_for(classes, wanted, unet.config.num_classes)
            if labels is not None:
                arrays["labels"] = labels.numpy()
            np.savez(out / npz, **arrays)

    return fill_folder(state, out, wanted, lambda i: [image_path(out, i, channels)], work, progress=progress,
                       finish=finish)


# ------------------------------------------------------------------------------------------- sample.py --cond
# A condition's outputs are named and seeded by its key (``sampling.conditions``: "a/x" for cond/a/x.jpg).

def output_names(key: str, n: int, suffix: str) -> list[str]:
    """The files of condition ``key`` under ``out``: ``a/x.png``; for n > 1 ``a/x_0.png`` .. ``a/x_{n-1}.png``,
    then ``a/x_mean.png`` and ``a/x_std.png``."""
    if n == 1:
        return [key + suffix]
    return [f"{key}_{k}{suffix}" for k in range(n)] + [f"{key}_mean{suffix}", f"{key}_std{suffix}"]


def write_mean_std(out: Path, names: list[str]) -> None:
    """The per-pixel mean and std of the outputs ``names[:-2]`` as uint8 images ``names[-2:]``: the mean as an
    image, the (population) standard deviation doubled, 2 * std * 255 in [0, 1] units: 0 where the outputs agree,
    255 at the largest spread a pixel can have (half its outputs black, half white); a uniform one shows 147."""
    stack = np.stack([read_image(out / name) for name in names[:-2]]).astype(np.float64)
    write_image(np.round(stack.mean(0)).astype(np.uint8), out / names[-2])
    write_image(np.clip(np.round(2 * stack.std(0)), 0, 255).astype(np.uint8), out / names[-1])


def condition_grid(pipe: DiffunetPipeline, items: list, outputs: list[Path], path: Path,
                   any_size: bool = False) -> Path:
    """``items``' conditions, masks (where given) and ``outputs``, one row each, one column per condition;
    ``any_size``: conditions (of one size) read at their own size, shown at the outputs'."""
    channels = pipe.unet.config.in_channels
    image, fill = read_batch(pipe, items, any_size)
    shown = np.stack([read_image(p) for p in outputs])
    if image.shape[2:] != shown.shape[1:3]:                          # a smaller super-resolution input
        image = torch.nn.functional.interpolate(image, size=shown.shape[1:3], mode="nearest")
    rows = [to_uint8(image * 2 - 1)]                                    # (N, C, H, W) [0, 1] -> (N, H, W, C) uint8
    if fill is not None:
        rows.append(to_uint8(fill.expand(-1, channels, -1, -1) * 2 - 1))
    rows.append(shown)
    return save_grid(np.concatenate(rows), path, nrow=len(items))


def sample_conditioned(model: str | Path, cond: str | Path, out: str | Path, *, mask: str | Path | None = None,
                       num_per_cond: int = 1, scheduler: str | None = None, steps: int | None = None,
                       eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size,
                       seed: int = SampleConfig.seed, classes=None, guidance_scale: float | None = None,
                       dtype: str = SampleConfig.dtype, device: str | None = None, prediction_type: str | None = None,
                       objective: str | None = None, tile: int | None = None, overlap: int | None = None,
                       grid: bool = True, progress: bool = True) -> Path:
    """``num_per_cond`` outputs of ``model`` (see ``sampling.load_model``) for every image file under ``cond``
    (any depth), each the condition of the model's task (``pretrained.pipeline_options``: the low-resolution
    input of super-resolution, the image to complete of inpainting, or of any epsilon model with
    ``scheduler="repaint"``), with the file of the same relative path and stem under ``mask`` (white: to fill)
    where a mask is taken. Images are converted to the model's channel count; another size is resized with a
    warning, or with ``tile`` kept: the network then runs on tiles of ``tile`` output pixels at every step,
    blended over ``overlap`` pixels (``DiffunetPipeline``'s ``tile``).

    Files: ``out/a/x.png`` for ``cond/a/x.jpg``; for N = ``num_per_cond`` > 1 ``out/a/x_0.png`` ..
    ``x_{N-1}.png``, ``x_mean.png`` and ``x_std.png`` (``write_mean_std``); ``out/grid.png``: condition / mask /
    output rows of the first ``GRID_COLUMNS`` conditions. Output k of key "a/x" draws from
    ``image_generator(seed, (crc32("a/x"), k))``: it depends neither on the batch size, nor on the processes,
    nor on the other files. Outputs whose file exists are skipped (a run resumes); a key's mean and std are
    (re)written once its N outputs exist. Under ``accelerate launch`` the missing outputs are split between the
    processes. Every file is checked before any sampling: a file without its partner, or one of another aspect
    ratio, is one error naming it. ``classes``: None (a class-conditional model's null class) or one class.
    ``scheduler``, ``steps`` and ``guidance_scale`` left at None sample as the run did (``load_for_processes``)."""
    state, unet, sched, settings = load_for_processes(model, dtype, device, scheduler=scheduler, steps=steps,
                                                      guidance_scale=guidance_scale,
                                                      prediction_type=prediction_type, objective=objective)
    options = pipeline_options(model)
    pipe = pipeline_for(unet, sched, **options)
    task, sampler = pipe.image_task, SAMPLERS.get(settings["scheduler"])     # None: "auto", which never inpaints
    if mask is None and ((sampler is not None and sampler.needs_mask) or task.takes_mask):
        raise ValueError(f"this {options['task']} pipeline{' with RePaint' if task.condition is None else ''} fills "
                         f"masks: pass --mask DIR, one mask per condition (same relative path and stem; white = to "
                         f"fill)")
    if isinstance(classes, str):
        raise ValueError(f"classes={classes!r} balances a numbered set; with conditions give one class, or none "
                         f"(the null class)")
    out, items = Path(out), conditions(cond, mask)
    suffix = ".png" if unet.config.in_channels in PIL_MODES else ".npy"          # as data.image_path
    names = {key: output_names(key, num_per_cond, suffix) for key, _, _ in items}
    # keys are distinct, and for N > 1 every name ends in _k, _mean or _std: only the grid can take a name
    clash = [path for key, path, _ in items if grid and "grid.png" in names[key]]
    if clash:
        raise DataError(f"{clash[0]} and the grid would both write {out / 'grid.png'}; rename it or pass --no-grid")
    with warnings.catch_warnings(record=True) as caught:    # every process checks every file: all stop alike,
        warnings.simplefilter("always")                     # before any sampling
        size = {key: read_condition(pipe, path, mask_path, tile is not None)[0].shape
                for key, path, mask_path in items}
    if caught and state.is_main_process:                    # files of another size: said once, with the count
        resized = [w for w in caught if issubclass(w.category, ResizeWarning)]
        for w in caught:
            if w not in resized:
                warnings.warn(str(w.message), w.category, stacklevel=2)
        if resized:
            more = f" ({len(resized) - 1} more of the {len(items)} files too)" if len(resized) > 1 else ""
            warnings.warn(f"{resized[0].message}{more}", ResizeWarning, stacklevel=2)

    def work(mine: list[tuple[int, int]]) -> Iterator[int]:
        for batch in same_size_batches(mine, lambda item: size[items[item[0]][0]], batch_size):  # (index, k) pairs
            image, fill = read_batch(pipe, [items[i] for i, _ in batch], tile is not None)
            keys = [(zlib.crc32(items[i][0].encode()), k) for i, k in batch]
            for _, _, images in pipe_batches(pipe, keys, seed=seed, classes=classes, steps=settings["steps"],
                                             guidance_scale=settings["guidance_scale"], eta=eta,
                                             batch_size=len(batch), image=image, mask_image=fill,
                                             tile=tile, overlap=overlap):
                for (i, k), x in zip(batch, to_uint8(images)):
                    path = out / names[items[i][0]][k]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_image(x, path)
            yield len(batch)

    def finish(todo: list[tuple[int, int]]) -> None:
        if num_per_cond > 1:
            redone = {items[i][0] for i, _ in todo}
            for key, _, _ in items:
                if key in redone or not all((out / name).exists() for name in names[key][-2:]):
                    write_mean_std(out, names[key])
        if grid:                                # the first conditions of the first one's size
            shown = [item for item in items if size[item[0]] == size[items[0][0]]][:GRID_COLUMNS]
            condition_grid(pipe, shown, [out / names[key][0] for key, _, _ in shown], out / "grid.png",
                           tile is not None)

    wanted = [(i, k) for i in range(len(items)) for k in range(num_per_cond)]
    return fill_folder(state, out, wanted, lambda item: [out / names[items[item[0]][0]][item[1]]], work,
                       progress=progress, finish=finish)


# ------------------------------------------------------------------------------------------- segmentation

def mask_image(ids: np.ndarray, classes: int) -> np.ndarray:
    """Class ids (H, W) -> the uint8 mask file: 0/255 for a binary mask, the ids themselves for more classes."""
    return (ids * (255 if classes == 2 else 1)).astype(np.uint8)


def std_image(std: np.ndarray) -> np.ndarray:
    """The ensemble's std map (H, W), 0..0.5 -> uint8 2 * std * 255: 0 where every sample agrees, 255 where they
    split evenly (the convention of ``write_mean_std``)."""
    return np.clip(np.round(std * 2 * 255), 0, 255).astype(np.uint8)


# What a deterministic model has no use for: it has no scheduler, and one forward pass gives its one mask.
DIFFUSION_ONLY = ("scheduler", "steps", "eta", "seed", "prediction_type", "objective")


def segmentation_pipeline(model, num_per_cond: int, dtype: str, device: str | None, **given):
    """(process state, the segmentation pipeline of folder ``model`` on this process's device, and its steps, eta
    and seed, each as given or as the run did / the defaults): what ``segment_to_folder`` and
    ``sample_arrays.segment_arrays`` start with. ``given`` are the options of ``DIFFUSION_ONLY``; a deterministic
    model given any of them, or ``num_per_cond`` > 1, is one ValueError line."""
    if is_deterministic(model):
        wrong = [f"--{name.replace('_', '-')}" for name in DIFFUSION_ONLY if given[name] is not None]
        wrong += ["--num-per-cond > 1"] if num_per_cond > 1 else []
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not for a deterministic segmentation model (one forward pass, "
                             f"no scheduler, one mask per image)")
    state, unet, sched, settings = load_for_processes(model, dtype, device, scheduler=given["scheduler"],
                                                      steps=given["steps"], guidance_scale=1.0,
                                                      prediction_type=given["prediction_type"],
                                                      objective=given["objective"])
    eta = SampleConfig.eta if given["eta"] is None else given["eta"]
    seed = SampleConfig.seed if given["seed"] is None else given["seed"]
    pipe = DiffunetSegmentationPipeline(unet=unet, scheduler=sched if unet.timed else None)
    pipe.set_progress_bar_config(disable=True)
    return state, pipe, settings["steps"], eta, seed


def segment_file(pipe: DiffunetSegmentationPipeline, image: torch.Tensor, key: str, path: Path, *,
                 num_per_cond: int, steps: int, eta: float, seed: int, tile, overlap, batch_size: int):
    """The pipeline's masks of one input file (``image``, (1, C, *S) in [0, 1]) whose key is ``key``: drawn from
    ``image_generator(seed, (crc32(key),))``, whole or by tiles; a ValueError names ``path`` (and, for a size the
    network cannot take whole, suggests --tile)."""
    try:
        return pipe(image=image, num_samples=num_per_cond, num_inference_steps=steps, eta=eta,
                    generator=image_generator(seed, (zlib.crc32(key.encode()),)), tile=tile, overlap=overlap,
                    tile_batch_size=batch_size, output_type="np")
    except ValueError as e:                                     # a size the network cannot take whole, say
        hint = "" if tile or "does not fit" not in str(e) else "; or pass --tile T, which takes any size"
        raise ValueError(f"{path}: {e}{hint}") from None


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
    state, pipe, steps, eta, seed = segmentation_pipeline(model, num_per_cond, dtype, device, scheduler=scheduler,
                                                          steps=steps, eta=eta, seed=seed,
                                                          prediction_type=prediction_type, objective=objective)
    unet, classes = pipe.unet, mask_classes(pipe.unet)
    channels = unet.config.cond_channels if unet.timed else unet.config.in_channels
    out, items = Path(out), conditions(cond)
    names = {key: [key + ".png"] + ([key + "_std.png"] if num_per_cond > 1 else []) for key, _, _ in items}
    for _, path, _ in items:                                   # every file checked before any compute
        match_channels(load_image(path), channels, str(path))

    def work(mine: list[int]) -> Iterator[int]:
        for i in mine:
            key, path, _ = items[i]
            image = torch.from_numpy(match_channels(load_image(path), channels, str(path))).permute(2, 0, 1)[None]
            result = segment_file(pipe, image, key, path, num_per_cond=num_per_cond, steps=steps, eta=eta,
                                  seed=seed, tile=tile, overlap=overlap, batch_size=batch_size)
            target = out / names[key][0]
            target.parent.mkdir(parents=True, exist_ok=True)
            write_image(mask_image(result.masks[0], classes)[..., None], target)
            if result.std is not None:
                write_image(std_image(result.std[0])[..., None], out / names[key][1])
            yield 1

    return fill_folder(state, out, list(range(len(items))), lambda i: [out / n for n in names[items[i][0]]], work,
                       desc="segmenting", progress=progress, made="segmented")


# ------------------------------------------------------------------------------------------- which mode

# What sample.py runs, by the pipeline class a folder holds (``pretrained.pipeline_class``) and whether --cond is
# given. A segmentation folder without --cond has nothing to segment: no entry.
RUNNERS = {
    (DiffunetPipeline, False): sample_to_folder,
    (DiffunetPipeline, True): sample_conditioned,
    (DiffunetSegmentationPipeline, True): segment_to_folder,
}
