"""Configs: a dataclass schema <- YAML file <- dotted command-line overrides, typed and validated (OmegaConf).

The ``model`` section is not written out here: it is made from ``UNet.__init__``'s signature, so the model's
keywords, their types and defaults exist in exactly one place. OmegaConf does the merging and the type
coercion; the thin layer on top checks every key against the schema first (all typos at once, each with the key
it likely meant) and turns OmegaConf's errors into one line each.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .model.unet import UNet

PRESET_DIR = Path(__file__).parent / "configs"


def _model_schema() -> type:
    """A dataclass with one field per ``UNet.__init__`` keyword: same names, types and defaults."""
    init = inspect.unwrap(UNet.__init__)
    hints = typing.get_type_hints(init)
    fields = [(name, hints[name], field(default=p.default))
              for name, p in inspect.signature(init).parameters.items() if name != "self"]
    return dataclasses.make_dataclass("ModelConfig", fields)


ModelConfig = _model_schema()


@dataclass
class DiffusionConfig:
    """The objective (``diffunet.objectives.OBJECTIVES``) and its settings; each key says which objective reads it."""
    objective: str = "ddpm"                     # "ddpm" (DDPMScheduler) | "flow" (rectified flow) | "edm" (Karras)
    num_train_timesteps: int = 1000             # ddpm: the chain's length; flow, edm: the scale of the time input
    beta_schedule: str = "squaredcos_cap_v2"    # ddpm: "linear" | "scaled_linear" | "squaredcos_cap_v2" (cosine)
                                                # | "sigmoid" (Jabri et al. 2022, lucidrains' default)
    beta_start: float = 0.0001                  # ddpm: the first beta of "linear" and "scaled_linear"
    beta_end: float = 0.02                      # ddpm: their last beta
    prediction_type: str = "epsilon"            # ddpm: "epsilon" | "v_prediction" | "sample" (x0)
    loss_weighting: str = "mse"                 # ddpm: "mse" | "min_snr" (min-SNR-gamma, Hang et al. 2023)
    snr_gamma: float = 5.0                      # ddpm: min_snr's cap gamma on the x0-terms weight
    time_sampling: str = "logit_normal"         # flow: the law of t, "logit_normal" (SD3) | "uniform"
    logit_mean: float = 0.0                     # flow: t = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0                      # flow: the std of logit(t)
    flow_shift: float = 1.0                     # flow: the samplers' timestep shift t' = s t / (1 + (s - 1) t)
    p_mean: float = -1.2                        # edm: ln sigma ~ N(p_mean, p_std^2) in training
    p_std: float = 1.2                          # edm: the std of ln sigma in training
    sigma_data: float = 0.5                     # edm: the data's std, for the preconditioning
    sigma_min: float = 0.002                    # edm: the samplers' lowest noise level
    sigma_max: float = 80.0                     # edm: the samplers' highest noise level


@dataclass
class AugmentConfig:
    """Joint augmentation of a sample with its condition and mask, every task, 1D / 2D / 3D
    (diffunet/data/transforms.py); off by default."""
    flip: bool = False                          # random flips along every spatial axis
    rot90: bool = False                         # quarter turns in a plane of equal sides (2D, 3D)
    rotate: float = 0.0                         # small rotations up to this many degrees (3D: about each axis)
    shift: int = 0                              # integer shifts up to this many pixels / voxels per axis
    intensity: float = 0.0                      # the sample's values x e^a + b, a, b ~ N(0, intensity^2)
    p: float = 0.5                              # each transform applied to each sample with this probability


@dataclass
class DataConfig:
    source: str = "digits"                      # a name in data.SOURCES ("digits", "cells", "cifar10") | a folder
                                                # path | "hf:<name or path>"
    image_column: str = "image"                 # HF datasets: column holding the images
    label_column: Optional[str] = "label"       # HF datasets / digits: column of class ids (None: unlabelled)
    split: str = "train"                        # HF datasets: the split trained on
    hflip: bool = False                         # random horizontal flips
    num_workers: int = 0                        # DataLoader worker processes (0: load in the training process)
    bad_images: str = "strict"                  # unreadable images in a folder: "strict" (stop) | "skip" (warn)
    holdout: int = 0                            # images held out of training (a fixed split, seed 0): the
                                                # conditions of grids and evaluation for image-conditioned tasks
    subset: int = 0                             # train on a fixed random N of the images (seed 0, taken before
                                                # the holdout); 0: all
    cond_column: Optional[str] = None           # HF datasets: column of conditioning images (low-res inputs)
    mask_column: Optional[str] = None           # HF datasets: column of inpainting masks (white/1: to fill), or of
                                                # segmentation masks (class ids; 0/255 read as 0/1)
    num_crops: int = 1000                       # data.source=cells: training crops of sample_size (diffunet.data.cells);
                                                # signals: signals; cells3d: volumes of twice sample_size
    intensity: str = "percentile"               # signal / volume files, each to [-1, 1]: "percentile" (of its own
                                                # values) | "fixed" (intensity_range are values, e.g. CT's HU) | "none"
    intensity_range: list[float] = field(default_factory=lambda: [0.5, 99.5])   # percentiles or values -> -1, 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)    # joint flips, turns, rotations, shifts
    pos_ratio: float = 0.5                      # 3D / 1D segmentation: patches centred on a labelled voxel (the rest
                                                # anywhere), as MONAI's RandCropByPosNegLabel


@dataclass
class TrainConfig:
    max_steps: int = 2000                       # optimizer updates in the run
    batch_size: int = 64                        # per process
    lr: float = 2e-4                            # AdamW's peak learning rate
    lr_scheduler: str = "constant_with_warmup"  # any name diffusers' get_scheduler takes
    warmup_steps: int = 100                     # linear warm-up of the lr, in optimizer updates
    weight_decay: float = 0.0                   # AdamW's decoupled weight decay
    adam_beta1: float = 0.9                     # AdamW's first beta (the gradients' decay)
    adam_beta2: float = 0.999                   # AdamW's second beta (the squared gradients' decay)
    grad_clip: float = 1.0                      # max gradient norm; 0 turns clipping off
    grad_accum: int = 1                         # micro-batches per update (accelerate's accumulation)
    mixed_precision: str = "auto"               # "auto" (by the device: diffunet/training/precision.py) | "no" |
                                                # "fp16" | "bf16"
    channels_last: bool = False                 # NHWC activations (a win on GPUs; see diffunet/training/precision.py)
    compile: bool = False                       # torch.compile the model (falls back to eager with a warning)
    num_threads: int = 0                        # CPU threads per process (torch.set_num_threads); 0: torch's
                                                # default, one per core. 1 where another job shares the cores
    gradient_checkpointing: bool = False        # recompute each level in backward: memory for time
    ema_decay: float = 0.999                    # diffusers' EMAModel: samples, evaluation and the pipeline use it
    label_dropout: float = 0.1                  # class-conditional models: drop labels to "null" (for CFG)
    cond_dropout: float = 0.0                   # image-conditioned models: drop the condition (zeros + a flag),
                                                # so that guidance_scale applies to it
    augment_p: float = 0.0                      # EDM's non-leaky augmentation (diffunet.data.augment), each op with
                                                # this probability; needs model.augment_dim=9 (task=generate)
    seed: int = 0                               # initial weights, data order and noise: a run is reproducible
    log_every: int = 25                         # loss, lr, grad norm and img/s to tensorboard every N updates
    checkpoint_every: int = 500                 # a full checkpoint (resumable bitwise) every N updates
    keep_checkpoints: int = 3                   # the newest N are kept
    sample_every: int = 500                     # a grid of EMA samples every N updates (samples/step_*.png)
    eval_every: int = 0                         # FID/KID of EMA samples every N steps (0: off)
    eval_num_images: int = 256                  # samples (or held-out images) each evaluation scores
    eval_extractor: str = "digits"              # "digits" (offline) | "inception" | a path to Inception weights;
                                                # signals and volumes: metrics.frechet's own (offline)
    eval_reference: Optional[str] = None        # folder | .npz | "digits" ("signals", "cells3d"); None: the
                                                # training data
    resume: Optional[str] = None                # "latest" or a checkpoint folder
    init_from: Optional[str] = None             # start from these weights: a model or pipeline folder of ours, or a
                                                # diffusers UNet2DModel one (converted); model.* must match it
    allow_inexact_resume: bool = False          # resume even if world size / batch size / data changed
    max_bad_steps: int = 10                     # stop after this many non-finite losses/gradients in a row
    phema_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])   # post-hoc EMA: the profiles
                                                # tracked (EDM2's pair); [] turns it off
                                                # (diffunet/training/power_ema.py)
    phema_snapshots: int = 8                    # ... snapshots per run, evenly spaced, the last at max_steps; 0: off


@dataclass
class SuperResolutionConfig:
    """the super_resolution task: how much smaller its inputs are."""
    factor: int = 4                             # the condition is x0 area-downsampled by this (2 or more, dividing
                                                # the model's size); paired data's conds/ are this much smaller
    factors: Optional[list[int]] = None         # per axis instead, e.g. [2, 1, 1]: a volume's thick slices to
                                                # isotropic voxels (through-plane); None: factor along every axis
    ensemble: int = 1                           # evaluation scores the mean of this many samples per input (what
                                                # sample.py --num-per-cond N writes as x_mean)


@dataclass
class InpaintingConfig:
    """the inpainting task: the masks drawn where the data pairs none."""
    mask: str = "mixed"                         # masks drawn per training batch: a name in data.inpaint_masks.MASKS
    eval_mask: str = "half"                     # masks of grids and evaluation (seeded by sample.seed)
    ensemble: int = 1                           # evaluation scores the mean of this many samples per input (what
                                                # sample.py --num-per-cond N writes as x_mean)


@dataclass
class DenoiseConfig:
    """the denoise task: the noise made where the data pairs no noisy images."""
    sigma: float = 0.4                          # std of the Gaussian noise added to x0 in [-1, 1] (then clipped) to
                                                # make the condition, where the data pairs no noisy images
    ensemble: int = 1                           # evaluation scores the mean of this many samples per input (what
                                                # sample.py --num-per-cond N writes as x_mean)


@dataclass
class SegmentConfig:
    """The segmentation tasks' section: the deterministic U-Net's loss, its weight map, and the diffusion
    model's ensemble."""
    loss: str = "dice_ce"                       # a name in tasks.segmentation.LOSSES: "ce" | "dice_ce" |
                                                # "unet_weighted_ce"
    w0: float = 10.0                            # unet_weighted_ce: the border weight w0 exp(-(d1 + d2)^2 / 2 sigma^2)
    sigma: float = 5.0                          # ... and its width, px
    ensemble: int = 4                           # diffusion: samples per image in evaluation (mean mask and std map)


