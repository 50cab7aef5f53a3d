"""Fast paths as switches: memory format, torch.compile, gradient checkpointing, and the mixed-precision context.

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

import torch
from torch import nn

from .nn import choose

# "fp16" | "bf16" | "no" (accelerate's names) -> autocast dtype
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    dtype = choose(MIXED_PRECISION, mixed_precision, "mixed_precision")
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)
