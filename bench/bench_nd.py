"""diffunet's UNet beyond images: 3D against MONAI's DiffusionModelUNet, 1D against lucidrains' Unet1D.

    python bench/bench_nd.py                 # 3D at 32^3 and 1D at 512, fp32 eager: ~1.5 min on 2 cores
    python bench/bench_nd.py --full --memory 64   # + the best flags of each, + peak memory at 64^3 (~10 min)
    python bench/bench_nd.py --largest --check 96 # the largest cube a ~20M-parameter 3D U-Net trains on in 24 GiB

Each pair is built at matched architecture and measured side by side in one process, the rows taking turns in
every round (a load burst hits both): training steps per second (forward, backward, AdamW; median of --repeats
rounds after a warm-up) and forward passes per second, then the ratio ours / theirs. Parameters and forward FLOPs
(torch's FlopCounterMode) of both are printed. The peak memory of one training step is measured in a child process
(RSS above the level before the step, glibc told to hand freed blocks back, as bench_unet.py does).
The peers are bench-only: ``pip install --no-deps monai denoising-diffusion-pytorch ema-pytorch`` (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from bench_recipes import import_peer
from bench_unet import peak_memory, return_freed_memory_to_os
from diffunet import UNet
from diffunet.training.precision import describe_device

GIB = 2**30


# ------------------------------------------------------------------------------------------------ the pairs

def ours_3d(size: int) -> UNet:
    """The 3D pair's architecture in our switches: MONAI's DiffusionModelUNet layout (strided-conv down, nearest +
    conv up, concatenated skips, time added before the second norm, attention at the deepest level and in the
    bottleneck, heads of 32 channels, GroupNorm 32, eps 1e-6)."""
    return UNet(sample_size=size, spatial_dims=3, in_channels=1, base_channels=32, channel_mult=(1, 2, 2),
                num_res_blocks=1, attention_levels=(2,), head_dim=32, norm_eps=1e-6, downsample="conv",
                upsample="nearest", skip="concat", time_condition="add")


def monai_3d(flash: bool):
    from monai.networks.nets import DiffusionModelUNet
    return DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(32, 64, 64),
                              attention_levels=(False, False, True), num_head_channels=32, norm_num_groups=32,
                              use_flash_attention=flash)


def checkpoint_monai(model):
    """MONAI's DiffusionModelUNet offers no activation checkpointing: recompute each down, middle and up block in
    the backward pass, as ours does per level."""
    for block in [*model.down_blocks, model.middle_block, *model.up_blocks]:
        block.forward = types.MethodType(
            lambda self, *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k), block)
    return model


def ours_1d(length: int) -> UNet:
    """Matched to lucidrains' Unet1D(dim=32, dim_mults=(1, 2, 4, 8)): 4 levels of 2 blocks (theirs: 2 down, 2 up;
    ours: 2 down, 3 up), attention at the coarsest level and in the bottleneck (theirs: linear attention at every
    level, full in the bottleneck). Their blocks run at the level's input width (32, 32, 64, 128; 256 in the
    bottleneck), ours at one width per level, so ours takes 32, 64, 128, 160 channels: 4 % fewer parameters and
    3 % fewer forward FLOPs than theirs (both printed)."""
    return UNet(sample_size=length, spatial_dims=1, in_channels=1, base_channels=32, channel_mult=(1, 2, 4, 5),
                num_res_blocks=2, attention_levels=(3,), head_dim=32, norm_groups=8)


def lucidrains_1d():
    import_peer()                                       # torchvision stood in for, as bench_recipes.py does
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch_1d import Unet1D
    return Unet1D(dim=32, dim_mults=(1, 2, 4, 8), channels=1)


def call(model, x, t):
    """One forward pass of either side: ours and MONAI's take (x, timesteps), lucidrains' (x, time)."""
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model, x, t) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call(model, x, t)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------ timing

class Side:
    """One model with its optimizer, its input and its two timed calls."""

    def __init__(self, name: str, model, shape, channels_last: bool = False):
        self.name, self.model = name, model.train()
        self.x, self.t = torch.randn(shape), torch.randint(0, 1000, (shape[0],))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
            self.x = self.x.contiguous(memory_format=torch.channels_last_3d)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.train_s, self.forward_s = [], []

    def step(self):
        loss = F.mse_loss(call(self.model, self.x, self.t), self.x)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def forward(self):
        with torch.no_grad():
            call(self.model, self.x, self.t)

    def timed(self, fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def race(sides: list[Side], repeats: int) -> None:
    for side in sides:                                                  # warm-up: allocator, oneDNN
        side.step()
        side.forward()
    for _ in range(repeats):
        for side in sides:
            side.train_s.append(side.timed(side.step))
            side.forward_s.append(side.timed(side.forward))


def rate(seconds: list[float], batch: int) -> float:
    return batch / statistics.median(seconds)


# ------------------------------------------------------------------------------------------------ memory

def memory_rows(size: int, batch: int) -> dict:
    """{name: bytes} of one training step at size^3, batch ``batch``, ours and MONAI's, with and without
    checkpointing; run in this process (a fresh child, see ``memory_in_child``)."""
    return_freed_memory_to_os()
    out = {}
    for name, build in (("ours", lambda: ours_3d(size)), ("monai", lambda: monai_3d(flash=True))):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = build().train()
            if ckpt:
                model = model.enable_gradient_checkpointing() or model if name == "ours" else checkpoint_monai(model)
            side = Side(name, model, (batch, 1, size, size, size))
            side.step()                                                 # optimizer state exists, as in training
            out[f"{name}{' + checkpointing' if ckpt else ''}"] = peak_memory(side.step, torch.device("cpu"))
            del side, model
    return out


def memory_in_child(size: int, batch: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--memory-only", str(size), str(batch)],
                            stdout=subprocess.PIPE, text=True)
    if result.returncode:
        raise SystemExit(f"the memory run failed (exit status {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ largest cube

def largest_model(size: int) -> UNet:
    """22M parameters: 4 levels of 32, 64, 128, 160 channels, 2 blocks each, attention (heads of 32 channels) at the
    deepest level and in the bottleneck."""
    return UNet(sample_size=size, spatial_dims=3, in_channels=1, base_channels=32, channel_mult=(1, 2, 4, 5),
                num_res_blocks=2, attention_levels=(3,), head_dim=32)


def estimated_peak(size: int, bf16: bool) -> float:
    """GiB at the peak of one training step (batch 1, checkpointing, AdamW), by torch's MemTracker over fake
    tensors: every allocation of the step counted, nothing computed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # MemTracker's "Module is None" notes under checkpointing
        model = largest_model(size)
        model.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(model.parameters())
        tracker.track_external(model, opt)
        x = torch.randn(1, 1, size, size, size)
        peak = 0
        with tracker:
            for _ in range(2):                             # the second step has the optimizer's state
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    loss = model(x, torch.tensor([5])).sample.float().square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                peak = max(peak, tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
                tracker.reset_mod_stats()
    return peak / GIB


def largest(args) -> None:
    print(f"largest cube: {params(largest_model(32)) / 1e6:.1f}M parameters, batch 1, gradient checkpointing, "
          f"AdamW; budget {args.budget} GiB")
    print(f"{'size':>6} {'bf16 GiB':>9} {'fp32 GiB':>9}")
    fits = None
    for size in range(96, 321, 32):
        bf16, fp32 = estimated_peak(size, True), estimated_peak(size, False)
        print(f"{size:>4}^3 {bf16:>9.2f} {fp32:>9.2f}", flush=True)
        if bf16 <= args.budget:
            fits = size
        else:
            break
    print(f"largest cube within {args.budget} GiB in bf16 with checkpointing (estimated): {fits}^3")
    if args.check is not None:                           # the estimate against a real step's RSS, fp32
        size = args.check
        real = json.loads(subprocess.run([sys.executable, __file__, "--real-only", str(size)], stdout=subprocess.PIPE,
                                         text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"check at {size}^3 fp32: estimated {estimated_peak(size, False):.2f} GiB, measured {real / GIB:.2f} "
              f"GiB (RSS peak of a real step over the level before it, plus the parameters' and optimizer's "
              f"{real_static(size) / GIB:.2f} GiB)")


def real_static(size: int) -> int:
    return params(largest_model(size)) * 4 * 4             # weights, gradients, two AdamW moments (fp32)


def real_peak(size: int) -> int:
    return_freed_memory_to_os()
    model = largest_model(size)
    model.enable_gradient_checkpointing()
    side = Side("ours", model, (1, 1, size, size, size))
    side.step()
    return peak_memory(side.step, torch.device("cpu")) + real_static(size)


# ------------------------------------------------------------------------------------------------ report

def compare(title: str, sides: list[Side], batch: int, unit: str) -> list[tuple]:
    ours, theirs = sides[0], sides[1:]
    rows = []
    for other in theirs:
        train = rate(ours.train_s, batch) / rate(other.train_s, batch)
        fwd = rate(ours.forward_s, batch) / rate(other.forward_s, batch)
        rows.append((other.name, train, fwd))
    print(f"\n{title}")
    print(f"{'model':<34} {'train ' + unit + '/s':>14} {'forward ' + unit + '/s':>16}")
    for side in sides:
        print(f"{side.name:<34} {rate(side.train_s, batch):>14.2f} {rate(side.forward_s, batch):>16.2f}")
    for name, train, fwd in rows:
        print(f"ours / {name:<27} {train:>13.2f}x {fwd:>15.2f}x")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size3d", type=int, default=32, help="cube side of the 3D throughput rows (default 32)")
    parser.add_argument("--batch3d", type=int, default=2)
    parser.add_argument("--length", type=int, default=512, help="signal length of the 1D rows (default 512)")
    parser.add_argument("--batch1d", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="also the best flags of each: channels_last_3d, and "
                                                            "MONAI's SDPA attention (use_flash_attention)")
    parser.add_argument("--memory", type=int, metavar="SIDE", help="also the peak memory of one training step at "
                                                                  "SIDE^3, batch 2, +- checkpointing (64: ~4 min)")
    parser.add_argument("--largest", action="store_true", help="only the largest-cube search (estimates; minutes)")
    parser.add_argument("--budget", type=float, default=24.0, help="GiB for --largest (default 24)")
    parser.add_argument("--check", type=int, help="with --largest: also measure a real fp32 step at this cube")
    parser.add_argument("--memory-only", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--real-only", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_only:
        print(json.dumps(memory_rows(*args.memory_only)))
        return
    if args.real_only:
        print(json.dumps(real_peak(args.real_only)))
        return
    print(describe_device(torch.device("cpu")))
    if args.largest:
        largest(args)
        return
    start = time.perf_counter()
    torch.manual_seed(0)
    s, b = args.size3d, args.batch3d
    x, t = torch.randn(b, 1, s, s, s), torch.randint(0, 1000, (b,))
    ours, theirs = ours_3d(s), monai_3d(flash=False)
    print(f"\n3D, {s}^3 batch {b}, fp32 eager")
    for name, model in (("ours", ours), ("MONAI DiffusionModelUNet", theirs)):
        print(f"  {name:<28} {params(model) / 1e6:.3f}M parameters, {flops(model, x, t) / 1e9:.2f} GFLOP forward")
    shape = tuple(x.shape)
    sides = [Side("ours", ours, shape), Side("MONAI DiffusionModelUNet", theirs, shape)]
    if args.full:
        sides += [Side("ours, channels_last_3d", ours_3d(s), shape, channels_last=True),
                  Side("MONAI, flash", monai_3d(flash=True), shape),
                  Side("MONAI, flash, channels_last_3d", monai_3d(flash=True), shape, channels_last=True)]
    race(sides, args.repeats)
    compare(f"3D, {s}^3, batch {b} (volumes)", sides[:2], b, "vol")
    if args.full:                               # each side's fastest training setting, against the other's
        ours_rows, their_rows = [sides[0], sides[2]], [sides[1], *sides[3:]]
        fastest = [max(rows, key=lambda side: rate(side.train_s, b)) for rows in (ours_rows, their_rows)]
        compare("3D, every setting", [*ours_rows, *their_rows], b, "vol")
        compare("3D, the fastest setting of each (training)", fastest, b, "vol")

    n, b1 = args.length, args.batch1d
    x1, t1 = torch.randn(b1, 1, n), torch.randint(0, 1000, (b1,))
    ours1, theirs1 = ours_1d(n), lucidrains_1d()
    print(f"\n1D, length {n} batch {b1}, fp32 eager")
    for name, model in (("ours", ours1), ("lucidrains Unet1D", theirs1)):
        print(f"  {name:<28} {params(model) / 1e6:.3f}M parameters, {flops(model, x1, t1) / 1e9:.2f} GFLOP forward")
    sides1 = [Side("ours", ours1, tuple(x1.shape)), Side("lucidrains Unet1D", theirs1, tuple(x1.shape))]
    race(sides1, args.repeats)
    compare(f"1D, length {n}, batch {b1} (signals)", sides1, b1, "sig")

    if args.memory:
        m = args.memory
        print(f"\npeak memory of one training step, {m}^3 batch 2, fp32 (MONAI with SDPA attention)")
        for name, used in memory_in_child(m, 2).items():
            print(f"  {name:<34} {used / GIB:6.2f} GiB")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
