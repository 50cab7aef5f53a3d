"""Everything a run saves and loads: checkpoints (model, optimizer, schedule, EMA, every process's RNG, the
trainer's counters), finding the one to resume from, and reading a model or pipeline folder without running code
from it (``load_model_folder``; writing one is ``diffunet.export``).

Checkpoint folders are never half-written: a temporary folder, fsync, a sha256 manifest, an atomic rename.

A folder ``step_XXXXXX`` under ``<run>/checkpoints`` exists only once complete; its ``manifest.json`` (written
last, inside the temporary folder) lists every file's size and sha256, so a file damaged later is detected by
``verify`` and the checkpoint skipped in favour of the previous good one. Old checkpoints are rotated only after
the new one is in place.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import diffusers
import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from .config import ConfigError
from .pipeline import IMAGE_TASKS, DiffunetPipeline
from .unet import UNet

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")

# What a resumed run must share with the checkpoint for its data order and RNG streams to continue exactly.
EXACT_RESUME_KEYS = ("world_size", "batch_size", "grad_accum", "seed", "dataset_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f".step_{step:06d}.tmp"


def seal(tmp: Path, final: Path) -> Path:
    """Fsync every file of ``tmp``, write the manifest, and rename it to ``final`` atomically.

    If ``final`` exists (the same step saved before, as when a run stops on bad steps right after saving), it
    holds the same weights and is kept.
    """
    if final.exists():
        shutil.rmtree(tmp)
        return final
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {}
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        manifest[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"complete": True, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in {p.parent for p in files} | {tmp}:
        _fsync_dir(d)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def verify(path: Path) -> None:
    """Raise CheckpointError unless every file in ``path``'s manifest is there with its size and sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST} (incomplete or not a checkpoint)") from None
    for name, want in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != want["bytes"] or _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupted (checksum mismatch)")


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every sealed checkpoint under ``root``, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return sorted(found)


