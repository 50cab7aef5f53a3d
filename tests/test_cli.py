"""The command lines: overrides in any order around --config, and an argparse error is one line."""

import importlib.util
from pathlib import Path

import pytest

from diffunet.plan import main as plan_main
from diffunet.posthoc_ema import main as posthoc_main

ROOT = Path(__file__).resolve().parents[1]


def _train_py():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_train_py_takes_overrides_on_both_sides_of_config(capsys):
    assert _train_py()(["--print-config", "output_dir=x", "--config", "cells-seg", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("output_dir: x\n") and "task: segmentation" in out and "  lr: 0.001\n" in out


@pytest.mark.parametrize("name,main,argv", [("python train.py", None, ["--bogus"]),
                                            ("python -m diffunet.plan", plan_main, []),
                                            ("python -m diffunet.posthoc_ema", posthoc_main, ["run", "--step", "x"])])
def test_an_argparse_error_is_one_line(name, main, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        (main or _train_py())(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: ") and lines[0].endswith(f"(see {name} --help)")
