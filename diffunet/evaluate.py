"""Score samples against a reference: FID, KID and IS (``diffunet.metrics.evaluate``).

    python -m diffunet.evaluate SAMPLES REFERENCE [--extractor digits|inception] [--inception-weights FILE]

SAMPLES and REFERENCE: a folder of images, an .npz of uint8 images, or ``digits`` (the embedded set). The
extractor defaults to the offline digits classifier when REFERENCE is ``digits`` and to Inception otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import EvalConfig
from .metrics import EXTRACTORS, ExtractorUnavailable, evaluate


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m diffunet.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("samples", help="folder, .npz or 'digits'")
    p.add_argument("reference", help="folder, .npz or 'digits' (its features are cached)")
    p.add_argument("--extractor", choices=list(EXTRACTORS), help="default: digits for 'digits', else inception")
    p.add_argument("--inception-weights", metavar="FILE", help="TorchScript inception-2015-12-05.pt")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--device", default=None)
    p.add_argument("--kid-subset-size", type=int, default=EvalConfig.kid_subset_size)
    p.add_argument("--kid-subsets", type=int, default=EvalConfig.kid_subsets)
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--no-cache", dest="cache", action="store_false", help="recompute the reference's features")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    extractor = args.inception_weights or args.extractor or ("digits" if args.reference == "digits" else "inception")
    try:
        result = evaluate(args.samples, args.reference, extractor, batch_size=args.batch_size, device=args.device,
                          kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets, cache=args.cache,
                          seed=args.seed)
    except (ExtractorUnavailable, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:10s} {value:.6g}" if isinstance(value, float) else f"{key:10s} {value}")
    return result


if __name__ == "__main__":
    main()
