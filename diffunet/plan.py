"""Print a U-Net's shape plan, level by level: ``python -m diffunet.plan configs/digits.yaml [key=value ...]``.

``--vs model.skip=concat_1x1`` adds the per-level parameter difference of a variant, which shows the seed's
claims in numbers (what the 1x1 fusion saves, what valid padding crops, where attention sits).
"""

from __future__ import annotations

import sys

from .cli import ArgumentParser
from .config import build_model, load_config
from .errors import ConfigError
from .model.unet import AXES, UNet


def _by_axis(sizes) -> str:
    """(16, 8, 8) -> "16x8x8": a size or margin per axis."""
    return "x".join(map(str, sizes))


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def format_plan(model: UNet, variant: UNet | None = None, size=None) -> str:
    """The plan of ``model`` as an aligned text table (and the variant's parameter delta per level)."""
    tiling = model.tiling(model.config.sample_size if size is None else size)
    head = ["level", "channels", "size", "attn", "encoder", "skip", "decoder", "crop"]
    rows = []
    plan = model.plan(size)
    other = variant.plan(size) if variant is not None else None
    for i, r in enumerate(plan):
        row = [str(r.level), str(r.channels), _by_axis(r.size), "yes" if r.attention else "",
               _params(r.encoder_params), _params(r.skip_params), _params(r.decoder_params),
               _by_axis(r.crop) if any(r.crop) else "-"]
        if other is not None:
            o = other[i]
            delta = (o.encoder_params + o.skip_params + o.decoder_params
                     - r.encoder_params - r.skip_params - r.decoder_params)
            row.append(f"{'+' if delta >= 0 else '-'}{_params(abs(delta))}")
        rows.append(row)
    if other is not None:
        head.append("variant")
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *rows]]
    total = sum(p.numel() for p in model.parameters())
    levels = sum(r.encoder_params + r.skip_params + r.decoder_params for r in plan)
    middle = sum(p.numel() for p in model.middle.parameters())
    lines.append(f"bottleneck {_params(middle)}, stem/head/embeddings {_params(total - levels - middle)}")
    c = model.config
    lines.insert(0, f"UNet{'' if model.dims == 2 else f' {model.dims}D'} {c.padding} padding, "
                    f"down={c.downsample}, up={c.upsample}, skip={c.skip}: {_params(total)} parameters")
    if any(f != (2,) * model.dims for f in model.factors):
        lines.insert(1, f"down factors per level ({', '.join(AXES[model.dims])}): "
                        f"{', '.join(_by_axis(f) for f in model.factors)}; sizes divide by {_by_axis(model.divisors)}")
    if c.cond_channels:
        lines.append(f"stem: {c.in_channels} sample + {c.cond_channels} condition channels -> "
                     f"{c.base_channels * c.channel_mult[0]}")
    if any(tiling.pad):
        lines.append(f"valid padding: input {_by_axis(tiling.output_size)} is mirror-padded to "
                     f"{_by_axis(tiling.input_size)} (margin {_by_axis(tiling.margin)} "
                     f"px per side consumed by the unpadded convs)")
    if variant is not None:
        lines.append(f"variant: {_params(sum(p.numel() for p in variant.parameters()))} parameters")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m diffunet.plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML config or preset name")
    parser.add_argument("overrides", nargs="*", default=[],     # a default: argparse would call it required
                        help="dotted overrides, e.g. model.skip=add")
    parser.add_argument("--vs", action="append", default=[], metavar="KEY=VALUE",
                        help="compare with a variant (repeatable), e.g. --vs model.skip=concat_1x1")
    parser.add_argument("--size", type=int, nargs="+", help="plan for this input size (one int, or one per axis: "
                                                            "H W, D H W) instead")
    args = parser.parse_args(argv)
    try:
        model = build_model(load_config(args.config, args.overrides))
        variant = build_model(load_config(args.config, args.overrides + args.vs)) if args.vs else None
        size = None if args.size is None else tuple(args.size) if len(args.size) > 1 else args.size[0]
        print(format_plan(model, variant, size))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
