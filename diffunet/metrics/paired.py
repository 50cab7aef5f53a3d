"""Per-image scores of outputs against their truths: PSNR, SSIM, LPIPS and a classifier's accuracy, for the
image-conditioned jobs (super-resolution, inpainting), by torchmetrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..config import EvalConfig
from .fid import _device, extract, load_extractor

PSNR_CAP = 100.0                                    # dB; identical images have infinite PSNR (see paired_scores)
LPIPS_MIN_SIDE = 64                                 # LPIPS inputs are upsampled to at least this (AlexNet needs >= 31)
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"   # torchvision's AlexNet weights


# ------------------------------------------------------------------------------------------- paired metrics

def _as_nchw(images, what: str, dtype=torch.uint8) -> torch.Tensor:
    """numpy (N, H, W, C) or (N, H, W), or torch (N, C, H, W) -> torch (N, C, H, W), of ``dtype``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images[..., None] if images.ndim == 3 else images))
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images     # (N, H, W, C) -> (N, C, H, W)
    if images.ndim != 4 or (dtype is not None and images.dtype != dtype):
        raise ValueError(f"{what}: expected {dtype or ''} images, numpy (N, H, W, C) or torch (N, C, H, W); got "
                         f"{type(images).__name__} {tuple(images.shape)} {images.dtype}")
    return images


@torch.no_grad()
def classify(images, classifier: str | Path | nn.Module = "digits", *, batch_size: int = EvalConfig.batch_size,
             device=None) -> torch.Tensor:
    """Predicted class (N,) int64 of uint8 images (numpy (N, H, W, C) or torch (N, C, H, W)) under ``classifier``
    (what ``load_extractor`` takes: ``"digits"`` by default)."""
    device = _device(device)
    x = _as_nchw(images, "classify").permute(0, 2, 3, 1).cpu().numpy()    # extract takes (N, H, W, C)
    return extract(load_extractor(classifier).to(device), x, batch_size, device)[1].argmax(1)


def ssim_kernel(height: int, width: int) -> tuple[int, float]:
    """(kernel size, sigma) of SSIM's Gaussian window for an image: the standard 11 / 1.5 (Wang et al. 2004)
    where both sides are at least 11, else the largest odd size that fits, sigma scaled with it (torchmetrics
    sizes the window from sigma, int(3.5 sigma + 0.5) * 2 + 1, and reflects pad = size // 2 < side)."""
    k = min(11, (min(height, width) - 1) // 2 * 2 + 1)
    return k, 1.5 * k / 11


def lpips_metric(device=None):
    """torchmetrics' LPIPS (AlexNet, inputs in [0, 1]) where it can be built offline, else (None, a one-line note
    on how to get it). It needs torchvision and AlexNet's ImageNet weights in the torch hub cache; built without
    them, torchvision would try to download."""
    import importlib.util

    weights = Path(torch.hub.get_dir()) / "checkpoints" / Path(ALEXNET_URL).name
    if importlib.util.find_spec("torchvision") is None or not weights.is_file():
        return None, ("lpips: unavailable offline (needs torchvision and cached AlexNet weights: pip install "
                      f"'diffunet[vision]' and put {ALEXNET_URL} in {weights.parent})")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device), None


