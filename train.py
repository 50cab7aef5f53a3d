"""Train a diffusion model.

    python train.py                                     # the default: digits, offline, minutes on a CPU
    python train.py --config configs/small.yaml train.lr=1e-4 model.skip=concat_1x1
    accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 train.py --config ... --resume latest
"""

import sys

from omegaconf import OmegaConf

from diffunet.cli import ArgumentParser
from diffunet.config import load_config
from diffunet.errors import CheckpointError, ConfigError, DataError, TrainingError
from diffunet.training.loop import Interrupted, train


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python train.py", description="Train a diffunet diffusion model.",
                            epilog="Overrides are dotted keys: train.max_steps=500 model.skip=add")
    parser.add_argument("--config", default="digits", help="a YAML file or preset name (default: digits)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (same as train.resume=...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)     # overrides may stand before and after --config
    try:
        cfg = load_config(args.config, args.overrides + ([f"train.resume={args.resume}"] if args.resume else []))
        if args.print_config:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        train(cfg)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + int(e.signum)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
