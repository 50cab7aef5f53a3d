"""The Frechet distances of signals and volumes (diffunet.metrics.frechet): the shipped extractors, the scores'
properties (real items near the floor, corrupted ones far), the tri-planar protocol, folders, the command line
and a training run's evaluation."""

import json

import numpy as np
import pytest
import torch

from diffunet.data.synthetic import SIGNAL_CLASSES, nuclei_crops, signals_arrays, write_signals
from diffunet.evaluate import main as evaluate_main
from diffunet.metrics.frechet import (PLANES, array_features, evaluate_arrays, read_arrays, signals_extractor,
                                      slices_extractor)


def test_the_shipped_signals_classifier_reads_held_out_signals_of_any_length():
    net = signals_extractor()
    for length in (128, 256, 512):
        x, y = signals_arrays(200, length, seed=5, part=2)
        _, logits = net.features_and_logits(torch.from_numpy(x))
        assert (logits.argmax(1).numpy() == y).mean() >= 0.97, length


def test_real_signals_score_near_the_floor_and_corrupted_ones_far_from_it():
    x, y = signals_arrays(256, 256, seed=7, part=2)         # other seeds than the reference's: real, unseen
    real = evaluate_arrays(x, "signals", 1, labels=y)
    assert real["accuracy"] >= 0.97
    assert real["fid"] < 2 * real["fid_floor"]
    assert real["num_fake"] == 256 and real["num_real"] == 1024
    noisy = evaluate_arrays(x + np.random.default_rng(0).normal(0, 0.2, x.shape).astype(np.float32), "signals", 1)
    smooth = evaluate_arrays(np.repeat(x[:, :, ::8], 8, axis=2), "signals", 1)
    one_class = evaluate_arrays(x[y == 0].repeat(4, 0), "signals", 1)
    for worse in (noisy, smooth, one_class):
        assert worse["fid"] > 5 * real["fid"], worse
    wrong = evaluate_arrays(x, "signals", 1, labels=(y + 1) % len(SIGNAL_CLASSES))
    assert wrong["accuracy"] <= 0.03


def test_volumes_are_scored_on_three_planes_as_maisi_does():
    net = slices_extractor()
    x = nuclei_crops(6, (16, 24, 32), seed=3)
    feats, logits = array_features(net, x)
    assert logits is None and set(feats) == set(PLANES)
    # the slices of each plane: along D (xy), H (zx) and W (yz)
    assert [feats[p].shape for p in ("xy", "zx", "yz")] == [(6, 16, 64), (6, 24, 64), (6, 32, 64)]
    # one slice's features do not depend on the others in its volume
    alone = net(torch.from_numpy(x[:1, :, 5]))
    torch.testing.assert_close(feats["xy"][0, 5], alone[0].double())


def test_real_volumes_score_near_the_floor_and_degraded_ones_far_from_it():
    x = nuclei_crops(24, (16, 16, 16), seed=11)
    real = evaluate_arrays(x, "cells3d", 3)
    assert {"fid_xy", "fid_zx", "fid_yz", "fid_floor_xy", "kid_mean"} <= set(real)
    assert real["fid"] == pytest.approx(np.mean([real[f"fid_{p}"] for p in PLANES]))
    assert real["fid"] < 2 * real["fid_floor"] and real["num_real"] == 128
    noisy = evaluate_arrays(x + np.random.default_rng(0).normal(0, 0.15, x.shape).astype(np.float32), "cells3d", 3)
    blurred = evaluate_arrays(torch.nn.functional.avg_pool3d(torch.from_numpy(x), 3, 1, 1).numpy(), "cells3d", 3)
    empty = evaluate_arrays(np.full_like(x, x.min()) + np.random.default_rng(1).normal(0, 0.02, x.shape)
                            .astype(np.float32), "cells3d", 3)
    for worse in (noisy, blurred, empty):
        assert worse["fid"] > 3 * real["fid"], worse


def test_folders_and_the_command_line(tmp_path, capsys):
    write_signals(tmp_path / "real", n=40, length=64, seed=9)
    x = read_arrays(tmp_path / "real", 1)
    assert x.shape == (40, 1, 64)
    result = evaluate_main([str(tmp_path / "real"), "signals", "--dims", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(result["fid"])
    assert result["fid"] < 2 * result["fid_floor"]
    # class-conditional samples with sample.py's labels.csv get the classifier's accuracy
    samples = tmp_path / "samples"
    samples.mkdir()
    s, y = signals_arrays(12, 64, seed=9, part=4)
    for i, signal in enumerate(s):
        np.save(samples / f"{i:06d}.npy", signal)
    (samples / "labels.csv").write_text("".join(f"{i:06d}.npy,{label}\n" for i, label in enumerate(y)))
    assert evaluate_main([str(samples), str(tmp_path / "real"), "--dims", "1"])["accuracy"] == 1.0
    # a reference of larger volumes: their centre patches at the samples' size
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    for i, volume in enumerate(nuclei_crops(6, (12, 16, 16), seed=2)):
        np.save(volumes / f"{i}.npy", volume)
    patches = evaluate_arrays(nuclei_crops(3, (8, 8, 8), seed=4), volumes, 3)
    assert patches["num_real"] == 6 and patches["fid"] > 0
    with pytest.raises(ValueError, match="0.npy is \\(12, 16, 16\\), smaller than the samples' \\(16, 16, 16\\)"):
        evaluate_arrays(nuclei_crops(3, (16, 16, 16), seed=4), volumes, 3)
    # signals of another length than the reference's: one line
    np.save(samples / "000000.npy", np.zeros((1, 32), np.float32))
    with pytest.raises(SystemExit, match="error: .*000000.npy is \\(1, 32\\)"):
        evaluate_main([str(samples), str(tmp_path / "real"), "--dims", "1"])