@torch.no_grad()
def paired_scores(outputs, truth, *, mask=None, labels=None, classifier: str | Path | nn.Module | None = "digits",
                  lpips: bool = True, device=None, batch_size: int = EvalConfig.batch_size) -> dict:
    """Scores of image-conditioned outputs (super-resolution, inpainting) against their truth, image by image.

    Args:
        outputs: uint8 images, numpy (N, H, W, C) or torch (N, C, H, W); scored in [0, 1].
        truth: uint8 images of the outputs' shape, their truth.
        mask: (N, H, W[, 1]) numpy or (N, 1, H, W) torch, bool or 0/1 (or 0/255): 1 marks the filled region.
        labels: (N,) class ids: adds the fraction of outputs that ``classifier`` puts in their class.
        classifier: what ``load_extractor`` takes (default the digits classifier); used only with ``labels``.
        lpips: add LPIPS where it can be built offline (``lpips_metric``), else a line in ``notes``.

    Returns:
        dict(psnr, ssim, [psnr_masked], [accuracy], [lpips], num_images, [notes]). psnr: mean over images of each
        image's PSNR (dB, all channels), capped at ``PSNR_CAP`` = 100 dB so that identical images keep the mean
        finite (a one-level error on one pixel of a 256x256 RGB image is 101 dB). ssim: torchmetrics' SSIM, mean
        over images, with the window of ``ssim_kernel`` (11x11, sigma 1.5 for images of 11 pixels or more a side).
        psnr_masked: mean over images of the PSNR of the masked pixels only (all channels), capped likewise;
        images with an empty mask are left out (and counted in ``notes``). accuracy: fraction of outputs
        classified as their label. lpips: torchmetrics' LPIPS (AlexNet), mean over images, lower is closer; gray
        images are repeated to RGB, images under 64 pixels a side are upsampled (bilinear, by an integer factor)
        to at least 64.
    """
    device = _device(device)
    outputs, truth = _as_nchw(outputs, "outputs"), _as_nchw(truth, "truth")
    if outputs.shape != truth.shape:
        raise ValueError(f"outputs {tuple(outputs.shape)} and truth {tuple(truth.shape)} differ in shape (N, C, H, W)")
    n, c, h, w = outputs.shape
    if n == 0:
        raise ValueError("no images to score")
    if mask is not None:
        mask = _as_nchw(mask, "mask", dtype=None)
        if mask.shape != (n, 1, h, w):
            raise ValueError(f"mask {tuple(mask.shape)} is not one (1, H, W) mask per image {(n, 1, h, w)}")
        values = set(mask.unique().tolist())
        if not (values <= {0, 1} or values <= {0, 255}):
            raise ValueError("mask values must be 0/1 (or 0/255), 1 marking the filled region")
        mask = mask != 0
    if labels is not None:
        if classifier is None:
            raise ValueError("labels need a classifier to score the outputs with (e.g. classifier='digits')")
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (n,):
            raise ValueError(f"labels {tuple(labels.shape)} are not one class id per image ({n},)")
    notes = []
    kernel_size, sigma = ssim_kernel(h, w)
    lpips_net, note = lpips_metric(device) if lpips else (None, None)
    if note or (lpips_net is not None and c not in (1, 3)):
        notes.append(note or f"lpips: needs 1- or 3-channel images, got {c}")
        lpips_net = None
    psnr, ssim, psnr_masked = [], [], []
    for lo in range(0, n, batch_size):
        o, t = (x[lo:lo + batch_size].to(device).float() / 255 for x in (outputs, truth))
        psnr.append(peak_signal_noise_ratio(o, t, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        ssim.append(structural_similarity_index_measure(o, t, data_range=1.0, reduction="none",
                                                        kernel_size=kernel_size, sigma=sigma))
        if mask is not None:
            m = mask[lo:lo + batch_size].to(device)
            mse = ((o - t) ** 2 * m).sum((1, 2, 3)) / (m.sum((1, 2, 3)) * c)        # nan for an empty mask
            psnr_masked.append(-10 * torch.log10(mse))
        if lpips_net is not None:
            if c == 1:
                o, t = o.expand(-1, 3, -1, -1), t.expand(-1, 3, -1, -1)        # (B, 1, H, W) -> (B, 3, H, W)
            if min(h, w) < LPIPS_MIN_SIDE:
                factor = math.ceil(LPIPS_MIN_SIDE / min(h, w))      # (B, 3, H, W) -> (B, 3, fH, fW)
                o, t = (F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False) for x in (o, t))
            lpips_net.update(o, t)
    out = dict(psnr=torch.cat(psnr).clamp(max=PSNR_CAP).mean().item(), ssim=torch.cat(ssim).mean().item())
    if mask is not None:
        values = torch.cat(psnr_masked)
        empty = int(values.isnan().sum())
        out["psnr_masked"] = values.clamp(max=PSNR_CAP).nanmean().item()
        if empty:
            notes.append(f"psnr_masked: {empty} of {n} images have an empty mask and are left out")
    if labels is not None:
        predicted = classify(outputs, classifier, batch_size=batch_size, device=device)
        out["accuracy"] = (predicted == labels).double().mean().item()
    if lpips_net is not None:
        out["lpips"] = lpips_net.compute().item()
    out["num_images"] = n
    return dict(out, notes=notes) if notes else out


def array_scores(outputs: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
                 baselines: dict[str, torch.Tensor] | None = None) -> dict:
    """PSNR and mean absolute error of signals or volumes (N, C, *S) in [-1, 1] against their truth, on the
    [0, 1] scale the image scores use; SSIM for volumes (torchmetrics' 3D SSIM, the window of ``ssim_kernel`` for
    the smallest side); with ``mask`` (N, 1, *S), 1 where a value was filled, the same on the filled
    region alone (``psnr_masked``, ``mae_masked``): what inpainting and imputation are scored by. ``baselines``
    (name -> outputs of a classical method, e.g. "linear" interpolation) are scored alike, as ``psnr_<name>``,
    ``mae_masked_<name>``, ..., so that a log line says what the model adds."""
    if outputs.shape != truth.shape:
        raise ValueError(f"outputs {tuple(outputs.shape)} and truth {tuple(truth.shape)} differ in shape")
    o, t = ((x.float().cpu() + 1) / 2 for x in (outputs, truth))
    spatial = tuple(range(1, o.ndim))
    err = (o - t).abs()
    out = {"psnr": peak_signal_noise_ratio(o, t, data_range=1.0, reduction="none", dim=spatial)
           .clamp(max=PSNR_CAP).mean().item(), "mae": err.mean().item()}
    if o.ndim == 5:
        kernel, sigma = ssim_kernel(min(o.shape[2:]), min(o.shape[2:]))
        out["ssim"] = structural_similarity_index_measure(o, t, data_range=1.0, kernel_size=kernel,
                                                          sigma=sigma).item()
    if mask is not None:
        m = mask.float().cpu().expand_as(o)
        filled = m.sum(spatial).clamp(min=1)
        mse = ((o - t) ** 2 * m).sum(spatial) / filled
        out["psnr_masked"] = (-10 * torch.log10(mse.clamp(min=1e-10))).clamp(max=PSNR_CAP).mean().item()
        out["mae_masked"] = ((err * m).sum(spatial) / filled).mean().item()
    for name, values in (baselines or {}).items():
        scored = array_scores(values, truth, mask)
        out.update({f"{key}_{name}": v for key, v in scored.items() if key != "num_images"})
    out["num_images"] = len(o)
    return out


def linear_fill(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Signals (N, C, L) with the samples where ``mask`` (N, 1, L) is 1 replaced by linear interpolation between
    the known ones (constant beyond the first and last): imputation's classical baseline."""
    out = x.detach().float().cpu().numpy().copy()
    unknown = mask.cpu().numpy()[:, 0] > 0
    at = np.arange(x.shape[-1])
    for n in range(len(out)):
        gaps, known = unknown[n], ~unknown[n]
        if gaps.any() and known.any():
            for c in range(out.shape[1]):
                out[n, c, gaps] = np.interp(at[gaps], at[known], out[n, c, known])
    return torch.from_numpy(out)


def cubic_upsample(low: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(N, C, *s) -> (N, C, *size) by cubic spline interpolation (scipy's ``zoom``, order 3, pixel centres
    aligned as ``align_corners=False`` aligns them): tricubic for volumes, which torch's ``interpolate`` lacks."""
    from scipy import ndimage

    arr = low.detach().float().cpu().numpy()
    zoom = [1, 1] + [t / s for t, s in zip(size, arr.shape[2:])]
    return torch.from_numpy(ndimage.zoom(arr, zoom, order=3, mode="nearest", grid_mode=True)).clamp(-1, 1)
