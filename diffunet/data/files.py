"""Every image file diffunet reads or writes, through one decoder (``decode``): training images (``load_image``, any
PIL mode as float in [0, 1]) and their transform to the model's size and channels (``to_model_tensor``), sample
files and grids (``read_image``, ``write_image``, ``save_grid``), the image files below a folder (``image_files``,
``files_by_stem``), and training's policy for files that cannot be read (``apply_bad_image_policy``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}     # channel counts a PNG holds; others are written as .npy


# ------------------------------------------------------------------------------------------ transform

def to_array(image: Image.Image) -> np.ndarray:
    """Any PIL image as (H, W, C) float32 in [0, 1]: palette, CMYK and alpha resolved, 16-bit scaled right.

    PIL's own ``convert("L")`` clips 16-bit values at 255 instead of scaling them, so integer depths are
    scaled by their range here.
    """
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    if image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "1":
        image = image.convert("L")
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype.kind in "ui":                                # I;16 and I modes: PIL's 16-bit images
        arr = arr.astype(np.float32) / 65535.0
    else:
        arr = arr.astype(np.float32)
    arr = np.clip(arr, 0.0, 1.0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 4:                                      # RGBA: composite onto black
        arr = arr[..., :3] * arr[..., 3:]
    return arr


def match_channels(arr: np.ndarray, channels: int, where: str) -> np.ndarray:
    """(H, W, c) -> (H, W, channels): RGB to gray by luminance, gray to RGB by repetition."""
    have = arr.shape[-1]
    if have == channels:
        return arr
    if have == 3 and channels == 1:
        return arr @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
    if have == 1:
        return np.repeat(arr, channels, axis=-1)
    raise DataError(f"{where} has {have} channels and the model wants {channels}; set model.in_channels={have}")


RESIZE = {"bicubic": dict(mode="bicubic", antialias=True, align_corners=False),     # images
          # masks: stays exactly 0/1; "-exact" samples pixel centres as align_corners=False does, so it stays aligned
          "nearest": dict(mode="nearest-exact")}


def fit(x: torch.Tensor, size: tuple[int, int], resize: str = "bicubic") -> torch.Tensor:
    """(C, h, w) -> (C, H, W): resize (``RESIZE[resize]``) so the image covers ``size``, then center-crop; clamped
    to [0, 1] but for "nearest"."""
    h, w = x.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    new = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    if new != (h, w):
        x = F.interpolate(x[None], size=new, **RESIZE[resize])[0]
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    x = x[:, top:top + size[0], left:left + size[1]]
    return x if resize == "nearest" else x.clamp(0, 1)      # nearest keeps the values it samples: class ids


def resize_note(where, size: tuple[int, int], odd: list[tuple[str, str]], total: int) -> str | None:
    """What ``fit`` does to the ``odd`` (name, "WxH") of ``total`` images that are not of the model's ``size``,
    or None: said once before training, since a wrong size is otherwise silent."""
    if not odd:
        return None
    want = f"{size[1]}x{size[0]}"                           # width x height, as _wxh writes the images' sizes
    return (f"note: {len(odd)} of {total} images under {where} are not {want}: each is resized to cover {want} "
            f"and center-cropped (the first: {odd[0][0]}, {odd[0][1]})")


def _wxh(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def to_model_tensor(arr: np.ndarray, size: tuple[int, int], channels: int, where: str) -> torch.Tensor:
    """(H, W, c) float in [0, 1] -> (channels, *size) float in [-1, 1]."""
    arr = match_channels(arr, channels, where)
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return fit(x, size) * 2 - 1


def decode(path: str | Path, convert):
    """Decode one image file fully (a truncated file fails here, not later) and return ``convert(image)``.

    A decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``) is refused rather than decoded. Every
    failure is one DataError that names the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return convert(image)
    except Exception as e:  # PIL raises many types for bad files; all mean the same to the user
        reason = str(e).splitlines()[0] if str(e) else "unreadable"
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {reason}") from None


def load_image(path: Path) -> np.ndarray:
    """One file for training, as ``to_array`` gives it: (H, W, C) float32 in [0, 1], alpha composited."""
    return decode(path, to_array)


BAD_IMAGES = ("strict", "skip")


