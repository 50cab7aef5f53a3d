"""The seed's claims about the U-Net, measured: ``python -m experiments.report [--quick] [--out report] [--seeds N]``.

Trains small denoisers on the embedded digits (16x16) and writes ``OUT/index.md``, one section per claim, each
with its setup, a table (mean ± sd over seeds), a matplotlib plot and a plain verdict, plus ``OUT/numbers.json``:

1. skips carry the high frequencies      4. upsampling artifacts (checkerboard energy)
2. skips are a gradient highway          5. padding at the borders ("same" vs "valid")
3. strided conv as a learned anti-alias  6. the 1x1 conv after concatenation (cost vs loss)

A verdict is "holds" only when every seed agrees and the mean difference exceeds the seed-to-seed spread of the
differences (runs are paired: the same seed gives the same initial weights, batches, noise and timesteps);
"does not hold" when every seed disagrees by as much; otherwise "not resolved". ``--quick`` trains for seconds:
it checks that the report runs, and its verdicts are not evidence.

Models are trained one after another on one thread by default: they are too small to gain much from intra-op
threads, and on a shared machine oversubscribed threads cost up to ten times the time (``--threads`` to change).

Layout: ``lab.py`` is what the claims share (settings, training, measures, verdicts, writing); each claim is one
module named for it, with one ``section_*(lab, plt) -> Section`` function; ``SECTIONS`` below gives their order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from .concat_1x1 import section_concat_1x1
from .downsampling import section_downsampling
from .gradient_highway import section_gradient_highway
from .lab import (COMMAND, FULL, MATPLOTLIB_MISSING, QUICK, Check, Lab, Section, Settings, band_power,
                  jsonable, not_worse, nyquist_fraction, overall, paired, pyplot, radial_power, render)
from .padding import section_padding
from .skips_high_frequencies import section_skips_high_frequencies
from .upsampling import section_upsampling

SECTIONS = (section_skips_high_frequencies, section_gradient_highway, section_downsampling, section_upsampling,
            section_padding, section_concat_1x1)

__all__ = ["SECTIONS", "QUICK", "FULL", "Settings", "Lab", "Section", "Check", "paired", "not_worse", "overall",
           "radial_power", "band_power", "nyquist_fraction", "MATPLOTLIB_MISSING", "run_report", "main"]


def run_report(out: str | Path = "report", settings: Settings = FULL, seeds: int | None = None, log=print,
               command: str = COMMAND) -> list[Section]:
    """Train, measure and write ``out/index.md``, ``out/numbers.json`` and one PNG per section."""
    plt = pyplot()
    if seeds is not None:
        settings = dataclasses.replace(settings, seeds=seeds)
    if settings.seeds < 1:
        raise ValueError("seeds must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    lab = Lab(settings, log)
    sections = []
    for make in SECTIONS:
        section = make(lab, plt)
        name = f"{section.number}-{section.slug}.png"
        section.figure.savefig(out / name)
        plt.close(section.figure)
        section.figure = name
        sections.append(section)
        log(f"[{lab.elapsed():6.1f}s] section {section.number} ({section.title}): {section.verdict}")
    seconds = time.perf_counter() - start
    (out / "index.md").write_text(render(sections, settings, seconds, command))
    numbers = {s.slug: {"verdict": s.verdict, "checks": [dataclasses.asdict(c) for c in s.checks], **s.numbers}
               for s in sections}
    numbers["settings"] = dataclasses.asdict(settings)
    numbers["seconds"] = seconds
    (out / "numbers.json").write_text(json.dumps(jsonable(numbers), indent=1))
    log(f"wrote {out / 'index.md'} in {seconds:.0f} s")
    return sections


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds of training: checks that the report runs")
    p.add_argument("--out", default="report", help="output folder (index.md, numbers.json, PNGs)")
    p.add_argument("--seeds", type=int, default=None, help="models per configuration (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see module doc)")
    args = p.parse_args(argv)
    pyplot()                                                # fail before training, not after
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    command = COMMAND + " ".join(["", *(argv if argv is not None else sys.argv[1:])])
    run_report(args.out, QUICK if args.quick else FULL, args.seeds,
               log=lambda msg: print(msg, file=sys.stderr, flush=True), command=command.rstrip())
