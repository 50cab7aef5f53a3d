"""diffunet: a time-conditioned U-Net denoiser whose every design choice is a switch, native to diffusers."""

import diffusers

from .pipeline import DiffunetPipeline
from .segment_pipeline import DiffunetSegmentationPipeline
from .unet import PlanRow, Tiling, UNet

# DiffusionPipeline.from_pretrained looks the class that model_index.json names up in diffusers' own namespace
# (anything else must come as code inside the folder, run only under trust_remote_code): put ours there.
for _pipeline in (DiffunetPipeline, DiffunetSegmentationPipeline):
    setattr(diffusers, _pipeline.__name__, _pipeline)

__version__ = "0.1.0"
__all__ = ["UNet", "DiffunetPipeline", "DiffunetSegmentationPipeline", "Tiling", "PlanRow", "__version__"]
