"""Every fast path gives the plain model's outputs (within its precision), and the hot path does no needless work."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from conftest import tiny
from diffunet.model.kernels import CPU_MATMUL_ATTENTION_TOKENS, FOUR_PHASE_MIN_SIZE, Conv3d, Dropout, attend, cpu_dropout, nearest_up_conv, phase_kernel
from diffunet.training.precision import apply_fast_paths, autocast, compiler_missing
from diffunet import UNet
from diffunet.model.nn import InterpolateConv


def model_and_batch(**kw):
    model = tiny(zero_init=False, **kw)        # attention at 8x8 and in the bottleneck; nonzero output
    return model, torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999])


def grads(model, x, t, **autocast_kw):
    model.zero_grad(set_to_none=True)
    with autocast("cpu", **autocast_kw):
        out = model(x, t).sample
    out.float().square().mean().backward()
    return out.detach().float(), [p.grad.float().clone() for p in model.parameters()]


def assert_close_lists(a, b, **tol):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


def test_channels_last_gives_the_same_outputs_and_gradients():
    model, x, t = model_and_batch()
    out, g = grads(model, x, t)
    fast = apply_fast_paths(copy.deepcopy(model), channels_last=True)
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out_cl, g_cl = grads(fast, x, t)
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-4)
    assert_close_lists(g_cl, g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_switch_gives_the_same_gradients(dropout):
    model, x, t = model_and_batch(dropout=dropout)
    torch.manual_seed(1)
    out, g = grads(model, x, t)
    fast = apply_fast_paths(copy.deepcopy(model), gradient_checkpointing=True)
    assert fast.gradient_checkpointing
    torch.manual_seed(1)                                    # the recompute replays the same dropout masks
    out_ck, g_ck = grads(fast, x, t)
    torch.testing.assert_close(out_ck, out)
    assert_close_lists(g_ck, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("time_condition", ["scale_shift", "add"])
def test_bf16_autocast_on_cpu_is_close_and_finite(time_condition):
    model, x, t = model_and_batch(time_condition=time_condition)
    out, g = grads(model, x, t)
    out16, g16 = grads(model, x, t, mixed_precision="bf16")
    assert torch.isfinite(out16).all() and all(torch.isfinite(p).all() for p in g16)
    assert (out16 - out).abs().max() <= 0.05 * out.abs().max()             # bf16 keeps ~3 significant digits
    for a, b in zip(g16, g):
        assert (a - b).norm() <= 0.1 * b.norm() + 1e-6


def test_timestep_features_stay_fp32_under_autocast():
    model = tiny()
    with autocast("cpu", "bf16"):
        assert model.time_embed[0](torch.tensor([1.0, 999.0])).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [16, CPU_MATMUL_ATTENTION_TOKENS, 4 * CPU_MATMUL_ATTENTION_TOKENS])
def test_both_attention_routes_agree_with_the_fp32_reference(tokens, dtype):
    q, k, v = (torch.randn(2, 4, tokens, 32) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    out = attend(q.to(dtype), k.to(dtype), v.to(dtype)).float()
    torch.testing.assert_close(out, ref, atol=1e-5 if dtype == torch.float32 else 3e-2, rtol=1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size, padding", [((1, 1), 1), ((5, 7), 1), ((8, 8), 1), ((2, 3), 0), ((5, 7), 0)])
def test_four_phase_upsampling_equals_interpolate_then_conv(size, padding, channels_last, bias):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=padding)
    out = nearest_up_conv(x, w, b, padding)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=memory_format) or size == (1, 1)   # 1x1: both layouts at once
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    inputs = (x, w, b) if bias else (x, w)
    assert_close_lists(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size, padding", [((4,), 1), ((5,), 0), ((3, 4, 5), 1), ((2, 3, 3), 0)])
def test_two_and_eight_phase_upsampling_equal_interpolate_then_conv(size, padding, channels_last):
    """The same rewrite along a signal (2 phases) and in a volume (8): values, gradients and memory format."""
    dims = len(size)
    if channels_last and dims == 1:
        pytest.skip("a signal has no channels-last format")
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    w = torch.randn(4, 3, *(3,) * dims, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    conv = {1: F.conv1d, 3: F.conv3d}[dims]
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=padding)
    out = nearest_up_conv(x, w, b, padding)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    assert_close_lists(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g),
                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_nearest_upsampler_takes_the_four_phase_route_with_the_same_result(mixed_precision):
    up = InterpolateConv("nearest", 8, "same")
    x = torch.randn(2, 8, FOUR_PHASE_MIN_SIZE, FOUR_PHASE_MIN_SIZE)
    with autocast("cpu", mixed_precision):
        up.four_phase = False
        ref = up(x)
        up.four_phase = True
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = up(x)
    assert "aten::upsample_nearest2d" not in {e.key for e in prof.key_averages()}
    assert out.dtype == ref.dtype
    tol = dict(rtol=1e-5, atol=1e-5) if mixed_precision == "no" else dict(rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("padding", [1, 0])
def test_four_phase_kernels_are_the_tap_sums_rounded_once(padding):
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    rows = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)   # [phase, tap, row]
    rows = rows if padding else rows.flip(0)
    ref = torch.einsum("akr,bls,ocrs->abockl", rows, rows, w).reshape(16, 3, 2, 2)
    torch.testing.assert_close(phase_kernel(w, padding), ref, rtol=1e-15, atol=1e-15)
    # bf16 weights (a pipeline loaded with torch_dtype=bfloat16): summed in fp32, rounded once
    w16 = w.to(torch.bfloat16)
    assert torch.equal(phase_kernel(w16, padding), phase_kernel(w16.double(), padding).to(torch.bfloat16))


@pytest.mark.parametrize("padding, size", [("valid", (12, 16)), ("same", (32, 48))])   # upsampler inputs >= 8
def test_unet_outputs_do_not_depend_on_the_upsampling_route(padding, size):
    model = tiny(zero_init=False, padding=padding, sample_size=size, upsample="nearest", channel_mult=(1, 2, 2),
                 attention_resolutions=())
    ups = [m for m in model.modules() if isinstance(m, InterpolateConv)]
    x, t = torch.randn(2, 1, *size), torch.tensor([3, 700])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(x, t).sample
    assert "aten::upsample_nearest2d" not in {e.key for e in prof.key_averages()}   # every upsampler took it
    for m in ups:
        m.four_phase = False
    torch.testing.assert_close(out, model(x, t).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_dropout_is_dropout(p, channels_last):
    x = torch.rand(5, 8, 99, 101) + 1                                          # odd size; no zeros of its own
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = cpu_dropout(x, p)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - p) < 5e-3                      # 400k draws: 5e-3 is > 6 sigma
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn_like(x)
    (dx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(dx, torch.where(kept, g / (1 - p), 0))
    # the mask is not tied to the layout: two halves of one tensor are independent
    a, b = kept[:2].flatten(), kept[2:4].flatten()
    assert abs((a == b).float().mean().item() - (p**2 + (1 - p) ** 2)) < 1e-2


def test_dropout_module_follows_the_seed_and_the_mode():
    drop, x = Dropout(0.2), torch.randn(4, 3, 8, 8)
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), a)
    assert not torch.equal(drop(x), a)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_attention_takes_sdpas_fused_kernel_not_the_math_path():
    # The fused CPU kernel refuses a head dim that is not contiguous; with it alone enabled, a layout regression
    # (the math fallback, which stores every token-pair score) raises here.
    model, x, t = model_and_batch()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model(x, t).sample.sum().backward()
    q = torch.randn(1, 2, 4 * CPU_MATMUL_ATTENTION_TOKENS, 16, dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):                            # large N in bf16: the fused kernel too
        attend(q, q, q)


def test_forward_and_backward_have_no_host_syncs_or_table_rebuilds():
    model, x, t = model_and_batch()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.mse_loss(model(x, t).sample, x).backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_local_scalar_dense" not in ops                           # .item() / bool(tensor): a GPU sync


def test_time_features_are_the_checkpoints_sinusoids_in_fp32_under_autocast():
    # diffusers' Timesteps replaced our own embedding: the features must be bitwise the formula checkpoints were
    # trained with (cos first, frequencies exp(-ln(10^4) i / half)), and stay fp32 under bf16 autocast.
    import math

    embed = tiny().time_embed[0]                                            # base_channels=8: 4 frequencies
    t = torch.tensor([0, 1, 7, 999, 250.5])
    args = t[:, None] * torch.exp(-math.log(10000.0) * torch.arange(4, dtype=torch.float32) / 4)[None]
    assert torch.equal(embed(t), torch.cat([args.cos(), args.sin()], dim=-1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert embed(torch.randint(0, 1000, (3,))).dtype == torch.float32


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding, bias", [(1, True), (0, False)])
def test_3d_convs_backward_in_channels_last_gives_torchs_gradients(channels_last, padding, bias):
    torch.manual_seed(0)
    conv = Conv3d(6, 5, 3, padding=padding, bias=bias)
    reference = torch.nn.Conv3d(6, 5, 3, padding=padding, bias=bias)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 18, 16, 17)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    results = []
    for layer in (conv, reference):
        x_ = x.clone().requires_grad_()
        out = layer(x_)
        out.backward(torch.ones_like(out))
        results.append([out, x_.grad, *(p.grad for p in layer.parameters())])
    assert type(results[0][0].grad_fn).__name__ == "_ChannelsLastBackwardConv3dBackward"     # the route was taken
    assert torch.equal(results[0][0], results[1][0])                                  # the forward is torch's
    for ours, torchs in zip(results[0][1:], results[1][1:]):
        assert ours.is_contiguous() == torchs.is_contiguous()                   # the caller's layout comes back
        assert (ours - torchs).abs().max() <= 1e-5 * torchs.abs().max()       # fp32 sums in another order


def test_3d_convs_keep_torchs_path_where_the_other_layout_is_not_faster():
    small, single = torch.randn(1, 4, 8, 8, 8, requires_grad=True), torch.randn(1, 1, 32, 32, 32, requires_grad=True)
    assert type(Conv3d(4, 4, 3, padding=1)(small).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(Conv3d(1, 4, 3, padding=1)(single).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(Conv3d(4, 4, 1)(small.repeat(1, 1, 2, 2, 2)).grad_fn).__name__ == "ConvolutionBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(Conv3d(4, 4, 3, padding=1)(small.repeat(1, 1, 2, 2, 2)).grad_fn).__name__ == "ConvolutionBackward0"
    model = UNet(sample_size=8, spatial_dims=3, in_channels=1, base_channels=8, channel_mult=(1, 2), norm_groups=4,
                 attention_levels=())
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Conv3d)} == {Conv3d}


def test_fast_paths_keep_the_state_dict_and_the_class():
    model = tiny()
    keys = list(model.state_dict())
    fast = apply_fast_paths(model, channels_last=True, gradient_checkpointing=True)
    assert fast is model and list(fast.state_dict()) == keys


def test_compile_without_a_compiler_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    model, x, t = model_and_batch()
    ref = model(x, t).sample
    with pytest.warns(UserWarning, match="torch.compile unavailable .*C\\+\\+ compiler") as record:
        fast = apply_fast_paths(model, compile=True)
    assert len(record) == 1 and fast is model
    torch.testing.assert_close(fast(x, t).sample, ref)


@pytest.mark.parametrize("backend", [
    "aot_eager",                                                            # traces forward + backward, in seconds
    pytest.param("inductor", marks=pytest.mark.skipif(
        compiler_missing("cpu") is not None or not os.environ.get("DIFFUNET_TEST_INDUCTOR"),
        reason="no compiler here, or DIFFUNET_TEST_INDUCTOR unset (compiling kernels takes ~30 s on a small CPU)")),
])
def test_compile_gives_the_same_outputs_gradients_and_state_dict(backend):
    model, x, t = model_and_batch(channel_mult=(1,), attention_resolutions=())   # the smallest U: compiles fastest
    out, g = grads(model, x, t)
    keys = list(model.state_dict())
    fast = apply_fast_paths(copy.deepcopy(model), compile=True, compile_backend=backend)
    out_c, g_c = grads(fast, x, t)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-4)
    assert_close_lists(g_c, g, atol=1e-5, rtol=1e-4)
    assert list(fast.state_dict()) == keys and type(fast) is type(model)


def test_autocast_names():
    assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "no"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown mixed_precision 'fp8'; choose one of 'no', 'bf16', 'fp16'"):
        autocast("cpu", "fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs CUDA")
def test_fp16_training_with_grad_scaler_stays_finite():
    model, x, t = model_and_batch()
    model, x, t = model.cuda(), x.cuda() * 50, t.cuda()                     # large inputs: overflow bait
    opt, scaler = torch.optim.AdamW(model.parameters(), lr=1e-3), torch.amp.GradScaler("cuda")
    for _ in range(5):
        with autocast("cuda", "fp16"):
            out = model(x, t).sample
        assert torch.isfinite(out).all()
        scaler.scale(F.mse_loss(out.float(), x)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bench_builds_a_matched_diffusers_twin():
    spec = importlib.util.spec_from_file_location("bench_unet", Path(__file__).parents[1] / "bench" / "bench_unet.py")
    bench = sys.modules["bench_unet"] = importlib.util.module_from_spec(spec)   # dataclasses look it up there
    spec.loader.exec_module(bench)
    for kw in [dict(), dict(time_condition="add", head_dim=8, channel_mult=(1, 2, 2))]:
        ours = tiny(head_dim=4, **kw) if "head_dim" not in kw else tiny(**kw)
        twin = bench.diffusers_twin(ours)
        x, t = torch.randn(1, 1, 16, 16), torch.tensor([3])
        n_ours, n_twin = (sum(p.numel() for p in m.parameters()) for m in (ours, twin))
        f_ours, f_twin = (bench.count_flops(m, x, t, backward=False) for m in (ours, twin))
        assert abs(n_twin / n_ours - 1) < 0.05 and abs(f_twin / f_ours - 1) < 0.05
        assert twin(x, t).sample.shape == ours(x, t).sample.shape
    with pytest.raises(ValueError, match="no counterpart"):
        bench.diffusers_twin(tiny(skip="add"))


def test_the_bench_runs_end_to_end_and_prints_its_targets():
    # a smoke run on the digits architecture (no numbers asserted: timings are the bench's business, not a test's);
    # a merge once broke the bench at its first row and no test noticed
    bench = Path(__file__).parents[1] / "bench" / "bench_unet.py"
    run = subprocess.run([sys.executable, str(bench), "--preset", "digits", "--batch", "2", "--repeats", "1",
                          "--warmup", "1", "--ddim-steps", "2", "--threads", "1"],
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert any(line.startswith("device: ") and "precision auto -> " in line for line in lines)
    targets = [line for line in lines if line[:3] in {"1. ", "2. ", "3. ", "4. "}]
    assert len(targets) == 4 and all(line.rstrip().endswith(("PASS", "FAIL", "device)")) for line in targets)
