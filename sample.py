"""Sample images from a trained diffunet model.

    python sample.py runs/digits/pipeline --out runs/digits/samples --num-images 100 [--scheduler flow_euler ...]
    accelerate launch sample.py runs/digits/pipeline --out runs/digits/samples --num-images 10000   # split
    python sample.py runs/digits-sr/pipeline --cond lowres/ --out runs/digits-sr/sharp [--num-per-cond 4]
    python sample.py runs/cells-seg/pipeline --cond images/ --out runs/cells-seg/masks [--tile 128]
    python sample.py runs/cells-segdiff/pipeline --cond images/ --out runs/cells-segdiff/masks --num-per-cond 8
    python sample.py runs/signals/pipeline --out runs/signals/samples --num-images 40      # 000000.npy, ...
    python sample.py runs/cells3d-seg/pipeline --cond volumes/ --out masks/ --tile 32      # NIfTI in, NIfTI out

Every option is a keyword of ``diffunet.sample_folders.sample_to_folder`` or, with --cond,
``diffunet.sample_folders.sample_conditioned`` (``segment_to_folder`` for a segmentation pipeline): the one
``RUNNERS`` names for the folder; for a model of signals or volumes ``diffunet.sample_arrays``' (``ARRAY_RUNNERS``);
see docs/sampling.md.
"""

import argparse
import inspect
import sys

from diffunet.cli import ArgumentParser
from diffunet.config import SampleConfig
from diffunet.errors import CheckpointError
from diffunet.objectives import OBJECTIVES, TARGETS
from diffunet.pretrained import is_deterministic, pipeline_class
from diffunet.training.precision import ALIASES, PRECISION
from diffunet.sample_arrays import ARRAY_RUNNERS, FORMATS, model_dims, segment_arrays
from diffunet.sample_folders import DIFFUSION_ONLY, RUNNERS, segment_to_folder
from diffunet.sampling import SCHEDULERS

DEFAULTS = SampleConfig()
GIVEN = argparse.SUPPRESS       # every option reaches the function only when given: its own default applies
                                # (None: as the run sampled), and an option a mode has no use for is refused
AS_THE_RUN = "default: as the run sampled (its pipeline folder says), else {}"


def runner(args: dict):
    """The function of this model folder and these options (``RUNNERS``: by the folder's pipeline class and
    ``--cond``). A segmentation model without ``--cond`` has nothing to segment: one line."""
    kind = pipeline_class(args["model"])                   # first: its errors name a folder that is none
    table = RUNNERS if model_dims(args["model"]) == 2 else ARRAY_RUNNERS      # images, or signals and volumes
    run = table.get((kind, "cond" in args))
    if run is None:
        raise ValueError(f"{args['model']} is a segmentation model: pass --cond DIR, the images to segment "
                         f"(python -m diffunet.cells DIR makes test images)")
    return run


