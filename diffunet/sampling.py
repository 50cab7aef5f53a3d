"""Sampling: diffusers schedulers by name, reproducible sets of samples, and sample folders (their image files and
grids are written and read by ``diffunet.data``). The loop itself is ``DiffunetPipeline.__call__``
(``diffunet.pipeline``): every function here calls it, batch by batch, with one generator per image.

Reproducibility rests on one rule: image i is drawn from its own ``torch.Generator``, seeded from (seed, i), for
its initial noise and for every noise draw of the scheduler. The images therefore do not depend on the batch
size, the number of processes, or which indices were already on disk, and a set can be extended later
(``start_index``) or an interrupted run resumed (indices whose file exists are skipped). Conditioned runs
(``sample_conditioned``) seed output k of a condition file from (seed, crc32 of its relative path, k) instead.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import RePaintScheduler
from tqdm.auto import tqdm

from .checkpoint import (SAMPLE_SETTINGS, CheckpointError, is_segmentation, load_model_folder, pipeline_index,
                         pipeline_options, sample_settings)
from .config import DiffusionConfig, SampleConfig
from .data import (PIL_MODES, DataError, image_path, load_image, match_channels, no_images, pair_files, read_image,
                   read_mask, save_grid, to_uint8, write_image)
from .fast import describe_device, precision, resolve_precision
from .objectives import SAMPLERS, make_noise_scheduler, make_sampler, objective_of, sampler_name
from .pipeline import DiffunetPipeline, ResizeWarning, upsample_condition

SCHEDULERS = {"auto": None, **SAMPLERS}  # "auto": the model's objective's default (objectives.OBJECTIVES)
# Schedulers that need an image and a mask (``sample.py --cond --mask``): training-free inpainting with any
# epsilon-predicting model, unconditional or class-conditional (Lugmayr et al. 2022)
INPAINTING_SCHEDULERS = {"repaint": RePaintScheduler}

GRID_MAX = 100                                          # images shown in grid.png
GRID_COLUMNS = 8                                        # conditions shown in a conditioned run's grid.png


def make_scheduler(name: str, config) -> object:
    """A sampling scheduler ``name`` (``SCHEDULERS``: one that fits the model's objective, or "auto"; or one of
    ``INPAINTING_SCHEDULERS``) built from the training scheduler's ``config`` (same noise levels and target)."""
    if name in INPAINTING_SCHEDULERS:
        if objective_of(config) != "ddpm":
            raise ValueError(f"scheduler {name} samples ddpm models only; this one is {objective_of(config)} "
                             f"(train one with diffusion.objective=ddpm, e.g. --config digits-ddpm)")
        return INPAINTING_SCHEDULERS[name].from_config(config)
    return make_sampler(name, config)


def load_model(path: str | Path, scheduler: str = SampleConfig.scheduler, prediction_type: str | None = None,
               dtype: torch.dtype = torch.float32, objective: str | None = None):
    """(unet, scheduler) from a pipeline folder written by ``train.py`` (``model_index.json``, ``unet/``,
    ``scheduler/``; whichever pipeline class it names: ``DiffunetPipeline``, or ``DDPMPipeline`` in older runs)
    or from a bare ``UNet.save_pretrained`` folder, by the training scheduler it records
    (``checkpoint.recorded_scheduler``). A folder that records none cannot say what its model predicts: it is
    refused (CheckpointError) unless ``objective`` ("ddpm", "flow", "edm") or ``prediction_type`` (a DDPM target)
    says, which then take the schema's defaults of ``diffusion.*`` for the rest. ``prediction_type`` also
    overrides a recorded target. A model without time (deterministic segmentation) gets no scheduler (None).
    A folder that cannot be used is one ``CheckpointError`` line naming the file
    (``checkpoint.load_model_folder``). The pipeline's own keywords (``task``, ``sr_factor``: which image
    condition the model takes) are ``checkpoint.pipeline_options(path)``, for ``generate_batches`` /
    ``generate``; how its run sampled, ``checkpoint.sample_settings(path)``."""
    unet, train_config = load_model_folder(path, dtype)
    if unet.config.time_condition == "none":
        return unet, None
    if train_config is None:
        if objective is None and prediction_type is None:
            raise CheckpointError(f"{path} does not say what its model predicts (a model folder saved without its "
                                  f"training scheduler): pass --objective ddpm|flow|edm (with --prediction-type "
                                  f"for a ddpm model), or sample the pipeline folder train.py wrote")
        diffusion = DiffusionConfig(objective=objective or "ddpm")
        if prediction_type is not None:
            diffusion.prediction_type = prediction_type
        train_config = dict(make_noise_scheduler(diffusion).config)
    elif objective is not None and objective_of(train_config) != objective:
        raise CheckpointError(f"{path} records a {objective_of(train_config)} model; --objective {objective} "
                              f"contradicts it: leave --objective out")
    train_config = dict(train_config)
    if prediction_type is not None:
        train_config["prediction_type"] = prediction_type
        # from_config gives keys listed as "defaults used" the new class's default: this one is now chosen
        train_config["_use_default_values"] = [k for k in train_config.get("_use_default_values", [])
                                               if k != "prediction_type"]
    return unet, make_scheduler(scheduler, train_config)


