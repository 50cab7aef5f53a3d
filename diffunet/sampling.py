"""Sampling: diffusers schedulers by name, reproducible sets of samples, the setup of a sampling run and the
conditions it reads. The loop itself is ``DiffunetPipeline.__call__`` (``diffunet.model.pipeline``): every
function here calls it, batch by batch, with one generator per image. The folders ``sample.py`` writes are
``diffunet.sample_folders`` (their image files and grids are written and read by ``diffunet.data``).

Reproducibility rests on one rule: image i is drawn from its own ``torch.Generator``, seeded from (seed, i), for
its initial noise and for every noise draw of the scheduler. The images therefore do not depend on the batch
size, the number of processes, or which indices were already on disk, and a set can be extended later
(``start_index``) or an interrupted run resumed (indices whose file exists are skipped). Conditioned runs
(``sample_folders.sample_conditioned``) seed output k of a condition file from (seed, crc32 of its relative path,
k) instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .pretrained import (SAMPLE_SETTINGS, CheckpointError, is_segmentation, load_model_folder, pipeline_index,
                         sample_settings)
from .config import DiffusionConfig, SampleConfig
from .data import DataError, load_image, match_channels, no_images, pair_files, read_mask
from .training.precision import describe_device, precision, resolve_precision
from .objectives import SAMPLERS, make_noise_scheduler, make_sampler, objective_of, sampler_name
from .model.pipeline import DiffunetPipeline, upsample_condition

# Every name sample.scheduler takes: "auto" (the model's objective's default, objectives.OBJECTIVES), the
# objectives' samplers, then those that inpaint (``Sampler.needs_mask``: sample.py --cond --mask)
SCHEDULERS = {"auto": None, **{n: s for n, s in SAMPLERS.items() if not s.needs_mask},
              **{n: s for n, s in SAMPLERS.items() if s.needs_mask}}


def make_scheduler(name: str, config) -> object:
    """A sampling scheduler ``name`` (``SCHEDULERS``: one that fits the model's objective, "auto", or "repaint" for
    a ddpm model: every name is an entry of ``objectives.OBJECTIVES``) built from the training scheduler's
    ``config`` (same noise levels and target): ``objectives.make_sampler``."""
    return make_sampler(name, config)


def load_model(path: str | Path, scheduler: str = SampleConfig.scheduler, prediction_type: str | None = None,
               dtype: torch.dtype = torch.float32, objective: str | None = None):
    """(unet, scheduler) from a pipeline folder written by ``train.py`` (``model_index.json``, ``unet/``,
    ``scheduler/``; whichever pipeline class it names: ``DiffunetPipeline``, or ``DDPMPipeline`` in older runs)
    or from a bare ``UNet.save_pretrained`` folder, by the training scheduler it records
    (``pretrained.recorded_scheduler``). A folder that records none cannot say what its model predicts: it is
    refused (CheckpointError) unless ``objective`` ("ddpm", "flow", "edm") or ``prediction_type`` (a DDPM target)
    says, which then take the schema's defaults of ``diffusion.*`` for the rest. ``prediction_type`` also
    overrides a recorded target. A model without time (deterministic segmentation) gets no scheduler (None).
    A folder that cannot be used is one ``CheckpointError`` line naming the file
    (``pretrained.load_model_folder``). The pipeline's own keywords (``task``, ``sr_factor``: which image
    condition the model takes) are ``pretrained.pipeline_options(path)``, for ``generate_batches`` /
    ``generate``; how its run sampled, ``pretrained.sample_settings(path)``."""
    unet, train_config = load_model_folder(path, dtype)
    if not unet.timed:
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

def pipeline_for(unet, scheduler, device=None, task: str = "generate", sr_factor: int = 1,
                 intensity: list | None = None, sr_factors: list | None = None) -> DiffunetPipeline:
    """The pipeline that runs the loop (``DiffunetPipeline.__call__``) for ``task``, on ``device`` if given (the
    U-Net is moved there), without its per-step progress bar: ``pipe_batches`` counts images."""
    pipe = DiffunetPipeline(unet=unet, scheduler=scheduler, task=task, sr_factor=sr_factor, intensity=intensity,
                            sr_factors=sr_factors)
    pipe.set_progress_bar_config(disable=True)
    return pipe if device is None else pipe.to(device)


def pipe_batches(pipe: DiffunetPipeline, indices: Sequence, *, seed: int = SampleConfig.seed, classes=None,
                 guidance_scale: float = SampleConfig.guidance_scale, steps: int = SampleConfig.steps,
                 eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size, device=None,
                 progress: bool = False, image=None, mask_image=None, **tiles
                 ) -> Iterator[tuple[list, torch.Tensor | None, torch.Tensor]]:
    """Yield (indices, labels, images) batch by batch from ``pipe`` (any ``DiffunetPipeline``, built with its
    task and sr_factor; its per-step progress bar is turned off, and with ``device`` it is moved there) for any
    list of image indices (or keys that ``image_generator`` takes); see ``sample_with``. ``image`` /
    ``mask_image``: image conditions, one per index (sliced with the batches); ``tiles``: the pipeline's
    ``tile`` / ``overlap`` for conditions of any size."""
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe = pipe.to(device)
    indices = list(indices)
    all_labels = class_labels_for(classes, indices, pipe.unet.config.num_classes)
    with tqdm(total=len(indices), unit="img", disable=not progress, desc="sampling") as bar:
        for lo in range(0, len(indices), batch_size):
            idx, part = indices[lo:lo + batch_size], slice(lo, lo + batch_size)
            labels = None if all_labels is None else all_labels[part]
            images = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps,
                          generator=[image_generator(seed, i) for i in idx], eta=eta,
                          image=None if image is None else image[part],
                          mask_image=None if mask_image is None else mask_image[part],
                          output_type="latent", **tiles).images
            yield idx, labels, images.clamp(-1, 1).cpu()
            bar.update(len(idx))


def sample_with(pipe: DiffunetPipeline, num_images: int, *, start_index: int = 0, class_labels=None,
                **keywords) -> torch.Tensor:
    """``num_images`` samples of ``pipe`` in [-1, 1], shape (N, C, H, W) float32 on the CPU: images start_index ..
    start_index + N - 1, each from its own generator seeded by (seed, index), so the result depends on neither
    the batch size nor the number of processes (up to float rounding, ~1e-6: batched kernels may sum in
    another order). ``class_labels`` as ``generate``'s (``pipe_batches``' ``classes``); ``keywords``: the
    others of ``pipe_batches`` (``seed``, ``guidance_scale``, ``steps``, ``eta``, ``batch_size``, ``device``,
    ``progress``, ``image``, ``mask_image``)."""
    batches = pipe_batches(pipe, range(start_index, start_index + num_images), classes=class_labels, **keywords)
    return torch.cat([images for _, _, images in batches])


def generate_batches(unet, scheduler, indices: Sequence[int], *, steps: int = SampleConfig.steps,
                     seed: int = SampleConfig.seed, classes=None, guidance_scale: float = SampleConfig.guidance_scale,
                     eta: float = SampleConfig.eta, batch_size: int = SampleConfig.batch_size, device=None,
                     progress: bool = False, image=None, mask_image=None, task: str = "generate",
                     sr_factor: int = 1) -> Iterator[tuple[list[int], torch.Tensor | None, torch.Tensor]]:
    """``pipe_batches`` of the pipeline of ``unet`` and ``scheduler`` for ``task`` (``pipeline_for``)."""
    yield from pipe_batches(pipeline_for(unet, scheduler, device, task, sr_factor), indices, seed=seed,
                            classes=classes, guidance_scale=guidance_scale, steps=steps, eta=eta,
                            batch_size=batch_size, progress=progress, image=image, mask_image=mask_image)


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
    Every batch is one call of ``DiffunetPipeline``, given one generator per image: ``sample_with`` of the
    pipeline ``pipeline_for`` builds."""
    return sample_with(pipeline_for(unet, scheduler, device, task, sr_factor), num_images, start_index=start_index,
                       steps=steps, seed=seed, class_labels=class_labels, guidance_scale=guidance_scale, eta=eta,
                       batch_size=batch_size, progress=progress, image=image, mask_image=mask_image)


