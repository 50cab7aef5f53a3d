"""Train the offline extractors of the Frechet distances of signals and volumes (``diffunet.metrics.frechet``);
each about a minute or two on a CPU.

    python scripts/train_array_extractors.py signals    # -> diffunet/metrics/assets/signals_classifier.safetensors
    python scripts/train_array_extractors.py slices     # -> diffunet/metrics/assets/slices_encoder.safetensors

Both train on embedded items seeded (seed, 3, k): neither the runs' training items (part 1) nor the held-out
references (part 2), so the classifier that scores generated signals is a held-out classifier.

- signals: ``SignalClassifier`` on 4,096 signals of length 256, half of the batches through a round trip to a
  random length in [128, 512] (the classifier resamples its input, so it must not care at which length a sample
  was made); its second head tells clean signals from noisy and smoothed ones (a quarter each). Prints its
  accuracy on 1,024 held-out signals (part 2).
- slices: ``SliceEncoder`` on 32x32 windows of slices of 48 nuclei volumes of 64^3, from the three planes: it
  names the kind (an xy slice, a zx / yz slice, a noisy one, a blurred one; a quarter each) and regresses the
  fraction of nucleus in the window (from the exact masks). Prints the held-out accuracy and error (part 2).

The features are then scaled to unit standard deviation on the training items.
"""

import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffunet.data.synthetic import nuclei_arrays, signals_arrays
from diffunet.metrics.frechet import SIGNALS_WEIGHTS, SLICES_WEIGHTS, SignalClassifier, SliceEncoder

TRAIN, HELD_OUT = 3, 2


def fit(net, batches, steps: int, loss_of, lr: float = 2e-3):
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for step in range(steps):
        loss = loss_of(net, *next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.3f}")
    net.eval()


def save(net, features: torch.Tensor, out: str) -> None:
    with torch.no_grad():
        net.feature_scale.fill_(1 / features.std().item())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)


# ------------------------------------------------------------------------------------------- signals

def signal_batches(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, batch: int = 64):
    """(signals, classes, quality): half clean, a quarter with noise (sd 0.03 to 0.3), a quarter smoothed (a
    moving average of 3 to 15 samples); half of the batches at another length."""
    while True:
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = x[idx]
        quality = torch.tensor([0, 0, 1, 2])[torch.randint(0, 4, (batch,), generator=gen)]
        noise = torch.randn(xb.shape, generator=gen) * (0.03 + 0.27 * torch.rand(batch, 1, 1, generator=gen))
        xb = torch.where((quality == 1).view(-1, 1, 1), xb + noise, xb)
        width = int(torch.randint(1, 8, (), generator=gen)) * 2 + 1
        smooth = F.avg_pool1d(F.pad(xb, (width // 2, width // 2), mode="replicate"), width, 1)
        xb = torch.where((quality == 2).view(-1, 1, 1), smooth, xb)
        if torch.rand((), generator=gen) < 0.5:
            length = int(torch.randint(128, 513, (), generator=gen))
            xb = F.interpolate(xb, size=length, mode="linear", align_corners=False)
        yield xb, y[idx], quality


def signal_loss(net, xb, yb, quality):
    features, logits = net.features_and_logits(xb)
    return F.cross_entropy(logits, yb) + F.cross_entropy(net.quality(features / net.feature_scale), quality)


def train_signals(out: str, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    x, y = map(torch.from_numpy, signals_arrays(4096, 256, seed, TRAIN))
    hx, hy = map(torch.from_numpy, signals_arrays(1024, 256, seed, HELD_OUT))
    net = SignalClassifier()
    fit(net, signal_batches(x, y, torch.Generator().manual_seed(seed)), steps, signal_loss)
    with torch.no_grad():
        acc = (net.features_and_logits(hx)[1].argmax(1) == hy).float().mean().item()
        xb, _, quality = next(signal_batches(hx, hy, torch.Generator().manual_seed(seed + 1), batch=1024))
        seen = (net.quality(net(xb) / net.feature_scale).argmax(1) == quality).float().mean().item()
        save(net, net(x), out)
    print(f"held-out accuracy {acc:.4f} on {len(hy)} signals, quality (clean / noisy / smoothed) {seen:.4f}; "
          f"weights: {out}")


# ------------------------------------------------------------------------------------------- slices

def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (1, H, W) image blurred by a Gaussian of ``sigma`` pixels (reflected borders)."""
    t = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(image[None], (4, 4, 4, 4), mode="reflect")
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))[0]


def slice_batches(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator, batch: int = 64, size: int = 32):
    n, _, *full = images.shape
    while True:
        kinds = torch.randint(0, 4, (batch,), generator=gen)
        xs, fractions = [], []
        for kind in kinds.tolist():
            v = int(torch.randint(0, n, (), generator=gen))
            axis = 0 if kind == 0 else int(torch.randint(1, 3, (), generator=gen)) if kind == 1 else \
                int(torch.randint(0, 3, (), generator=gen))
            i = int(torch.randint(0, full[axis], (), generator=gen))
            image, mask = images[v, 0].select(axis, i), masks[v, 0].select(axis, i)
            a, b = (int(torch.randint(0, s - size + 1, (), generator=gen)) for s in image.shape)
            xs.append(image[a:a + size, b:b + size])
            fractions.append(mask[a:a + size, b:b + size].mean())
        x = torch.stack(xs)[:, None]
        noisy, blurred = kinds == 2, kinds == 3
        x = x + noisy.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen) * (
            0.05 + 0.25 * torch.rand(batch, 1, 1, 1, generator=gen))
        sigma = 0.6 + 0.9 * torch.rand(batch, generator=gen)
        x = torch.stack([_blur(image, float(s)) if b else image for image, s, b in zip(x, sigma, blurred)])
        yield x, kinds, torch.stack(fractions)


def slice_loss(net, x, kinds, fractions):
    logits, fraction = net.kinds_and_fraction(x)
    return F.cross_entropy(logits, kinds) + 10 * F.mse_loss(fraction, fractions)


def train_slices(out: str, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    images, masks = map(torch.from_numpy, nuclei_arrays(48, (64, 64, 64), seed, TRAIN))
    held_images, held_masks = map(torch.from_numpy, nuclei_arrays(8, (64, 64, 64), seed, HELD_OUT))
    images, held_images = images * 2 - 1, held_images * 2 - 1
    net = SliceEncoder()
    fit(net, slice_batches(images, masks, torch.Generator().manual_seed(seed)), steps, slice_loss)
    x, kinds, fractions = next(slice_batches(held_images, held_masks, torch.Generator().manual_seed(seed + 1),
                                             batch=2048))
    with torch.no_grad():
        logits, fraction = net.kinds_and_fraction(x)
        acc = (logits.argmax(1) == kinds).float().mean().item()
        err = (fraction - fractions).abs().mean().item()
        train_x = next(slice_batches(images, masks, torch.Generator().manual_seed(seed + 2), batch=2048))[0]
        save(net, net(train_x), out)
    print(f"held-out slices: kind accuracy {acc:.4f}, nucleus fraction mean error {err:.4f} "
          f"(mean fraction {fractions.mean().item():.3f}); weights: {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=["signals", "slices"])
    p.add_argument("--out", default=None, help="default: the shipped asset")
    p.add_argument("--steps", type=int, default=None, help="default: signals 1500, slices 800")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.which == "signals":
        train_signals(a.out or str(SIGNALS_WEIGHTS), a.steps or 1500, a.seed)
    else:
        train_slices(a.out or str(SLICES_WEIGHTS), a.steps or 800, a.seed)