@dataclass
class SampleConfig:
    """The ``sample`` section (a run's sample grids and evaluation samples) and the defaults of ``sample.py`` and
    ``diffunet.sampling``. The ClassVars are defaults only, not config keys: the training loop does not take them."""
    scheduler: str = "auto"                     # a name in objectives.SAMPLERS: ddpm: "ddim" | "dpmpp" | "ddpm" |
                                                # "euler" | "heun" | "heun_karras" | "unipc"; flow: "flow_dpmpp" |
                                                # "flow_euler" | "flow_heun"; edm: "edm_dpmpp" | "edm_euler";
                                                # "auto": the objective's first (ddim, flow_dpmpp, edm_dpmpp)
    steps: int = 50                             # sampling steps of grids, evaluation and, saved, sample.py
    num_images: int = 64                        # images in each sample grid
    guidance_scale: float = 1.0                 # 1: the conditional model, 0: unconditional, > 1: stronger guidance
    seed: int = 0                               # the grids' noise (evaluation: seed + 1)
    eta: ClassVar[float] = 0.0                  # DDIM noise: 0 deterministic, 1 DDPM-like
    batch_size: ClassVar[int] = 64              # images per forward pass per process; does not change the images
    dtype: ClassVar[str] = "float32"            # the U-Net's precision while sampling (a name
                                                # training.precision.PRECISION takes)