# ------------------------------------------------------------------------------------------- a run's setup

def load_for_processes(model: str | Path, dtype: str, device: str | None, *, scheduler: str | None = None,
                       steps: int | None = None, guidance_scale: float | None = None,
                       prediction_type: str | None = None, objective: str | None = None):
    """(accelerate's process state, unet on this process's device in the ``dtype`` asked for, scheduler, the
    sampling settings): what every sampling run of ``sample.py`` starts with, under ``accelerate launch`` or
    alone. The settings (``scheduler``, ``steps``, ``guidance_scale``) are each as given, else as the run that
    wrote the folder sampled (``pretrained.sample_settings``); the main process says in one line which it uses."""
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
    name = sampler_name(settings["scheduler"], sched.config)
    shown = ["scheduler", "steps"] + (["guidance_scale"] if guided else [])
    line = (f"sampling with {name} ({type(sched).__name__}), {settings['steps']} steps"
            + (f", guidance {settings['guidance_scale']:g}" if guided else ""))
    sources = {"the run's sample.* in " + str(pipeline_index(model) or Path(model) / "config.json"):
               [key for key in shown if given[key] is None and key in saved],
               "defaults, the folder records none": [key for key in shown if given[key] is None and key not in saved]}
    said = [f"{', '.join('--' + key.replace('_', '-') for key in keys)}: {where}" for where, keys in sources.items()
            if keys]
    return f"{line} ({'; '.join(said)})" if said else line


