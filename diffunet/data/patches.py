"""Datasets of signals and volumes (a model with ``spatial_dims`` 1 or 3), read whole and cropped to the model's
size in patches: ``ArrayFolder`` (files below a folder; first-level subfolders are the classes), ``PairedArrays``
(``images/`` with ``masks/`` or ``conds/``, paired by stem at any depth), and ``ArraySamples`` (arrays in memory:
the embedded ``signals`` and ``cells3d``).

Patches. An item is asked for by a key: an index (evaluation, grids: the centre patch) or ``(index, draw)``
(training: the batch sampler's, ``training.loop.IndexBatches``), where ``draw`` is a tuple of ints that seeds the
crop position (``numpy.random.default_rng(draw)``). The draw is made of the run's seed and the global batch
number, which a checkpoint saves, so a resumed run crops exactly where a straight one would, with any number of
loader workers. For segmentation, ``pos_ratio`` of the patches are centred on a labelled voxel (as MONAI's
``RandCropByPosNegLabel``), the others anywhere. An input smaller than the model's size along an axis is
mirror-padded to it (the original U-Net's answer at image borders), said once before training.

Every item is (sample (C, *size) in [-1, 1], label[, partner]): a mask (1, *size) of class ids (segmentation) or
0/1 (inpainting), or a condition (C, *size) in [-1, 1] resampled to the sample's grid (super-resolution).
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError
from ..model.unet import KINDS
from .arrays import Meta, intensity_window, normalise, read_array, stem_of, suffix_of, suffixes
from .seg_masks import class_ids, class_values_problem

KIND = {dims: kinds[:-1] for dims, kinds in KINDS.items()}      # "signal", "image", "volume"


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def patch_box(shape: tuple[int, ...], size: tuple[int, ...], draw=None, foreground: np.ndarray | None = None,
              pos_ratio: float = 0.0) -> tuple[slice, ...]:
    """Where to crop ``size`` from an array of spatial ``shape`` (each axis at least ``size``): the centre
    without ``draw``; else a position from ``default_rng(draw)``, centred on a random voxel of ``foreground``
    with probability ``pos_ratio`` (where it has one), uniform otherwise."""
    room = [s - z for s, z in zip(shape, size)]
    if draw is None:
        starts = [r // 2 for r in room]
    else:
        rng = np.random.default_rng(draw)
        centred = rng.random() < pos_ratio
        if centred and foreground is not None and foreground.any():
            voxels = np.flatnonzero(foreground)
            centre = np.unravel_index(voxels[rng.integers(len(voxels))], shape)
            starts = [int(np.clip(c - z // 2, 0, r)) for c, z, r in zip(centre, size, room)]
        else:
            starts = [int(rng.integers(0, r + 1)) for r in room]
    return tuple(slice(a, a + z) for a, z in zip(starts, size))


def mirror_pad(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """(C, *S) -> (C, *max(S, size)): each short axis mirror-padded (reflected about its edge voxels), evenly."""
    pads = [(0, 0)] + [((z - s) // 2, z - s - (z - s) // 2) if s < z else (0, 0)
                       for s, z in zip(array.shape[1:], size)]
    if not any(a or b for a, b in pads):
        return array
    return np.pad(array, pads, mode="reflect" if min(array.shape[1:]) > 1 else "edge")


def split_key(key) -> tuple[int, tuple | None]:
    """An item's key: an index, or (index, draw) from the training sampler."""
    return (int(key[0]), tuple(key[1])) if isinstance(key, tuple) else (int(key), None)


class Patches(Dataset):
    """The patch cropping every signal and volume dataset shares. A subclass gives ``whole(i)``: (sample (C, *S)
    float32 in [-1, 1], label, partner (1 or C, *S) or None), and sets ``size``, ``dims``, ``condition``."""

    keyed = True                # the training sampler gives (index, draw) keys: random patches
    condition: str | None = None
    pos_ratio = 0.0
    size_note: str | None = None

    def whole(self, i: int):
        raise NotImplementedError

    def __getitem__(self, key):
        i, draw = split_key(key)
        image, label, partner = self.whole(i)
        image = mirror_pad(image, self.size)
        foreground = None
        if partner is not None:
            partner = mirror_pad(partner, self.size)
            if self.condition == "masks" and self.pos_ratio > 0:
                foreground = partner[0] > 0
        box = (slice(None),) + patch_box(image.shape[1:], self.size, draw, foreground, self.pos_ratio)
        item = (torch.from_numpy(np.ascontiguousarray(image[box])), label)
        if partner is not None:
            item += (torch.from_numpy(np.ascontiguousarray(partner[box])),)
        return item