def apply_bad_image_policy(dataset, bad: list[tuple[str, str]], policy: str, warn=print) -> None:
    """``strict``: stop, naming the first bad file; ``skip``: drop them and warn once with the count. Then the
    note that preflight left on the dataset (``size_note``: images resized and cropped to the model's size), once."""
    if bad:
        _drop_bad(dataset, bad, policy, warn)
    note = getattr(dataset, "size_note", None)      # here: training calls this once, on every dataset it checks
    if note:
        warn(note)


def _drop_bad(dataset, bad: list[tuple[str, str]], policy: str, warn) -> None:
    if policy not in BAD_IMAGES:
        raise DataError(f"unknown data.bad_images {policy!r}; choose 'strict' or 'skip'")
    if policy == "strict":
        raise DataError(f"{len(bad)} unreadable image(s) under {dataset.root}, first {bad[0][1]}; fix or remove "
                        f"them, or set data.bad_images=skip")
    dataset.drop({path for path, _ in bad})
    shown = ", ".join(path for path, _ in bad[:3]) + (", ..." if len(bad) > 3 else "")
    warn(f"warning: skipping {len(bad)} unreadable image(s) under {dataset.root}: {shown}")
    if len(dataset) == 0:
        raise DataError(f"no readable images left under {dataset.root}")


# ------------------------------------------------------------------------------------------ image files

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_path(folder: str | Path, index: int, channels: int) -> Path:
    """Where image ``index`` lives: ``000042.png`` (1-4 channels) or ``000042.npy`` (any other count)."""
    return Path(folder) / f"{index:06d}.{'png' if channels in PIL_MODES else 'npy'}"


def write_image(image: np.ndarray, path: str | Path) -> Path:
    """Write one (H, W, C) uint8 image; atomically, so an interrupted run never leaves a half file behind that a
    resumed run would take for a finished image."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        if path.suffix == ".npy":
            np.save(f, image)
        else:
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image, PIL_MODES[image.shape[-1]]).save(f, "PNG")
    os.replace(part, path)
    return path


def read_image(path: str | Path) -> np.ndarray:
    """One image file (PNG, JPEG, ..., or .npy) as (H, W, C) uint8, its channels as stored (samples, metrics)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path)
    image = decode(path, np.asarray)                            # as stored: RGBA keeps its alpha, no compositing
    return image[..., None] if image.ndim == 2 else image


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Write (N, H, W, C) uint8 images as one PNG grid, ``nrow`` images per row (default: about square).
    Images of more than 4 channels show their first three."""
    n, h, w, c = images.shape
    if c not in PIL_MODES:
        images, c = images[..., :3], 3
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid, PIL_MODES[c]).save(path)
    return path


# ------------------------------------------------------------------------------------------ folders of files

def image_files(root: str | Path, suffixes=IMAGE_EXTENSIONS) -> list[Path]:
    """Every image file below ``root`` (files with one of ``suffixes``), any depth, sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def no_images(folder: str | Path) -> DataError:
    """The error for a folder without image files: which suffixes are read, and what the folder holds instead
    (a folder of .npy arrays looks like data but is not read)."""
    found = Counter(p.suffix.lower() or "suffixless" for p in Path(folder).rglob("*") if p.is_file())
    kinds = [f"{n} {suffix} file{'s' if n > 1 else ''}" for suffix, n in found.most_common(3)]
    rest = sum(found.values()) - sum(n for _, n in found.most_common(3))
    held = ", ".join(kinds) + (f" and {rest} other files" if rest else "")
    why = f"found {held}; save them in one of those formats (e.g. PNG)" if found else "the folder is empty"
    return DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {folder}: {why}")


def files_by_stem(root: str | Path, suffixes=IMAGE_EXTENSIONS) -> dict[str, Path]:
    """The image files below ``root`` by their path relative to it without suffix (``{"a/x": root/a/x.png}``);
    two files of one key are a DataError naming both."""
    found = {}
    for path in image_files(root, suffixes):
        key = path.relative_to(root).with_suffix("").as_posix()
        if key in found:
            raise DataError(f"{found[key]} and {path} have the same stem, so neither can be paired; rename or "
                            f"remove one")
        found[key] = path
    return found
