"""Signal and volume files: what diffunet reads and writes where a model is 1D or 3D, and what each file carries
that an output must keep (``Meta``: a NIfTI's affine and header, a TIFF's resolution tags).

Formats, by suffix (``FORMATS``); every array comes back channels first, float32, (C, L) or (C, D, H, W):

- ``.nii`` / ``.nii.gz`` (nibabel, ``diffunet[medical]``): a volume (X, Y, Z) or (X, Y, Z, C), the 4th axis
  channels. The axes stay in the order stored, so the affine stays valid for an output of the same shape.
- ``.tif`` / ``.tiff`` stacks (tifffile, ``diffunet[medical]``): (Z, Y, X), with a channel axis (ImageJ's C, or
  samples S) moved first. The X/Y resolution tags and ImageJ's z ``spacing`` are kept.
- ``.npy``: (L,) or (C, L) for a signal; (D, H, W) or (C, D, H, W) for a volume. ``.npz``: the one array it holds.
- ``.csv`` (signals): one row per time step, one column per channel, an optional first row of column names.

Intensities (``normalise``): each file to [-1, 1] by its own percentiles (``data.intensity=percentile``, the
default), by a fixed window (``fixed``: e.g. CT's Hounsfield range) or as stored (``none``); ``denormalise`` maps
a model output back to the input's units. Training and sampling call the same functions with the same settings
(saved in the pipeline folder), so they cannot drift apart.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..model.unet import KINDS

MEDICAL = "pip install 'diffunet[medical]'"


def suffix_of(path: str | Path) -> str:
    """The format suffix of ``path``, lower case, ``.nii.gz`` as one."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | Path) -> str:
    """The name of ``path`` without its format suffix (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    return name[:len(name) - len(suffix_of(path))]


@dataclass(frozen=True)
class Meta:
    """What a file carried beside its values, for outputs written in its place.

    spacing: the size of a voxel (or sample) along each spatial axis, in the file's units (mm for NIfTI); None
             where the file says nothing (.npy, .csv). HD95 is measured in these units.
    """
    format: str                                 # a key of FORMATS: ".nii.gz", ".tif", ".npy", ...
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None            # NIfTI: voxel indices -> world coordinates (4, 4)
    header: object = None                       # NIfTI: the nibabel header, copied into outputs
    tiff: dict = field(default_factory=dict)    # TIFF: resolution, resolutionunit, ImageJ spacing / unit

    def resampled(self, factors: tuple[int, ...]) -> "Meta":
        """The metadata of this file's grid refined ``factors`` times per axis (a super-resolved output): voxels
        ``f`` times smaller, the first voxel's centre moved so the grid covers the same extent."""
        factors = tuple(factors)
        if all(f == 1 for f in factors):
            return self
        spacing = tuple(s / f for s, f in zip(self.spacing, factors)) if self.spacing else None
        affine = None
        if self.affine is not None:
            affine = self.affine.copy()
            for axis, f in enumerate(factors):
                column = self.affine[:3, axis]
                affine[:3, axis] = column / f
                affine[:3, 3] += column * (0.5 / f - 0.5)     # old voxel 0 spans [-0.5, 0.5]: new centres inside
        tiff = dict(self.tiff)
        if "resolution" in tiff and len(factors) == 3:        # (x, y) pixels per unit; axes (Z, Y, X)
            x, y = tiff["resolution"]
            tiff["resolution"] = (x * factors[2], y * factors[1])
        if "spacing" in tiff and len(factors) == 3:
            tiff["spacing"] = tiff["spacing"] / factors[0]
        return replace(self, spacing=spacing, affine=affine, tiff=tiff)


# ------------------------------------------------------------------------------------------ readers

def _need(module: str, path: Path):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"reading {path} needs {module}: {MEDICAL}") from None


def _read_nifti(path: Path, dims: int) -> tuple[np.ndarray, Meta]:
    nib = _need("nibabel", path)
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)                  # reads (and checks) the whole file
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, 3, 0)                                  # the 4th axis: channels
    else:
        raise DataError(f"{path} has {data.ndim} axes (shape {'x'.join(map(str, data.shape))}); diffunet reads a "
                        f"NIfTI volume as (X, Y, Z) or (X, Y, Z, C): save one volume (and its channels) per file")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, Meta(".nii.gz" if suffix_of(path) == ".nii.gz" else ".nii", zooms, np.asarray(image.affine),
                      image.header.copy())


