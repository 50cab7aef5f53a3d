"""``DiffunetSegmentationPipeline``: class masks of images of any size, from a deterministic U-Net (the 2015
U-Net's job, ``time_condition="none"``) or by diffusion (Wolleb et al. 2022: the mask is x0, the image the
condition), whole or by overlap-tile.

    pipe = DiffusionPipeline.from_pretrained("runs/cells-seg/pipeline", trust_remote_code=True)
    out = pipe(image=micrographs, tile=128)       # any size: tiles of 128 output pixels
    out.masks, out.probabilities                  # (B, H, W) class ids, (B, K, H, W)
    out = diffusion_pipe(image=micrographs, num_samples=8)
    out.std                                       # (B, H, W): where the N samples disagree

A diffusion model's ensemble: N masks per image, each from its own noise; the probability of class k is the
fraction of samples that chose it, and the uncertainty map is the per-pixel standard deviation of the samples'
one-hot masks, sqrt(sum_k var_k / 2): for a binary mask the std of the foreground indicator, 0 where all samples
agree and 0.5 where they split evenly.

This file travels inside exported pipeline folders, with the modules it imports.
"""

import functools
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .pipeline import check_output_type, denoise, from_folder, to_model_space
from .tiles import predict_tiled
from .unet import KINDS

OUTPUT_TYPES = ("np", "pt", "pil")


# ---------------------------------------------------------------------------------------- masks as samples
# A diffusion model denoises the mask in [-1, 1]: a binary mask is one channel (2 m - 1), K > 2 classes are K
# one-hot channels. Training (diffunet.tasks) encodes with the same function, so the two cannot drift apart.

def mask_classes(unet) -> int:
    """The number of classes K a segmentation U-Net predicts: a deterministic one's output channels (logits); a
    diffusion one's mask channels (1: binary)."""
    if not unet.timed:
        return unet.config.out_channels or unet.config.in_channels
    return 2 if unet.config.in_channels == 1 else unet.config.in_channels


def mask_to_sample(mask: torch.Tensor, classes: int, dims: int = 2) -> torch.Tensor:
    """Class ids (B, 1, *S) or (B, *S), ``dims`` spatial axes -> the diffusion sample (B, 1 or K, *S) in {-1, 1}."""
    ids = (mask[:, 0] if mask.ndim == dims + 2 else mask).long()
    if classes == 2:
        return ids[:, None].float() * 2 - 1
    return F.one_hot(ids, classes).movedim(-1, 1).float() * 2 - 1


def sample_to_onehot(x: torch.Tensor, classes: int) -> torch.Tensor:
    """A denoised sample (B, 1 or K, *S) -> its one-hot mask (B, K, *S): the sign of a binary one, the
    largest channel of K."""
    ids = (x[:, 0] > 0).long() if classes == 2 else x.argmax(1)
    return F.one_hot(ids, classes).movedim(-1, 1).float()


@dataclass
class SegmentationPipelineOutput(BaseOutput):
    """masks: class ids (B, H, W) (np int64, pt long) or PIL "L" images (binary 0/255, else the ids);
    probabilities (B, K, H, W) float32: softmax, or the ensemble's class frequencies; std (B, H, W) float32, the
    ensemble's uncertainty map (None for a deterministic model or one sample). Signals and volumes: (B, L) or
    (B, D, H, W) masks and maps, (B, K, ...) probabilities."""
    masks: object
    probabilities: object
    std: object | None = None


