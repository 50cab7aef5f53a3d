"""The ablation report: its measures, its verdict rule, and the structure of what it writes."""

import dataclasses
import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from experiments import report

# Smaller than --quick: the report's structure, not its evidence.
TINY = dataclasses.replace(report.QUICK, name="test", steps=2, batch=8, probe_images=24, grad_depths=(2, 3),
                           grad_steps=2, grad_probes=1, pad_steps=1, pad_batch=4, timing_steps=1)


def test_nyquist_fraction_sees_a_checkerboard_and_not_interpolation():
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    assert report.nyquist_fraction(checker[None, None]) == pytest.approx(1.0)
    coarse = torch.randn(4, 3, 8, 8)
    # 2x interpolation has a zero at Nyquist: exact for nearest, bilinear up to its clamped edge rows
    assert report.nyquist_fraction(F.interpolate(coarse, scale_factor=2.0, mode="nearest")) < 1e-12
    assert report.nyquist_fraction(F.interpolate(coarse, scale_factor=2.0, mode="bilinear")) < 0.01
    assert report.nyquist_fraction(torch.randn(64, 1, 16, 16)) == pytest.approx(3 / 255, rel=0.3)


def test_radial_power_of_white_noise_is_flat_and_of_a_blur_falls():
    f, p = report.radial_power(torch.randn(256, 1, 16, 16))
    assert f[0] == 1 / 16 and f[-1] == pytest.approx(math.sqrt(2) / 2, abs=1 / 16)
    assert p[1:].max() / p[1:].min() < 1.5
    blurred = F.avg_pool2d(torch.randn(256, 1, 17, 17), 2, stride=1)
    _, q = report.radial_power(blurred)
    assert q[2] > 10 * q[-2]


def test_verdicts_need_every_seed_and_a_margin_beyond_the_spread():
    assert report.paired("p", [0.3, 0.5], "").verdict == "holds"
    assert report.paired("p", [-0.3, -0.5], "").verdict == "does not hold"
    assert report.paired("p", [0.3, -0.1], "").verdict.startswith("not resolved")
    assert report.paired("p", [0.01, 1.0], "").verdict.startswith("not resolved")   # agree, but spread > mean
    assert report.not_worse("p", [0.3, -0.1], "").verdict.startswith("holds")
    assert report.not_worse("p", [-0.3, -0.5], "").verdict == "does not hold"
    checks = [report.Check("a", "holds", ""), report.Check("b", "does not hold", "")]
    assert report.overall(checks) == "holds in part"
    assert report.overall(checks[1:]) == "does not hold on this data"


def test_missing_matplotlib_fails_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"pip install 'diffunet\[report\]'"):
        report.main(["--quick"])


def _finite(obj):
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def test_report_has_six_sections_valid_plots_and_finite_numbers(tmp_path):
    from PIL import Image

    torch.set_num_threads(1)
    sections = report.run_report(tmp_path, TINY, log=lambda msg: None)
    assert [s.number for s in sections] == [1, 2, 3, 4, 5, 6]
    text = (tmp_path / "index.md").read_text()
    headings = re.findall(r"^## (\d)\. ", text, flags=re.M)
    assert headings == ["1", "2", "3", "4", "5", "6"]
    for part in text.split("\n## ")[1:]:
        for field in ("**Claim.**", "**Setup.**", "**Verdict: ", "| prediction | verdict | evidence |"):
            assert field in part
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(images) == 6
    for name in images:
        with Image.open(tmp_path / name) as im:
            im.verify()
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] >= 400
    assert not re.search(r"\b(nan|inf)\b", text)
    numbers = json.loads((tmp_path / "numbers.json").read_text())
    assert _finite(numbers)
    assert {s.slug for s in sections} <= set(numbers)
    for s in sections:
        assert s.checks and all(c.verdict.split(" (")[0] in ("holds", "does not hold", "not resolved")
                                for c in s.checks)
