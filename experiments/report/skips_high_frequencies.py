"""Claim 1: skips carry the high frequencies (skip="concat" vs "none": loss per noise level, error spectra)."""

from __future__ import annotations

import math

import numpy as np

from .lab import CURVE_T, LOW_NOISE_T, SPECTRUM_T, Lab, Section, band_power, describe, fmt, paired, radial_power, table


def section_skips_high_frequencies(lab: Lab, plt) -> Section:
    seeds = range(lab.s.seeds)
    variants = {"concat": {}, "none": {"skip": "none"}}
    curves = {v: [] for v in variants}
    spectra, band = {v: [] for v in variants}, {v: [] for v in variants}
    data_f, data_p = radial_power(lab.test_x)
    lo, hi = 0.125, 0.25             # the top octave of the digits' own band (they are 8x8, upsampled)
    data_band = band_power(lab.test_x, lo, hi)
    for name, kw in variants.items():
        for seed in seeds:
            model = lab.train(seed, **kw).model
            curves[name].append(lab.loss_curve(model))
            error = lab.x0_hat(model, SPECTRUM_T) - lab.test_x              # what the denoiser got wrong
            spectra[name].append(radial_power(error)[1])
            band[name].append(band_power(error, lo, hi) / data_band)
    low = [i for i, t in enumerate(CURVE_T) if t in LOW_NOISE_T]
    high = [i for i, t in enumerate(CURVE_T) if t >= 500]
    low_loss = {v: [c[low].mean() for c in curves[v]] for v in variants}
    high_loss = {v: [c[high].mean() for c in curves[v]] for v in variants}
    rel_low = [n / c for n, c in zip(low_loss["none"], low_loss["concat"])]
    rel_high = [n / c for n, c in zip(high_loss["none"], high_loss["concat"])]

    rows = [[f"t = {t}"] + [fmt([c[i] for c in curves[v]], 3) for v in variants]
            + [fmt([n[i] / c[i] for n, c in zip(curves["none"], curves["concat"])], 3)]
            for i, t in enumerate(CURVE_T)]
    t1 = table(["noise level", "eps-MSE, skip=concat", "eps-MSE, skip=none", "none / concat"], rows)
    t2 = table(["", "skip=concat", "skip=none", "data"],
               [[f"error power of x0-hat at t={SPECTRUM_T} in {lo}-{hi} cycles/px, / data's power there",
                 fmt(band["concat"]), fmt(band["none"]), "1"]])
    checks = [
        paired(f"without skips the loss is higher at the low-noise end (t in {LOW_NOISE_T})",
               [n - c for n, c in zip(low_loss["none"], low_loss["concat"])],
               f"eps-MSE {fmt(low_loss['concat'])} (concat) vs {fmt(low_loss['none'])} (none)"),
        paired("the gap is wider at the low-noise end than at high noise (t >= 500)",
               [a - b for a, b in zip(rel_low, rel_high)],
               f"none/concat loss ratio {fmt(rel_low)} at low noise vs {fmt(rel_high)} at high noise"),
        paired(f"with skips the low-noise estimate (t={SPECTRUM_T}) gets the high frequencies more right",
               [np.log(n / c) for n, c in zip(band["none"], band["concat"])],
               f"error power in {lo}-{hi} cycles/px, relative to the data's: {fmt(band['concat'])} (concat) vs "
               f"{fmt(band['none'])} (none)"),
    ]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, color in (("concat", "C0"), ("none", "C3")):
        c = np.array(curves[name])
        a.errorbar(CURVE_T, c.mean(0), yerr=c.std(0, ddof=1) if len(c) > 1 else None, color=color, marker="o",
                   ms=3, capsize=2, label=f"skip={name}")
        p = np.array(spectra[name])
        b.plot(data_f, p.mean(0), color=color, marker="o", ms=3, label=f"error of x0-hat, skip={name}")
    b.plot(data_f, data_p, color="k", ls="--", label="data (held out)")
    a.set(xscale="log", yscale="log", xlabel="timestep t (low t = little noise)", ylabel="held-out eps-MSE",
          title="Denoising loss per noise level")
    b.axvspan(lo, hi, color="0.9", zorder=0)
    b.set(yscale="log", xlabel="radial frequency (cycles/px)", ylabel="power",
          title=f"Radial power spectra, x0 estimate at t={SPECTRUM_T}", xlim=(0, 0.5 * math.sqrt(2)))
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()

    return Section(
        1, "skips-high-frequencies", "Skips carry the high frequencies",
        "The skip hands the decoder the encoder's features at full resolution, so fine detail need not squeeze "
        "through the bottleneck; without it the denoiser should fail where fine detail matters most, at low noise, "
        "and its estimates should get the high frequencies wrong.",
        describe(lab) + "; skip=\"concat\" vs \"none\" at equal steps. The loss is measured on the held-out digits "
        f"at each noise level (same noise for every model); the spectra are of the error of the model's x0 "
        f"estimate, x0-hat - x0, at t={SPECTRUM_T}, against the data's own spectrum (shaded: {lo}-{hi} cycles/px, "
        f"the top octave of the data's band: digits are 8x8 upsampled, so above "
        f"{hi} cycles/px the data have almost no power).",
        [t1, t2], checks,
        "The eps-MSE is highest at the low-noise end for every model: there the noise is tiny and predicting it "
        "means knowing the clean image to the pixel. "
        + ("The gap without skips is as wide or wider at high noise: under the epsilon target the high-noise end "
           "needs every pixel too, since the target is then nearly the input itself (white noise, all frequencies), "
           "which a network without skips must also squeeze through its bottleneck." if np.mean(rel_high)
           >= np.mean(rel_low) else ""),
        {"loss_curve": {v: np.array(curves[v]).tolist() for v in variants}, "error_band_ratio": band,
         "low_noise_loss": low_loss, "high_noise_loss": high_loss}, fig)
