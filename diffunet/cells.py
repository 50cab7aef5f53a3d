"""``python -m diffunet.cells OUT``: the procedural cells' held-out test images and their masks, for trying the
segmentation models on files (the generator is ``data/cells.py``).

    python -m diffunet.cells cells_test --num 3 --size 512     # cells_test/images/*.png, cells_test/masks/*.png
"""

import sys

from .cli import ArgumentParser
from .data.cells import MIN_SIZE, write_test_images


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m diffunet.cells",
                       description="Write the held-out segmentation test images (test_images): OUT/images/*.png "
                                   "and their masks OUT/masks/*.png (0/255, same names).")
    p.add_argument("out", help="folder to write images/ and masks/ into")
    p.add_argument("--num", type=int, default=3, help="how many images (default 3)")
    p.add_argument("--size", type=int, default=512, help=f"side in pixels, at least {MIN_SIZE} (default 512)")
    p.add_argument("--seed", type=int, default=0, help="test images of seed K: (K, 2, k), never a training image")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num {args.num}: give at least 1 image")
    if args.size < MIN_SIZE:
        p.error(f"--size {args.size}: give at least {MIN_SIZE} (a cell is up to about {MIN_SIZE} px across)")
    out = write_test_images(args.out, args.num, args.size, args.seed)
    print(f"wrote {args.num} cell image(s) of {args.size}x{args.size} to {out / 'images'} and their masks "
          f"(0/255) to {out / 'masks'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