class ArraySamples(Patches):
    """Arrays in memory, (N, C, *S) float32 in [-1, 1], with labels and partners (masks or conditions), cropped
    to ``size``: the embedded ``signals`` and ``cells3d``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size, num_classes: int | None,
                 partners: np.ndarray | None = None, condition: str | None = None, pos_ratio: float = 0.0):
        self.images, self.labels, self.partners = images, labels, partners
        self.size, self.dims = tuple(size), len(size)
        self.num_classes, self.condition, self.pos_ratio = num_classes, condition, pos_ratio

    def __len__(self):
        return len(self.images)

    def whole(self, i):
        return self.images[i], int(self.labels[i]), None if self.partners is None else self.partners[i]


class ArrayFolder(Patches):
    """Every signal or volume file below ``root`` (``arrays.suffixes(dims)``), any depth; when all sit in
    first-level subfolders, their sorted names are the classes. Each file is normalised by ``intensity`` (a mode
    of ``arrays.intensity_window`` and its bounds) and kept in memory once read."""

    def __init__(self, root: str | Path, size, channels: int, intensity: tuple[str, tuple] = ("percentile", (0.5, 99.5))):
        self.root, self.size, self.dims, self.channels = Path(root), tuple(size), len(size), channels
        self.intensity = intensity
        if not self.root.is_dir():
            raise DataError(f"{root} is not a folder")
        self.files = array_files(self.root, self.dims)
        if not self.files:
            raise no_arrays(self.root, self.dims)
        parts = [p.relative_to(self.root).parts for p in self.files]
        parents = {p[0] for p in parts if len(p) > 1}
        labelled = all(len(p) > 1 for p in parts) and len(parents) > 1
        self.classes = sorted(parents) if labelled else []
        self.num_classes = len(self.classes) or None
        self.labels = [self.classes.index(p[0]) if labelled else -1 for p in parts]
        self._read = functools.lru_cache(maxsize=256)(self._load)

    def __len__(self):
        return len(self.files)

    def _load(self, path: Path) -> tuple[np.ndarray, Meta]:
        """One sample file: read, checked against the model (its channels), normalised; and its metadata."""
        array, meta = read_array(path, self.dims)
        if array.shape[0] != self.channels:
            raise DataError(f"{path} has {array.shape[0]} channel(s) but the model takes {self.channels}; set "
                            f"model.in_channels={array.shape[0]} (and model.out_channels)")
        mode, bounds = self.intensity
        return normalise(array, intensity_window(array, mode, bounds)), meta

    def preflight(self, progress: bool = False) -> list[tuple[str, str]]:
        """Read every file once before training: (path, reason) for each that cannot be used; the note of those
        smaller than the model's size (mirror-padded)."""
        from tqdm.auto import tqdm

        bad, small = [], []
        for i, path in enumerate(tqdm(self.files, desc=f"checking {KIND[self.dims]}s", disable=not progress,
                                      leave=False)):
            try:
                shape = self._check(i)
            except DataError as e:
                bad.append((str(path), str(e)))
                continue
            if any(s < z for s, z in zip(shape, self.size)):
                small.append((path.relative_to(self.root).as_posix(), _shape(shape)))
        self.size_note = pad_note(self.root, self.size, small, len(self.files) - len(bad), KIND[self.dims])
        return bad

    def _check(self, i: int) -> tuple[int, ...]:
        """The spatial shape of item ``i``, read (and checked) as training will read it."""
        return self._read(self.files[i])[0].shape[1:]

    def drop(self, paths: set[str]) -> None:
        keep = [i for i, p in enumerate(self.files) if str(p) not in paths]
        self.files = [self.files[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]

    def whole(self, i):
        return self._read(self.files[i])[0], self.labels[i], None


class PairedArrays(ArrayFolder):
    """``root/images/`` with ``root/masks/`` (segmentation: class ids; inpainting: 0/1) or ``root/conds/``
    (super-resolution inputs), paired by the path below each without the format suffix. A mask must have its
    image's shape (and a NIfTI's, its affine); a condition is resampled (linearly) to its image's grid."""

    def __init__(self, root, size, channels: int, intensity=("percentile", (0.5, 99.5)),
                 mask_classes: int | None = None, pos_ratio: float = 0.0):
        root = Path(root)
        kinds = [k for k in ("conds", "masks") if (root / k).is_dir()] if (root / "images").is_dir() else []
        if len(kinds) != 1:
            raise DataError(f"{root} is not paired data: it needs images/ and one of conds/, masks/ (found "
                            f"{', '.join(k + '/' for k in kinds) or 'neither'})")
        super().__init__(root / "images", size, channels, intensity)
        self.root, self.condition, self.mask_classes, self.pos_ratio = root, kinds[0], mask_classes, pos_ratio
        partners = {key_of(p, root / self.condition): p for p in array_files(root / self.condition, self.dims)}
        self.partners = [partners.pop(key_of(p, root / "images"), None) for p in self.files]
        self.lone_partners = sorted(partners.values())
        self._pair = functools.lru_cache(maxsize=256)(self._read_pair)

    def unpaired(self) -> list[tuple[str, str]]:
        lone = [(str(p), f"{p.relative_to(self.root).as_posix()} has no partner in {self.condition}/")
                for p, q in zip(self.files, self.partners) if q is None]
        return lone + [(str(q), f"{q.relative_to(self.root).as_posix()} has no partner in images/")
                       for q in self.lone_partners]

    def preflight(self, progress: bool = False) -> list[tuple[str, str]]:
        bad = self.unpaired()
        lone = {p for p, _ in bad}
        kept = [i for i, f in enumerate(self.files) if str(f) not in lone]     # read the pairs only
        self.files, self.labels = [self.files[i] for i in kept], [self.labels[i] for i in kept]
        self.partners = [self.partners[i] for i in kept]
        return bad + super().preflight(progress)

    def _check(self, i: int) -> tuple[int, ...]:
        return self._pair(i)[0].shape[1:]

    def drop(self, paths: set[str]) -> None:
        partner_of = dict(zip(self.files, self.partners))
        super().drop(paths | {str(p) for p, q in partner_of.items() if str(q) in paths})
        self.partners = [partner_of[p] for p in self.files]
        self._pair.cache_clear()                            # kept by index, and the indices moved

    def _read_pair(self, i: int):
        path, partner = self.files[i], self.partners[i]
        if partner is None:
            raise DataError(f"{path} has no partner in {self.root / self.condition}")
        image, image_meta = self._read(path)
        other, other_meta = read_array(partner, self.dims)
        if self.condition == "conds":
            other = normalise(other, intensity_window(other, *self.intensity))
            if other.shape[1:] != image.shape[1:]:
                mode = {1: "linear", 3: "trilinear"}[self.dims]
                other = F.interpolate(torch.from_numpy(other)[None], size=image.shape[1:], mode=mode,
                                      align_corners=False)[0].numpy()
            return image, other
        if other.shape[0] != 1 or other.shape[1:] != image.shape[1:]:
            raise DataError(f"{partner} is {_shape(other.shape[1:])} (x{other.shape[0]} channels) but {path} is "
                            f"{_shape(image.shape[1:])}: a mask has its {KIND[self.dims]}'s shape and one channel")
        if image_meta.affine is not None and other_meta.affine is not None and \
                not np.allclose(image_meta.affine, other_meta.affine, atol=1e-4):
            raise DataError(f"{partner} and {path} have different affines (they do not lie in the same space); "
                            f"resample the mask onto its image")
        if self.mask_classes is not None:
            problem = class_values_problem(other[0], self.mask_classes, str(partner))
            if problem:
                raise DataError(problem)
            return image, class_ids(other[0])[None].astype(np.float32)
        values = np.unique(other)
        if not np.isin(values, (0, 1)).all() and not np.isin(values, (0, 255)).all():
            raise DataError(f"{partner} has values other than 0/1 or 0/255 (e.g. {values[~np.isin(values, (0, 1, 255))][0]:g});"
                            f" an inpainting mask is 1 where a voxel is to be filled")
        return image, (other > 0).astype(np.float32)

    def whole(self, i):
        image, partner = self._pair(i)
        return image, self.labels[i], partner


def key_of(path: Path, root: Path) -> str:
    """What pairs two files: the path below their folder, without the format suffix (``a/x.nii.gz`` -> ``a/x``)."""
    return (path.relative_to(root).parent / stem_of(path)).as_posix()


def array_files(root: Path, dims: int) -> list[Path]:
    """The sample files below ``root`` for a ``dims``-D model, sorted; two of one key are a DataError."""
    wanted = suffixes(dims)
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and suffix_of(p) in wanted)
    seen = {}
    for p in files:
        k = key_of(p, root)
        if k in seen:
            raise DataError(f"{seen[k]} and {p} have the same stem, so neither can be paired; rename or remove one")
        seen[k] = p
    return files


def no_arrays(folder: Path, dims: int) -> DataError:
    found = Counter(suffix_of(p) or "suffixless" for p in Path(folder).rglob("*") if p.is_file())
    held = ", ".join(f"{n} {s}" for s, n in found.most_common(3)) or "nothing"
    return DataError(f"no {KIND[dims]} files ({', '.join(sorted(suffixes(dims)))}) under {folder} (found {held}); "
                     f"a {dims}D model reads those")


def pad_note(where, size, small: list[tuple[str, str]], total: int, kind: str) -> str | None:
    if not small:
        return None
    return (f"note: {len(small)} of {total} {kind}s under {where} are smaller than {_shape(size)} along an axis: "
            f"each is mirror-padded to it (the first: {small[0][0]}, {small[0][1]})")
