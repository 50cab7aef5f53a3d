"""``python -m diffunet.synthetic volumes|signals OUT``: held-out files of the embedded 3D nuclei (a paired folder
of NIfTI volumes and masks) or 1D signals (a class folder of .npy), for trying 3D and 1D models on files (the
generators are ``data/synthetic.py``).

    python -m diffunet.synthetic volumes held_out --num 3 --size 96    # held_out/images/*.nii.gz, held_out/masks/
    python -m diffunet.synthetic signals held_out --num 40             # held_out/<class>/*.npy
"""

import sys

from .cli import ArgumentParser
from .data.synthetic import write_signals, write_volumes


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m diffunet.synthetic", description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("kind", choices=("volumes", "signals"))
    p.add_argument("out", help="the folder to write")
    p.add_argument("--num", type=int, default=None, help="how many (default: 3 volumes, 40 signals)")
    p.add_argument("--size", type=int, default=64, help="volumes: the side of each cube (default 64)")
    p.add_argument("--length", type=int, default=256, help="signals: samples per signal (default 256)")
    p.add_argument("--seed", type=int, default=0, help="held-out items of seed K: (K, 2, k), never a training item")
    args = p.parse_args(argv)
    num = args.num or (3 if args.kind == "volumes" else 40)
    if num < 1 or min(args.size, args.length) < 8:
        p.error("give --num of at least 1 and sizes of at least 8")
    if args.kind == "volumes":
        out = write_volumes(args.out, num, args.size, args.seed)
        print(f"wrote {num} volume(s) of {args.size}^3 to {out / 'images'} and their masks to {out / 'masks'}")
    else:
        out = write_signals(args.out, num, args.length, args.seed)
        print(f"wrote {num} signal(s) of length {args.length} to {out}/<class>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