@dataclass
class EvalConfig:
    """The defaults of ``diffunet.metrics`` and ``python -m diffunet.evaluate``; not a config section (a run's
    evaluation, ``train.eval_*``, uses them as they are)."""
    batch_size: int = 256                       # images per feature-extractor forward pass
    kid_subset_size: int = 1000                 # KID: MMD^2 over random subsets of min(this, N_real, N_fake) images
    kid_subsets: int = 100                      # ... averaged over this many subsets
    is_splits: int = 10                         # IS: at most this many splits (fewer, so each holds >= 100 images)
    seed: int = 0                               # fixes KID's subsets and IS's splits
    floor_draws: int = 4                        # fid_floor: the mean FID of this many draws of N real images


@dataclass
class Config:
    output_dir: str = "runs/default"            # where the run writes; refused over checkpoints without --resume
    task: str = "generate"                      # what a batch means: a name in diffunet.tasks.TASKS
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    super_resolution: SuperResolutionConfig = field(default_factory=SuperResolutionConfig)
    inpainting: InpaintingConfig = field(default_factory=InpaintingConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)


# Keys that moved into their task's section, still read at the old place for a release, so that an old run's
# config.yaml and an old command line load. A value other than the default says the new name, once per source.
MOVED = {"data.sr_factor": "super_resolution.factor", "data.mask": "inpainting.mask",
         "data.eval_mask": "inpainting.eval_mask"}


