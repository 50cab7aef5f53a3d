"""How good the outputs are, by torchmetrics: the distribution metrics of generated samples (``fid``: FID, KID,
IS, the FID floor, the extractors and the reference cache; ``frechet``: the same for signals and, tri-planar,
for volumes), per-image scores against a truth (``paired``: PSNR,
SSIM, LPIPS, class accuracy) and near-copies of the training set (``memorization``). Segmentation's Dice, IoU and
HD95 live with their task (``tasks.segmentation``); ``python -m diffunet.evaluate`` scores a folder.
"""

from .fid import (DIGITS_WEIGHTS, EXTRACTORS, IMAGE_SUFFIXES, ExtractorUnavailable, digits_extractor, evaluate,
                  extract, fid_floor, inception_extractor, load_extractor, reference_features)
from .frechet import evaluate_arrays
from .paired import classify, paired_scores

__all__ = ["DIGITS_WEIGHTS", "EXTRACTORS", "IMAGE_SUFFIXES", "ExtractorUnavailable", "classify", "digits_extractor",
           "evaluate", "evaluate_arrays", "extract", "fid_floor", "inception_extractor", "load_extractor",
           "paired_scores", "reference_features"]
