"""Batch norm under several processes (issue #30): with ``sync_batch_norm`` two processes holding parts of a
batch compute what one process computes on the whole batch: outputs, gradients, running statistics, and so the
trained weights."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from conftest import tiny
from torch import nn

from diffunet.training.batchnorm import GlobalBatchNorm2d, sync_batch_norm
from diffunet.config import load_config
from diffunet.training.loop import train

ROOT = Path(__file__).resolve().parents[1]

# (layer, input shape of the whole batch, momentum, affine); rank 0 holds 2 of the 6 images, rank 1 the other 4
# (unequal parts: the count is summed across processes too)
CASES = [(nn.BatchNorm1d, (6, 3), 0.1, True), (nn.BatchNorm1d, (6, 3, 5), None, True),
         (nn.BatchNorm2d, (6, 4, 5, 3), 0.1, True), (nn.BatchNorm2d, (6, 4, 5, 3), 0.3, False),
         (nn.BatchNorm3d, (6, 2, 3, 4, 2), None, True)]
SPLIT = (slice(0, 2), slice(2, 6))
CPU_PAIR = SimpleNamespace(num_processes=2, device=torch.device("cpu"))      # what sync_batch_norm reads


def _layer(case):
    cls, shape, momentum, affine = case
    torch.manual_seed(1)
    layer = cls(shape[1], momentum=momentum, affine=affine).double()
    if affine:                                      # not 1 and 0: the affine must be applied after the sync
        nn.init.uniform_(layer.weight, 0.5, 1.5), nn.init.uniform_(layer.bias, -1, 1)
    return layer


def _data(case, step):
    """Input (mean far from 0, so the variance is not the mean square) and upstream gradient of a whole batch."""
    g = torch.Generator().manual_seed(10 * step + 1)
    x = 3 + 2 * torch.randn(case[1], generator=g, dtype=torch.float64)
    return x, torch.randn(case[1], generator=g, dtype=torch.float64)


def _run(layer, xs, part=slice(None)):
    """Two training steps and one eval forward on ``part`` of each batch: outputs, gradients and buffers."""
    found = {}
    for step, (x, g) in enumerate(xs):
        x = x[part].clone().requires_grad_(True)
        layer.zero_grad()
        out = layer.train()(x)
        out.backward(g[part])
        found[f"out{step}"], found[f"dx{step}"] = out.detach(), x.grad
        for name, p in layer.named_parameters():
            found[f"d{name}{step}"] = p.grad.clone()
    found["eval"] = layer.eval()(xs[0][0][part]).detach()
    found.update({k: v.clone() for k, v in layer.state_dict().items()})
    return found


def _worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results = []
        for case in CASES:
            layer = _layer(case)
            assert sync_batch_norm(nn.Sequential(layer), CPU_PAIR) == 1
            results.append(_run(layer, [_data(case, s) for s in range(2)], SPLIT[rank]))
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_with_parts_of_a_batch_equal_one_process_with_the_whole_batch(tmp_path):
    # fork: the children share the parent's imports (seconds saved); one thread each, tiny tensors
    mp.start_processes(_worker, args=(tmp_path / "store", tmp_path), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case, *parts in zip(CASES, *ranks):
        whole = _run(_layer(case), [_data(case, s) for s in range(2)])
        for step in range(2):
            for key in (f"out{step}", f"dx{step}"):             # each process: its part of the whole batch's
                torch.testing.assert_close(torch.cat([h[key] for h in parts]), whole[key], msg=f"{case} {key}")
            for key in (f"dweight{step}", f"dbias{step}") if case[3] else ():
                # per process: its part's; DDP averages them over processes, their sum is the whole batch's
                torch.testing.assert_close(parts[0][key] + parts[1][key], whole[key], msg=f"{case} {key}")
        for half, part in zip(parts, SPLIT):
            torch.testing.assert_close(half["eval"], whole["eval"][part])     # eval: the same running statistics
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(half[key], whole[key], msg=f"{case} {key}")
    # and not by chance: plain BatchNorm on rank 0's part alone is far from it
    alone = _run(_layer(CASES[2]), [_data(CASES[2], s) for s in range(2)], SPLIT[0])
    assert not torch.allclose(alone["out0"], ranks[0][2]["out0"], atol=1e-3)
    assert not torch.allclose(alone["running_var"], ranks[0][2]["running_var"], atol=1e-3)


def test_conversion_keeps_parameters_buffers_and_keys(tmp_path):
    model = tiny(norm="batch", attention_resolutions=())
    before = model.state_dict()
    tensors = {k: v.data_ptr() for k, v in before.items()}
    n = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n > 0
    assert sync_batch_norm(model, SimpleNamespace(num_processes=1, device=torch.device("cpu"))) == 0
    assert not any(isinstance(m, GlobalBatchNorm2d) for m in model.modules())          # one process: untouched
    assert sync_batch_norm(model, CPU_PAIR) == n
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layers) == n and all(type(m) is GlobalBatchNorm2d for m in layers)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors       # the same tensors, same keys
    assert sync_batch_norm(model, CPU_PAIR) == 0                                       # already converted
    model.eval()
    x = torch.randn(2, 1, 16, 16)
    model.save_pretrained(tmp_path / "unet")
    loaded = type(model).from_pretrained(tmp_path / "unet").eval()
    assert not any(isinstance(m, GlobalBatchNorm2d) for m in loaded.modules())       # plain again when loaded
    torch.testing.assert_close(loaded(x, 0).sample, model(x, 0).sample)               # eval: plain batch norm
    # CUDA-like devices get torch's SyncBatchNorm (the conversion itself needs no GPU)
    cuda = tiny(norm="batch", attention_resolutions=())
    assert sync_batch_norm(cuda, SimpleNamespace(num_processes=2, device=torch.device("cuda"))) == n
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in cuda.modules()) == n
    assert cuda.state_dict().keys() == before.keys()
    # no batch norm: nothing to do
    assert sync_batch_norm(tiny(), CPU_PAIR) == sync_batch_norm(tiny(), SimpleNamespace(
        num_processes=2, device=torch.device("cuda"))) == 0


# ------------------------------------------------------------------------------- issue #30, end to end

STEPS, LR = 8, 2e-3
TINY_SEG = ["model.sample_size=16", "model.base_channels=8", "data.num_crops=48", "data.holdout=8",
            "data.hflip=false",                     # per-process flips would change the data between the runs
            "train.log_every=100", "train.warmup_steps=2", "train.eval_every=0", "train.sample_every=100",
            "sample.num_images=2", f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS}", f"train.lr={LR}"]


def _inert(cfg) -> set[str]:
    """Parameters batch norm makes irrelevant in training: conv biases in front of one, which subtracts any
    per-channel constant. Their gradient is rounding noise, and Adam divides a gradient by its own size, so they
    wander by up to lr a step between any two runs that add in another order (1 and 2 threads alike), and the
    running means that follow them with them. The test leaves them out."""
    from torch.utils.data import default_collate
    from diffunet.tasks import TASKS
    from diffunet.training.loop import validate
    model, dataset = validate(cfg)
    batch = default_collate([dataset[i] for i in range(8)])
    target, inputs = TASKS["segmentation"].training_batch(batch, model, cfg)
    TASKS["segmentation"].loss(model, None, target, inputs, cfg).backward()
    top = max(p.grad.abs().max() for p in model.parameters())
    return {name for name, p in model.named_parameters() if p.grad.abs().max() < 1e-5 * top}


def test_issue_30_two_processes_at_batch_4_train_the_batch_norm_model_of_one_at_batch_8(tmp_path, one_thread):
    """The cells-seg preset (model.norm=batch), shrunk: 8 steps at one process x 8 images, and at two processes
    x 4 (accelerate, gloo). Same seed, same global batches: the saved weights and running statistics agree. Without
    synchronised batch norm the weights differ by ~2e-2 and the running variances by ~0.2; with it, ~1e-6."""
    one = load_config("cells-seg", TINY_SEG + [f"output_dir={tmp_path / 'one'}", "train.batch_size=8"])
    inert = _inert(one)
    assert inert and all(name.endswith(".bias") for name in inert)
    train(one)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(ROOT / "train.py"), "--config", "cells-seg", *TINY_SEG,
                          f"output_dir={tmp_path / 'two'}", "train.batch_size=4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for saved in (f"checkpoints/step_{STEPS:06d}/model.safetensors",            # the weights as trained
                  "pipeline/unet/diffusion_pytorch_model.safetensors"):         # EMA weights, the running stats
        a, b = (load_file(tmp_path / run / saved) for run in ("one", "two"))
        assert a.keys() == b.keys()
        diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
        stats = ("running_mean", "running_var")
        weights = max(d for k, d in diff.items() if k not in inert and not k.endswith(stats))
        running_var = max(d for k, d in diff.items() if k.endswith("running_var"))
        running_mean = max(d for k, d in diff.items() if k.endswith("running_mean"))
        assert weights < 1e-4 and running_var < 1e-4, (saved, weights, running_var)
        assert running_mean < STEPS * LR, (saved, running_mean)                   # moved with the inert biases
        assert all(a[k].item() == b[k].item() == STEPS for k in a if k.endswith("num_batches_tracked"))
    assert "17 batch-norm layers synced across 2 processes" in two.stdout