# ------------------------------------------------------------------------------------------- seeds, labels

def image_generator(seed: int, index: int | tuple[int, ...]) -> torch.Generator:
    """The generator of image ``index``. SeedSequence mixes (seed, index) so that nearby pairs give unrelated
    streams and no two pairs collide (a plain ``seed * K + index`` would). A tuple of ints (a conditioned
    output: the crc32 of its condition's key, k) is SeedSequence's spawn key, a domain of its own: SeedSequence
    pads short entropy with zeros ([s, i] and [s, i, 0] are one stream), spawn keys are kept apart."""
    sequence = (np.random.SeedSequence(seed, spawn_key=index) if isinstance(index, tuple)
                else np.random.SeedSequence([seed, index]))
    state = sequence.generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def class_labels_for(classes, indices: Sequence[int], num_classes: int | None) -> torch.Tensor | None:
    """Labels of the images at ``indices``. ``classes``: None (unconditional), an int (every image that class),
    "all" (balanced: image i gets i mod num_classes, so any range of indices is balanced to within one image and
    an extended set stays balanced) or a sequence / tensor with one label per index."""
    if classes is None:
        return None
    if not num_classes:
        raise ValueError("class labels given, but this model is unconditional (num_classes=None)")
    if isinstance(classes, str):
        if classes != "all":
            raise ValueError(f"classes must be an int, 'all' or one label per image, got {classes!r}")
        return torch.tensor([i % num_classes for i in indices])
    if isinstance(classes, int):
        if not 0 <= classes < num_classes:
            raise ValueError(f"class label {classes} is outside 0..{num_classes - 1}")
        return torch.full((len(indices),), classes)
    labels = torch.as_tensor(classes)
    if labels.shape != (len(indices),):
        raise ValueError(f"expected {len(indices)} class labels, got shape {tuple(labels.shape)}")
    return labels


# ------------------------------------------------------------------------------------------- the loop

def pipeline_for(unet, scheduler, device=None, task: str = "generate", sr_factor: int = 1) -> DiffunetPipeline:
    """The pipeline that runs the loop (``DiffunetPipeline.__call__``) for ``task``, on ``device`` if given (the
    U-Net is moved there), without its per-step progress bar: ``generate_batches`` counts images."""
    pipe = DiffunetPipeline(unet=unet, scheduler=scheduler, task=task, sr_factor=sr_factor)
    pipe.set_progress_bar_config(disable=True)
    return pipe if device is None else pipe.to(device)


