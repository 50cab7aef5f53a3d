"""diffunet: a time-conditioned U-Net denoiser whose every design choice is a switch, native to diffusers."""

import diffusers

from .pipeline import DiffunetPipeline
from .unet import PlanRow, Tiling, UNet

# DiffusionPipeline.from_pretrained looks the class that model_index.json names up in diffusers' own namespace
# (anything else must come as code inside the folder, run only under trust_remote_code): put ours there.
setattr(diffusers, DiffunetPipeline.__name__, DiffunetPipeline)

__version__ = "0.1.0"
__all__ = ["UNet", "DiffunetPipeline", "Tiling", "PlanRow", "__version__"]
