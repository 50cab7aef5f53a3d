"""The data layer, by role:

- ``files``: every image file diffunet reads or writes, through one decoder; the transform to the model's size and
  channel count; sample files and grids; the bad-image policy of training.
- ``folders``: image folders, paired folders (``images/`` with ``conds/`` or ``masks/``) and the pairing rules.
- ``sources``: the datasets a name stands for (``SOURCES``, ``source_of``: digits, cifar10, cells) and HF datasets.
- ``seg_masks``: segmentation targets: class ids, instances, the 2015 U-Net weight map, borders, object counts.
- ``inpaint_masks``: the inpainting masks drawn per batch (``MASKS``).
- ``cells``: procedural microscopy-like cells from a seed (``python -m diffunet.cells OUT``).
- ``arrays``: signal and volume files (NIfTI, TIFF stacks, .npy/.npz, .csv), their metadata, intensities.
- ``patches``: signal and volume datasets, cropped to the model's size in patches from a seeded draw.
- ``synthetic``: the embedded 1D signals and 3D nuclei, from a seed.
- ``augment``: EDM's non-leaky augmentation for small datasets.

Here: ``build_dataset`` (the dataset ``data.source`` names) and the fixed subset and held-out split of it.

Every dataset yields ``(image, label)``: a (C, H, W) float tensor in [-1, 1] at the model's size and channel
count, and an int class id (-1 where the data has none). ``num_classes`` says how many classes there are (None
for unlabelled data). Paired data (a folder of ``images/`` with ``conds/`` or ``masks/``; HF datasets with
``data.cond_column`` or ``data.mask_column``) yields ``(image, label, cond)``; its ``condition`` says which
("conds" or "masks"; None elsewhere). Segmentation (``mask_classes=K``) reads the masks as class ids 0..K-1, and
``weights=(w0, sigma)`` adds each mask's weight map: ``(image, label, mask, weight)``. Random flips happen on the
batch in the training loop, not here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from ..errors import DataError
from ..model.tables import as_size
from .files import (PIL_MODES, apply_bad_image_policy, files_by_stem, image_path, load_image, match_channels,
                    no_images, read_image, save_grid, to_uint8, write_image)
from .patches import ArrayFolder, PairedArrays
from .folders import ImageFolder, PairedFolder, pair_files, paired_kind, read_class_mask, read_mask
from .sources import SOURCES, HFDataset, Source, digits_arrays, source_of

__all__ = [
    "build_dataset", "DatasetPart", "take_subset", "split_holdout",     # defined here
    "DataError",                                                        # re-exported: what the data layer raises
    "PIL_MODES", "apply_bad_image_policy", "files_by_stem", "image_path", "load_image", "match_channels",
    "no_images", "read_image", "save_grid", "to_uint8", "write_image",  # files
    "ImageFolder", "PairedFolder", "pair_files", "read_class_mask", "read_mask",                # folders
    "SOURCES", "Source", "digits_arrays", "source_of",                                          # sources
]


class DatasetPart(Subset):
    """The items of ``dataset`` at ``indices``, with the attributes training reads of a dataset."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        super().__init__(dataset, indices)
        self.num_classes = getattr(dataset, "num_classes", None)
        self.condition = getattr(dataset, "condition", None)
        self.root = getattr(dataset, "root", None)
        self.keyed = getattr(dataset, "keyed", False)       # patches: a key is (index, draw), data.patches

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.dataset[(self.indices[key[0]], key[1])]
        return super().__getitem__(key)

    def __getitems__(self, keys):           # what the DataLoader calls for a batch (torch >= 2.2)
        return [self[key] for key in keys]


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


def build_dataset(data_cfg, sample_size, channels: int, *, mask_classes: int | None = None,
                  weights: tuple[float, float] | None = None) -> Dataset:
    """The dataset ``data.source`` names, at the model's size and channel count.

    mask_classes: None: masks are inpainting masks; K: segmentation masks of class ids 0..K-1 (0/255 read as 0/1),
                  for paired folders' masks/, ``data.mask_column`` and the cells
    weights:      (w0, sigma): items gain the U-Net weight map of their mask, (image, label, mask, weight); the
                  cells always carry it
    """
    size = as_size(sample_size) if isinstance(sample_size, int) else tuple(sample_size)     # (H, W), (L,), (D, H, W)
    source = str(data_cfg.source)
    segment = dict(mask_classes=mask_classes, weights=weights)
    named = source_of(source)
    if named is not None and named.dims != len(size):
        fits = ", ".join(f"data.source={name}" for name, s in SOURCES.items() if s.dims == len(size))
        raise DataError(f"data.source={source} holds {named.dims}D samples but the model is {len(size)}D "
                        f"(model.spatial_dims={len(size)}); use {fits or 'a folder'}, or set "
                        f"model.spatial_dims={named.dims}")
    if named is not None:
        if not named.masks and (mask_classes is not None or weights is not None):
            with_masks = ", ".join(f"data.source={name}" for name, s in SOURCES.items() if s.masks)
            raise DataError(f"data.source={source} has no masks to segment; use {with_masks}, a folder of "
                            f"images/ and masks/, or hf:... with data.mask_column")
        return named.build(data_cfg, size, channels, **segment)
    if len(size) != 2:
        return array_dataset(data_cfg, source, size, channels, **segment)
    if source.startswith("hf:"):
        return HFDataset(source[3:], size, channels, data_cfg.image_column, data_cfg.label_column, data_cfg.split,
                         data_cfg.cond_column, data_cfg.mask_column, **segment)
    if paired_kind(source) or mask_classes is not None or weights is not None:
        return PairedFolder(source, size, channels, **segment)
    # checked here, not by ImageFolder: the message lists SOURCES, which folders cannot import (sources imports it)
    if not Path(source).is_dir():
        raise DataError(f"data.source {source} is not a folder (nor {', '.join(map(repr, SOURCES))} or 'hf:<name>')")
    return ImageFolder(source, size, channels)


def array_dataset(data_cfg, source: str, size: tuple[int, ...], channels: int, mask_classes: int | None = None,
                  weights=None) -> Dataset:
    """The signals or volumes of a folder (``patches``): paired (images/ with masks/ or conds/) or not."""
    if source.startswith("hf:"):
        raise DataError(f"data.source={source}: Hugging Face datasets give 2D images here; save the signals or "
                        f"volumes as files (.npy, .nii.gz, .tif, .csv) in a folder and give its path")
    if weights is not None:
        raise DataError("the 2015 U-Net weight maps are 2D; for signals and volumes use segment.loss=dice_ce or ce")
    if not Path(source).is_dir():
        raise DataError(f"data.source {source} is not a folder (nor "
                        f"{', '.join(repr(n) for n, s in SOURCES.items() if s.dims == len(size))})")
    intensity = (str(data_cfg.intensity), tuple(data_cfg.intensity_range))
    if (Path(source) / "images").is_dir():
        # patches centred on labelled voxels for segmentation only (an inpainting mask is no structure to find)
        return PairedArrays(source, size, channels, intensity, mask_classes,
                            data_cfg.pos_ratio if mask_classes is not None else 0.0)
    if mask_classes is not None:
        raise DataError(f"{source} has no masks to segment: give a folder of images/ and masks/")
    return ArrayFolder(source, size, channels, intensity)
