"""Speed: the fast paths as switches and the one precision table.

Switches (``apply_fast_paths``): memory format, torch.compile, gradient checkpointing; precision (``PRECISION``,
``autocast``), and the one place that picks it for the hardware (``DEVICES``, ``resolve_precision``: "auto").
The CPU kernels the building blocks call (``Dropout``, ``attend``, ``nearest_up_conv``) are ``model/kernels.py``,
which travels inside exported folders; nothing here knows the U-Net.

``apply_fast_paths`` is the one entry point the training config calls (``train.channels_last``, ``train.compile``,
``train.gradient_checkpointing``); ``bench/bench_unet.py`` calls the same function on our UNet and on diffusers'
``UNet2DModel``, so both are measured through identical switches. Mixed precision is not a model transform: the
training loop gets it from accelerate (``mixed_precision="bf16"|"fp16"``: autocast, plus a GradScaler for fp16);
``autocast`` below is the same context for code that runs without accelerate (benchmarks, sampling).

What each switch buys (``python bench/bench_unet.py`` measures all of them, on CPU and CUDA):

- ``channels_last``: NHWC activations, the native layout of cuDNN's tensor-core convolutions and of oneDNN.
  On GPUs with fp16/bf16 a clear win; on CPU PyTorch's GroupNorm backward is several times slower in NHWC,
  which eats the convolution gain, so leave it off there.
- ``compile``: ``torch.compile`` of the model in place (``nn.Module.compile``: the object stays a UNet, its
  state-dict keys and ``save_pretrained`` are unchanged, diffusers pipelines accept it). It fuses the norms,
  SiLUs and adds between the convolutions; worth it on GPUs, where the first step compiles in about a minute.
  On a small CPU it compiles for minutes and gains little.
- ``gradient_checkpointing``: recompute one U-Net level at a time in the backward pass: activation memory for
  about one extra forward pass of time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..model.tables import choose

# accelerate's mixed_precision names -> the dtype the model computes in. Training, sampling and the bench all
# read this one table; torch's dtype names are accepted as aliases (sample.py --dtype float32).
PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"fp32": "no", "float32": "no", "bfloat16": "bf16", "float16": "fp16"}
# A bare `train.mixed_precision=no` on the command line is YAML 1.1's false, which OmegaConf's str field then holds
# as "False": read as "no", but not a name to offer anyone.
YAML_NO = {"False": "no"}


def alias(name: str) -> str:
    """accelerate's name for a precision name, alias or YAML's reading of "no"."""
    return {**ALIASES, **YAML_NO}.get(name, name)


def precision(name: str, what: str = "mixed_precision") -> tuple[str, torch.dtype]:
    """(accelerate's name, dtype) of a precision name or alias; a one-line error listing the valid names."""
    name = alias(name)
    return name, choose(PRECISION, name, what)


# ------------------------------------------------------------------------------------------ precision by hardware

@dataclass(frozen=True)
class DeviceClass:
    auto: str                           # what mixed_precision="auto" resolves to here
    bf16_slowdown: str | None = None    # bf16 is emulated here: a step's time against fp32; None: native (or a GPU)


# Device class -> what "auto" picks, and why bf16 is slow there. bf16 autocast pays off only where the hardware
# multiplies bf16 natively; on other CPUs oneDNN emulates it (AVX-512: converts to fp32 per tile; AVX2: reference
# kernels) and a training step runs slower than in fp32. Slowdowns are training steps measured by
# bench/bench_unet.py and the issue-17 report (docs/performance.md); the AVX2 one also with the emulation
# ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 machine.
DEVICES = {
    "cuda bf16":       DeviceClass("bf16"),    # Ampere and later, ROCm: bf16 tensor cores, fp32's range, no scaler
    "cuda fp16":       DeviceClass("fp16"),    # before Ampere: fp16 tensor cores, with accelerate's GradScaler
    "cpu AMX":         DeviceClass("bf16"),    # Sapphire Rapids and later: bf16 tile matmuls
    "cpu AVX512_BF16": DeviceClass("bf16"),    # Cooper Lake, Zen 4 and later: convolutions ~2x fp32
    "cpu AVX512":      DeviceClass("no", "~2x slower"),            # Skylake-SP, Cascade Lake, Ice Lake
    "cpu AVX2":        DeviceClass("no", "~10-35x slower"),        # Haswell to Alder Lake laptops, Zen 1-3
    "cpu DEFAULT":     DeviceClass("no", "likely slower"),         # no x86 vector kernels: ARM, POWER, ... unmeasured
    "other":           DeviceClass("no"),      # MPS, XPU, ...: not measured; fp32 unless asked
}

# cpuinfo flag (torch.cpu.get_capabilities) -> the class it makes an AVX-512 CPU, best first.
NATIVE_BF16 = {"amx_bf16": "AMX", "avx512_bf16": "AVX512_BF16"}

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that keep AVX-512 but not its bf16 instructions: oneDNN's own bf16 check
# still says yes, but it emulates bf16 (measured ~2x slower than fp32). Lower caps already fail that check.
ONEDNN_CAPS_WITHOUT_BF16 = {"AVX512_CORE", "AVX512_CORE_VNNI"}


class PrecisionWarning(UserWarning):
    """An explicit precision that runs much slower on this device than fp32 (bf16 on a CPU without native bf16)."""


def cpu_class() -> str:
    """This CPU's key in ``DEVICES`` (less the "cpu "): "AMX", "AVX512_BF16", "AVX512", "AVX2" or "DEFAULT".

    Decided from torch's capability queries, not a timing probe: they are free, deterministic and mockable, while a
    sub-second probe on a shared 2-core VM would be noisy and add a startup cost to every run. They also say what
    torch will run, not only what the chip has: ``get_cpu_capability()`` is the kernel set ATen dispatches to
    (``ATEN_CPU_CAPABILITY`` caps it); oneDNN's bf16 check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``, which
    honours ``ONEDNN_MAX_CPU_ISA`` down to AVX2) says its bf16 kernels exist at all; cpuinfo's flags tell native
    bf16 from oneDNN's AVX-512 emulation, which both of the others accept (as does a cap in
    ``ONEDNN_CAPS_WITHOUT_BF16``, read from the environment).
    """
    kernels = torch.backends.cpu.get_cpu_capability()                 # "AVX512", "AVX2", "DEFAULT", "SVE256", ...
    flags = torch.cpu.get_capabilities()
    native = [name for flag, name in NATIVE_BF16.items() if flags.get(flag)]
    if kernels == "AVX512" and native and onednn_bf16():
        return native[0]
    return kernels if f"cpu {kernels}" in DEVICES else "DEFAULT"


def onednn_bf16() -> bool:
    """Whether oneDNN may use bf16 instructions on this CPU (under ``ONEDNN_MAX_CPU_ISA``); False in builds
    without oneDNN."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and cap not in ONEDNN_CAPS_WITHOUT_BF16
    except (AttributeError, RuntimeError):
        return False


def device_class(device: torch.device | str) -> str:
    """``device``'s key in ``DEVICES``. CUDA asks ``torch.cuda.is_bf16_supported`` of the current device (the one
    accelerate sets for each process), natively only: pre-Ampere GPUs emulate bf16 slowly."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "cuda bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "cuda fp16"
    return f"cpu {cpu_class()}" if kind == "cpu" else "other"


