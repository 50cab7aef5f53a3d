"""A smoke run of bench/bench_segmentation.py (MONAI's UNet as the peer): skipped where MONAI is not installed, as
in CI, which installs only the dev extra. No numbers asserted: the targets are the bench's business."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("monai")


def test_the_segmentation_bench_prints_both_rows(capsys):
    path = Path(__file__).parents[1] / "bench" / "bench_segmentation.py"
    spec = importlib.util.spec_from_file_location("bench_segmentation", path)
    bench = sys.modules["bench_segmentation"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--quick", "--steps", "3", "--test-size", "128", "--repeats", "1"])
    out = capsys.readouterr().out
    number = r"\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(?:[\d.]+|nan)$"    # parameters, s/step, Dice, IoU, HD95
    for row in ("ours", "MONAI"):
        assert re.search(rf"^{row}{number}", out, re.M), out
    assert re.search(r"^\s+predict_tiled\s+[\d.]+ MPix/s$", out, re.M)
    assert re.search(r"^\s+sliding_window_inference\s+[\d.]+ MPix/s$", out, re.M)
    assert out.count("PASS") + out.count("FAIL") == 2 and code == (1 if "FAIL" in out else 0)