def generate_batches(unet, scheduler, indices: Sequence[int], *, steps: int = SampleConfig.steps,
                     seed: int = SampleConfig.seed, classes=None, guidance_scale: float = SampleConfig.guidance_scale,
                     eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size, device=None,
                     progress: bool = False, image=None, mask_image=None, task: str = "generate",
                     sr_factor: int = 1) -> Iterator[tuple[list[int], torch.Tensor | None, torch.Tensor]]:
    """Yield (indices, labels, images) batch by batch for any list of image indices (or keys that
    ``image_generator`` takes); see ``generate``. ``image`` / ``mask_image``: image conditions, one per index
    (sliced with the batches)."""
    pipe = pipeline_for(unet, scheduler, device, task, sr_factor)
    indices = list(indices)
    all_labels = class_labels_for(classes, indices, unet.config.num_classes)
    with tqdm(total=len(indices), unit="img", disable=not progress, desc="sampling") as bar:
        for lo in range(0, len(indices), batch_size):
            idx, part = indices[lo:lo + batch_size], slice(lo, lo + batch_size)
            labels = None if all_labels is None else all_labels[part]
            images = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps,
                          generator=[image_generator(seed, i) for i in idx], eta=eta,
                          image=None if image is None else image[part],
                          mask_image=None if mask_image is None else mask_image[part],
                          output_type="latent").images
            yield idx, labels, images.clamp(-1, 1).cpu()
            bar.update(len(idx))


def generate(unet, scheduler, num_images: int, *, steps: int = SampleConfig.steps, seed: int = SampleConfig.seed,
             start_index: int = 0, class_labels=None, guidance_scale: float = SampleConfig.guidance_scale,
             eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size, device=None,
             progress: bool = False, image=None, mask_image=None, task: str = "generate",
             sr_factor: int = 1) -> torch.Tensor:
    """``num_images`` samples in [-1, 1], shape (N, C, H, W) float32 on the CPU: images start_index ..
    start_index + N - 1, each from its own generator seeded by (seed, index), so the result depends on neither
    the batch size nor the number of processes (up to float rounding, ~1e-6: batched kernels may sum in
    another order). ``class_labels``: None, an int, "all" (balanced) or one label per
    image; ``guidance_scale`` 1.0 is the conditional model, 0.0 the unconditional, other values classifier-free
    guidance. ``eta`` is DDIM's noise (other schedulers ignore it). ``image`` / ``mask_image``: image conditions,
    one per image in [0, 1], for the pipeline's ``task`` (and ``sr_factor``) or RePaint. The U-Net runs in its
    own dtype and device (or ``device``).
    Every batch is one call of ``DiffunetPipeline``, given one generator per image."""
    batches = generate_batches(unet, scheduler, range(start_index, start_index + num_images), steps=steps,
                               seed=seed, classes=class_labels, guidance_scale=guidance_scale, eta=eta,
                               batch_size=batch_size, device=device, progress=progress, image=image,
                               mask_image=mask_image, task=task, sr_factor=sr_factor)
    return torch.cat([images for _, _, images in batches])


# ------------------------------------------------------------------------------------------- sample.py

def load_for_processes(model: str | Path, dtype: str, device: str | None, *, scheduler: str | None = None,
                       steps: int | None = None, guidance_scale: float | None = None,
                       prediction_type: str | None = None, objective: str | None = None):
    """(accelerate's process state, unet on this process's device in the ``dtype`` asked for, scheduler, the
    sampling settings): what every sampling run of ``sample.py`` starts with, under ``accelerate launch`` or
    alone. The settings (``scheduler``, ``steps``, ``guidance_scale``) are each as given, else as the run that
    wrote the folder sampled (``checkpoint.sample_settings``); the main process says in one line which it uses."""
    from accelerate import PartialState

    # accelerate sets up multi-process CPU runs (gloo) only when told cpu=True; on a GPU machine that would
    # force the CPU, so ask for it only where there is no GPU or the CPU is requested
    no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    state = PartialState(cpu=str(device).startswith("cpu") or (device is None and no_gpu))
    where = torch.device(device) if device else state.device
    name = resolve_precision(dtype, where, what="--dtype", warn=print if state.is_main_process else lambda _: None)
    if dtype == "auto" and state.is_main_process:
        print(f"--dtype {dtype}: {name} on {describe_device(where)}")
    given = dict(scheduler=scheduler, steps=steps, guidance_scale=guidance_scale)
    saved = sample_settings(model)
    settings = {key: saved.get(key, SAMPLE_SETTINGS[key]) if value is None else value for key, value in given.items()}
    unet, sched = load_model(model, settings["scheduler"], prediction_type, precision(name, "dtype")[1], objective)
    if sched is not None and state.is_main_process:
        print(describe_settings(model, sched, settings, given, saved, guided=not is_segmentation(model)))
    return state, unet.to(where), sched, settings


