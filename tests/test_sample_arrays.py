"""sample.py for signals and volumes: numbered samples class-balanced as images are, outputs of files named and
placed as their inputs (a NIfTI's affine and spacing, on the finer grid of a super-resolved output), inpainting
that keeps every known value, masks of volumes of any size by tiles, and resuming."""

import nibabel as nib
import numpy as np
import pytest

from diffunet.data.synthetic import write_volumes
from sample import main as sample_main
from test_nd_jobs import SEGMENT, SIGNALS, VOLUMES, _run


def _affine(spacing=(0.5, 0.5, 2.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    return affine


def test_signals_are_numbered_npy_files_class_balanced(tmp_path, capsys):
    pipe, _ = _run(tmp_path, "sig", *SIGNALS, "model.num_classes=4", "train.max_steps=1")
    out = tmp_path / "samples"
    assert sample_main([str(pipe), "--out", str(out), "--num-images", "6", "--steps", "2"]) == 0
    files = sorted(p.name for p in out.glob("*.npy"))
    assert files == [f"{i:06d}.npy" for i in range(6)] and np.load(out / files[0]).shape == (32,)
    assert (out / "labels.csv").read_text().splitlines()[:5] == [f"{i:06d}.npy,{i % 4}" for i in range(4)] + \
        ["000004.npy,0"]
    assert (out / "grid.png").is_file()
    first = np.load(out / "000002.npy")
    assert sample_main([str(pipe), "--out", str(out), "--num-images", "8", "--steps", "2"]) == 0
    assert "2 images written by 1 process(es), 6 already there" in capsys.readouterr().out
    assert np.array_equal(np.load(out / "000002.npy"), first)              # kept, not redone


def test_volumes_are_nifti_by_default_and_npy_on_request(tmp_path):
    pipe, _ = _run(tmp_path, "gen", *VOLUMES, "train.max_steps=1")
    assert sample_main([str(pipe), "--out", str(tmp_path / "a"), "--num-images", "2", "--steps", "2"]) == 0
    volume = nib.load(str(tmp_path / "a" / "000000.nii.gz"))
    assert volume.shape == (16, 16, 16) and np.abs(np.asarray(volume.dataobj)).max() <= 1
    assert sample_main([str(pipe), "--out", str(tmp_path / "b"), "--num-images", "1", "--steps", "2",
                        "--format", "npy"]) == 0
    assert np.load(tmp_path / "b" / "000000.npy").shape == (16, 16, 16)
    with pytest.raises(SystemExit):
        sample_main([str(pipe), "--out", str(tmp_path / "c"), "--format", "png"])


def test_volume_masks_keep_their_inputs_space_at_any_size(tmp_path):
    pipe, _ = _run(tmp_path, "seg", *VOLUMES, *SEGMENT, "train.max_steps=1")
    cond = tmp_path / "cond"
    (cond / "sub").mkdir(parents=True)
    image = np.random.default_rng(0).random((20, 24, 18)).astype(np.float32) * 400
    nib.save(nib.Nifti1Image(image, _affine()), str(cond / "sub" / "scan.nii.gz"))
    out = tmp_path / "masks"
    assert sample_main([str(pipe), "--cond", str(cond), "--out", str(out), "--tile", "8"]) == 0
    mask = nib.load(str(out / "sub" / "scan.nii.gz"))
    assert mask.shape == image.shape and np.allclose(mask.affine, _affine())
    assert mask.header.get_zooms() == pytest.approx((0.5, 0.5, 2.0)) and mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_super_resolved_volumes_land_on_the_finer_grid(tmp_path, capsys):
    pipe, _ = _run(tmp_path, "sr", *VOLUMES, "task=super_resolution", "model.cond_channels=1",
                   "super_resolution.factor=2", "train.max_steps=1")
    cond = tmp_path / "low"
    cond.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((8, 8, 8)).astype(np.float32) * 50 + 100,
                             _affine((2.0, 2.0, 2.0))), str(cond / "v.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((5, 8, 8), np.float32), np.eye(4)), str(cond / "w.nii.gz"))
    assert sample_main([str(pipe), "--cond", str(cond), "--out", str(tmp_path / "x"), "--steps", "2"]) == 2
    assert (f"error: {cond / 'w.nii.gz'} is 5x8x8 but this model takes inputs of 8x8x8; pass --tile T for inputs "
            f"of any size, or crop it") in capsys.readouterr().err
    assert not (tmp_path / "x" / "v.nii.gz").exists()                     # checked before any sampling
    (cond / "w.nii.gz").unlink()
    assert sample_main([str(pipe), "--cond", str(cond), "--out", str(tmp_path / "hr"), "--steps", "2"]) == 0
    fine = nib.load(str(tmp_path / "hr" / "v.nii.gz"))
    assert fine.shape == (16, 16, 16) and fine.header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
    assert np.allclose(fine.affine @ [-0.5, -0.5, -0.5, 1], _affine((2.0, 2.0, 2.0)) @ [-0.5, -0.5, -0.5, 1])
    values = np.asarray(fine.dataobj)
    assert 90 <= values.min() and values.max() <= 160                     # in the input's units, not [-1, 1]


def test_through_plane_super_resolution_refines_one_axis(tmp_path):
    pipe, run = _run(tmp_path, "tp", *VOLUMES, "task=super_resolution", "model.cond_channels=1",
                     "super_resolution.factors=[2,1,1]", "train.max_steps=1", "train.eval_every=1", "data.holdout=2",
                     "train.eval_num_images=2")
    cond = tmp_path / "thick"
    cond.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(2).random((8, 16, 16)).astype(np.float32), _affine((3, 1, 1))),
             str(cond / "v.nii"))
    assert sample_main([str(pipe), "--cond", str(cond), "--out", str(tmp_path / "thin"), "--steps", "2"]) == 0
    thin = nib.load(str(tmp_path / "thin" / "v.nii"))
    assert thin.shape == (16, 16, 16) and thin.header.get_zooms() == pytest.approx((1.5, 1.0, 1.0))
    assert "psnr" in (run / "eval.jsonl").read_text()
    nib.save(nib.Nifti1Image(np.random.default_rng(3).random((12, 24, 20)).astype(np.float32), _affine((3, 1, 1))),
             str(cond / "big.nii"))                                  # larger than the model: by tiles
    assert sample_main([str(pipe), "--cond", str(cond), "--out", str(tmp_path / "tiled"), "--steps", "2",
                        "--tile", "16"]) == 0
    big = nib.load(str(tmp_path / "tiled" / "big.nii"))
    assert big.shape == (24, 24, 20) and big.header.get_zooms() == pytest.approx((1.5, 1.0, 1.0))
    assert nib.load(str(tmp_path / "tiled" / "v.nii")).shape == (16, 16, 16)         # inputs of two sizes


