"""bench/bench_nd.py's pairs are what its README says: matched architectures, MONAI's checkpointing wrapper changes
no gradient, and the memory estimator counts a real model's step. The timings themselves are the bench's job."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
bench_nd = pytest.importorskip("bench_nd")


def test_the_3d_pair_has_monais_parameter_count():
    pytest.importorskip("monai")
    assert bench_nd.params(bench_nd.ours_3d(16)) == bench_nd.params(bench_nd.monai_3d(flash=False))


@pytest.mark.skipif(importlib.util.find_spec("denoising_diffusion_pytorch") is None,
                    reason="lucidrains' denoising-diffusion-pytorch is not installed (the bench extra)")
def test_the_1d_pair_is_matched_within_five_percent():
    ours, theirs = bench_nd.params(bench_nd.ours_1d(64)), bench_nd.params(bench_nd.lucidrains_1d())
    assert abs(ours / theirs - 1) < 0.05


def test_checkpointing_monai_changes_no_gradient():
    pytest.importorskip("monai")
    grads = []
    for wrap in (False, True):
        torch.manual_seed(0)
        model = bench_nd.monai_3d(flash=True)
        model = bench_nd.checkpoint_monai(model) if wrap else model
        x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
        bench_nd.call(model, x, torch.tensor([10])).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