def parse(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python sample.py", description=__doc__.splitlines()[0])
    p.add_argument("model", help="pipeline folder written by train.py, or a UNet.save_pretrained folder")
    p.add_argument("--out", required=True, help="output folder: 000000.png, ..., grid.png (with --cond: the "
                                                "conditions' relative paths and stems)")
    p.add_argument("--num-images", type=int, default=GIVEN, help=f"default {DEFAULTS.num_images}")
    p.add_argument("--start-index", type=int, default=GIVEN, help="first image index (extend an existing set)")
    p.add_argument("--cond", default=GIVEN, metavar="DIR",
                   help="sample an image-conditioned model: one output per image file under DIR (any depth)")
    p.add_argument("--mask", default=GIVEN, metavar="DIR",
                   help="with --cond: the masks (white = to fill), paired by relative path and stem")
    p.add_argument("--num-per-cond", type=int, default=GIVEN, metavar="N",
                   help="with --cond: N outputs per condition (stem_0 ... stem_{N-1}, stem_mean, stem_std)")
    p.add_argument("--tile", type=int, default=GIVEN, metavar="T",
                   help="segmentation, super-resolution and inpainting: by tiles of T output pixels per axis "
                        "(inputs of any size, memory bounded by T)")
    p.add_argument("--overlap", type=int, default=GIVEN, metavar="P",
                   help="with --tile, 'same'-padding models: blended overlap of neighbouring tiles (default T/4)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default=GIVEN,
                   help="repaint: training-free inpainting (with --cond and --mask); " + AS_THE_RUN.format("auto"))
    p.add_argument("--steps", type=int, default=GIVEN, help=AS_THE_RUN.format(50))
    p.add_argument("--eta", type=float, default=GIVEN, help="DDIM noise: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--batch-size", type=int, default=GIVEN, help=f"default {DEFAULTS.batch_size}")
    p.add_argument("--seed", type=int, default=GIVEN, help=f"default {DEFAULTS.seed}")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--class-label", dest="classes", type=int, metavar="K", default=GIVEN,
                        help="class id of every image")
    labels.add_argument("--classes", choices=["all"], default=GIVEN,
                        help="a balanced set (the default for conditional models)")
    p.add_argument("--guidance-scale", type=float, default=GIVEN,
                   help="classifier-free guidance: 1 conditional, 0 unconditional, >1 stronger; "
                        + AS_THE_RUN.format(1))
    p.add_argument("--dtype", choices=["auto", *PRECISION, *ALIASES], default=GIVEN,
                   help=f"the U-Net's precision (default {DEFAULTS.dtype})")
    p.add_argument("--device", default=GIVEN, help="default: the process's accelerator, else the CPU")
    p.add_argument("--objective", choices=list(OBJECTIVES), default=GIVEN,
                   help="what a bare model folder that records no scheduler was trained for (a pipeline folder, "
                        "and model folders train.py wrote, record it)")
    p.add_argument("--prediction-type", choices=list(TARGETS), default=GIVEN,
                   help="a ddpm model's target, for such a bare model folder (or to override a recorded one)")
    p.add_argument("--npz", nargs="?", const="samples.npz", default=GIVEN,
                   help="also write the images as uint8 in an .npz (default name samples.npz, in --out)")
    p.add_argument("--format", dest="array_format", choices=list(FORMATS), default=GIVEN,
                   help="a model of signals or volumes: the files of its samples (default .npy for signals, "
                        ".nii.gz for volumes)")
    p.add_argument("--no-grid", dest="grid", action="store_false", default=GIVEN)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=GIVEN)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    try:
        run = runner(vars(args))
        segmenting = run in (segment_to_folder, segment_arrays)
        deterministic = segmenting and is_deterministic(args.model)
    except (CheckpointError, ValueError) as e:
        p.error(str(e))
    takes = set(inspect.signature(run).parameters) - set(DIFFUSION_ONLY if deterministic else ())
    wrong = [name for name in vars(args) if name not in takes]
    if wrong:                                   # one rule: every option given that this mode has no use for
        where = ("not for a deterministic segmentation model (one forward pass, no scheduler)" if deterministic else
                 "not for a segmentation model" if segmenting else
                 "not with --cond" if "cond" in vars(args) else "only with --cond")
        p.error(f"{', '.join(typed(p, name, argv) for name in wrong)}: {where}")
    return args


def typed(parser: argparse.ArgumentParser, dest: str, argv: list[str]) -> str:
    """The option string the user typed for ``dest`` (``--no-grid`` for grid, ``--class-label`` for classes)."""
    options = [o for a in parser._actions if a.dest == dest for o in a.option_strings]
    return next((o for o in options if any(arg == o or arg.startswith(o + "=") for arg in argv)), options[0])


def main(argv=None) -> int:
    args = vars(parse(argv))
    try:
        runner(args)(**args)
    except (CheckpointError, ValueError) as e:          # a bad folder, file, label or option: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