def resolve_precision(name: str, device: torch.device | str, what: str = "train.mixed_precision",
                      warn: Callable[[str], object] | None = None, instead: str | None = None) -> str:
    """accelerate's mixed_precision name ("no" | "fp16" | "bf16") for ``name`` on ``device``.

    "auto" picks by ``DEVICES``; explicit names and aliases (``ALIASES``) pass through. An explicit bf16 on a CPU
    without native bf16 runs as asked, with one line that says why and what to set instead, given to ``warn``
    (e.g. ``accelerator.print``: once per run, not per process) or, by default, ``warnings.warn`` as a
    ``PrecisionWarning``. ``what`` names the option in that line and in the error for an unknown name;
    ``instead`` replaces the line's advice (default: ``<what>=auto or no``)."""
    name = alias(name)
    choose({"auto": None, **PRECISION}, name, what)
    cls = device_class(device)
    hardware = DEVICES[cls]
    if name == "bf16" and hardware.bf16_slowdown:
        message = (f"bf16 on this CPU ({cls.removeprefix('cpu ')}, no native bf16) is emulated and "
                   f"{hardware.bf16_slowdown} than fp32; use {instead or what + '=auto or no'}")
        if warn is None:
            warnings.warn(message, PrecisionWarning, stacklevel=2)
        else:
            warn(message)
    return hardware.auto if name == "auto" else name


# What ``accelerate launch`` tells its processes: its --mixed_precision flag, else the user's `accelerate config`,
# else "no". Absent when a run is started with plain python (or torchrun).
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"