def _read_tiff(path: Path, dims: int) -> tuple[np.ndarray, Meta]:
    tifffile = _need("tifffile", path)
    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        data, axes = series.asarray(), series.axes.upper()
        tags, imagej = tif.pages[0].tags, tif.imagej_metadata or {}
        tiff = {}
        if "XResolution" in tags and "YResolution" in tags:
            (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
            tiff["resolution"] = (xn / xd, yn / yd)
            tiff["resolutionunit"] = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 1
        for key in ("spacing", "unit"):
            if key in imagej:
                tiff[key] = imagej[key]
    channel = [i for i, a in enumerate(axes) if a in "CS"]
    spatial = [i for i, a in enumerate(axes) if a not in "CS"]
    if len(channel) > 1 or len(spatial) != 3:
        raise DataError(f"{path} is a TIFF of axes {axes} (shape {'x'.join(map(str, data.shape))}); a volume is a "
                        f"stack of 2D planes, ZYX, with at most one channel axis")
    data = np.moveaxis(data, channel[0], 0) if channel else data[None]
    spacing = None
    if "resolution" in tiff:
        x, y = tiff["resolution"]
        spacing = (float(tiff.get("spacing", 1.0)), 1 / y if y else 1.0, 1 / x if x else 1.0)
    return data.astype(np.float32), Meta(suffix_of(path), spacing, tiff=tiff)


def _read_npy(path: Path, dims: int) -> tuple[np.ndarray, Meta]:
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                keys = list(data.keys())
                if len(keys) != 1:
                    raise DataError(f"{path} holds {len(keys)} arrays ({', '.join(keys) or 'none'}); an .npz "
                                    f"sample holds one")
                data = data[keys[0]]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
            from None
    if data.dtype.kind not in "biuf":
        raise DataError(f"{path} holds {data.dtype} values; a sample is numbers")
    if data.ndim == dims:
        data = data[None]
    return data.astype(np.float32), Meta(suffix_of(path))


def _read_csv(path: Path, dims: int) -> tuple[np.ndarray, Meta]:
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and not _numbers(rows[0]):
        rows = rows[1:]                                                 # a header of column names
    if not rows:
        raise DataError(f"{path} has no rows of numbers; a .csv signal is one row per time step, one column per "
                        f"channel")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise DataError(f"{path}: row {i + 1} has {len(row)} values but the first has {width}; a .csv signal is "
                            f"one row per time step, one column per channel, every row full")
        if not _numbers(row):
            raise DataError(f"{path}: row {i + 1} holds a value that is not a number ({row}); fill or remove it")
    return np.asarray(rows, dtype=np.float32).T.copy(), Meta(".csv")    # (L, C) -> (C, L)


def _numbers(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Format:
    read: object                # (path, dims) -> (array, Meta)
    dims: tuple[int, ...]       # the dimensionalities whose samples it holds


FORMATS = {
    ".nii": Format(_read_nifti, (3,)), ".nii.gz": Format(_read_nifti, (3,)),
    ".tif": Format(_read_tiff, (3,)), ".tiff": Format(_read_tiff, (3,)),
    ".npy": Format(_read_npy, (1, 3)), ".npz": Format(_read_npy, (1, 3)),
    ".csv": Format(_read_csv, (1,)),
}


def suffixes(dims: int) -> set[str]:
    """The suffixes of the files that hold ``dims``-D samples."""
    return {s for s, f in FORMATS.items() if dims in f.dims}


def read_array(path: str | Path, dims: int) -> tuple[np.ndarray, Meta]:
    """One signal (``dims=1``) or volume (3) file as ((C, *spatial) float32, its ``Meta``); every problem is one
    DataError naming the file: an unknown suffix, a missing reader, a corrupt file, the wrong number of axes."""
    path = Path(path)
    entry = FORMATS.get(suffix_of(path))
    kind = KINDS[dims][:-1]
    if entry is None or dims not in entry.dims:
        raise DataError(f"{path}: {suffix_of(path) or 'no suffix'} is not a {kind} file; diffunet reads "
                        f"{', '.join(sorted(suffixes(dims)))}")
    try:
        data, meta = entry.read(path, dims)
    except DataError:
        raise
    except Exception as e:              # nibabel, tifffile and gzip raise many types for a bad file
        reason = str(e).splitlines()[0] if str(e) else "unreadable"
        raise DataError(f"cannot read {path}: {type(e).__name__}: {reason}") from None
    if data.ndim != dims + 1:
        single = data.shape[0] == 1                                     # read as one channel: its own dims
        shape = "x".join(map(str, data.shape[1:] if single else data.shape))
        raise DataError(f"{path} is {data.ndim - 1 if single else data.ndim}D (shape {shape}) but "
                        f"the model takes {dims}D {kind}s; give {kind}s {'(L,) or (C, L)' if dims == 1 else '(D, H, W)'}"
                        f" or build the model with model.spatial_dims={data.ndim - 1 if single else 2}")
    if not np.isfinite(data).all():
        raise DataError(f"{path} holds NaN or infinite values; fill them before training")
    return data, meta


# ------------------------------------------------------------------------------------------ writers

def _part(path: Path) -> Path:
    """The temporary name ``path`` is written under, then renamed: its format suffix kept (nibabel and tifffile
    choose the encoding by it)."""
    return path.with_name(f"{stem_of(path)}.part{suffix_of(path)}")


def write_array(array: np.ndarray, path: str | Path, meta: Meta | None = None) -> Path:
    """Write one (C, *spatial) array at ``path`` in the format its suffix names, keeping what ``meta`` carried (a
    NIfTI's affine and header, a TIFF's resolution); atomically, so an interrupted run never leaves a half file.
    A single channel is written without its channel axis."""
    path = Path(path)
    suffix, part = suffix_of(path), _part(path)
    meta = meta if meta is not None else Meta(suffix)
    data = array[0] if array.shape[0] == 1 else array
    if suffix in (".nii", ".nii.gz"):
        nib = _need("nibabel", path)
        data = data if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
        header = meta.header.copy() if meta.header is not None else None
        affine = meta.affine if meta.affine is not None else np.diag([*(meta.spacing or (1.0, 1.0, 1.0)), 1.0])
        image = nib.Nifti1Image(data, affine, header)
        image.header.set_data_dtype(data.dtype)
        if meta.spacing:
            image.header.set_zooms(tuple(meta.spacing) + tuple(image.header.get_zooms()[3:]))
        nib.save(image, str(part))
    elif suffix in (".tif", ".tiff"):
        tifffile = _need("tifffile", path)
        tiff = meta.tiff
        imagej = {k: tiff[k] for k in ("spacing", "unit") if k in tiff}
        axes = "ZYX" if array.shape[0] == 1 else "ZCYX"
        stack = data if array.shape[0] == 1 else np.moveaxis(array, 0, 1)
        options = dict(resolution=tiff["resolution"]) if "resolution" in tiff else {}
        if data.dtype in (np.uint8, np.uint16, np.float32):           # what ImageJ reads
            options.update(imagej=True, metadata={"axes": axes, **imagej})
        tifffile.imwrite(str(part), stack, **options)
    elif suffix == ".csv":
        np.savetxt(part, array.T, delimiter=",", fmt="%.7g")
    elif suffix == ".npy":
        with open(part, "wb") as f:
            np.save(f, data)
    else:
        raise DataError(f"cannot write {path}: diffunet writes {', '.join(sorted(set(FORMATS) - {'.npz'}))}")
    os.replace(part, path)
    return path


# ------------------------------------------------------------------------------------------ intensities

INTENSITY = ("percentile", "fixed", "none")


def intensity_window(array: np.ndarray, mode: str, bounds) -> np.ndarray:
    """(C, 2): the (lo, hi) of each channel of ``array`` that ``normalise`` maps to (-1, 1).

    percentile: ``bounds`` are two percentiles (e.g. (0.5, 99.5)) of each channel's values, the window MONAI's
    ``ScaleIntensityRangePercentiles`` takes; fixed: ``bounds`` are the values themselves; none: (-1, 1)."""
    c = array.shape[0]
    if mode == "percentile":
        window = np.percentile(array.reshape(c, -1), list(bounds), axis=1).T
    elif mode == "fixed":
        window = np.tile(np.asarray(bounds, np.float64), (c, 1))
    elif mode == "none":
        window = np.tile([-1.0, 1.0], (c, 1))
    else:
        raise DataError(f"unknown data.intensity {mode!r}; choose one of {', '.join(INTENSITY)}")
    same = window[:, 1] <= window[:, 0]
    window[same, 1] = window[same, 0] + 1.0                             # a constant channel maps to -1
    return window


def normalise(array: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(C, *S) values -> (C, *S) float32 in [-1, 1]: each channel's ``window`` (C, 2) onto (-1, 1), clipped."""
    shape = (-1,) + (1,) * (array.ndim - 1)
    lo, hi = window[:, 0].reshape(shape), window[:, 1].reshape(shape)
    return np.clip((array - lo) / (hi - lo) * 2 - 1, -1, 1).astype(np.float32)


def denormalise(array: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``normalise``'s inverse on (C, *S) model outputs in [-1, 1]: the values in the input's units."""
    shape = (-1,) + (1,) * (array.ndim - 1)
    lo, hi = window[:, 0].reshape(shape), window[:, 1].reshape(shape)
    return ((array + 1) / 2 * (hi - lo) + lo).astype(np.float32)
