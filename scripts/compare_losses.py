"""Are two runs' logged training losses the same? Reads the ``loss`` scalar of each run's tensorboard logs
(``<run>/logs``) and compares them step by step: what a restructuring that keeps behaviour must leave unchanged.

    python scripts/compare_losses.py runs/before runs/after     # exit status 0 when every logged loss is equal
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def losses(run: Path, tag: str = "loss") -> dict[int, float]:
    """step -> the logged ``tag`` of every event file under ``run/logs`` that has it."""
    found = {}
    for events in sorted((Path(run) / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            found.update({e.step: e.value for e in acc.Scalars(tag)})
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--tag", default="loss")
    args = parser.parse_args(argv)
    a, b = losses(args.a, args.tag), losses(args.b, args.tag)
    if not a or not b:
        print(f"no '{args.tag}' logged in {args.a if not a else args.b}")
        return 2
    steps = sorted(set(a) | set(b))
    differ = [s for s in steps if a.get(s) != b.get(s)]
    print(f"{len(steps)} logged steps ({steps[0]}..{steps[-1]}); {len(differ)} differ"
          + (f", first at step {differ[0]}: {a.get(differ[0])} vs {b.get(differ[0])}" if differ else
             f"; last loss {a[steps[-1]]:.6f} in both"))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