class DiffunetSegmentationPipeline(DiffusionPipeline):
    """Segmentation with diffunet's ``UNet``: one forward pass of a deterministic model, or an ensemble of
    diffusion samples conditioned on the image; by tiles of ``tile`` output pixels for images larger than memory
    allows ("valid" padding: the overlap-tile strategy, exactly the whole-image result; "same": overlapping tiles
    blended, see ``diffunet.model.tiles``)."""

    model_cpu_offload_seq = "unet"
    _optional_components = ["scheduler"]        # None for a deterministic model (saved as [null, null])

    def __init__(self, unet, scheduler, sample_scheduler: str = "auto", sample_steps: int = 50, intensity: list = None):
        super().__init__()                      # scheduler: no default, diffusers takes keywords with one for options
        self.register_modules(unet=unet, scheduler=scheduler)
        if unet.timed:                          # a diffusion model: how the run sampled
            self.register_to_config(sample_scheduler=sample_scheduler, sample_steps=sample_steps)
        if intensity is not None:               # signals and volumes: how files map to [-1, 1] (data.arrays)
            self.register_to_config(intensity=list(intensity))
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)   # [0, 1] -> [-1, 1]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; for the installed class and a local folder through diffunet's own
        reader (``DiffunetPipeline.from_pretrained``): no code from the folder runs, no ``trust_remote_code``."""
        return from_folder(cls, super().from_pretrained, pretrained_model_name_or_path, kwargs)

    @property
    def deterministic(self) -> bool:
        return not self.unet.timed

    @torch.no_grad()
    def __call__(self, image, num_samples: int = 1, num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
                 tile=None, overlap: int | None = None, tile_batch_size: int = 4, output_type: str | None = "np",
                 return_dict: bool = True):
        """Segment ``image``.

        Args:
            image: PIL images, an np array (B, H, W, C) or a tensor (B, C, H, W) in [0, 1], of any size the
                network takes whole (``UNet.tiling``), or any size at all with ``tile``; for a model of signals
                or volumes, a tensor or array (B, C, L) / (B, C, D, H, W).
            num_samples: diffusion only: masks sampled per image (the ensemble); > 1 gives ``std``.
            num_inference_steps: diffusion only: scheduler steps per sample; default: the run's
                (``config.sample_steps``).
            generator: one generator, or one per image (image i's samples then draw from ``generator[i]`` only).
            eta: DDIM's noise (0 deterministic); schedulers without it ignore it.
            tile: output pixels per tile (an int, or one per axis: (h, w)); None: the whole image at once.
            overlap: "same" padding: the blended width between tiles (default a quarter of the tile).
            tile_batch_size: tiles per network call.
            output_type: "np", "pt" or "pil" (masks as images; images only).
        """
        unet, device = self.unet, self._execution_device
        output_type = check_output_type(output_type, unet.dims, OUTPUT_TYPES)
        if num_inference_steps is None:
            num_inference_steps = self.config.get("sample_steps", 50)
        x = to_model_space(image, unet.dims, self.image_processor).to(device, torch.float32)   # (B, C, *S), [-1, 1]
        channels = unet.config.in_channels if self.deterministic else unet.config.cond_channels
        if x.shape[1] != channels:
            raise ValueError(f"image has {x.shape[1]} channel(s); this model segments {channels}-channel "
                             f"{KINDS[unet.dims]}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if self.deterministic and num_samples > 1:
            raise ValueError("num_samples > 1 is for diffusion models; a deterministic model gives one mask")
        if not self.deterministic and self.scheduler is None:
            raise ValueError("a diffusion segmentation model needs a scheduler: pipe.scheduler = DDIMScheduler(...)")
        if tile is not None and not self.deterministic and unet.valid:
            # a valid tile's network input is larger than its output, and a sample must keep its size
            raise ValueError("tiled diffusion needs padding='same' (overlapping tiles, blended); a valid-padding "
                             "diffusion model segments whole images: leave tile=None")
        if isinstance(generator, list) and len(generator) != len(x):
            raise ValueError(f"{len(generator)} generators for {len(x)} images; give one per image")

        if tile is None:                        # one batch: every image, every sample (B N rows)
            outputs = [self.predict(x, num_samples, num_inference_steps, generator, eta)]
        else:                                   # image by image, tile_batch_size tiles (x N samples) a call
            outputs = []
            for i in range(len(x)):
                g = generator[i] if isinstance(generator, list) else generator
                predict = functools.partial(self.predict, num_samples=num_samples, steps=num_inference_steps,
                                            generator=g, eta=eta)
                outputs.append(predict_tiled(predict, x[i:i + 1], tile, overlap=overlap, batch_size=tile_batch_size,
                                             geometry=unet))
        out = torch.cat(outputs).float()                                               # (B, K + 1, H, W)
        probabilities, std = out[:, :-1], out[:, -1]
        masks = probabilities.argmax(1)
        std = std if num_samples > 1 else None
        if output_type == "np":
            masks, probabilities = masks.cpu().numpy(), probabilities.cpu().numpy()
            std = None if std is None else std.cpu().numpy()
        elif output_type == "pil":
            scale = 255 if probabilities.shape[1] == 2 else 1
            masks = [PIL.Image.fromarray((m * scale).astype(np.uint8)) for m in masks.cpu().numpy()]
        self.maybe_free_model_hooks()
        output = SegmentationPipelineOutput(masks=masks, probabilities=probabilities, std=std)
        return output if return_dict else output.to_tuple()

    def predict(self, x: torch.Tensor, num_samples: int, steps: int, generator, eta: float) -> torch.Tensor:
        """(b, C, h, w) images (tiles) in [-1, 1] -> (b, K + 1, h, w): the K class probabilities, then the
        uncertainty map (zeros for a deterministic model). Tiles blend these linearly ("same" padding)."""
        unet, dtype = self.unet, self.unet.dtype
        low_precision = torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32)
        if self.deterministic:
            with low_precision:
                probabilities = unet(x.to(dtype)).sample.float().softmax(1)
            return torch.cat([probabilities, probabilities[:, :1] * 0], 1)    # (a valid tile's output is smaller)
        classes = mask_classes(unet)
        cond = x.repeat(num_samples, *(1,) * (x.ndim - 1))                             # (N b, C, h, w), sample-major
        if isinstance(generator, list):                 # one per image: row k b + i draws from generator[i]
            generator = generator * num_samples
        noise = randn_tensor((len(cond), unet.config.in_channels, *x.shape[2:]), generator=generator,
                             device=x.device, dtype=torch.float32)

        def model(x_t, t):
            with low_precision:
                return unet(x_t.to(dtype), t, cond=cond.to(dtype)).sample.float()

        samples = sample_to_onehot(denoise(self.scheduler, model, noise, steps, generator, eta, self.progress_bar),
                                   classes)
        samples = samples.unflatten(0, (num_samples, len(x)))                          # (N, b, K, h, w)
        mean, var = samples.mean(0), samples.var(0, unbiased=False)
        return torch.cat([mean, (var.sum(1, keepdim=True) / 2).sqrt()], 1)
