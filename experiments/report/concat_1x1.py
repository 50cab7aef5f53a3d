"""Claim 6: the 1x1 conv after concatenation (parameters, FLOPs and time per step against the loss)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from diffunet.objectives import diffusion_loss

from .lab import Check, Lab, Section, describe, flops_per_image, fmt, n_params, not_worse, table


def section_concat_1x1(lab: Lab, plt) -> Section:
    names = ("concat", "concat_1x1", "add")
    seeds = range(lab.s.seeds)
    loss = {n: [lab.loss(lab.train(seed, skip=n).model) for seed in seeds] for n in names}
    probe = {n: lab.build(0, skip=n) for n in names}
    params = {n: n_params(probe[n]) for n in names}
    flops = {n: flops_per_image(probe[n], lab.s.size) for n in names}
    # Time per training step, interleaved across variants so that a change in machine load hits all alike.
    x0 = lab.train_x[: lab.s.batch]
    times, opts = {n: [] for n in names}, {n: torch.optim.AdamW(probe[n].parameters(), lr=1e-4) for n in names}
    for rep in range(lab.s.timing_steps + 1):
        for n in names:
            start = time.perf_counter()
            l = diffusion_loss(probe[n], lab.sched, x0, generator=torch.Generator().manual_seed(rep))  # noqa: E741
            opts[n].zero_grad()
            l.backward()
            opts[n].step()
            if rep:                                                     # the first step warms up
                times[n].append(time.perf_counter() - start)
    ms = {n: float(np.median(times[n]) * 1000) for n in names}
    rows = [[f"`{n}`", f"{params[n] / 1e3:.1f}k", f"{flops[n] / 1e6:.1f}", f"{ms[n]:.1f}", fmt(loss[n])]
            for n in names]
    t1 = table(["skip", "parameters", "MFLOPs / image (forward)", f"ms / step (batch {lab.s.batch}, median)",
                "held-out loss"], rows)
    saved = (params["concat_1x1"] < params["concat"], flops["concat_1x1"] < flops["concat"])
    checks = [
        Check("concat_1x1 has fewer parameters and FLOPs than concat", "holds" if all(saved) else "does not hold",
              f"{params['concat_1x1'] / params['concat'] - 1:+.0%} parameters, "
              f"{flops['concat_1x1'] / flops['concat'] - 1:+.0%} FLOPs (exact counts)"),
        not_worse("concat_1x1 is not worse than concat at equal steps",
                  [c - p for c, p in zip(loss["concat"], loss["concat_1x1"])],
                  f"loss {fmt(loss['concat_1x1'])} (concat_1x1) vs {fmt(loss['concat'])} (concat)"),
    ]

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    x = np.arange(len(names))
    for ax, values, label in ((axes[0], [params[n] / 1e3 for n in names], "parameters (k)"),
                              (axes[1], [flops[n] / 1e6 for n in names], "MFLOPs / image"),
                              (axes[2], [ms[n] for n in names], "ms / training step")):
        ax.bar(x, values, 0.6, color="C0")
        ax.set(xticks=x, xticklabels=names, title=label)
    m = [np.mean(loss[n]) for n in names]
    sd = [np.std(loss[n], ddof=1) if len(loss[n]) > 1 else 0 for n in names]
    axes[3].bar(x, m, 0.6, yerr=sd, capsize=3, color="C2")
    axes[3].set(xticks=x, xticklabels=names, title="held-out eps-MSE",
                ylim=(min(mm - s for mm, s in zip(m, sd)) * 0.97, max(mm + s for mm, s in zip(m, sd)) * 1.01))
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()

    return Section(
        6, "concat-1x1", "The 1x1 conv after concatenation",
        "Concatenating the skip doubles the channels every following 3x3 conv reads; a 1x1 conv straight after the "
        "concatenation cuts them back, saving about 9·S·C_out weights per block for (C+S)·C spent, at no cost in "
        "quality.",
        describe(lab) + "; `skip` in concat, concat_1x1, add. Parameters and forward FLOPs "
        "(`torch.utils.flop_counter`) of one 16x16 image; time per training step measured interleaved across the "
        f"variants ({lab.s.timing_steps} steps each, one thread, on a machine with load average "
        f"{os.getloadavg()[0]:.1f}).",
        [t1], checks,
        "`add` is listed as the cheapest fusion for reference; it is not part of the claim. "
        f"In numbers: the 1x1 saves {1 - params['concat_1x1'] / params['concat']:.0%} of the parameters, "
        f"{1 - flops['concat_1x1'] / flops['concat']:.0%} of the FLOPs and "
        f"{1 - ms['concat_1x1'] / ms['concat']:.0%} of the time per step, for a held-out loss "
        f"{np.mean(loss['concat_1x1']) / np.mean(loss['concat']) - 1:+.1%} at equal steps.",
        {"params": params, "flops": flops, "ms_per_step": ms, "loss": loss}, fig)