def describe_settings(model, sched, settings: dict, given: dict, saved: dict, guided: bool = True) -> str:
    """One line: the scheduler (by name and class), steps and (where the model takes it) guidance a sampling run
    uses, and where each that was not ``given`` comes from: the run that wrote ``model`` (``saved``), or the
    defaults where the folder records none."""
    name = sampler_name(settings["scheduler"], sched.config) if settings["scheduler"] != "repaint" else "repaint"
    shown = ["scheduler", "steps"] + (["guidance_scale"] if guided else [])
    line = (f"sampling with {name} ({type(sched).__name__}), {settings['steps']} steps"
            + (f", guidance {settings['guidance_scale']:g}" if guided else ""))
    sources = {"the run's sample.* in " + str(pipeline_index(model) or Path(model) / "config.json"):
               [key for key in shown if given[key] is None and key in saved],
               "defaults, the folder records none": [key for key in shown if given[key] is None and key not in saved]}
    said = [f"{', '.join('--' + key.replace('_', '-') for key in keys)}: {where}" for where, keys in sources.items()
            if keys]
    return f"{line} ({'; '.join(said)})" if said else line


def sample_to_folder(model: str | Path, out: str | Path, num_images: int = SampleConfig.num_images, *,
                     scheduler: str | None = None, steps: int | None = None,
                     eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size,
                     seed: int = SampleConfig.seed, start_index: int = 0, classes=None,
                     guidance_scale: float | None = None, dtype: str = SampleConfig.dtype,
                     device: str | None = None, prediction_type: str | None = None, objective: str | None = None,
                     npz: str | None = None, grid: bool = True, progress: bool = True) -> Path:
    """Images start_index .. start_index + num_images - 1 of ``model`` (see ``load_model``) as ``out/000042.png``,
    plus ``out/grid.png`` and, with ``npz``, an .npz (path relative to ``out``) of the range: ``images``
    (N, H, W, C) uint8, ``indices`` and, for class-conditional models, ``labels``.

    Indices whose file exists are skipped, so an interrupted run resumes without duplicates or gaps. Under
    ``accelerate launch`` the missing indices are split into contiguous, disjoint chunks, one per process.
    A class-conditional model with ``classes=None`` samples a balanced set ("all"). ``scheduler``, ``steps`` and
    ``guidance_scale`` left at None sample as the run did (``load_for_processes``); ``objective`` and
    ``prediction_type`` say what a bare model folder that records no scheduler predicts (``load_model``)."""
    state, unet, sched, settings = load_for_processes(model, dtype, device, scheduler=scheduler, steps=steps,
                                                      guidance_scale=guidance_scale,
                                                      prediction_type=prediction_type, objective=objective)
    steps, guidance_scale = settings["steps"], settings["guidance_scale"]
    options = pipeline_options(model)
    if classes is None and unet.config.num_classes:
        classes = "all"
    out, channels = Path(out), unet.config.in_channels
    out.mkdir(parents=True, exist_ok=True)
    wanted = range(start_index, start_index + num_images)
    todo = [i for i in wanted if not image_path(out, i, channels).exists()]
    state.wait_for_everyone()                                   # every process lists the folder before any writes
    with state.split_between_processes(todo) as mine:
        for idx, _, images in generate_batches(unet, sched, mine, steps=steps, seed=seed, classes=classes,
                                               guidance_scale=guidance_scale, eta=eta, batch_size=batch_size,
                                               progress=progress and state.is_local_main_process, **options):
            for i, image in zip(idx, to_uint8(images)):
                write_image(image, image_path(out, i, channels))
    state.wait_for_everyone()
    if state.is_main_process:
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
        print(f"{len(todo)} images written by {state.num_processes} process(es), "
              f"{num_images - len(todo)} already there: {out}")
    return out


# ------------------------------------------------------------------------------------------- sample.py --cond
# A condition file's key is its path relative to the folder without suffix ("a/x" for cond/a/x.jpg), as
# data.pair_files pairs files: it names the outputs (out/a/x.png) and seeds them, so an output never depends on
# which other files exist.

