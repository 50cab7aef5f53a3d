"""The datasets by source: the names ``data.source`` takes (``SOURCES``: the embedded digits, CIFAR-10, the
procedural cells) and Hugging Face ``datasets`` (``HFDataset``, ``hf:<name>``); a folder is ``folders``'.

Each ``Source`` carries what other modules ask of a name (has it masks to segment, is it an FID reference, which
offline classifier reads its classes), so they look the name up (``source_of``) instead of comparing it with
"digits".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError
from ..model.tables import as_size
from . import cells, synthetic
from .files import _wxh, resize_note, to_model_tensor
from .folders import image_array, paired_item, pairing
from .patches import ArraySamples


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


def signals_source(n: int, size: tuple[int], channels: int, mask_classes: int | None, weights) -> ArraySamples:
    """``data.source=signals``: ``n`` signals of the embedded family (``synthetic.signals_arrays``, seed 0), four
    classes in turn, at the model's length."""
    if channels != 1:
        raise DataError("data.source=signals is 1-channel: set model.in_channels=1 (and model.out_channels)")
    signals, labels = synthetic.signals_arrays(n, size[0], seed=0)
    return ArraySamples(signals, labels, size, len(synthetic.SIGNAL_CLASSES))


def cells3d_source(n: int, size: tuple[int, int, int], channels: int, mask_classes: int | None, weights,
                   pos_ratio: float = 0.0) -> ArraySamples:
    """``data.source=cells3d``: ``n`` nuclei volumes (``synthetic.nuclei_arrays``, seed 0) of twice the model's
    size per axis (at least 32), cropped to it in random patches; their masks ride along (segmentation), or stay
    behind (generation, super-resolution, inpainting: ``mask_classes`` None)."""
    if channels != 1:
        raise DataError("data.source=cells3d is 1-channel: set model.in_channels=1")
    if mask_classes not in (None, 2):
        raise DataError(f"data.source=cells3d has 2 classes (background, nucleus) but the model has {mask_classes};"
                        f" set model.out_channels=2")
    if weights is not None:
        raise DataError("data.source=cells3d has no 2015 U-Net weight maps (they are 2D); use segment.loss=dice_ce "
                        "or ce")
    images, masks = synthetic.nuclei_arrays(n, tuple(max(32, 2 * s) for s in size), seed=0)
    segment = mask_classes is not None
    return ArraySamples(images * 2 - 1, np.full(n, -1), size, None, masks if segment else None,
                        "masks" if segment else None, pos_ratio)


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


@dataclass(frozen=True)
class Source:
    """A ``data.source`` that is a name, not a path, and what the rest of the toolkit asks of that name."""
    build: Callable                     # (data_cfg, size, channels, mask_classes=, weights=) -> Dataset
    masks: bool = False                 # it has masks to segment
    reference: Callable | None = None   # () -> (N, H, W, C) uint8: the name is an FID reference (metrics, evaluate)
    classifier: str | None = None       # the offline classifier of its classes (a name in metrics.EXTRACTORS)
    dims: int = 2                       # the spatial dimensionality of its samples (model.spatial_dims)
    held_out: Callable | None = None    # (n, size) -> (n, C, *size) float32 in [-1, 1]: real signals / volumes
                                        # no run trains on, the Frechet reference (metrics.frechet)


SOURCES = {     # the names data.source takes; every other value is "hf:<name>" or a folder
    "digits": Source(lambda cfg, size, channels, **_: digits_dataset(size, channels),
                     reference=lambda: digits_arrays(16)[0], classifier="digits"),
    "cifar10": Source(lambda cfg, size, channels, **_: cifar10_dataset(size, channels)),
    "cells": Source(lambda cfg, size, channels, **segment: cells_source(cfg.num_crops, size, channels, **segment),
                    masks=True),
    "signals": Source(lambda cfg, size, channels, **segment: signals_source(cfg.num_crops, size, channels, **segment),
                      dims=1, held_out=lambda n, size: synthetic.signals_arrays(n, size[0], seed=0, part=2)[0]),
    "cells3d": Source(lambda cfg, size, channels, **segment: cells3d_source(cfg.num_crops, size, channels,
                                                                          pos_ratio=cfg.pos_ratio, **segment),
                      masks=True, dims=3, held_out=lambda n, size: synthetic.nuclei_crops(n, size, seed=0, part=2)),
}


def source_of(name) -> Source | None:
    """The ``SOURCES`` entry of ``name`` (a ``data.source``, an evaluation reference), or None: a folder, an .npz,
    ``hf:<name>``, anything but a name."""
    return SOURCES.get(name) if isinstance(name, str) else None
