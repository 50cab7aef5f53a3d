"""The folders ``sample.py`` writes for a model of signals or volumes (``spatial_dims`` 1 or 3), one function per
mode as ``sample_folders`` has for images, on the same resumable job (``fill_folder``) and the same seeds:

- ``sample_arrays``: numbered samples of a generating model, ``out/000042.npy`` (signals) or ``.nii.gz``
  (volumes; ``array_format="npy"`` for .npy), class-balanced as images are (index mod K), and ``grid.png``;
- ``condition_arrays`` (``--cond DIR``): outputs of a super-resolution or inpainting model, one or N per input
  file, each written with its input's stem and format, and what the file carried: a NIfTI's affine and header,
  a TIFF's resolution (on the finer grid of a super-resolved output);
- ``segment_arrays`` (``--cond DIR``, a segmentation pipeline): one mask per input file in its format and space
  (class ids, uint8), and for an ensemble of N > 1 the std map beside it (``stem_std``, float32), whole or by
  tiles of any input size.

Inputs are read (``data.arrays.read_array``) and mapped to [-1, 1] as training read them: the pipeline folder
records the run's ``data.intensity`` (``intensity``); outputs go back to the input's units (``denormalise``).
Generated samples have no input: they are written in the model's [-1, 1] units, or in the window's units where
training used a fixed one (``data.intensity=fixed``: e.g. Hounsfield units).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import DataConfig, SampleConfig
from .data import DataError, save_grid, to_uint8
from .errors import CheckpointError
from .data.arrays import Meta, denormalise, intensity_window, normalise, read_array, suffix_of, write_array
from .data.patches import array_files, key_of, no_arrays
from .data.views import pictures
from .model.pipeline import DiffunetPipeline
from .model.segment_pipeline import DiffunetSegmentationPipeline, mask_classes
from .objectives import SAMPLERS
from .pretrained import model_config, pipeline_options, pipeline_record
from .sample_folders import GRID_COLUMNS, GRID_MAX, fill_folder, segment_file, segmentation_pipeline
from .sampling import class_labels_for, load_for_processes, pipe_batches, pipeline_for, same_size_batches

FORMATS = {"npy": ".npy", "nii.gz": ".nii.gz"}           # sample.py --format: a generating model's files
DEFAULT_FORMAT = {1: ".npy", 3: ".nii.gz"}
DEFAULT_INTENSITY = [DataConfig.intensity, *DataConfig().intensity_range]   # for a folder that records none


def model_dims(path) -> int:
    """The spatial dimensionality of the model of folder ``path``: 2 for a folder from before it was recorded, and
    for one that cannot be read (the runner's own error then names what is wrong with it)."""
    try:
        return int(model_config(path).get("spatial_dims", 2))
    except (ValueError, OSError, CheckpointError):
        return 2


def intensity_of(path) -> tuple[str, tuple[float, float]]:
    """How the run that wrote folder ``path`` mapped its files to [-1, 1]: (mode, bounds)."""
    mode, *bounds = pipeline_record(path).get("intensity") or DEFAULT_INTENSITY
    return str(mode), tuple(bounds)


def read_input(path: Path, dims: int, channels: int, intensity) -> tuple[torch.Tensor, np.ndarray, Meta]:
    """One input file as (1, C, *S) in [0, 1] (what the pipelines take), its intensity window and its Meta."""
    array, meta = read_array(path, dims)
    if array.shape[0] != channels:
        raise DataError(f"{path} has {array.shape[0]} channel(s) but the model takes {channels}")
    window = intensity_window(array, *intensity)
    return (torch.from_numpy(normalise(array, window))[None] + 1) / 2, window, meta


def read_mask_file(path: Path, dims: int, shape: tuple[int, ...]) -> torch.Tensor:
    """An inpainting mask file as (1, 1, *S) in {0, 1}, 1 where a value is to be filled: 0/1 or 0/255, the shape
    of its input."""
    mask, _ = read_array(path, dims)
    if mask.shape[0] != 1 or mask.shape[1:] != tuple(shape):
        raise DataError(f"{path} is {'x'.join(map(str, mask.shape[1:]))} (x{mask.shape[0]} channels) but its input "
                        f"is {'x'.join(map(str, shape))}: a mask has its input's shape and one channel")
    values = np.unique(mask)
    if not (np.isin(values, (0, 1)).all() or np.isin(values, (0, 255)).all()):
        raise DataError(f"{path} has values other than 0/1 or 0/255; 1 marks what is to be filled")
    return torch.from_numpy((mask > 0).astype(np.float32))[None]


def array_conditions(cond, mask, dims: int) -> list[tuple[str, Path, Path | None]]:
    """(key, input file, its mask file or None) of every signal or volume file under ``cond``, by key (the path
    below the folder without the format suffix); a file without its partner is one DataError naming it."""
    cond = Path(cond)
    for folder in (cond, mask):
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{folder} is not a folder")
    inputs = {key_of(p, cond): p for p in array_files(cond, dims)}
    if not inputs:
        raise no_arrays(cond, dims)
    masks = {} if mask is None else {key_of(p, Path(mask)): p for p in array_files(Path(mask), dims)}
    if mask is not None:
        for lone, other in ((sorted(inputs.keys() - masks.keys()), mask), (sorted(masks.keys() - inputs.keys()), cond)):
            if lone:
                path = inputs.get(lone[0]) or masks[lone[0]]
                raise DataError(f"{path} has no file of the same relative path and stem under {other}")
    return [(key, inputs[key], masks.get(key)) for key in sorted(inputs)]


def _grid(samples: list[torch.Tensor], path: Path, nrow: int | None = None) -> Path:
    """Samples (each (C, *S) in [-1, 1]) as one PNG of their pictures (``data.views``)."""
    return save_grid(to_uint8(pictures(torch.stack(samples))), path, nrow=nrow)


# ------------------------------------------------------------------------------------------- sample.py

def sample_arrays(model: str | Path, out: str | Path, num_images: int = SampleConfig.num_images, *,
                  scheduler: str | None = None, steps: int | None = None, eta: float = SampleConfig.eta,
                  batch_size: int = SampleConfig.batch_size, seed: int = SampleConfig.seed, start_index: int = 0,
                  classes=None, guidance_scale: float | None = None, dtype: str = SampleConfig.dtype,
                  device: str | None = None, prediction_type: str | None = None, objective: str | None = None,
                  array_format: str | None = None, grid: bool = True, progress: bool = True) -> Path:
    """Samples start_index .. start_index + num_images - 1 of a signal or volume model as ``out/000042.npy`` or
    ``.nii.gz`` (``array_format``: "npy" or "nii.gz"; default .npy for signals, .nii.gz for volumes), plus
    ``grid.png`` of the first ``GRID_MAX``; the rest as ``sample_folders.sample_to_folder``."""
    state, unet, sched, settings = load_for_processes(model, dtype, device, scheduler=scheduler, steps=steps,
                                                      guidance_scale=guidance_scale,
                                                      prediction_type=prediction_type, objective=objective)
    if array_format is not None and array_format not in FORMATS:
        raise ValueError(f"unknown format {array_format!r}; choose {' or '.join(FORMATS)}")
    suffix = FORMATS[array_format] if array_format else DEFAULT_FORMAT[unet.dims]
    if suffix == ".nii.gz" and unet.dims != 3:
        raise ValueError("--format nii.gz is for volumes; signals are written as .npy")
    pipe = pipeline_for(unet, sched, **pipeline_options(model))
    mode, bounds = intensity_of(model)
    window = np.tile(np.asarray(bounds if mode == "fixed" else (-1.0, 1.0), np.float64), (unet.config.in_channels, 1))
    if classes is None and unet.config.num_classes:
        classes = "all"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(range(start_index, start_index + num_images))
    meta = Meta(suffix, (1.0,) * unet.dims)

    def work(mine: list[int]) -> Iterator[int]:
        for idx, _, samples in pipe_batches(pipe, mine, seed=seed, classes=classes, steps=settings["steps"],
                                            guidance_scale=settings["guidance_scale"], eta=eta, batch_size=batch_size):
            for i, x in zip(idx, samples):
                write_array(denormalise(x.numpy(), window), out / f"{i:06d}{suffix}", meta)
            yield len(idx)

    def finish(todo: list[int]) -> None:
        if grid:
            shown = [torch.from_numpy(normalise(read_array(out / f"{i:06d}{suffix}", unet.dims)[0], window))
                     for i in wanted[:GRID_MAX]]
            k = unet.config.num_classes
            _grid(shown, out / "grid.png", nrow=k if classes == "all" and k and len(shown) >= k else None)
        labels = class_labels_for(classes, wanted, unet.config.num_classes)
        if labels is not None:                                   # which class each numbered file is
            (out / "labels.csv").write_text("".join(f"{i:06d}{suffix},{int(y)}\n" for i, y in zip(wanted, labels)))

    return fill_folder(state, out, wanted, lambda i: [out / f"{i:06d}{suffix}"], work, progress=progress,
                       finish=finish)


def condition_arrays(model: str | Path, cond: str | Path, out: str | Path, *, mask: str | Path | None = None,
                     num_per_cond: int = 1, scheduler: str | None = None, steps: int | None = None,
                     eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size,
                     seed: int = SampleConfig.seed, classes=None, guidance_scale: float | None = None,
                     dtype: str = SampleConfig.dtype, device: str | None = None, prediction_type: str | None = None,
                     objective: str | None = None, tile: int | None = None, overlap: int | None = None,
                     grid: bool = True, progress: bool = True) -> Path:
    """``num_per_cond`` outputs of a super-resolution or inpainting model of signals or volumes for every file
    under ``cond``: ``out/a/x.nii.gz`` for ``cond/a/x.nii.gz`` (N > 1: ``x_0`` .. ``x_{N-1}``, ``x_mean``,
    ``x_std``), in the input's format and units, with its metadata (for super-resolution on the grid
    its factors finer). An input is the model's size (super-resolution: that size over its factors), or any size
    with ``tile`` (the network run on tiles of that many output positions per axis at every step, blended where
    ``overlap`` wide; ``DiffunetPipeline``'s ``tile``); inpainting keeps the known values of the input exactly.
    Seeds, resuming and processes as ``sample_folders.sample_conditioned``; every file is read before any
    sampling."""
    state, unet, sched, settings = load_for_processes(model, dtype, device, scheduler=scheduler, steps=steps,
                                                      guidance_scale=guidance_scale,
                                                      prediction_type=prediction_type, objective=objective)
    options = pipeline_options(model)
    pipe = pipeline_for(unet, sched, **options)
    task, sampler = pipe.image_task, SAMPLERS.get(settings["scheduler"])
    if mask is None and ((sampler is not None and sampler.needs_mask) or task.takes_mask):
        raise ValueError(f"this {options['task']} pipeline fills masks: pass --mask DIR, one mask per input (same "
                         f"relative path and stem; 1 = to fill)")
    dims, channels, intensity = unet.dims, unet.config.in_channels, intensity_of(model)
    factors = pipe.input_factors
    want = tuple(s // f for s, f in zip(unet.image_size, factors))
    items = array_conditions(cond, mask, dims)
    read = {}
    for key, path, mask_path in items:                          # every file checked before any sampling
        x, window, meta = read_input(path, dims, channels, intensity)
        if tuple(x.shape[2:]) != want and tile is None:
            raise DataError(f"{path} is {'x'.join(map(str, x.shape[2:]))} but this model takes inputs of "
                            f"{'x'.join(map(str, want))}; pass --tile T for inputs of any size, or crop it")
        fill = None if mask_path is None else read_mask_file(mask_path, dims, tuple(x.shape[2:]))
        original = None if fill is None else read_array(path, dims)[0]        # kept where nothing is filled
        read[key] = (x, fill, window, meta.resampled(factors), original)
    out = Path(out)
    names = {key: ([f"{key}{suffix_of(path)}"] if num_per_cond == 1 else
                   [f"{key}_{k}{suffix_of(path)}" for k in range(num_per_cond)]
                   + [f"{key}_{s}{suffix_of(path)}" for s in ("mean", "std")]) for key, path, _ in items}

    def work(mine: list[tuple[int, int]]) -> Iterator[int]:
        for batch in same_size_batches(mine, lambda item: read[items[item[0]][0]][0].shape, batch_size):
            keys = [items[i][0] for i, _ in batch]
            image = torch.cat([read[key][0] for key in keys])
            fill = None if mask is None else torch.cat([read[key][1] for key in keys])
            seeds = [(zlib.crc32(key.encode()), k) for key, (_, k) in zip(keys, batch)]
            for _, _, samples in pipe_batches(pipe, seeds, seed=seed, classes=classes, steps=settings["steps"],
                                              guidance_scale=settings["guidance_scale"], eta=eta,
                                              batch_size=len(batch), image=image, mask_image=fill,
                                              tile=tile, overlap=overlap):
                for key, (_, k), x in zip(keys, batch, samples):
                    _, filled, window, meta, original = read[key]
                    values = denormalise(x.numpy(), window)
                    if filled is not None:                       # the input's own values where nothing was filled
                        values = np.where(filled[0].numpy() > 0, values, original)
                    path = out / names[key][k]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_array(values.astype(np.float32), path, meta)
            yield len(batch)

    def finish(todo) -> None:
        if num_per_cond > 1:
            for key, _, _ in items:
                stack = np.stack([read_array(out / name, dims)[0] for name in names[key][:num_per_cond]])
                meta = read[key][3]
                write_array(stack.mean(0).astype(np.float32), out / names[key][-2], meta)
                write_array(stack.std(0).astype(np.float32), out / names[key][-1], meta)
        if grid:                                # the first inputs of the first one's size (one grid, one size)
            shown = [item for item in items if read[item[0]][0].shape == read[items[0][0]][0].shape][:GRID_COLUMNS]
            rows = []
            for key, _, _ in shown:
                rows.append(read[key][0][0] * 2 - 1)
            for key, _, _ in shown:
                output, _ = read_array(out / names[key][0], dims)
                rows.append(torch.from_numpy(normalise(output, read[key][2])))
            if max(factors) > 1:                                 # inputs at the outputs' size, to stand in a grid
                size = rows[-1].shape[1:]
                rows[:len(shown)] = [torch.nn.functional.interpolate(r[None], size=size, mode="nearest")[0]
                                     for r in rows[:len(shown)]]
            _grid(rows, out / "grid.png", nrow=len(shown))

    wanted = [(i, k) for i in range(len(items)) for k in range(num_per_cond)]
    return fill_folder(state, out, wanted, lambda item: [out / names[items[item[0]][0]][item[1]]], work,
                       progress=progress, finish=finish)


def segment_arrays(model: str | Path, cond: str | Path, out: str | Path, *, tile: int | None = None,
                   overlap: int | None = None, num_per_cond: int = 1, scheduler: str | None = None,
                   steps: int | None = None, eta: float | None = None, batch_size: int = SampleConfig.batch_size,
                   seed: int | None = None, dtype: str = SampleConfig.dtype, device: str | None = None,
                   prediction_type: str | None = None, objective: str | None = None, progress: bool = True) -> Path:
    """Masks of every signal or volume file under ``cond`` (any size; ``tile``: by tiles of that many output
    voxels per axis) by a segmentation pipeline: ``out/a/x.nii.gz`` for ``cond/a/x.nii.gz``, class ids (uint8)
    in the input's format and space (its affine, header, resolution); an ensemble of N > 1 writes its std map
    as ``x_std`` (float32). Options, seeds and resuming as ``sample_folders.segment_to_folder``."""
    state, pipe, steps, eta, seed = segmentation_pipeline(model, num_per_cond, dtype, device, scheduler=scheduler,
                                                          steps=steps, eta=eta, seed=seed,
                                                          prediction_type=prediction_type, objective=objective)
    unet = pipe.unet
    classes, dims, intensity = mask_classes(unet), unet.dims, intensity_of(model)
    if classes > 255:
        raise ValueError(f"{classes} classes do not fit the uint8 masks written")
    channels = unet.config.cond_channels if unet.timed else unet.config.in_channels
    out, items = Path(out), array_conditions(cond, None, dims)
    for _, path, _ in items:                                    # every file checked before any compute
        read_input(path, dims, channels, intensity)
    names = {key: [f"{key}{suffix_of(path)}"] + ([f"{key}_std{suffix_of(path)}"] if num_per_cond > 1 else [])
             for key, path, _ in items}

    def work(mine: list[int]) -> Iterator[int]:
        for i in mine:
            key, path, _ = items[i]
            image, _, meta = read_input(path, dims, channels, intensity)
            result = segment_file(pipe, image, key, path, num_per_cond=num_per_cond, steps=steps, eta=eta,
                                  seed=seed, tile=tile, overlap=overlap, batch_size=batch_size)
            target = out / names[key][0]
            target.parent.mkdir(parents=True, exist_ok=True)
            write_array(np.asarray(result.masks[0])[None].astype(np.uint8), target, meta)
            if result.std is not None and num_per_cond > 1:
                write_array(np.asarray(result.std[0])[None].astype(np.float32), out / names[key][1], meta)
            yield 1

    return fill_folder(state, out, list(range(len(items))), lambda i: [out / n for n in names[items[i][0]]], work,
                       desc="segmenting", progress=progress, made="segmented")



# What sample.py runs for a signal or volume model, as sample_folders.RUNNERS for images
ARRAY_RUNNERS = {
    (DiffunetPipeline, False): sample_arrays,
    (DiffunetPipeline, True): condition_arrays,
    (DiffunetSegmentationPipeline, True): segment_arrays,
}