def conditions(cond: str | Path, mask: str | Path | None = None) -> list[tuple[str, Path, Path | None]]:
    """(key, condition file, its mask file or None) of every image under ``cond``, in key order; a file of
    either folder without its partner, or two files of one key (x.png and x.jpg), is one DataError naming it."""
    cond = Path(cond)
    for folder in (cond, mask):
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{folder} is not a folder")
    # without masks the folder is paired with itself: its files by key, two files of one key still refused
    pairs, lone_conds, lone_masks = pair_files(cond, cond if mask is None else mask)
    for lone, other in ((lone_conds, mask), (lone_masks, cond)):
        if lone:
            more = f" ({len(lone) - 1} more files lack one too)" if len(lone) > 1 else ""
            raise DataError(f"{lone[0]} has no file of the same relative path and stem under {other}{more}")
    if not pairs:
        raise no_images(cond)
    return [(c.relative_to(cond).with_suffix("").as_posix(), c, None if mask is None else m) for c, m in pairs]


def output_names(key: str, n: int, suffix: str) -> list[str]:
    """The files of condition ``key`` under ``out``: ``a/x.png``; for n > 1 ``a/x_0.png`` .. ``a/x_{n-1}.png``,
    then ``a/x_mean.png`` and ``a/x_std.png``."""
    if n == 1:
        return [key + suffix]
    return [f"{key}_{k}{suffix}" for k in range(n)] + [f"{key}_mean{suffix}", f"{key}_std{suffix}"]


