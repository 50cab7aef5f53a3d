"""diffunet: a time-conditioned U-Net denoiser whose every design choice is a switch, native to diffusers."""

from .unet import PlanRow, Tiling, UNet

__version__ = "0.1.0"
__all__ = ["UNet", "Tiling", "PlanRow", "__version__"]