def presets() -> list[str]:
    """Names of the configs shipped with diffunet (``diffunet/configs/*.yaml``, also ``configs/`` in the repo)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    if (PRESET_DIR / f"{path.stem}.yaml").is_file() and path.suffix in ("", ".yaml"):
        return PRESET_DIR / f"{path.stem}.yaml"
    near = difflib.get_close_matches(path.stem, presets(), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; presets: {', '.join(presets())}"
    raise ConfigError(f"no config file or preset named '{name_or_path}'{hint}")


def _unknown_keys(schema: DictConfig, layer: dict, prefix: str = "") -> list[tuple[str, str | None, DictConfig]]:
    """Every key of ``layer`` that the schema lacks: (full key, the nearest valid full key or None, its section).
    OmegaConf's merge stops at the first one; a file with three typos should say three."""
    found = []
    for key, value in layer.items():
        name = f"{prefix}{key}"
        if key not in schema:
            near = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)    # OmegaConf's own rule
            found.append((name, prefix + near[0] if near else None, schema))
        elif isinstance(value, dict) and isinstance(schema[key], DictConfig) and _is_schema(schema[key]):
            found += _unknown_keys(schema[key], value, name + ".")
    return found


def _is_schema(node: DictConfig) -> bool:
    """A section made from a dataclass: its keys are fixed (a plain dict-typed section would take any key)."""
    return dataclasses.is_dataclass(OmegaConf.get_type(node))


def _unknown_keys_message(unknown: list[tuple[str, str | None, DictConfig]]) -> str:
    """One key: its suggestion, else that section's valid keys. Several: each with its suggestion, on one line."""
    if len(unknown) == 1:
        name, near, section = unknown[0]
        if near:
            return f"unknown config key '{name}'; did you mean '{near}'?"
        return f"unknown config key '{name}'; valid keys: {', '.join(map(str, section))}"
    keys = ", ".join(f"'{name}'" + (f" (did you mean '{near}'?)" if near else "") for name, near, _ in unknown)
    hint = "" if all(near for _, near, _ in unknown) else "; python train.py --print-config lists the valid keys"
    return f"unknown config keys {keys}{hint}"