def read_condition(pipe: DiffunetPipeline, cond: Path, mask: Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One condition as ``generate_batches`` takes it: the image (1, C, H, W) in [0, 1] at the model's size and
    the mask (1, 1, H, W) in {0, 1}. The pipeline checks them, on this file alone, so that its errors (another
    aspect ratio, a mask the model takes none of ...) and warnings (another size: resized) name the file."""
    def tensor(arr: np.ndarray) -> torch.Tensor:                      # (H, W, C) -> (1, C, H, W)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]

    array = load_image(cond)
    image = tensor(match_channels(array, pipe.unet.config.in_channels, str(cond)))
    fill = None if mask is None else tensor(read_mask(mask, array, str(cond)))
    where = cond if mask is None else f"{cond} (mask {mask})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            known, fill = pipe.known_pixels(image, fill, 1, torch.device("cpu"))   # [-1, 1], as fitted
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    for w in caught:
        warnings.warn(f"{where}: {w.message}", w.category, stacklevel=2)
    # super-resolution takes its input at the low size or the model's: the model's, so any mix stacks in a batch
    return (upsample_condition(known, pipe.unet.image_size) + 1) / 2, fill


def read_batch(pipe: DiffunetPipeline, items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The conditions of a batch of (key, cond, mask) items, stacked: (B, C, H, W) and (B, 1, H, W) or None;
    each file read once. Warnings were shown when the files were first checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = {item[1]: read_condition(pipe, item[1], item[2]) for item in items}
    image = torch.cat([read[c][0] for _, c, _ in items])
    return image, None if items[0][2] is None else torch.cat([read[c][1] for _, c, _ in items])


def write_mean_std(out: Path, names: list[str]) -> None:
    """The per-pixel mean and std of the outputs ``names[:-2]`` as uint8 images ``names[-2:]``: the mean as an
    image, the (population) standard deviation doubled, 2 * std * 255 in [0, 1] units: 0 where the outputs agree,
    255 at the largest spread a pixel can have (half its outputs black, half white); a uniform one shows 147."""
    stack = np.stack([read_image(out / name) for name in names[:-2]]).astype(np.float64)
    write_image(np.round(stack.mean(0)).astype(np.uint8), out / names[-2])
    write_image(np.clip(np.round(2 * stack.std(0)), 0, 255).astype(np.uint8), out / names[-1])


def condition_grid(pipe: DiffunetPipeline, items: list, outputs: list[Path], path: Path) -> Path:
    """``items``' conditions, masks (where given) and ``outputs``, one row each, one column per condition."""
    channels = pipe.unet.config.in_channels
    image, fill = read_batch(pipe, items)
    rows = [to_uint8(image * 2 - 1)]                                    # (N, C, H, W) [0, 1] -> (N, H, W, C) uint8
    if fill is not None:
        rows.append(to_uint8(fill.expand(-1, channels, -1, -1) * 2 - 1))
    rows.append(np.stack([read_image(p) for p in outputs]))
    return save_grid(np.concatenate(rows), path, nrow=len(items))


def sample_conditioned(model: str | Path, cond: str | Path, out: str | Path, *, mask: str | Path | None = None,
                       num_per_cond: int = 1, scheduler: str | None = None, steps: int | None = None,
                       eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size,
                       seed: int = SampleConfig.seed, classes=None, guidance_scale: float | None = None,
                       dtype: str = SampleConfig.dtype, device: str | None = None, prediction_type: str | None = None,
                       objective: str | None = None, grid: bool = True, progress: bool = True) -> Path:
    """``num_per_cond`` outputs of ``model`` (see ``load_model``) for every image file under ``cond`` (any
    depth), each the condition of the model's task (``checkpoint.pipeline_options``: the low-resolution input of
    super-resolution, the image to complete of inpainting, or of any epsilon model with ``scheduler="repaint"``),
    with the file of the same relative path and stem under ``mask`` (white: to fill) where a mask is taken.
    Images are converted to the model's channel count; another size is resized with a warning.

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
    steps, guidance_scale = settings["steps"], settings["guidance_scale"]
    options = pipeline_options(model)
    pipe = pipeline_for(unet, sched, **options)
    task = pipe.image_task
    if mask is None and (isinstance(sched, RePaintScheduler) or (task is not None and task.takes_mask)):
        raise ValueError(f"this {options['task']} pipeline{' with RePaint' if task is None else ''} fills masks: "
                         f"pass --mask DIR, one mask per condition (same relative path and stem; white = to fill)")
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
        for _, path, mask_path in items:
            read_condition(pipe, path, mask_path)
    if caught and state.is_main_process:                    # files of another size: said once, with the count
        resized = [w for w in caught if issubclass(w.category, ResizeWarning)]
        for w in caught:
            if w not in resized:
                warnings.warn(str(w.message), w.category, stacklevel=2)
        if resized:
            more = f" ({len(resized) - 1} more of the {len(items)} files too)" if len(resized) > 1 else ""
            warnings.warn(f"{resized[0].message}{more}", ResizeWarning, stacklevel=2)

    todo = [(i, k) for i, (key, _, _) in enumerate(items) for k in range(num_per_cond)
            if not (out / names[key][k]).exists()]
    state.wait_for_everyone()                                   # every process lists the folder before any writes
    with state.split_between_processes(todo) as mine:
        show = progress and state.is_local_main_process
        with tqdm(total=len(mine), unit="img", disable=not show, desc="sampling") as bar:
            for lo in range(0, len(mine), batch_size):
                batch = mine[lo:lo + batch_size]                        # (condition index, k) pairs
                image, fill = read_batch(pipe, [items[i] for i, _ in batch])
                keys = [(zlib.crc32(items[i][0].encode()), k) for i, k in batch]
                for _, _, images in generate_batches(unet, sched, keys, steps=steps, seed=seed, classes=classes,
                                                     guidance_scale=guidance_scale, eta=eta, batch_size=len(batch),
                                                     image=image, mask_image=fill, **options):
                    for (i, k), x in zip(batch, to_uint8(images)):
                        path = out / names[items[i][0]][k]
                        path.parent.mkdir(parents=True, exist_ok=True)
                        write_image(x, path)
                bar.update(len(batch))
    state.wait_for_everyone()
    if state.is_main_process:
        if num_per_cond > 1:
            redone = {items[i][0] for i, _ in todo}
            for key, _, _ in items:
                if key in redone or not all((out / name).exists() for name in names[key][-2:]):
                    write_mean_std(out, names[key])
        if grid:
            shown = items[:GRID_COLUMNS]
            condition_grid(pipe, shown, [out / names[key][0] for key, _, _ in shown], out / "grid.png")
        print(f"{len(todo)} images written by {state.num_processes} process(es), "
              f"{len(items) * num_per_cond - len(todo)} already there: {out}")
    return out
