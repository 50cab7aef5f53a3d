"""1D generation against the peer: diffunet's signals preset and lucidrains' ``Unet1D`` + ``GaussianDiffusion1D``
trained for the same steps on the same embedded signals, then scored by the Frechet distance on the shipped
signals classifier (``metrics.frechet``), read against the floor of real signals.

    python bench/bench_signals.py                  # a quick look: 100 steps per arm, 128 samples
    python bench/bench_signals.py --steps 400      # the preset's steps: docs/volumes.md's numbers

Arms, each trained in this process, in turn:
- ``ours``: preset ``signals`` as it is (class-conditional, flow matching, Euler 20 steps), sampled with every
  class equally often: its samples' class accuracy under the held-out classifier is the preset's target (95 %).
- ``ours, unconditional``: the same with ``model.num_classes=null``: the like-for-like arm against the peer.
- ``lucidrains``: ``Unet1D(dim=24, dim_mults=(1, 2, 4, 8))`` (its README's, at dim 24 for about our parameter
  count: 2.33M against 2.28M; printed) in ``GaussianDiffusion1D`` (its
  defaults: 1000 steps, cosine schedule, noise prediction; DDIM with 20 sampling steps, as ours), unconditional
  (Unet1D has no class input). It trains on the same 2,048 signals in the same batch size with our optimizer
  settings (AdamW at the preset's lr, warmup and cosine decay, EMA of the preset's decay through diffusers'
  ``EMAModel``): their ``Trainer1D``'s defaults (lr 8e-5, 700k steps) are for another budget.

Unconditional samples have no class to check; the column "classes" gives the fraction of the samples the
classifier puts in each of the four classes (0.25 each for a model that covers them evenly).
The peer installs as bench/README.md says (``pip install --no-deps denoising-diffusion-pytorch ema-pytorch``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch                                                            # noqa: E402
from diffusers.optimization import get_scheduler                        # noqa: E402
from diffusers.training_utils import EMAModel                           # noqa: E402

from bench_recipes import _chunks, import_peer                          # noqa: E402
from diffunet.config import load_config                                 # noqa: E402
from diffunet.data.synthetic import SIGNAL_CLASSES, signals_arrays      # noqa: E402
from diffunet.metrics.frechet import evaluate_arrays, signals_extractor  # noqa: E402
from diffunet.sampling import generate, load_model                      # noqa: E402
from diffunet.training.loop import train                                # noqa: E402

PRESET = "signals"


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def class_shares(samples: torch.Tensor) -> list[float]:
    predicted = signals_extractor().features_and_logits(samples)[1].argmax(1)
    return torch.bincount(predicted, minlength=len(SIGNAL_CLASSES)).div(len(samples)).tolist()


def ours(args, root: Path, conditional: bool) -> dict:
    name = "ours" if conditional else "ours-uncond"
    overrides = [f"output_dir={root / name}", f"train.max_steps={args.steps}", f"train.seed={args.seed}",
                 f"train.checkpoint_every={args.steps}", f"train.sample_every={args.steps}", "train.eval_every=0",
                 f"train.warmup_steps={min(50, args.steps // 5)}", *([] if conditional else ["model.num_classes=null"])]
    cfg = load_config(PRESET, overrides)
    start = time.perf_counter()
    unet, scheduler = load_model(train(cfg))
    seconds = time.perf_counter() - start
    classes = "all" if conditional else None
    with torch.no_grad():
        samples = generate(unet, scheduler, args.num_samples, steps=cfg.sample.steps, seed=args.seed,
                           class_labels=classes, guidance_scale=cfg.sample.guidance_scale)
    labels = torch.arange(args.num_samples) % len(SIGNAL_CLASSES) if conditional else None
    scores = evaluate_arrays(samples, "signals", 1, labels=labels)
    return dict(scores, params=params(unet), train_s=seconds, classes=class_shares(samples))


def lucidrains(args) -> dict:
    import_peer()
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch_1d import GaussianDiffusion1D, Unet1D

    cfg = load_config(PRESET)
    length = cfg.model.sample_size
    torch.manual_seed(args.seed)
    net = Unet1D(dim=24, dim_mults=(1, 2, 4, 8), channels=1)
    diffusion = GaussianDiffusion1D(net, seq_length=length, timesteps=1000, sampling_timesteps=cfg.sample.steps)
    x, _ = signals_arrays(cfg.data.num_crops, length, seed=0)         # what data.source=signals trains on
    x = (torch.from_numpy(x) + 1) / 2                                 # it takes [0, 1] and maps it to [-1, 1]
    t = cfg.train
    opt = torch.optim.AdamW(diffusion.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    lr = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=min(50, args.steps // 5), num_training_steps=args.steps)
    ema = EMAModel(diffusion.parameters(), decay=t.ema_decay)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    order = torch.randperm(len(x), generator=gen)
    for step in range(args.steps):
        lo = step * t.batch_size % len(x)
        if lo + t.batch_size > len(x):
            order, lo = torch.randperm(len(x), generator=gen), 0
        loss = diffusion(x[order[lo:lo + t.batch_size]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), t.grad_clip)
        opt.step()
        lr.step()
        ema.step(diffusion.parameters())
    seconds = time.perf_counter() - start
    ema.copy_to(diffusion.parameters())
    diffusion.eval()
    torch.manual_seed(args.seed)
    with torch.no_grad():
        samples = torch.cat([diffusion.sample(batch_size=n) for n in _chunks(args.num_samples, 64)])
    samples = samples * 2 - 1                                          # its [0, 1] back to the data's [-1, 1]
    return dict(evaluate_arrays(samples, "signals", 1), params=params(net), train_s=seconds,
                classes=class_shares(samples))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="training steps per arm (the preset: 400)")
    ap.add_argument("--num-samples", type=int, default=128, help="samples per arm scored")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-signals-") as tmp:
        root = args.out or Path(tmp)
        results["ours"] = ours(args, root, conditional=True)
        results["ours, unconditional"] = ours(args, root, conditional=False)
        results["lucidrains Unet1D"] = lucidrains(args)

    floor = results["ours"].get("fid_floor")
    print(f"\npreset {PRESET}: {args.steps} training steps per arm, {args.num_samples} samples each, scored against "
          f"1,024 held-out embedded signals; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"Frechet floor (as many real signals against the reference): {floor:.3f}" if floor else "no floor")
    print(f"{'arm':22} {'params':>10} {'train s':>8} {'FD':>8} {'FD/floor':>9} {'accuracy':>9}  classes")
    for arm, row in results.items():
        accuracy = f"{row['accuracy']:9.3f}" if "accuracy" in row else f"{'-':>9}"
        ratio = f"{row['fid'] / floor:9.2f}" if floor else f"{'-':>9}"
        print(f"{arm:22} {row['params']:10,d} {row['train_s']:8.1f} {row['fid']:8.3f} {ratio} {accuracy}  "
              + " ".join(f"{share:.2f}" for share in row["classes"]))
    uncond, peer = results["ours, unconditional"]["fid"], results["lucidrains Unet1D"]["fid"]
    print(f"targets: accuracy >= 0.95: {'PASS' if results['ours']['accuracy'] >= 0.95 else 'FAIL'}; "
          f"FD <= 1.2x floor: {'PASS' if floor and results['ours']['fid'] <= 1.2 * floor else 'FAIL'}; "
          f"better than lucidrains at equal steps (unconditional FD {uncond:.3f} vs {peer:.3f}): "
          f"{'PASS' if uncond < peer else 'FAIL'}")
    out = dict(preset=PRESET, steps=args.steps, num_samples=args.num_samples, results=results)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
