"""Score samples against a reference: FID, KID and IS (``diffunet.metrics.evaluate``); or, with ``--paired``,
image-conditioned outputs against their truth: PSNR, SSIM, LPIPS, class accuracy (``metrics.paired_scores``);
or, with ``--segmentation``, masks against their truth masks: Dice, IoU, HD95 (``segmentation_scores``).

    python -m diffunet.evaluate SAMPLES REFERENCE [--extractor digits|inception] [--inception-weights FILE]
    python -m diffunet.evaluate OUTPUTS TRUTH --paired [--mask DIR] [--classifier digits] [--skip-unpaired]
    python -m diffunet.evaluate MASKS TRUTH_MASKS --segmentation [--classes K] [--skip-unpaired]

SAMPLES and REFERENCE: a folder of images, an .npz of uint8 images, or ``digits`` (the embedded set). The
extractor defaults to the offline digits classifier when REFERENCE is ``digits`` and to Inception otherwise.

Signals and volumes (``metrics.frechet``): SAMPLES a folder of .npy / .csv signals or .nii.gz / .tif / .npy
volumes, REFERENCE such a folder or ``signals`` / ``cells3d`` (held-out embedded items at the samples' size);
``--dims`` where a folder of .npy files does not say. Signals: the Frechet distance on the shipped signals
classifier, and its class accuracy where a ``labels.csv`` lies beside the samples; volumes: the tri-planar
distance (MAISI's protocol), per plane and their mean.

    python -m diffunet.evaluate SAMPLES signals|cells3d|FOLDER [--dims 1|3] [--intensity none|percentile|fixed]

OUTPUTS and TRUTH (``--paired``): folders of images at any depth, paired by path without suffix (``a/x.png``
with ``a/x.jpg``); ``x_3.png`` (one of several outputs per condition) pairs with ``x`` unless TRUTH has an
``x_3`` itself, and ``x_mean`` / ``x_std`` (the per-pixel statistics sample.py writes) are skipped.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .cli import ArgumentParser
from .config import DataConfig, EvalConfig
from .data import DataError, files_by_stem, read_class_mask, read_image, read_mask, source_of
from .data.arrays import INTENSITY, suffix_of, suffixes
from .data.seg_masks import count_objects
from .metrics import EXTRACTORS, IMAGE_SUFFIXES, ExtractorUnavailable, classify, evaluate, paired_scores
from .metrics.frechet import array_files, evaluate_arrays
from .model.unet import KINDS
from .tasks.segmentation import segmentation_scores

SAMPLE_K = re.compile(r"(.+)_\d+")                  # stem_k: the k-th output for the condition `stem`
SAMPLE_STAT = re.compile(r"(.+)_(mean|std)")        # stem_mean, stem_std: per-pixel statistics, not outputs


class PairingError(ValueError):
    """Folders that do not pair up; the message is one line naming the first file concerned and the count."""


def image_files(folder: str | Path) -> dict[str, Path]:
    """The images below ``folder`` (any depth; ``grid.png`` is sample.py's preview), by their path relative to
    it without suffix: ``{"a/x": folder/a/x.png}`` (``data.files_by_stem``, with sample files' .npy)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    try:
        files = {k: p for k, p in files_by_stem(folder, IMAGE_SUFFIXES).items() if p.name != "grid.png"}
    except DataError as e:
        raise PairingError(str(e)) from None
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def pair_files(outputs: dict[str, Path], truth: dict[str, Path]) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(output file, truth key) for every output that has a truth image, and the outputs that have none."""
    pairs, unpaired = [], []
    for key, path in outputs.items():
        k, stat = SAMPLE_K.fullmatch(key), SAMPLE_STAT.fullmatch(key)
        if key in truth:
            pairs.append((path, key))
        elif k and k[1] in truth:
            pairs.append((path, k[1]))
        elif not (stat and stat[1] in truth):
            unpaired.append(path)
    return pairs, unpaired


def class_folders(truth: dict[str, Path]) -> dict[str, int] | None:
    """Class id by truth key when every truth image sits in a first-level subfolder and there are several (the
    sorted subfolder names are the classes, the rule of ``data.ImageFolder``), else None."""
    folders = {key: key.split("/")[0] for key in truth if "/" in key}
    names = sorted(set(folders.values()))
    if len(folders) < len(truth) or len(names) < 2:
        return None
    return {key: names.index(folder) for key, folder in folders.items()}


def read_masks(files: list[Path], truth: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) masks of the truth images (N, H, W, C), 1 for the filled region, read as sample.py reads its
    masks (``data.read_mask``); one line naming the first file of the wrong size or with other values than
    0/1 or 0/255."""
    try:
        return np.stack([read_mask(path, image, "its truth image") for path, image in zip(files, truth)])
    except DataError as e:
        raise PairingError(str(e)) from None


def read_stack(files: list[Path], what: str) -> np.ndarray:
    """(N, H, W, C) uint8 of the files, or one line naming two files of different shapes."""
    images = [read_image(p) for p in files]
    for path, image in zip(files, images):
        if image.shape != images[0].shape:
            raise PairingError(f"{what} of different shapes: {files[0]} is {images[0].shape}, {path} is "
                               f"{image.shape}; paired metrics take one size")
    return np.stack(images)


def paired_folders(outputs, truth, skip_unpaired: bool, nouns: tuple[str, str, str]):
    """(the truth files by key, the (output, key) pairs, the unpaired outputs) of two folders; a PairingError
    naming the first unpaired output (unless ``skip_unpaired``), or where nothing pairs. ``nouns``: what an
    output is, what its truth is, and "a(n) <truth>" for the messages."""
    truth_files = image_files(truth)
    pairs, unpaired = pair_files(image_files(outputs), truth_files)
    output, partner, a_partner = nouns
    if unpaired and not skip_unpaired:
        raise PairingError(f"{len(unpaired)} {output}(s) have no {partner} in {truth}, the first {unpaired[0]}; "
                           "pass --skip-unpaired to score the others")
    if not pairs:
        raise PairingError(f"no {output} in {outputs} pairs with {a_partner} in {truth}")
    return truth_files, pairs, unpaired


def evaluate_paired(outputs: str | Path, truth: str | Path, mask: str | Path | None = None, *,
                    classifier: str | None = None, skip_unpaired: bool = False, lpips: bool = True,
                    batch_size: int = EvalConfig.batch_size, device=None) -> dict:
    """``paired_scores`` of the folder ``outputs`` against the folder ``truth`` (pairing: the module docstring).

    ``mask``: a folder of masks paired with the truth by name (1 / white: the filled region; first channel).
    ``classifier``: add ``accuracy`` (the outputs' class against the truth's class subfolder, where every truth
    image sits in one) or else ``class_agreement`` (against the classifier's class of the truth image).
    ``skip_unpaired``: score the outputs that pair and count the others (``num_unpaired``) instead of failing.
    """
    truth_files, pairs, unpaired = paired_folders(outputs, truth, skip_unpaired,
                                                  ("output", "truth image", "an image"))
    keys = sorted({key for _, key in pairs})
    row = {key: i for i, key in enumerate(keys)}
    index = [row[key] for _, key in pairs]                      # truth row of each output
    true_images = read_stack([truth_files[key] for key in keys], "truth images")
    out_images = read_stack([path for path, _ in pairs], "outputs")
    if out_images.shape[1:] != true_images.shape[1:]:
        raise PairingError(f"{pairs[0][0]} is {out_images.shape[1:]} (H, W, C) but its truth "
                           f"{truth_files[pairs[0][1]]} is {true_images.shape[1:]}")
    masks = None
    if mask is not None:
        mask_files = image_files(mask)
        missing = [truth_files[key] for key in keys if key not in mask_files]
        if missing:
            raise PairingError(f"{len(missing)} truth image(s) have no mask in {mask}, the first {missing[0]}")
        masks = read_masks([mask_files[key] for key in keys], true_images)[index]
    labels, name = None, "accuracy"
    if classifier is not None:
        by_folder = class_folders(truth_files)
        if by_folder is not None:
            labels = np.array([by_folder[key] for key in keys])
        else:
            labels = classify(true_images, classifier, batch_size=batch_size, device=device).numpy()
            name = "class_agreement"
        labels = labels[index]
    result = paired_scores(out_images, true_images[index], mask=masks, labels=labels, classifier=classifier,
                           lpips=lpips, device=device, batch_size=batch_size)
    notes = result.pop("notes", [])
    result = {name if key == "accuracy" else key: value for key, value in result.items()}
    result.update(num_truth=len(keys), **(dict(num_unpaired=len(unpaired)) if skip_unpaired else {}))
    return dict(result, notes=notes) if notes else result


def evaluate_segmentation(outputs: str | Path, truth: str | Path, classes: int = 2, *,
                          skip_unpaired: bool = False) -> dict:
    """Dice, IoU (foreground classes) and HD95 of the masks in ``outputs`` against the truth masks in ``truth``
    (class ids, 0/255 read as 0/1; paired as in ``--paired``, ``x_std`` maps skipped), image by image (the
    masks may differ in size), averaged; and the mean number of objects (4-connected foreground components)
    in prediction and truth: too few means touching objects merged."""
    truth_files, pairs, unpaired = paired_folders(outputs, truth, skip_unpaired, ("mask", "truth mask", "a mask"))
    rows = []
    for path, key in pairs:
        pred, true = read_class_mask(path, classes), read_class_mask(truth_files[key], classes)
        if pred.shape != true.shape:
            raise PairingError(f"{path} is {pred.shape[1]}x{pred.shape[0]} but its truth {truth_files[key]} is "
                               f"{true.shape[1]}x{true.shape[0]}")
        scores = segmentation_scores(torch.from_numpy(pred)[None], torch.from_numpy(true)[None], classes)
        rows.append({**scores, "objects": count_objects(pred > 0), "objects_truth": count_objects(true > 0)})
    mean = {key: float(np.nanmean([row[key] for row in rows])) for key in ("dice", "iou", "hd95", "objects",
                                                                            "objects_truth")}
    return dict(mean, num_images=len(rows), **(dict(num_unpaired=len(unpaired)) if skip_unpaired else {}))


def floor_note(result: dict, reference: str, draws: int, noun: str = "images") -> str:
    """The line that says what the FID is to be read against: the floor, real images against their reference."""
    n = result["num_fake"]
    if "fid_floor" in result:
        return (f"fid is read against fid_floor, not 0: {n} real {noun} of {reference} score "
                f"{result['fid_floor']:.4g} against all {result['num_real']} (mean of {draws} draws); "
                f"fid / fid_floor = {result['fid'] / result['fid_floor']:.2f}")
    why = "--floor-draws 0" if draws < 1 else f"the reference holds {result['num_real']} {noun}, not more than {n}"
    return f"no fid_floor ({why}): FID depends on the number of {noun}, so compare only scores of {n} {noun}"


def array_dims(samples, reference) -> int:
    """2 for images; 1 or 3 where REFERENCE names embedded signals / volumes or SAMPLES holds NIfTI, TIFF or .csv
    files (a folder of .npy arrays is images unless --dims says otherwise)."""
    named = source_of(reference)
    if named is not None:
        return named.dims
    folder = Path(samples)
    found = {suffix_of(p) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()
    if found & (suffixes(3) - suffixes(1)):         # the formats that hold volumes only (data.arrays.FORMATS)
        return 3
    return 1 if found & (suffixes(1) - suffixes(3)) else 2


def evaluate_array_folder(samples, reference, dims: int, intensity, **options) -> dict:
    """``metrics.frechet.evaluate_arrays`` of a folder of signals or volumes; class-conditional samples (a
    ``labels.csv`` beside them, as sample.py writes) also get the signals classifier's ``accuracy``."""
    labels, table = None, Path(samples) / "labels.csv"
    if table.is_file() and dims == 1:
        by_name = dict(line.split(",") for line in table.read_text().split())
        files = array_files(samples, dims)
        if all(p.name in by_name for p in files):
            labels = [int(by_name[p.name]) for p in files]
    return evaluate_arrays(samples, reference, dims, labels=labels, intensity=intensity, **options)


def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m diffunet.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("samples", help="folder, .npz or 'digits' (--paired: the folder of outputs)")
    p.add_argument("reference", help="folder, .npz or 'digits' (its features are cached) (--paired: the truth folder)")
    p.add_argument("--extractor", choices=list(EXTRACTORS), help="default: digits for 'digits', else inception")
    p.add_argument("--inception-weights", metavar="FILE", help="TorchScript inception-2015-12-05.pt")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--device", default=None)
    p.add_argument("--kid-subset-size", type=int, default=EvalConfig.kid_subset_size)
    p.add_argument("--kid-subsets", type=int, default=EvalConfig.kid_subsets)
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--floor-draws", type=int, default=EvalConfig.floor_draws,
                   help="fid_floor: the mean FID of this many draws of as many real images as samples (0: none)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="recompute the reference's features")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    arrays = p.add_argument_group("signals and volumes (metrics.frechet: the signals classifier, tri-planar slices)")
    arrays.add_argument("--dims", type=int, choices=(1, 2, 3), default=None,
                        help="1 signals, 3 volumes (default: from a named reference or the files' suffixes)")
    arrays.add_argument("--intensity", choices=INTENSITY, default="none",
                        help="data.intensity applied to every file read, both folders (default none: the values "
                             "as they are, what sample.py writes)")
    arrays.add_argument("--intensity-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="its bounds (default: data.intensity_range's)")
    paired = p.add_argument_group("paired metrics (--paired)")
    paired.add_argument("--paired", action="store_true", help="PSNR, SSIM, LPIPS of outputs against their truth")
    paired.add_argument("--mask", metavar="DIR", help="masks paired with the truth by name: adds psnr_masked")
    paired.add_argument("--classifier", choices=list(EXTRACTORS), help="adds accuracy or class_agreement")
    paired.add_argument("--skip-unpaired", action="store_true", help="score the outputs that pair, count the others")
    paired.add_argument("--no-lpips", dest="lpips", action="store_false", help="skip LPIPS")
    paired.add_argument("--segmentation", action="store_true", help="masks against truth masks: Dice, IoU, HD95")
    paired.add_argument("--classes", type=int, default=2, help="--segmentation: the masks' class count")
    args = p.parse_args(argv)
    if args.segmentation and (args.paired or args.mask or args.classifier):
        p.error("--segmentation scores masks; --paired, --mask and --classifier are for image outputs")
    given = [flag for flag, on in (("--mask", args.mask), ("--classifier", args.classifier),
                                   ("--skip-unpaired", args.skip_unpaired), ("--no-lpips", not args.lpips)) if on]
    if given and not (args.paired or (args.segmentation and given == ["--skip-unpaired"])):
        p.error(f"{given[0]} needs --paired")
    if args.paired and (args.extractor or args.inception_weights):
        p.error("--extractor and --inception-weights are for FID / KID / IS; with --paired, --classifier")
    try:
        if args.segmentation:
            result = evaluate_segmentation(args.samples, args.reference, args.classes,
                                           skip_unpaired=args.skip_unpaired)
        elif args.paired:
            result = evaluate_paired(args.samples, args.reference, args.mask, classifier=args.classifier,
                                     skip_unpaired=args.skip_unpaired, lpips=args.lpips, batch_size=args.batch_size,
                                     device=args.device)
        elif (dims := args.dims or array_dims(args.samples, args.reference)) != 2:
            bounds = tuple(args.intensity_range or DataConfig().intensity_range)
            result = evaluate_array_folder(args.samples, args.reference, dims, (args.intensity, bounds),
                                           batch_size=args.batch_size, device=args.device, seed=args.seed,
                                           kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                                           floor_draws=args.floor_draws)
            result["notes"] = [floor_note(result, args.reference, args.floor_draws, KINDS[dims])]
        else:
            named = source_of(args.reference)      # a named reference is scored by its own classifier's features
            extractor = args.inception_weights or args.extractor or (
                named.classifier if named is not None and named.classifier else "inception")
            result = evaluate(args.samples, args.reference, extractor, batch_size=args.batch_size,
                              device=args.device, kid_subset_size=args.kid_subset_size,
                              kid_subsets=args.kid_subsets, cache=args.cache, seed=args.seed,
                              floor_draws=args.floor_draws)
            result["notes"] = [floor_note(result, args.reference, args.floor_draws)]
    except (ExtractorUnavailable, FileNotFoundError, PairingError, DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(result))
    else:
        width = max(10, *map(len, result))
        for key, value in result.items():
            for v in value if key == "notes" else [value]:                # one line a note
                print(f"{key:{width}s} {v:.6g}" if isinstance(v, float) else f"{key:{width}s} {v}")
    return result


if __name__ == "__main__":
    main()
