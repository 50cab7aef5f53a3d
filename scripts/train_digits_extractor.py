"""Train the offline feature extractor for FID / KID / IS on the embedded digits; about a minute on a CPU.

    python scripts/train_digits_extractor.py [--out diffunet/metrics/assets/digits_classifier.safetensors]

A small CNN (``diffunet.metrics.fid.DigitsClassifier``) on a stratified 80 % of scikit-learn's 1,797 digits at
16x16, with +-1 pixel shifts and half the batches seen through a 32x32 round trip (the extractor resizes its
input, so it must not care at which size a sample was made). The features are then scaled to unit standard
deviation on the training images. Prints the accuracy on the held-out 20 %.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split

from diffunet.data import digits_arrays
from diffunet.metrics import DIGITS_WEIGHTS
from diffunet.metrics.fid import DigitsClassifier


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 (B, 1, 16, 16): a random shift of up to one pixel each way, half of them via 32x32 and back."""
    dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(F.pad(x, (1, 1, 1, 1)), (dy, dx), dims=(2, 3))[..., 1:-1, 1:-1]
    if torch.rand((), generator=gen) < 0.5:
        x = F.interpolate(x.float(), size=32, mode="bicubic", align_corners=False).clamp(0, 255).round().byte()
    return x


def main(out: str, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    images, labels = digits_arrays(16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)                    # (N, 16, 16, 1) -> (N, 1, 16, 16) uint8
    y = torch.from_numpy(labels)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=labels, random_state=seed)
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * (len(train) // 64 + 1))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        for batch in torch.from_numpy(train)[torch.randperm(len(train), generator=gen)].split(64):
            _, logits = net.features_and_logits(augment(x[batch], gen))
            loss = F.cross_entropy(logits, y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            acc = (net.features_and_logits(x[test])[1].argmax(1) == y[test]).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  test accuracy {acc:.4f}")
    with torch.no_grad():
        net.feature_scale.fill_(1 / net(x[train]).std().item())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
    print(f"held-out accuracy {acc:.4f} on {len(test)} digits; weights: {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DIGITS_WEIGHTS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    main(**vars(p.parse_args()))
