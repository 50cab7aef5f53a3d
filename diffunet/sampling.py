"""Sampling: diffusers schedulers by name, reproducible sets of samples, and sample folders (their image files and
grids are written and read by ``diffunet.data``). The loop itself is ``DiffunetPipeline.__call__``
(``diffunet.pipeline``): every function here calls it, batch by batch, with one generator per image.

Reproducibility rests on one rule: image i is drawn from its own ``torch.Generator``, seeded from (seed, i), for
its initial noise and for every noise draw of the scheduler. The images therefore do not depend on the batch
size, the number of processes, or which indices were already on disk, and a set can be extended later
(``start_index``) or an interrupted run resumed (indices whose file exists are skipped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, RePaintScheduler, UniPCMultistepScheduler)
from tqdm.auto import tqdm

from .checkpoint import load_model_folder, pipeline_options
from .config import SampleConfig
from .data import image_path, read_image, save_grid, to_uint8, write_image
from .fast import describe_device, precision, resolve_precision
from .pipeline import DiffunetPipeline
from .tables import choose

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,                  # deterministic at eta=0 (the default); eta=1 is DDPM-like
    "dpmpp": DPMSolverMultistepScheduler,   # DPM-Solver++(2M)
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,          # two model calls per step
    "unipc": UniPCMultistepScheduler,
}
# Schedulers that need an image and a mask (``sample.py --cond --mask``): training-free inpainting with any
# epsilon-predicting model, unconditional or class-conditional (Lugmayr et al. 2022)
INPAINTING_SCHEDULERS = {"repaint": RePaintScheduler}

GRID_MAX = 100                                          # images shown in grid.png


def make_scheduler(name: str, config) -> object:
    """A sampling scheduler ``name`` (``SCHEDULERS``, ``INPAINTING_SCHEDULERS``) built from the training
    scheduler's ``config`` (same betas and target)."""
    return choose({**SCHEDULERS, **INPAINTING_SCHEDULERS}, name, "scheduler").from_config(config)


def load_model(path: str | Path, scheduler: str = SampleConfig.scheduler, prediction_type: str | None = None,
               dtype: torch.dtype = torch.float32):
    """(unet, scheduler) from a pipeline folder written by ``train.py`` (``model_index.json``, ``unet/``,
    ``scheduler/``; whichever pipeline class it names: ``DiffunetPipeline``, or ``DDPMPipeline`` in older runs)
    or from a bare ``UNet.save_pretrained`` folder, whose training scheduler is then taken to be
    ``DDPMScheduler()`` (1000 steps, linear betas) with target ``prediction_type`` (default "epsilon"). A folder
    that cannot be used is one ``CheckpointError`` line naming the file (``checkpoint.load_model_folder``).
    The pipeline's own keywords (``task``, ``sr_factor``: which image condition the model takes) are
    ``checkpoint.pipeline_options(path)``, for ``generate_batches`` / ``generate``."""
    unet, train_config = load_model_folder(path, dtype)
    train_config = dict(train_config if train_config is not None else DDPMScheduler().config)
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

def load_for_processes(model: str | Path, scheduler: str, prediction_type: str | None, dtype: str,
                       device: str | None):
    """(accelerate's process state, unet on this process's device in the ``dtype`` asked for, scheduler): what
    every sampling run of ``sample.py`` starts with, under ``accelerate launch`` or alone."""
    from accelerate import PartialState

    # accelerate sets up multi-process CPU runs (gloo) only when told cpu=True; on a GPU machine that would
    # force the CPU, so ask for it only where there is no GPU or the CPU is requested
    no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    state = PartialState(cpu=str(device).startswith("cpu") or (device is None and no_gpu))
    where = torch.device(device) if device else state.device
    name = resolve_precision(dtype, where, what="--dtype", warn=print if state.is_main_process else lambda _: None)
    if dtype == "auto" and state.is_main_process:
        print(f"--dtype {dtype}: {name} on {describe_device(where)}")
    unet, sched = load_model(model, scheduler, prediction_type, precision(name, "dtype")[1])
    return state, unet.to(where), sched


def sample_to_folder(model: str | Path, out: str | Path, num_images: int, *, scheduler: str = SampleConfig.scheduler,
                     steps: int = SampleConfig.steps, eta: float = SampleConfig.eta,
                     batch_size: int = SampleConfig.batch_size, seed: int = SampleConfig.seed, start_index: int = 0,
                     classes=None, guidance_scale: float = SampleConfig.guidance_scale,
                     dtype: str = SampleConfig.dtype, device: str | None = None, prediction_type: str | None = None,
                     npz: str | None = None, grid: bool = True, progress: bool = True) -> Path:
    """Images start_index .. start_index + num_images - 1 of ``model`` (see ``load_model``) as ``out/000042.png``,
    plus ``out/grid.png`` and, with ``npz``, an .npz (path relative to ``out``) of the range: ``images``
    (N, H, W, C) uint8, ``indices`` and, for class-conditional models, ``labels``.

    Indices whose file exists are skipped, so an interrupted run resumes without duplicates or gaps. Under
    ``accelerate launch`` the missing indices are split into contiguous, disjoint chunks, one per process.
    A class-conditional model with ``classes=None`` samples a balanced set ("all")."""
    state, unet, sched = load_for_processes(model, scheduler, prediction_type, dtype, device)
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
