"""The configuration reference page, generated from the schema: every key of every section with its type, default
and the comment beside it in the source (``config.py``'s dataclasses; ``UNet.__init__`` for ``model``).

    python -m diffunet.reference docs/configuration.md      # rewrite the page; tests/test_docs.py fails when stale

A table written by hand goes stale; this one is the schema's own words.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import typing
from pathlib import Path

from . import config
from .cli import ArgumentParser
from .model.unet import UNet

FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=]+=.*?\s#\s?(.*)$")      # name: type = default   # comment
MORE = re.compile(r"^\s+#\s?(.*)$")                               # a comment line continuing the one above

HEADER = """# Configuration reference

Every key of a run's config, generated from the schema (`diffunet/config.py`; `model` is `UNet.__init__`'s
signature) by `python -m diffunet.reference docs/configuration.md`: a test fails when this page and the schema
differ. Set a key in a YAML file (`python train.py --config my.yaml`) or on the command line
(`python train.py train.lr=1e-4 model.skip=add`); `python train.py --print-config` prints the resolved config. An
unknown key is one error line naming the likely one.
"""


def comments(source: str) -> dict[str, str]:
    """name -> its comment, from the source of a dataclass body or a signature written one field a line, with a
    trailing comment and comment-only lines below it that continue it."""
    found, last = {}, None
    for line in source.splitlines():
        field, more = FIELD.match(line), MORE.match(line)
        if field:
            last = field[1]
            found[last] = field[2].strip()
        elif more and last is not None:
            found[last] += " " + more[1].strip()
        else:
            last = None
    return found


def type_name(t) -> str:
    """A field's type as written: the annotation string, or a typing object without its module."""
    if isinstance(t, str):
        return t
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def shown(value) -> str:
    """A default as YAML reads it back: JSON of plain values (tuples as lists)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def rows(schema: type, source: str, prefix: str) -> list[str]:
    notes = comments(source)
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(schema)             # the annotations are strings (from __future__)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            continue                                    # a section: a table of its own
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        note = notes.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{prefix}{f.name}` | `{type_name(f.type)}` | `{shown(default)}` | {note} |")
    return lines


# What the sections without a docstring of their own are; any other section (a task's) says it in its docstring
WHAT = {"model": "the network: `UNet(**model)`, every switch", "diffusion": "the objective and its noise schedule",
        "data": "what is read, and how", "train": "the loop, precision, EMA, checkpoints",
        "sample": "the run's sample grids and evaluation samples; saved with its pipeline, sample.py's defaults",
        "segment": "the segmentation tasks"}


def sections() -> dict[str, tuple[type, str, str]]:
    """section -> (its dataclass, the source its comments are read from, what it is): every section of
    ``config.Config``, in its order, so that a new one (a task's) needs no line here."""
    found = {}
    for name, schema in typing.get_type_hints(config.Config).items():
        if not dataclasses.is_dataclass(schema):
            continue
        source = inspect.getsource(UNet.__init__) if name == "model" else inspect.getsource(schema)
        found[name] = (schema, source, WHAT.get(name) or (schema.__doc__ or name).strip().split("\n")[0].rstrip("."))
    return found


def page() -> str:
    """The whole reference page, as docs/configuration.md holds it."""
    out = [HEADER, "## Top level", "", *rows(config.Config, inspect.getsource(config.Config), ""), ""]
    for name, (schema, source, what) in sections().items():
        out += [f"## `{name}`: {what}", "", *rows(schema, source, f"{name}."), ""]
        for field, sub in typing.get_type_hints(schema).items():       # a section within it: data.augment
            if dataclasses.is_dataclass(sub):
                doc = " ".join((sub.__doc__ or field).split()).rstrip(".")
                out += [f"### `{name}.{field}`: {doc}", "", *rows(sub, inspect.getsource(sub), f"{name}.{field}."), ""]
    out += ["## Keys that moved", "", "Still read at their old place for a release (a value other than the default "
            "says the new name once):", "", "| old key | now |", "|---|---|",
            *(f"| `{old}` | `{new}` |" for old, new in config.MOVED.items()), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m diffunet.reference", description="Write the configuration reference page.")
    p.add_argument("page", help="the Markdown file to write (docs/configuration.md)")
    args = p.parse_args(argv)
    Path(args.page).write_text(page())
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
