"""diffunet: a time-conditioned U-Net denoiser whose every design choice is a switch, native to diffusers.

The package by role: ``model/`` (the network and its pipelines: what an exported folder carries), ``tasks/`` (the
jobs), ``data/``, ``training/``, ``metrics/``; at the top the config, the objectives, sampling, reading model
folders (``pretrained``) and the ``python -m`` commands (``evaluate``, ``export``, ``plan``, ``posthoc_ema``).
"""

__version__ = "0.1.0"

import sys

import diffusers

from . import model
from .model.pipeline import DiffunetPipeline
from .model.segment_pipeline import DiffunetSegmentationPipeline
from .model.unet import PlanRow, Tiling, UNet
from .pretrained import from_unet2d, load_pipeline

# DiffusionPipeline.from_pretrained looks the class that model_index.json names up in diffusers' own namespace
# (anything else must come as code inside the folder, run only under trust_remote_code): put ours there.
for _pipeline in (DiffunetPipeline, DiffunetSegmentationPipeline):
    setattr(diffusers, _pipeline.__name__, _pipeline)
model.pipeline.folder_reader = load_pipeline     # our own folders load without running their code

# Old names of moved modules, kept for a release: folders saved by a bare save_pretrained before the model code
# moved into model/ name their classes' modules as they were then ("diffunet.unet" in model_index.json), and
# diffusers imports that name.
for _old in ("unet", "pipeline", "segment_pipeline"):
    sys.modules[f"{__name__}.{_old}"] = globals()[_old] = getattr(model, _old)

__all__ = ["UNet", "DiffunetPipeline", "DiffunetSegmentationPipeline", "Tiling", "PlanRow", "from_unet2d",
           "__version__"]