def _shape_mismatch(base, layer, prefix: str = "") -> str | None:
    """Why ``layer`` cannot merge into ``base``: the first key given keys where the schema holds a list, or a list
    where it holds a section. OmegaConf says only "Cannot merge incompatible container types", naming no key."""
    for key, value in layer.items():
        have, name = base.get(key) if isinstance(base, dict) else None, f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(have, dict):
            found = _shape_mismatch(have, value, name + ".")
            if found:
                return found
        elif isinstance(value, dict) and isinstance(have, (list, tuple)):
            return f"{name} is a list, set as a whole: {name}=[{','.join(map(str, have))}]"
        elif isinstance(value, (list, tuple)) and isinstance(have, dict):
            return f"{name} is a section, set key by key: {name}.{next(iter(have), 'key')}=..."
    return None


def _forward_moved(layer: dict, origin: str) -> dict:
    """``layer`` with the keys of ``MOVED`` at their new place (a key given at both places keeps the new one)."""
    said = []
    for old, new in MOVED.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if not (isinstance(layer.get(section), dict) and key in layer[section]):
            continue
        value = layer[section].pop(key)
        target = layer.setdefault(new_section, {})
        if isinstance(target, dict):
            target.setdefault(new_key, value)
        if value != OmegaConf.select(OmegaConf.structured(Config), new):
            said.append(f"{old} is now {new}")
    if said:
        warnings.warn(f"{origin}: {', '.join(said)} (read as such; rename it)", FutureWarning, stacklevel=4)
    return layer


def _merge(base: DictConfig, layer: DictConfig | dict, origin: str) -> DictConfig:
    as_dict = OmegaConf.to_container(layer) if isinstance(layer, DictConfig) else layer
    if isinstance(as_dict, dict) and _is_schema(base) and OmegaConf.get_type(base) is Config:
        as_dict = layer = _forward_moved(as_dict, origin)
    unknown = _unknown_keys(base, as_dict) if isinstance(as_dict, dict) and _is_schema(base) else []
    if unknown:
        raise ConfigError(f"{origin}: {_unknown_keys_message(unknown)}")
    try:
        return OmegaConf.merge(base, layer)
    except TypeError:                                   # a list given keys, or a section given a list
        why = _shape_mismatch(OmegaConf.to_container(base), as_dict) or "a value's shape does not fit the schema"
        raise ConfigError(f"{origin}: {why}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{origin}: {key + ': ' if key else ''}{msg}") from None


def load_config(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults, then the YAML ``config`` (a path or a preset name), then ``key.sub=value`` overrides."""
    cfg = OmegaConf.structured(Config)
    if config is not None:
        path = _resolve(config)
        try:
            layer = OmegaConf.load(path)
        except Exception as e:  # a YAML syntax error: name the file and the first line of the parser's message
            raise ConfigError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
        cfg = _merge(cfg, layer, str(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form key.sub=value")
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    return cfg


def to_dict(node) -> dict:
    """A plain dict (lists for sequences) of a config section, for ``UNet(**...)`` and friends."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else dict(node)


def build_model(cfg: DictConfig) -> UNet:
    """``UNet(**cfg.model)``; a bad model value becomes a one-line ConfigError."""
    try:
        return UNet(**to_dict(cfg.model))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def model_from_preset(name: str, **overrides) -> UNet:
    """The UNet of a preset, with keyword overrides: ``model_from_preset("ddpm-cifar10", dropout=0.0)``."""
    return build_model(_merge(load_config(name), {"model": overrides}, "model_from_preset"))


def run_config(run: Path) -> DictConfig:
    """The config a run was trained with: ``<run>/config.yaml``, the folder ``train.py`` wrote."""
    if not (Path(run) / "config.yaml").is_file():
        raise ConfigError(f"{Path(run) / 'config.yaml'} is missing: pass a run's output_dir, the folder train.py wrote")
    return load_config(Path(run) / "config.yaml")
