"""Image folders and paired data: ``ImageFolder`` (every image below a folder; first-level subfolders are the
classes), ``PairedFolder`` (``images/`` with ``conds/`` or ``masks/``, paired by stem: ``pair_files``), and the
pairing rules every paired dataset shares, HF datasets included (``PARTNERS``: how a partner file is read, checked
against its image and made a tensor; ``class_masks`` for segmentation; ``pairing``, ``paired_item``).

The masks here are the files of a pair: inpainting masks (0/1: ``read_mask``) or class ids (``seg_masks``' rule:
``read_class_mask``); sampling and evaluation read single mask files with the same two readers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .files import (_wxh, decode, files_by_stem, fit, image_files, load_image, no_images, resize_note, to_array,
                    to_model_tensor)
from .seg_masks import WeightMaps, class_ids, class_values_problem


class ImageFolder(Dataset):
    """Every image below ``root``, any depth. When all images sit in first-level subfolders, the subfolder
    names (sorted) are the classes."""

    condition = None

    def __init__(self, root: str | Path, size, channels: int):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{root} is not a folder")
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

# ------------------------------------------------------------------------------------------ paired data
# The condition of an image is a second file: a conditioning image (``conds``: e.g. its low-resolution version,
# (C, H, W) in [-1, 1] like the image) or an inpainting mask (``masks``: (1, H, W), exactly 1. where a pixel is
# to be filled). Folders pair files by stem (``images/a/x.png`` with ``masks/a/x.jpg``), HF datasets by row.

def image_array(value) -> np.ndarray:
    """An image as a PIL image or an array (as ``datasets`` gives them) -> (H, W, C) float32 in [0, 1]."""
    return to_array(value) if isinstance(value, Image.Image) else _numeric(np.asarray(value))


def _numeric(arr: np.ndarray) -> np.ndarray:
    """An array image (H, W[, C]) as float in [0, 1]: integers by their range, floats as they are."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype.kind in "ui":
        return arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 65535.0)
    return arr.astype(np.float32)


MASK_MODES = {"1": "L", "LA": "L", "P": "RGB", "PA": "RGB", "RGBA": "RGB"}   # 1-bit as 0/255, palettes as colours


def mask_values(value) -> np.ndarray:
    """A mask as a PIL image or an array -> (H, W) or (H, W, C), its values as stored (``mask_problem`` checks them);
    alpha is dropped."""
    if isinstance(value, Image.Image) and value.mode in MASK_MODES:
        value = value.convert(MASK_MODES[value.mode])
    return np.asarray(value)


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
    layout, then class ids 0..classes-1 or 0/255 (``seg_masks.class_values_problem``)."""
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