def training_precision(asked: str, device: torch.device | str, warn: Callable[[str], object] | None = None,
                       environ=None) -> tuple[str, str | None]:
    """(accelerate's mixed_precision name for a training run, a line saying what decided it, or None) from
    ``train.mixed_precision`` (``asked``) and the launcher's word (``LAUNCHER_PRECISION``).

    The launcher's word rules over "auto", as accelerate's users and diffusers' training scripts expect; where no
    launcher spoke, "auto" picks by the device (``resolve_precision``). An explicit ``train.mixed_precision``
    that differs from the launcher's is a ValueError: one line naming both, since either silently winning trains
    in a precision somebody did not ask for. A bare ``accelerate launch`` (no flag, no config) says "no": fp32,
    also where "auto" would pick bf16, as accelerate itself does."""
    launcher = (os.environ if environ is None else environ).get(LAUNCHER_PRECISION)
    name = alias(asked)
    if launcher is None:
        resolved = resolve_precision(asked, device, warn=warn)
        return resolved, (f"train.mixed_precision=auto: {resolved} on {describe_device(device)}"
                          if name == "auto" else None)
    launcher = alias(launcher.lower())
    if name not in ("auto", launcher):
        raise ValueError(f"train.mixed_precision={name} but the launcher says mixed_precision={launcher} "
                         f"({LAUNCHER_PRECISION}: accelerate launch's --mixed_precision, or your accelerate config, "
                         f"'no' where neither says): make them agree, or leave train.mixed_precision=auto to follow "
                         f"the launcher")
    resolved = resolve_precision(launcher, device, what="the launcher's mixed_precision", warn=warn,
                                 instead="accelerate launch --mixed_precision no")
    return resolved, (f"train.mixed_precision=auto: {resolved}, the launcher's (accelerate launch "
                      f"--mixed_precision, or accelerate config)" if name == "auto" else None)


def describe_device(device: torch.device | str | None = None) -> str:
    """One line for headers and logs: the GPU's name, or the CPU's name, threads and kernel set; then its class and
    what "auto" picks there. ``device`` defaults to CUDA when present."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device is None else device)
    cls = device_class(device)
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        what = (f"{torch.cpu.get_capabilities().get('cpu_name', 'CPU')}, {torch.get_num_threads()} threads, "
                f"torch kernels {torch.backends.cpu.get_cpu_capability()}")
    else:
        what = device.type
    return f"{what}; class {cls!r}, precision auto -> {DEVICES[cls].auto!r}"


def compiler_missing(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here, or None when it can.

    Inductor writes C++ on CPUs and Triton on GPUs; without them the first forward pass would fail deep inside
    the compiler, so we look before compiling.
    """
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if torch.device(device).type == "cuda":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return None if any(n and shutil.which(n) for n in names) else "no C++ compiler found (set CXX or install g++)"


def apply_fast_paths(model: nn.Module, *, channels_last: bool = False, compile: bool = False,
                     gradient_checkpointing: bool = False, compile_mode: str | None = None,
                     compile_backend: str = "inductor") -> nn.Module:
    """Switch ``model``'s fast paths on, in place, and return it. Works on any diffusers ``ModelMixin``.

    Call it after moving the model to its device (the compiler check looks at that device) and before building
    the optimizer or wrapping the model (accelerate ``prepare``, DDP). Inputs need no conversion: a channels_last
    weight makes every convolution's output channels_last from the first layer on.

    ``compile`` falls back to eager with one warning when no compiler is available or ``torch.compile`` raises;
    ``compile_mode`` and ``compile_backend`` are passed on (e.g. "max-autotune" on GPUs; "aot_eager" to check
    that the model traces without building kernels).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if compile:
        device = next(model.parameters()).device
        reason = compiler_missing(device) if compile_backend == "inductor" else None
        if reason is None:
            try:
                model.compile(mode=compile_mode, backend=compile_backend)
            except Exception as e:  # an unsupported platform or torch build: eager still works
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if reason is not None:
            warnings.warn(f"torch.compile unavailable ({reason}); running the model eagerly", stacklevel=2)
    return model


def autocast(device: torch.device | str, mixed_precision: str = "no"):
    """``torch.autocast`` for accelerate's ``mixed_precision`` names; a no-op context for "no".

    The model keeps fp32 where precision matters: the timestep features are computed in fp32; GroupNorm runs in
    fp32 under CUDA autocast and, on CPU, in bf16 with fp32 statistics; softmax and SDPA accumulate in fp32.
    """
    dtype = precision(mixed_precision)[1]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
