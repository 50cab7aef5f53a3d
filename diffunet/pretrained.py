"""Reading a model or pipeline folder from disk (ours, or diffusers' UNet2DModel), without running code from it:
what ``sample.py``, the export, ``train.init_from`` and ``DiffunetPipeline.from_pretrained`` use. Writing one is
``diffunet.export``.
"""

from __future__ import annotations

import inspect
import json
import pickle
import re
import warnings
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DModel

from . import convert
from .errors import CheckpointError, ConfigError
from .model.pipeline import IMAGE_TASKS, DiffunetPipeline
from .model.segment_pipeline import DiffunetSegmentationPipeline
from .model.tables import as_size
from .model.unet import UNet, resolve_factors

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
        try:
            return convert.from_unet2d(_from_pretrained(UNet2DModel, folder, weights)).to(dtype)
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


def pipeline_class(path) -> type:
    """The pipeline class that samples folder ``path``: ``DiffunetSegmentationPipeline`` for a segmentation folder
    (``is_segmentation``), else ``DiffunetPipeline`` (whatever an older folder names, DDPMPipeline say, or none)."""
    return DiffunetSegmentationPipeline if is_segmentation(path) else DiffunetPipeline


def model_config(path) -> dict:
    """The config.json of the model of folder ``path`` (``model_folder``), read alone, before any weights; {}
    where there is none."""
    config = model_folder(path) / "config.json"
    return _read_json(config) if config.is_file() else {}


def is_deterministic(path) -> bool:
    """Whether the model of folder ``path`` (a pipeline's ``unet/``, or a bare model folder) has no time input: a
    deterministic network, which takes no scheduler."""
    # the folder's config.json, read before any model is built (no UNet.timed yet): the name is checked here
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
    # the keys of signals and volumes (intensity, sr_factors) only where the folder has them: an image
    # pipeline's options stay {"task", "sr_factor"}
    options = {key: saved.get(key, default) for key, default in PIPELINE_OPTIONS.items()
               if default is not None or saved.get(key) is not None}
    task, factor = options["task"], options["sr_factor"]
    if task not in IMAGE_TASKS:
        raise CheckpointError(f"{where} names task {task!r}; this diffunet knows {', '.join(IMAGE_TASKS)}")
    if type(factor) is not int or factor < 1:
        raise CheckpointError(f"{where} has sr_factor {factor!r}; it must be a positive integer")
    factors = options.get("sr_factors")
    if factors is not None and not (isinstance(factors, list) and all(type(f) is int and f >= 1 for f in factors)):
        raise CheckpointError(f"{where} has sr_factors {factors!r}; it must be a list of positive integers, one per "
                              f"axis")
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


def from_unet2d(source) -> UNet:
    """Our UNet with the architecture and weights of a diffusers ``UNet2DModel`` of the DDPM family, or of a folder
    holding one (its ``save_pretrained`` folder, a pipeline folder with a ``unet/``, a hub snapshot of
    google/ddpm-cifar10-32): same dtype, outputs equal to float rounding (``convert``). Errors are one line:
    CheckpointError for a folder, ValueError for a model that cannot be mapped."""
    if isinstance(source, UNet2DModel):
        return convert.from_unet2d(source)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"from_unet2d takes a UNet2DModel or a folder, got {type(source).__name__}")
    return load_unet(source, classes=("UNet2DModel",))     # checked file by file, then converted


# ------------------------------------------------------------------------------------------ train.init_from

# What a config that predates a switch means by its absence (folders saved before spatial_dims, down_factors ...).
UNET_DEFAULTS = {name: p.default for name, p in inspect.signature(UNet.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty}

# Switches that do not change what the weights compute at inference: a fine-tuning run may set its own.
TRAINING_ONLY = ("dropout", "zero_init")


def architecture(config) -> dict:
    """A model config's architecture switches in one spelling (lists, one size per axis, out_channels and the
    down factors resolved, keys a config predates at their defaults)."""
    config = {**UNET_DEFAULTS, **config}
    arch = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()
            if not k.startswith("_") and k not in TRAINING_ONLY}
    dims = config["spatial_dims"]
    arch["sample_size"] = as_size(config["sample_size"], dims)
    arch["down_factors"] = resolve_factors(config["down_factors"], len(config["channel_mult"]), dims)
    arch["out_channels"] = config["out_channels"] or config["in_channels"]
    return arch


def _override(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def init_from(model: UNet, path) -> None:
    """Load the weights of folder ``path`` (``load_unet``) into ``model``. Its architecture must be the folder's:
    a ConfigError otherwise, one line giving the ``model.*`` overrides that make it so."""
    loaded = load_unet(path)
    want, have = architecture(loaded.config), architecture(model.config)
    differ = {k: loaded.config[k] for k in want if want[k] != have.get(k)}
    if differ:
        raise ConfigError(f"train.init_from={path} holds a different architecture than the config's model; "
                          f"set {' '.join(f'model.{k}={_override(v)}' for k, v in differ.items())}")
    model.load_state_dict(loaded.state_dict())