# ------------------------------------------------------------------------------------------- conditions
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


def read_condition(pipe: DiffunetPipeline, cond: Path, mask: Path | None, any_size: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One condition as ``pipe_batches`` takes it: the image (1, C, H, W) in [0, 1] at the model's size (with
    ``any_size``, for sampling by tiles: at its own) and the mask (1, 1, H, W) in {0, 1}. The pipeline checks them,
    on this file alone, so that its errors (another aspect ratio, a mask the model takes none of ...) and warnings
    (another size: resized) name the file."""
    def tensor(arr: np.ndarray) -> torch.Tensor:                      # (H, W, C) -> (1, C, H, W)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]

    array = load_image(cond)
    image = tensor(match_channels(array, pipe.unet.config.in_channels, str(cond)))
    fill = None if mask is None else tensor(read_mask(mask, array, str(cond)))
    where = cond if mask is None else f"{cond} (mask {mask})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            known, fill = pipe.known_pixels(image, fill, 1, torch.device("cpu"), any_size)  # [-1, 1], as fitted
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    for w in caught:
        warnings.warn(f"{where}: {w.message}", w.category, stacklevel=2)
    if any_size:
        return (known + 1) / 2, fill
    # super-resolution takes its input at the low size or the model's: the model's, so any mix stacks in a batch
    return (upsample_condition(known, pipe.unet.image_size) + 1) / 2, fill


def read_batch(pipe: DiffunetPipeline, items: list, any_size: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The conditions of a batch of (key, cond, mask) items (of one size), stacked: (B, C, H, W) and (B, 1, H, W)
    or None; each file read once. Warnings were shown when the files were first checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = {item[1]: read_condition(pipe, item[1], item[2], any_size) for item in items}
    image = torch.cat([read[c][0] for _, c, _ in items])
    return image, None if items[0][2] is None else torch.cat([read[c][1] for _, c, _ in items])


def same_size_batches(mine: list, size_of: Callable, batch_size: int) -> Iterator[list]:
    """``mine`` in order, cut into batches of up to ``batch_size`` items whose ``size_of(item)`` is the same
    (conditions sampled by tiles keep their own sizes, and one batch is one tensor)."""
    batch = []
    for item in mine:
        if batch and (len(batch) == batch_size or size_of(item) != size_of(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch
