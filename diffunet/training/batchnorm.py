"""Batch norm over the global batch when several processes train: ``sync_batch_norm(model, accelerator)``.

Plain BatchNorm normalises each process's B images by their own statistics, so N processes at batch B train a
different model from one process at batch N*B, and each keeps running statistics of its own shard. Synchronised,
every training forward takes the per-channel statistics of all N*B images; outputs, gradients and the running
statistics are those of one process at the global batch. Eval mode and single-process runs are plain BatchNorm.

On CUDA (and the other devices torch's ``nn.SyncBatchNorm`` supports) torch's is used, as diffusers' autoencoder
training script does. It refuses CPU tensors in training (torch 2.13: ``ValueError`` unless the input is on
cuda / hpu / xpu / the privateuse1 backend), and CPU runs here use gloo, hence ``GlobalBatchNorm{1,2,3}d`` below.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

# torch 2.13 calls this differentiable all_reduce deprecated (pointing to the private _functional_collectives); it
# is still the public autograd-aware one. Silenced only where this module calls it.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning, module=__name__)

# where torch's nn.SyncBatchNorm trains (its forward raises on any other device once a process group is up)
TORCH_SYNC_DEVICES = {"cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name()}


class _GlobalStats:
    """The training forward of BatchNorm with the statistics of every process's batch (torch's ``_BatchNorm``
    otherwise). One all-reduce per layer of (sum, sum of squares, count) per channel; the all-reduce is the
    differentiable one, whose backward sums the gradients of the statistics over processes, so input and weight
    gradients are those of the whole batch. Mixed into the BatchNorm class it replaces, so parameters, buffers,
    state-dict keys and ``isinstance`` checks are the original's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        dims = [0, *range(2, input.ndim)]                   # all but channels: (B, C, *S) -> (C,)
        # float64 sums: E[x^2] - E[x]^2 cancels in float32 when |mean| >> std
        x = input.double()
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), input.numel() // c)])
        total = all_reduce(local)                           # (2C + 1,), summed over processes
        n = total[-1]
        if n.item() <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {int(n.item())} "
                             f"over all processes")
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)   # biased: what the batch is normalised by

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), factor)   # unbiased

        shape = (1, c) + (1,) * (input.ndim - 2)        # (C,) -> broadcast over (B, C, *S)
        dtype = torch.promote_types(input.dtype, torch.float32)     # bf16 / fp16 inputs: normalised in fp32
        scale = torch.rsqrt(var + self.eps).to(dtype)
        if self.weight is not None:
            scale = scale * self.weight
        out = (input.to(dtype) - mean.to(dtype).view(shape)) * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out.to(input.dtype)


class GlobalBatchNorm1d(_GlobalStats, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the global batch of all processes (``_GlobalStats``)."""


class GlobalBatchNorm2d(_GlobalStats, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over the global batch of all processes (``_GlobalStats``)."""


class GlobalBatchNorm3d(_GlobalStats, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` over the global batch of all processes (``_GlobalStats``)."""


GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def sync_batch_norm(model: nn.Module, accelerator) -> int:
    """Make ``model``'s batch norm layers normalise by the global batch when ``accelerator`` runs several processes;
    returns how many layers were converted (0 with one process or without batch norm).

    In place, before the optimizer is built and the model is wrapped (DDP): the parameters and buffers stay the
    same tensors, so the state dict, ``save_pretrained`` and checkpoints are unchanged. CUDA-like devices get
    torch's ``nn.SyncBatchNorm`` (``convert_sync_batchnorm``); others swap each ``nn.BatchNorm{1,2,3}d``'s class
    for its ``GlobalBatchNorm`` subclass.
    """
    if accelerator.num_processes < 2:
        return 0
    if accelerator.device.type in TORCH_SYNC_DEVICES:
        if isinstance(model, _BatchNorm):       # convert_sync_batchnorm would return a new one, not change it
            raise TypeError("sync_batch_norm converts the batch norm layers inside a model, not a lone layer")
        found = sum(isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        if found:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)         # children replaced in place, same parameters
        return found
    layers = [m for m in model.modules() if type(m) in GLOBAL]
    for m in layers:
        m.__class__ = GLOBAL[type(m)]
    return len(layers)