def latest_valid(root: Path, warn=print) -> Path | None:
    """The newest checkpoint that passes ``verify``; damaged ones are named through ``warn`` and skipped."""
    for _, path in reversed(complete_steps(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"skipping damaged checkpoint: {e}")
    return None


def rotate(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest sealed checkpoints, and leftovers of interrupted saves."""
    for _, path in complete_steps(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in Path(root).glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------------------------------------ RNG state
# Every process's RNG state, gathered to the main process and written there as safetensors + JSON: one writer,
# and nothing a load could execute. (accelerate's save_state writes a pickle per process, from each process.)

def rng_state() -> dict:
    """This process's python, numpy, torch (and CUDA) RNG states, as tensors and plain numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "meta": {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                      "python": [version, list(internal), gauss_next]}}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def save_rng(folder: Path, states: list[dict]) -> None:
    """Write the states of all processes (index = process rank) into ``folder``."""
    tensors, meta = {}, {}
    for rank, state in enumerate(states):
        meta[str(rank)] = state["meta"]
        tensors.update({f"{rank}.{k}": v.contiguous() for k, v in state.items() if k != "meta"})
    save_file(tensors, Path(folder) / "rng.safetensors")
    (Path(folder) / "rng.json").write_text(json.dumps(meta))


def load_rng(folder: Path, rank: int) -> bool:
    """Restore process ``rank``'s RNG states from ``folder``; False if the checkpoint has none for it."""
    meta = json.loads((Path(folder) / "rng.json").read_text()).get(str(rank))
    if meta is None:
        return False
    tensors = load_file(Path(folder) / "rng.safetensors")
    torch.set_rng_state(tensors[f"{rank}.torch"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors[f"{rank}.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[k] for k in sorted(tensors, key=lambda k: int(k.rsplit(".", 1)[1]) if ".cuda." in k else -1)
            if k.startswith(f"{rank}.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


# ------------------------------------------------------------------------------------------ a run's state

def find_resume(resume: str | None, root: Path, warn=print) -> Path | None:
    """The checkpoint ``train.resume`` asks for: None (start fresh, refused over existing checkpoints),
    "latest" (the newest that verifies) or a folder (verified)."""
    existing = complete_steps(root)
    if resume is None:
        if existing:
            raise ConfigError(f"{Path(root).parent} already holds checkpoints (up to step {existing[-1][0]}); "
                              f"pass --resume latest to continue, or choose another output_dir")
        return None
    if resume == "latest":
        found = latest_valid(root, warn=warn)
        if found is None and existing:
            raise CheckpointError(f"every checkpoint under {root} is damaged (see above); refusing to start over "
                                  f"silently: move them away or choose another output_dir")
        return found
    verify(Path(resume))
    return Path(resume)


def save(root: Path, step: int, accelerator, ema, state: dict, keep: int,
         extras: dict | None = None) -> tuple[Path, str | None]:
    """Write the run's full state as checkpoint ``step`` under ``root``, then rotate to the ``keep`` newest.

    Call it on every process: the others send the main process their RNG states, and only it writes (model,
    optimizer and lr schedule through accelerate, EMA and RNG as safetensors + JSON, ``state`` as
    trainer_state.json; each of ``extras``, name -> an object with ``save_to(folder) -> dict``, such as
    ``posthoc_ema.PowerEMA``, writes its files and gives its JSON entry of trainer_state.json, before the seal).
    Returns (folder, None), or (folder, message) if the write failed (a full disk, say):
    the temporary folder is then removed and every earlier checkpoint left as it was.
    """
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    rng = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if not accelerator.is_main_process:
        return final, None
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accelerator.save_state(str(tmp), safe_serialization=True)   # model, optimizer, lr schedule (no collective)
        save_rng(tmp, rng)
        extra = {name: obj.save_to(tmp) for name, obj in (extras or {}).items()}
        (tmp / "trainer_state.json").write_text(json.dumps(dict(state, ema=_save_ema(tmp, ema), **extra), indent=1))
        seal(tmp, final)
        rotate(root, keep)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_valid(root, warn=lambda _: None)
        return final, (f"could not write checkpoint {final.name} ({e}); "
                       f"{f'the last good checkpoint {kept} is intact' if kept else 'no earlier checkpoint exists'}")
    return final, None


def load(path: Path, accelerator, ema, current: dict, allow_inexact: bool, warn=print,
         extras: dict | None = None) -> dict:
    """Restore checkpoint ``path`` into the accelerator's objects, ``ema`` and this process's RNG; returns the
    trainer state saved with it. Refused (CheckpointError) where ``current`` differs from the saved run in an
    ``EXACT_RESUME_KEYS`` entry, unless ``allow_inexact``; refused where a file holds pickled objects. Each of
    ``extras`` (name -> an object with ``load_from(folder, entry)``) is restored from its entry; a checkpoint
    without one, or one it refuses (ValueError), cannot resume this run exactly: CheckpointError."""
    state = json.loads((path / "trainer_state.json").read_text())
    changed = [f"{k} {state[k]} -> {current[k]}" for k in EXACT_RESUME_KEYS if state.get(k) != current[k]]
    if changed:
        message = f"resuming from {path} cannot be exact ({', '.join(changed)}): the data order and RNG differ"
        if not allow_inexact:
            raise CheckpointError(f"{message}; set train.allow_inexact_resume=true to continue anyway")
        warn(f"WARNING: {message}; continuing as train.allow_inexact_resume=true asks")
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: a file holds objects other than plain tensors and "
                              f"numbers, which could run code ({str(e).splitlines()[0]})") from None
    load_rng(path, accelerator.process_index)
    _load_ema(path, ema, state["ema"])
    ema.to(accelerator.device)
    for name, obj in (extras or {}).items():
        if name not in state:
            raise CheckpointError(f"{path} holds no {name} state (its run kept none), so this run cannot resume "
                                  f"from it exactly; turn {name} off to resume it")
        try:
            obj.load_from(path, state[name])
        except ValueError as e:
            raise CheckpointError(f"cannot resume {path} exactly: {e}") from None
    return state


# EMA as safetensors + JSON rather than accelerate's pickled custom state: loading it runs no code.

def _save_ema(folder: Path, ema) -> dict:
    """Write ``ema``'s shadow weights to ``folder``; returns the rest of its state (decay, step counts)."""
    meta = ema.state_dict()
    shadow = {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(meta.pop("shadow_params"))}
    save_file(shadow, Path(folder) / "ema.safetensors")
    return meta


def _load_ema(folder: Path, ema, meta: dict) -> None:
    ema.load_state_dict(dict(meta, shadow_params=_ema_shadow(folder)))


def _ema_shadow(folder: Path) -> list[torch.Tensor]:
    shadow = load_file(Path(folder) / "ema.safetensors")
    return [shadow[f"{i}"] for i in range(len(shadow))]


def load_ema_weights(path: Path, model) -> int:
    """Put checkpoint ``path``'s EMA weights into ``model`` (its buffers from the model itself), verified first;
    returns the checkpoint's step. For exporting a checkpoint: no optimizer, accelerator or RNG involved."""
    verify(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        model.load_state_dict(load_file(path / "model.safetensors"))    # buffers too, then the EMA parameters
        with torch.no_grad():
            for p, ema in zip(model.parameters(), _ema_shadow(path), strict=True):
                p.copy_(ema)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).strip().splitlines()[0]}") from None
    return int(state["step"])


def replace_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """Replace folder ``final`` atomically with what ``write(tmp)`` puts in a temporary folder beside it: a
    reader finds the old folder or the new one, never a mix."""
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ model folders
# What sample.py, the export and a checkpoint import read. Every way such a folder can be unusable is one
# CheckpointError line naming the file; nothing in it is executed: its .py files are never imported (diffusers
# runs them only under trust_remote_code=True) and .bin weights are read with torch.load(weights_only=True).

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not a config")
    return data


# The model classes a folder may hold: ours, or a diffusers UNet2DModel of the DDPM family (converted: convert.py).
MODEL_CLASSES = {UNet.__name__: "diffunet's UNet", "UNet2DModel": "a diffusers UNet2DModel"}


def _check_class(path: Path, config: dict, allowed) -> str:
    """The ``_class_name`` of ``config`` (read from ``path``), one of ``allowed``; CheckpointError otherwise."""
    name = config.get("_class_name")
    if name not in allowed:
        what = f"a {name}" if isinstance(name, str) else "no model class (_class_name)"
        raise CheckpointError(f"{path} describes {what}, not {' or '.join(MODEL_CLASSES[c] for c in allowed)}")
    return name


def _check_unet_config(path: Path, config: dict) -> None:
    """``config.json`` of a ``UNet.save_pretrained`` folder: keys that ``UNet`` takes, an architecture it builds."""
    known = set(inspect.signature(UNet.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise CheckpointError(f"{path} has keys UNet does not take: {', '.join(unknown)} (a foreign config, or one "
                              f"from a newer diffunet)")
    try:
        with torch.device("meta"):                      # the architecture only: no memory, no weights
            UNet.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from None


def _check_weights(folder: Path) -> Path:
    """The weights file of a model folder; .bin ones must be a plain dict of tensors."""
    found = [folder / name for name in WEIGHTS if (folder / name).is_file()]
    if not found:
        raise CheckpointError(f"{folder} has no weights ({' or '.join(WEIGHTS)})")
    if found[0].suffix == ".bin":
        try:
            with warnings.catch_warnings():             # torch's notes on the pickle protocol: not for the user
                warnings.simplefilter("ignore")
                state = torch.load(found[0], map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"cannot load {found[0]}: it is not a file of tensors (a .bin must hold tensors "
                                  f"only: pickled objects are refused, never run); save the model with safetensors"
                                  ) from None
        except Exception as e:                          # not a torch file at all
            raise CheckpointError(f"{found[0]} is not a weights file ({str(e).splitlines()[0]})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{found[0]} is not a state dict of tensors")
    return found[0]


def model_folder(path) -> Path:
    """The folder holding a model's config.json: ``path`` itself, or its ``unet/`` (a pipeline folder)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path / "unet"                            # a pipeline: a missing unet/config.json is named as such
    for folder in (path, path / "unet"):
        if (folder / "config.json").is_file():
            return folder
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    raise CheckpointError(f"{path} holds no model: no config.json there nor in {path / 'unet'}")


def load_unet(path, dtype: torch.dtype = torch.float32, classes=tuple(MODEL_CLASSES)) -> UNet:
    """Our UNet from a model folder (``save_pretrained``), or the ``unet/`` of a pipeline folder, checked file by
    file: ours, or a diffusers UNet2DModel converted by ``convert.from_unet2d``; ``classes`` are the ones allowed."""
    folder = model_folder(path)
    config = _read_json(folder / "config.json")
    name = _check_class(folder / "config.json", config, classes)
    weights = _check_weights(folder)
    if name == "UNet2DModel":
        from diffusers import UNet2DModel

        from .convert import from_unet2d                # convert.py builds on this module: imported when needed
        try:
            return from_unet2d(_from_pretrained(UNet2DModel, folder, weights)).to(dtype)
        except ValueError as e:                         # an option or block our UNet has no switch for
            raise CheckpointError(f"cannot convert {folder}: {e}") from None
    _check_unet_config(folder / "config.json", config)
    return _from_pretrained(UNet, folder, weights, dtype)


def _from_pretrained(cls, folder: Path, weights: Path, dtype: torch.dtype = torch.float32):
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=weights.suffix == ".safetensors")
    except (OSError, RuntimeError, ValueError, KeyError) as e:     # damaged file, missing or misshapen tensors
        first = re.split(r"(?<=\.)\s", str(e).strip().splitlines()[0])[0]   # diffusers appends advice: cut it
        raise CheckpointError(f"cannot load {weights}: {first}") from None


def _check_pipeline_index(path: Path) -> dict:
    """``model_index.json`` of a pipeline folder: a ``unet`` that is diffunet's UNet and a diffusers scheduler."""
    index = _read_json(path)

    def pair(key):                                      # ["library", "Class"], or None
        entry = index.get(key)
        return entry if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry) else None

    def named(entry):
        return ".".join(entry) if entry else "nothing"

    unet, scheduler = pair("unet"), pair("scheduler")
    if not unet or unet[1] not in MODEL_CLASSES:
        raise CheckpointError(f"{path} names {named(unet)} as its unet, not {' or '.join(MODEL_CLASSES.values())}")
    if index.get("scheduler") == [None, None] and _segmentation_index(index):
        return index                                    # a deterministic model: nothing to schedule
    if not (scheduler and scheduler[0] == "diffusers" and scheduler[1].endswith("Scheduler")
            and hasattr(diffusers, scheduler[1])):
        raise CheckpointError(f"{path} names {named(scheduler)} as its scheduler, not one of diffusers' schedulers")
    return index


# What a pipeline folder's model_index.json says of its own pipeline, beside its components: DiffunetPipeline's
# other keywords, whose defaults a folder from before them, or a bare model folder, means. Two kinds: the task's
# (which image condition the model takes) and the run's sampling settings (``sample_*``: what sample.py and a call
# without steps or guidance use).
DEFAULTS = {name: p.default for name, p in inspect.signature(DiffunetPipeline.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}
SAMPLE_PREFIX = "sample_"
PIPELINE_OPTIONS = {k: v for k, v in DEFAULTS.items() if not k.startswith(SAMPLE_PREFIX)}
SAMPLE_SETTINGS = {k.removeprefix(SAMPLE_PREFIX): v for k, v in DEFAULTS.items() if k.startswith(SAMPLE_PREFIX)}


def _segmentation_index(index: dict) -> bool:
    """Whether a ``model_index.json`` names ``DiffunetSegmentationPipeline`` (exported folders: [module, class])."""
    name = index.get("_class_name")
    return (name[-1] if isinstance(name, list) else name) == "DiffunetSegmentationPipeline"


def is_segmentation(path) -> bool:
    """Whether ``path`` is a segmentation pipeline folder (``DiffunetSegmentationPipeline``) or its ``unet/``, or a
    model folder on its own of a U-Net without time (deterministic: it segments)."""
    record = pipeline_record(path)
    if record:
        return _segmentation_index(record)
    return (Path(path) / "config.json").is_file() and is_deterministic(path)


def model_config(path) -> dict:
    """The config.json of the model of folder ``path`` (``model_folder``), read alone, before any weights; {}
    where there is none."""
    config = model_folder(path) / "config.json"
    return _read_json(config) if config.is_file() else {}


def is_deterministic(path) -> bool:
    """Whether the model of folder ``path`` (a pipeline's ``unet/``, or a bare model folder) has no time input: a
    deterministic network, which takes no scheduler."""
    return model_config(path).get("time_condition") == "none"


def pipeline_options(path) -> dict:
    """``{"task": ..., "sr_factor": ...}`` of a pipeline folder, or of a model folder that records its pipeline
    (``pipeline_record``), the keywords of ``DiffunetPipeline`` beside the unet and scheduler; ``PIPELINE_OPTIONS``
    where it names none. A model that takes an image condition but records no task, and values no pipeline
    takes, are one CheckpointError line naming the folder or file."""
    saved = pipeline_record(path)
    where = pipeline_index(path) or Path(path) / "config.json"
    if not saved and is_conditioned(path):
        raise CheckpointError(f"{path} takes an image condition (model.cond_channels) but does not say for which "
                              f"task (super-resolution, inpainting, ...): sample the pipeline folder it came from")
    options = {key: saved.get(key, default) for key, default in PIPELINE_OPTIONS.items()}
    task, factor = options["task"], options["sr_factor"]
    if task != "generate" and task not in IMAGE_TASKS:
        raise CheckpointError(f"{where} names task {task!r}; this diffunet knows generate, {', '.join(IMAGE_TASKS)}")
    if type(factor) is not int or factor < 1:
        raise CheckpointError(f"{where} has sr_factor {factor!r}; it must be a positive integer")
    return options


def is_conditioned(path) -> bool:
    """Whether the model of folder ``path`` takes an image condition (``cond_channels`` > 0)."""
    return bool(model_config(path).get("cond_channels"))


def pipeline_index(path) -> Path | None:
    """The ``model_index.json`` that speaks for folder ``path``: its own, or, for the ``unet/`` of a pipeline
    folder, its pipeline's; None for a model folder on its own."""
    path = Path(path).resolve()
    for index in (path / "model_index.json", path.parent / "model_index.json" if path.name == "unet" else None):
        if index is not None and index.is_file():
            return index
    return None


def pipeline_record(path) -> dict:
    """What speaks for folder ``path`` as a pipeline: its ``model_index.json`` (``pipeline_index``), else the record
    its U-Net's config.json carries (``record_pipeline``: a ``unet/`` copied out of its pipeline folder); {} for a
    model folder with neither."""
    index = pipeline_index(path)
    if index is not None:
        return _read_json(index)
    config = Path(path) / "config.json"
    record = _read_json(config).get(PIPELINE_KEY) if config.is_file() else None
    return dict(record) if isinstance(record, dict) else {}


def sample_settings(path) -> dict:
    """How the run that wrote folder ``path`` sampled, as far as the folder says (``pipeline_record``): some of
    ``{"scheduler": ..., "steps": ..., "guidance_scale": ...}`` (its ``sample.*``); {} for a folder from before
    they were saved, or a model folder on its own. ``SAMPLE_SETTINGS`` are the defaults of what it leaves out."""
    saved = pipeline_record(path)
    return {key: saved[SAMPLE_PREFIX + key] for key in SAMPLE_SETTINGS if SAMPLE_PREFIX + key in saved}


# A model folder records its training scheduler's config in its config.json under this private key (diffusers
# keeps "_" keys through save and load and passes none to __init__): a bare model folder then says what its model
# predicts, and nothing has to be guessed.
SCHEDULER_KEY = "_diffunet_training_scheduler"


# ... and the pipeline's class and keywords (task, sr_factor, sample_*) under this one.
PIPELINE_KEY = "_diffunet_pipeline"


def record_pipeline(pipeline) -> None:
    """Write ``pipeline``'s class and keywords into its U-Net's config, to be saved with it."""
    options = {k: v for k, v in pipeline.config.items() if not k.startswith("_") and k not in ("unet", "scheduler")}
    pipeline.unet.register_to_config(**{PIPELINE_KEY: {"_class_name": type(pipeline).__name__, **options}})


def record_scheduler(unet, scheduler) -> None:
    """Write ``scheduler``'s config (the training scheduler's) into ``unet``'s config, to be saved with it."""
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    unet.register_to_config(**{SCHEDULER_KEY: {"_class_name": type(scheduler).__name__, **config}})


def recorded_scheduler(folder: Path, unet) -> dict | None:
    """The training scheduler's config of model folder ``folder``: recorded in its config.json (then a pipeline's
    ``scheduler/`` is the run's sampler), or, for the ``unet/`` of a pipeline folder from before the record, that
    pipeline's ``scheduler/``; None if neither says (or the pipeline has no scheduler)."""
    if unet.config.get(SCHEDULER_KEY):
        return dict(unet.config[SCHEDULER_KEY])
    index = pipeline_index(folder)
    if index is not None and _read_json(index).get("scheduler") not in (None, [None, None]):
        return _read_json(index.parent / "scheduler" / "scheduler_config.json")
    return None


def load_model_folder(path: Path, dtype: torch.dtype = torch.float32) -> tuple[UNet, dict | None]:
    """(unet in eval mode, the training scheduler's config) from a pipeline folder (``model_index.json``,
    ``unet/``, ``scheduler/``) or a bare ``UNet.save_pretrained`` folder (``config.json``: its recorded scheduler,
    ``recorded_scheduler``); the config is None for a model without a scheduler, or a bare folder that records
    none."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        index = _check_pipeline_index(path / "model_index.json")
        unet = load_unet(path, dtype, classes=(index["unet"][1],)).eval()
        return unet, recorded_scheduler(path / "unet", unet)
    if (path / "config.json").is_file():
        unet = load_unet(path, dtype).eval()
        return unet, recorded_scheduler(path, unet)
    raise CheckpointError(f"{path} is neither a pipeline folder (model_index.json) nor a model folder "
                          "(config.json); pass the <output_dir>/pipeline folder that train.py writes")


# Keywords of DiffusionPipeline.from_pretrained that mean nothing for a local folder read by load_pipeline (a
# folder holds one set of weights: a variant, or a dtype per component, is refused rather than ignored)
LOCAL_NOOPS = {"trust_remote_code", "local_files_only", "use_safetensors", "low_cpu_mem_usage", "cache_dir",
               "revision"}


def load_pipeline(cls, path, torch_dtype: torch.dtype | None = None, **kwargs):
    """``cls.from_pretrained(path)`` for a folder of ours (``DiffunetPipeline.from_pretrained``, or the
    segmentation pipeline's): the U-Net and scheduler read as ``load_model_folder`` reads them (no code from the
    folder is imported or run), the pipeline's keywords from its ``model_index.json``. ``unet=`` /
    ``scheduler=`` replace a component, as in diffusers; a folder of the other pipeline class is one line."""
    from .segment_pipeline import DiffunetSegmentationPipeline      # it imports this module's pipeline module

    given = {k: kwargs.pop(k) for k in ("unet", "scheduler") if k in kwargs}
    unknown = sorted(set(kwargs) - LOCAL_NOOPS)
    if unknown:
        raise TypeError(f"{cls.__name__}.from_pretrained of a local folder takes torch_dtype, unet= and "
                        f"scheduler=, not {', '.join(unknown)}")
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"torch_dtype={torch_dtype!r}: a diffunet folder takes one torch.dtype (its U-Net's)")
    path = Path(path)
    index = _check_pipeline_index(path / "model_index.json") if (path / "model_index.json").is_file() else None
    if index is None:
        raise CheckpointError(f"{path} is not a pipeline folder (no model_index.json); load a bare model folder "
                              f"with UNet.from_pretrained, or pass the <output_dir>/pipeline folder train.py wrote")
    segmentation = _segmentation_index(index)
    if segmentation != issubclass(cls, DiffunetSegmentationPipeline):
        right = "DiffunetSegmentationPipeline" if segmentation else "DiffunetPipeline"
        raise CheckpointError(f"{path} holds a {right}; load it with {right}.from_pretrained")
    if "unet" not in given:
        given["unet"] = load_model_folder(path, torch_dtype or torch.float32)[0]
    if "scheduler" not in given:                        # scheduler/ as saved: the run's sampler (older: training's)
        name = index["scheduler"][1]
        given["scheduler"] = None if name is None else getattr(diffusers, name).from_config(
            _read_json(path / "scheduler" / "scheduler_config.json"))
    takes = set(inspect.signature(cls.__init__).parameters) - {"self", "unet", "scheduler"}
    options = {k: v for k, v in index.items() if k in takes}
    if not segmentation:
        pipeline_options(path)                          # a task or factor no pipeline takes: one line
    return cls(**given, **options)