def test_imputed_signals_keep_every_known_value(tmp_path):
    pipe, _ = _run(tmp_path, "imp", *SIGNALS, "task=inpainting", "model.cond_channels=2", "inpainting.mask=gaps",
                   "train.max_steps=1")
    (tmp_path / "x").mkdir(), (tmp_path / "m").mkdir()
    signal = np.sin(np.linspace(0, 9, 32)).astype(np.float32) * 7 + 3
    gap = np.zeros(32, np.float32)
    gap[10:18] = 1
    np.save(tmp_path / "x" / "s.npy", signal)
    (tmp_path / "m" / "s.csv").write_text("\n".join(str(int(v)) for v in gap))       # any signal format
    assert sample_main([str(pipe), "--cond", str(tmp_path / "x"), "--mask", str(tmp_path / "m"),
                        "--out", str(tmp_path / "o"), "--steps", "2", "--num-per-cond", "2"]) == 0
    for name in ("s_0.npy", "s_1.npy"):
        filled = np.load(tmp_path / "o" / name)
        assert np.array_equal(filled[gap == 0], signal[gap == 0]) and not np.array_equal(filled, signal)
    assert (tmp_path / "o" / "s_std.npy").is_file() and (tmp_path / "o" / "grid.png").is_file()


def test_write_volumes_makes_a_paired_folder_the_readers_take(tmp_path):
    root = write_volumes(tmp_path / "v", n=2, size=24)
    image, mask = (nib.load(str(root / kind / "000001.nii.gz")) for kind in ("images", "masks"))
    assert image.shape == mask.shape == (24, 24, 24) and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
