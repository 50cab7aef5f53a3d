"""Datasets (the embedded digits, image folders, Hugging Face ``datasets``, CIFAR-10; one transform to tensors),
the inpainting masks drawn per batch (``MASKS``), and every image file diffunet reads or writes: one decoder
(``decode``) for training images and sample files alike.

Every dataset yields ``(image, label)``: a (C, H, W) float tensor in [-1, 1] at the model's size and channel
count, and an int class id (-1 where the data has none). ``num_classes`` says how many classes there are (None
for unlabelled data). Paired data (a folder of ``images/`` with ``conds/`` or ``masks/``; HF datasets with
``data.cond_column`` or ``data.mask_column``) yields ``(image, label, cond)``; its ``condition`` says which
("conds" or "masks"; None elsewhere). Random flips happen on the batch in the training loop, not here.

Segmentation (``build_dataset(..., mask_classes=K)``) reads the masks as class ids 0..K-1 (``seg_data``'s rule;
``read_class_mask`` for single files), and ``weights=(w0, sigma)`` adds each mask's U-Net weight map:
``(image, label, mask, weight)``. ``data.source=cells`` is the procedural cells of ``diffunet.cells``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset

from . import cells
from .seg_data import WeightMaps, class_ids, class_values_problem
from .unet import as_size

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}     # channel counts a PNG holds; others are written as .npy


class DataError(ValueError):
    """Data that cannot be used; the message is one line naming the source or file and what to do."""


@functools.lru_cache(maxsize=4)
def digits_arrays(size: int | tuple[int, int] = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package, no download), bicubically
    upsampled: images (N, H, W, 1) uint8 with white strokes on black, labels (N,) int64 in 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = as_size(size)
    x = torch.from_numpy(digits.images).float()[:, None] / 16.0                 # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, digits.target.astype(np.int64)


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


# ------------------------------------------------------------------------------------------ datasets

class ArrayDataset(Dataset):
    """Images already in memory as a (N, C, H, W) tensor in [-1, 1], with labels."""

    condition = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None):
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def digits_dataset(size, channels: int) -> ArrayDataset:
    if channels != 1:
        raise DataError(f"data.source=digits is 1-channel but model.in_channels={channels}; "
                        f"set model.in_channels=1 (and model.out_channels)")
    images, labels = digits_arrays(tuple(size))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return ArrayDataset(x, torch.from_numpy(labels), 10)


class ImageFolder(Dataset):
    """Every image below ``root``, any depth. When all images sit in first-level subfolders, the subfolder
    names (sorted) are the classes."""

    condition = None

    def __init__(self, root: str | Path, size, channels: int):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.source {root} is not a folder (nor {', '.join(map(repr, SOURCES))} or 'hf:<name>')")
        self.files = image_files(self.root)
        if not self.files:
            raise no_images(self.root)
        parents = {p.relative_to(self.root).parts[0] for p in self.files if len(p.relative_to(self.root).parts) > 1}
        labelled = all(len(p.relative_to(self.root).parts) > 1 for p in self.files) and len(parents) > 1
        self.classes = sorted(parents) if labelled else []
        self.num_classes = len(self.classes) or None
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[p.relative_to(self.root).parts[0]] if labelled else -1 for p in self.files]
        self.size, self.channels = tuple(size), channels
        self.size_note = None                   # preflight's resize_note, which apply_bad_image_policy prints

    def _name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def preflight(self, progress: bool = False) -> list[tuple[str, str]]:
        """Decode every image once, before training: (path, reason) for each that cannot be used. Records the
        ``size_note`` of the images that are not of the model's size."""
        from tqdm.auto import tqdm

        bad, odd = [], []
        for path in tqdm(self.files, desc="checking images", disable=not progress, leave=False):
            try:
                image = load_image(path)
            except DataError as e:
                bad.append((str(path), str(e).removeprefix("cannot read image ")))
                continue
            if image.shape[:2] != self.size:
                odd.append((self._name(path), _wxh(image)))
        self.size_note = resize_note(self.root, self.size, odd, len(self.files) - len(bad))
        return bad

    def drop(self, paths: set[str]) -> None:
        keep = [i for i, p in enumerate(self.files) if str(p) not in paths]
        self.files = [self.files[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        return to_model_tensor(load_image(path), self.size, self.channels, str(path)), self.labels[i]


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


# ------------------------------------------------------------------------------------------ paired data
# The condition of an image is a second file: a conditioning image (``conds``: e.g. its low-resolution version,
# (C, H, W) in [-1, 1] like the image) or an inpainting mask (``masks``: (1, H, W), exactly 1. where a pixel is
# to be filled). Folders pair files by stem (``images/a/x.png`` with ``masks/a/x.jpg``), HF datasets by row.

def image_array(value) -> np.ndarray:
    """An image as a PIL image or an array (as ``datasets`` gives them) -> (H, W, C) float32 in [0, 1]."""
    return to_array(value) if isinstance(value, Image.Image) else _numeric(np.asarray(value))


MASK_MODES = {"1": "L", "LA": "L", "P": "RGB", "PA": "RGB", "RGBA": "RGB"}   # 1-bit as 0/255, palettes as colours


def mask_values(value) -> np.ndarray:
    """A mask as a PIL image or an array -> (H, W) or (H, W, C), its values as stored (``mask_problem`` checks them);
    alpha is dropped."""
    if isinstance(value, Image.Image) and value.mode in MASK_MODES:
        value = value.convert(MASK_MODES[value.mode])
    return np.asarray(value)


def _wxh(arr: np.ndarray) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def cond_problem(image: np.ndarray, cond: np.ndarray, image_name: str, cond_name: str) -> str | None:
    """Why ``cond`` cannot condition ``image`` (both (H, W, C)), or None: another aspect ratio, beyond a pixel of
    rounding (|hc w - wc h| <= h + w for a resized copy), would not align once each is fitted to the model's size."""
    (h, w), (hc, wc) = image.shape[:2], cond.shape[:2]
    if abs(hc * w - wc * h) > h + w:
        return f"{cond_name} is {_wxh(cond)} but {image_name} is {_wxh(image)}: another aspect ratio"
    return None


def mask_layout_problem(image: np.ndarray | None, mask: np.ndarray, image_name: str | None,
                        mask_name: str) -> str | None:
    """What every mask (as ``mask_values`` reads it) must be, or why not: (H, W) or (H, W, C) with equal channels,
    of its image's size (``image`` (H, W, C); None: any size)."""
    if mask.ndim not in (2, 3):
        return f"{mask_name} has shape {mask.shape}; a mask is (H, W) or (H, W, C)"
    if mask.ndim == 3 and not (mask == mask[..., :1]).all():
        return f"{mask_name} has channels that differ; a mask is gray, or RGB with equal channels"
    if image is not None and mask.shape[:2] != image.shape[:2]:
        return f"{mask_name} is {_wxh(mask)} but {image_name} is {_wxh(image)}"
    return None


def _gray(mask: np.ndarray) -> np.ndarray:
    return mask[..., 0] if mask.ndim == 3 else mask


def mask_problem(image: np.ndarray, mask: np.ndarray, image_name: str, mask_name: str) -> str | None:
    """Why ``mask`` (as ``mask_values`` reads it) cannot be the inpainting mask of ``image`` (H, W, C), or None."""
    problem = mask_layout_problem(image, mask, image_name, mask_name)
    if problem:
        return problem
    values = np.unique(mask)
    odd = values[~np.isin(values, (0, 255) if values.max() > 1 else (0, 1))]
    if odd.size:
        return f"{mask_name} has values other than 0/255 or 0/1 (e.g. {odd[0]:g}); save masks binary, as PNG"
    return None


def mask_tensor(mask: np.ndarray, size: tuple[int, int], channels: int, where: str) -> torch.Tensor:
    """A checked mask (H, W[, C]) -> (1, *size) float, exactly 1. where a pixel is to be filled, whatever the
    image's ``channels``: the image's cover-and-crop geometry, resized by nearest neighbour."""
    return fit(torch.from_numpy((_gray(mask) > 0).astype(np.float32))[None], size, "nearest")


def read_mask(path: Path, image: np.ndarray, image_name: str) -> np.ndarray:
    """The mask file of ``image`` (H, W, C) as (H, W, 1) float, 1 where a pixel is to be filled, checked as
    training's masks are (``mask_problem``: 0/255 or 0/1, white / 1 = to fill, the image's size); a DataError
    naming the file otherwise. sample.py's and evaluate's ``--mask`` read their files with it."""
    mask = decode(path, mask_values)
    problem = mask_problem(image, mask, image_name, str(path))
    if problem:
        raise DataError(problem)
    return (_gray(mask) > 0).astype(np.float32)[..., None]


def class_mask_problem(image: np.ndarray | None, mask: np.ndarray, image_name: str | None, mask_name: str, *,
                       classes: int) -> str | None:
    """Why ``mask`` cannot be the segmentation mask of ``image`` for a ``classes``-class model, or None: a mask's
    layout, then class ids 0..classes-1 or 0/255 (``seg_data.class_values_problem``)."""
    return (mask_layout_problem(image, mask, image_name, mask_name)
            or class_values_problem(_gray(mask), classes, mask_name))


def class_mask_tensor(mask: np.ndarray, size: tuple[int, int], channels: int, where: str) -> torch.Tensor:
    """A checked segmentation mask -> (1, *size) float32 class ids, in the image's geometry (as ``mask_tensor``)."""
    return fit(torch.from_numpy(class_ids(_gray(mask)).astype(np.float32))[None], size, "nearest")


def read_class_mask(path: str | Path, classes: int) -> np.ndarray:
    """A segmentation mask file as (H, W) int64 class ids, checked as training's are (``class_mask_problem``,
    any size); a DataError naming the file otherwise. Evaluation and sample.py read ground truth with it."""
    mask = decode(path, mask_values)
    problem = class_mask_problem(None, mask, None, str(path), classes=classes)
    if problem:
        raise DataError(problem)
    return class_ids(_gray(mask))


@dataclass(frozen=True)
class Partner:
    """How one kind of condition is read, checked against its image, and made the condition tensor."""
    read: Callable          # a PIL image or array -> array
    problem: Callable       # (image (H, W, C), read partner, image name, partner name) -> reason or None
    tensor: Callable        # (read partner, size, channels, name) -> the condition tensor


PARTNERS = {"conds": Partner(image_array, cond_problem, to_model_tensor),         # a folder's name: its partner
            "masks": Partner(mask_values, mask_problem, mask_tensor)}


def class_masks(classes: int) -> Partner:
    """The partner of segmentation: ``masks`` read as class ids of a ``classes``-class model."""
    return Partner(mask_values, functools.partial(class_mask_problem, classes=classes), class_mask_tensor)


def pairing(condition: str | None, mask_classes: int | None, weights: tuple[float, float] | None, where: str,
            fix: str) -> tuple[Partner | None, WeightMaps | None]:
    """How a paired dataset reads its partners (``PARTNERS[condition]``; with ``mask_classes``, ``class_masks``) and
    its weight maps (None without ``weights``). Segmentation and weights need masks: a DataError saying ``fix``."""
    if (mask_classes is not None or weights is not None) and condition != "masks":
        raise DataError(f"{where} has no masks to segment; {fix}")
    if condition is None:
        return None, None
    partner = PARTNERS[condition] if mask_classes is None else class_masks(mask_classes)
    return partner, WeightMaps(*weights) if weights is not None else None


def paired_item(entry: Partner, image: np.ndarray, partner, size, channels: int, image_name: str,
                partner_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, cond) tensors of one pair, ``image`` read by ``image_array``, ``partner`` by ``entry.read``;
    a DataError (one line, naming both) where they do not go together."""
    problem = entry.problem(image, partner, image_name, partner_name)
    if problem:
        raise DataError(problem)
    return to_model_tensor(image, size, channels, image_name), entry.tensor(partner, size, channels, partner_name)


def pair_files(a_root: str | Path, b_root: str | Path) -> tuple[list[tuple[Path, Path]], list[Path], list[Path]]:
    """Pair the image files below two folders by their path relative to each, without suffix ("same stem, at any
    depth": ``a_root/s/x.png`` with ``b_root/s/x.jpg``); nothing is decoded. Returns (the pairs, in order of that
    key; the files of ``a_root`` without a partner; those of ``b_root``). Two files of one folder with the same key
    are a DataError naming both. Training pairs ``images/`` with ``conds/`` or ``masks/`` by it, and
    ``sample.py --cond DIR --mask DIR`` its two folders."""
    a, b = files_by_stem(a_root), files_by_stem(b_root)
    return ([(a[k], b[k]) for k in sorted(a.keys() & b.keys())],
            [a[k] for k in sorted(a.keys() - b.keys())], [b[k] for k in sorted(b.keys() - a.keys())])


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


def paired_kind(root: str | Path) -> str | None:
    """"conds" or "masks" where the folder ``root`` holds ``images/`` and that partner folder; None otherwise."""
    root = Path(root)
    kinds = [kind for kind in PARTNERS if (root / kind).is_dir()] if (root / "images").is_dir() else []
    if len(kinds) > 1:
        raise DataError(f"{root} holds images/ and both {'/ and '.join(kinds)}/; keep one (conds/ for "
                        f"super-resolution inputs, masks/ for inpainting)")
    return kinds[0] if kinds else None


class PairedFolder(ImageFolder):
    """``root/images/`` with ``root/conds/`` or ``root/masks/``: each image with the file of the same stem, at the
    same depth, in the other (``pair_files``). Items are (image, label, cond), or with ``weights`` (image, label,
    mask, weight); ``mask_classes``: masks of class ids (``build_dataset``). It is the ImageFolder of ``images/``
    (the same classes rule, the same ``preflight`` and ``drop`` contract), so training's bad-image check covers it;
    its messages name files relative to ``root``."""

    def __init__(self, root: str | Path, size, channels: int, mask_classes: int | None = None,
                 weights: tuple[float, float] | None = None):
        root = Path(root)
        self.condition = paired_kind(root)
        if self.condition is None:
            raise DataError(f"{root} is not paired data: it needs images/ and one of {'/, '.join(PARTNERS)}/")
        self.pairing, self.weight_maps = pairing(self.condition, mask_classes, weights, str(root),
                                                 "segmentation reads class-id masks from masks/")
        super().__init__(root / "images", size, channels)
        self.root = root
        if not image_files(root / self.condition):
            raise no_images(root / self.condition)
        pairs, _, self.lone_partners = pair_files(root / "images", root / self.condition)
        partner_of = dict(pairs)
        self.partners = [partner_of.get(path) for path in self.files]          # None: no partner

    def _lone(self, path: Path, other: str) -> str:
        stem = Path(*path.relative_to(self.root).parts[1:]).with_suffix("").as_posix()
        return f"{self._name(path)} has no partner in {other}/ (expected {other}/{stem}.<ext>)"

    def unpaired(self) -> list[tuple[str, str]]:
        """(path, reason) for each file without a partner, from the file names alone: nothing is decoded."""
        return ([(str(p), self._lone(p, self.condition)) for p, q in zip(self.files, self.partners) if q is None]
                + [(str(q), self._lone(q, "images")) for q in self.lone_partners])

    def preflight(self, progress: bool = False) -> list[tuple[str, str]]:
        """``unpaired()``, then each pair decoded and checked once (readable, and a mask of its image's size with
        values 0/1 or 0/255, or class ids): (path, reason) for each file that cannot be used."""
        from tqdm.auto import tqdm

        bad, entry, odd, kept = self.unpaired(), self.pairing, [], 0
        pairs = [(p, q) for p, q in zip(self.files, self.partners) if q is not None]
        for path, partner in tqdm(pairs, desc="checking pairs", disable=not progress, leave=False):
            try:
                image = load_image(path)
            except DataError as e:
                bad.append((str(path), str(e).removeprefix("cannot read image ")))
                continue
            try:
                problem = entry.problem(image, decode(partner, entry.read), self._name(path), self._name(partner))
            except DataError as e:
                problem = str(e).removeprefix("cannot read image ")
            if problem:
                bad.append((str(partner), problem))
                continue
            kept += 1                                   # the note counts the pairs training keeps
            if image.shape[:2] != self.size:
                odd.append((self._name(path), _wxh(image)))
        self.size_note = resize_note(self.root, self.size, odd, kept)
        return bad

    def drop(self, paths: set[str]) -> None:
        """Drop the items whose image or partner is in ``paths``."""
        partner_of = dict(zip(self.files, self.partners))
        super().drop(paths | {str(p) for p, q in partner_of.items() if str(q) in paths})
        self.partners = [partner_of[p] for p in self.files]
        self.lone_partners = [q for q in self.lone_partners if str(q) not in paths]
        if self.weight_maps:
            self.weight_maps.clear()                    # kept by index, and the indices moved

    def __getitem__(self, i):
        path, partner = self.files[i], self.partners[i]
        if partner is None:
            raise DataError(f"{self.root}: {self._lone(path, self.condition)}")
        image, cond = paired_item(self.pairing, load_image(path), decode(partner, self.pairing.read), self.size,
                                  self.channels, str(path), str(partner))
        return (image, self.labels[i], cond) + ((self.weight_maps(i, cond),) if self.weight_maps else ())


class HFDataset(Dataset):
    """A Hugging Face ``datasets`` dataset: a hub name (from the local cache when offline), a data folder, or a
    folder written by ``save_to_disk``. With ``cond_column`` (conditioning images) or ``mask_column`` (inpainting
    masks, PIL images or arrays; class ids with ``mask_classes``) its items are (image, label, cond), as a
    PairedFolder's, and (image, label, mask, weight) with ``weights``."""

    def __init__(self, spec: str, size, channels: int, image_column: str, label_column: str | None, split: str,
                 cond_column: str | None = None, mask_column: str | None = None, mask_classes: int | None = None,
                 weights: tuple[float, float] | None = None):
        try:
            import datasets
        except ImportError:
            raise DataError("data.source=hf:... needs the datasets package: pip install 'diffunet[hf]'") from None
        try:
            if (Path(spec) / "dataset_info.json").exists() or (Path(spec) / "state.json").exists():
                ds = datasets.load_from_disk(spec)
            else:
                ds = datasets.load_dataset(spec, split=split)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        except Exception as e:
            raise DataError(f"cannot load dataset '{spec}': {str(e).splitlines()[0]}") from None
        for key, column in (("image_column", image_column), ("cond_column", cond_column), ("mask_column", mask_column)):
            if column is not None and column not in ds.column_names:
                raise DataError(f"dataset '{spec}' has no column '{column}' (columns: {', '.join(ds.column_names)}); "
                                f"set data.{key}")
        if cond_column and mask_column:
            raise DataError(f"data.cond_column and data.mask_column are both set for '{spec}'; keep one "
                            f"(cond_column for super-resolution inputs, mask_column for inpainting)")
        self.ds, self.spec, self.image_column = ds, spec, image_column
        self.condition = "conds" if cond_column else "masks" if mask_column else None        # a key of PARTNERS
        self.cond_column = cond_column or mask_column
        self.pairing, self.weight_maps = pairing(self.condition, mask_classes, weights, f"dataset '{spec}'",
                                                 "set data.mask_column to its column of class-id masks")
        self.label_column = label_column if label_column in ds.column_names else None
        self.num_classes = None
        if self.label_column is not None:
            feature = ds.features[self.label_column]
            self.num_classes = getattr(feature, "num_classes", None) or int(max(ds[self.label_column])) + 1
        self.size, self.channels = tuple(size), channels
        self.size_note = None                   # as an ImageFolder's: rows whose image is resized, by preflight

    @property
    def root(self) -> str:                      # what apply_bad_image_policy's messages name
        return self.spec

    def preflight(self, progress: bool = False) -> list[tuple[str, str]]:
        """With a condition column, read every row once before training, as a PairedFolder's preflight does:
        (row, reason) for each whose image and condition do not go together (a mask of another size, other
        values), and the ``size_note``. Without one, nothing: rows are read as training reaches them."""
        from tqdm.auto import tqdm

        if self.condition is None:
            return []
        bad, odd = [], []
        for i in tqdm(range(len(self.ds)), desc="checking rows", disable=not progress, leave=False):
            try:
                read = self._read(i)
                self._pair(i, read)
            except DataError as e:
                bad.append((f"{self.spec}[{i}]", str(e)))
                continue
            image, _, _, where = read
            if image.shape[:2] != self.size:
                odd.append((where, _wxh(image)))
        self.size_note = resize_note(f"dataset '{self.spec}'", self.size, odd, len(self.ds) - len(bad))
        return bad

    def drop(self, rows: set[str]) -> None:
        self.ds = self.ds.select([i for i in range(len(self.ds)) if f"{self.spec}[{i}]" not in rows])
        if self.weight_maps:
            self.weight_maps.clear()

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self._pair(i)
        return item + ((self.weight_maps(i, item[2]),) if self.weight_maps else ())

    def _read(self, i):
        """Row ``i`` as (its image (H, W, C) in [0, 1], its label, the row, its name)."""
        row, where = self.ds[i], f"{self.spec}[{i}]"
        label = int(row[self.label_column]) if self.label_column is not None else -1
        return image_array(row[self.image_column]), label, row, where

    def _pair(self, i, read=None):
        """Item ``i`` without its weight map (from ``read``, ``_read(i)`` if given): what preflight checks."""
        image, label, row, where = read or self._read(i)
        if self.condition is None:
            return to_model_tensor(image, self.size, self.channels, where), label
        partner = self.pairing.read(row[self.cond_column])
        image, cond = paired_item(self.pairing, image, partner, self.size, self.channels,
                                  f"{where}.{self.image_column}", f"{where}.{self.cond_column}")
        return image, label, cond


def _numeric(arr: np.ndarray) -> np.ndarray:
    """An array image (H, W[, C]) as float in [0, 1]: integers by their range, floats as they are."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype.kind in "ui":
        return arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 65535.0)
    return arr.astype(np.float32)


def cifar10_dataset(size, channels: int, root: str | Path = "~/.cache/diffunet/cifar10") -> ArrayDataset:
    try:
        import torchvision
    except ImportError:
        raise DataError("data.source=cifar10 needs torchvision: pip install 'diffunet[vision]'") from None
    try:
        ds = torchvision.datasets.CIFAR10(Path(root).expanduser(), train=True, download=True)
    except Exception as e:
        raise DataError(f"cannot get CIFAR-10 into {root}: {str(e).splitlines()[0]}") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
    if tuple(size) != (32, 32):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", antialias=True).clamp(0, 1)
    if channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    elif channels != 3:
        raise DataError(f"CIFAR-10 is RGB; set model.in_channels=3 (got {channels})")
    return ArrayDataset(x * 2 - 1, torch.tensor(ds.targets), 10)


class DatasetPart(Subset):
    """The items of ``dataset`` at ``indices``, with the attributes training reads of a dataset."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        super().__init__(dataset, indices)
        self.num_classes = getattr(dataset, "num_classes", None)
        self.condition = getattr(dataset, "condition", None)
        self.root = getattr(dataset, "root", None)


def take_subset(dataset: Dataset, n: int) -> Dataset:
    """``data.subset``: a fixed random ``n`` of the items (the first ``n`` of ``RandomState(0)``'s permutation, in
    index order), to train on a small dataset cut from a larger one; ``n=0``: ``dataset``. Taken after the
    bad-image policy and before ``split_holdout``, so a script that builds the same dataset gets the same images."""
    if n == 0:
        return dataset
    if not 0 < n <= len(dataset):
        raise DataError(f"data.subset={n} but the dataset has {len(dataset)} images; set 1 to {len(dataset)} "
                        f"(0: all)")
    order = np.random.RandomState(0).permutation(len(dataset))
    return DatasetPart(dataset, sorted(order[:n].tolist()))


def split_holdout(dataset: Dataset, n: int) -> tuple[Dataset, DatasetPart | None]:
    """``data.holdout``: (the training part, the ``n`` held-out items); ``n=0``: (``dataset``, None).

    A fixed split: the held-out items are the first ``n`` of ``numpy.random.RandomState(0).permutation(len(dataset))``
    (each part in index order), whatever ``train.seed``, so a script that builds the same dataset and calls this
    gets the same held-out images. Split after the bad-image policy has dropped files: the indices are positions
    in the dataset as it is then.
    """
    if n == 0:
        return dataset, None
    if not 0 < n < len(dataset):
        raise DataError(f"data.holdout={n} but the dataset has {len(dataset)} images; hold out 0 to {len(dataset) - 1}")
    order = np.random.RandomState(0).permutation(len(dataset))     # the legacy stream is frozen (NEP 19): stable
    return DatasetPart(dataset, sorted(order[n:].tolist())), DatasetPart(dataset, sorted(order[:n].tolist()))


def cells_source(n: int, size: tuple[int, int], channels: int, mask_classes: int | None,
                 weights: tuple[float, float] | None) -> cells.CellsDataset:
    """``data.source=cells``: ``n`` crops of the procedural cells (``cells.cells_dataset``, seed 0) at the model's
    square size; the items always carry the weight map (``weights``, or the cells' defaults)."""
    if channels != 1:
        raise DataError("data.source=cells is grayscale, square crops: set model.in_channels=1")
    if size[0] != size[1]:
        raise DataError("data.source=cells is grayscale, square crops: set model.sample_size to one int")
    if mask_classes not in (None, 2):
        raise DataError(f"data.source=cells has 2 classes (background, cell) but the model has {mask_classes}; "
                        f"set model.out_channels=2")
    options = dict(zip(("w0", "sigma"), weights)) if weights is not None else {}
    # crops tile 256 px images (cells_arrays' default); a larger crop needs images that hold it
    return cells.cells_dataset(n, crop=size[0], seed=0, source=max(256, size[0]), **options)


@dataclass(frozen=True)
class NamedSource:
    """A ``data.source`` that is a name, not a path."""
    build: Callable         # (data_cfg, size, channels, mask_classes=, weights=) -> Dataset
    masks: bool             # it has masks to segment


SOURCES = {     # the names data.source takes; every other value is "hf:<name>" or a folder
    "digits": NamedSource(lambda cfg, size, channels, **_: digits_dataset(size, channels), masks=False),
    "cifar10": NamedSource(lambda cfg, size, channels, **_: cifar10_dataset(size, channels), masks=False),
    "cells": NamedSource(lambda cfg, size, channels, **segment: cells_source(cfg.num_crops, size, channels, **segment),
                         masks=True),
}


def build_dataset(data_cfg, sample_size, channels: int, *, mask_classes: int | None = None,
                  weights: tuple[float, float] | None = None) -> Dataset:
    """The dataset ``data.source`` names, at the model's size and channel count.

    mask_classes: None: masks are inpainting masks; K: segmentation masks of class ids 0..K-1 (0/255 read as 0/1),
                  for paired folders' masks/, ``data.mask_column`` and the cells
    weights:      (w0, sigma): items gain the U-Net weight map of their mask, (image, label, mask, weight); the
                  cells always carry it
    """
    size = as_size(sample_size)
    source = str(data_cfg.source)
    segment = dict(mask_classes=mask_classes, weights=weights)
    if source in SOURCES:
        named = SOURCES[source]
        if not named.masks and (mask_classes is not None or weights is not None):
            with_masks = ", ".join(f"data.source={name}" for name, s in SOURCES.items() if s.masks)
            raise DataError(f"data.source={source} has no masks to segment; use {with_masks}, a folder of "
                            f"images/ and masks/, or hf:... with data.mask_column")
        return named.build(data_cfg, size, channels, **segment)
    if source.startswith("hf:"):
        return HFDataset(source[3:], size, channels, data_cfg.image_column, data_cfg.label_column, data_cfg.split,
                         data_cfg.cond_column, data_cfg.mask_column, **segment)
    if paired_kind(source) or mask_classes is not None or weights is not None:
        return PairedFolder(source, size, channels, **segment)
    return ImageFolder(source, size, channels)
