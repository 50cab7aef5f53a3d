"""A smoke run of bench/bench_volumes.py (MONAI's BasicUNet and sliding window as the peers): skipped where MONAI is
not installed, as in CI. No numbers asserted: the targets are the bench's business."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("monai")


def test_the_volume_bench_prints_every_row(capsys):
    path = Path(__file__).parents[1] / "bench" / "bench_volumes.py"
    spec = importlib.util.spec_from_file_location("bench_volumes", path)
    bench = sys.modules["bench_volumes"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--quick", "--steps", "2"])
    out = capsys.readouterr().out
    number = r"\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(?:[\d.]+|nan)$"    # parameters, s/step, Dice, IoU, HD95
    for row in ("ours", "MONAI", "ours, tiled"):
        assert re.search(rf"^{row}{number}", out, re.M), out
    assert re.search(r"^\s+predict_tiled\s+[\d.]+ Mvoxel/s$", out, re.M)
    assert re.search(r"^\s+sliding_window_inference\s+[\d.]+ Mvoxel/s$", out, re.M)
    assert "voxels with the same class" in out
    assert out.count("PASS") + out.count("FAIL") == 3 and code == (1 if "FAIL" in out else 0)
