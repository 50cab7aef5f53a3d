"""Signal and volume files (``data.arrays``): each format read channels first, what it carried kept in what is
written back, intensities normalised and restored, and every bad file one line that names it."""

import builtins
import gzip

import nibabel as nib
import numpy as np
import pytest
import tifffile

from diffunet.data.arrays import (Meta, denormalise, intensity_window, normalise, read_array, stem_of, suffix_of,
                                  write_array)
from diffunet.errors import DataError


def _affine():
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    return affine


def _one_line(e) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_suffixes_and_stems_take_nii_gz_as_one():
    assert suffix_of("a/b.NII.GZ") == ".nii.gz" and stem_of("a/scan.nii.gz") == "scan"
    assert suffix_of("x.tif") == ".tif" and stem_of("x.tif") == "x"


def test_nifti_reads_channels_first_and_an_output_keeps_affine_and_spacing(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, _affine()), str(tmp_path / "a.nii.gz"))
    array, meta = read_array(tmp_path / "a.nii.gz", 3)
    assert array.shape == (1, 6, 5, 4) and np.array_equal(array[0], data)
    assert meta.spacing == pytest.approx((0.8, 0.8, 2.5)) and np.allclose(meta.affine, _affine())
    write_array((array > 0).astype(np.uint8), tmp_path / "out.nii.gz", meta)
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert np.allclose(back.affine, _affine()) and back.header.get_zooms() == pytest.approx((0.8, 0.8, 2.5))
    assert np.array_equal(np.asarray(back.dataobj), data > 0) and back.get_data_dtype() == np.uint8
    assert not list(tmp_path.glob("*.part*"))                               # written whole, then renamed


def test_a_fourth_nifti_axis_is_channels_and_a_fifth_is_refused(tmp_path):
    data = np.arange(2 * 3 * 4 * 2, dtype=np.float32).reshape(2, 3, 4, 2)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "c.nii"))
    array, _ = read_array(tmp_path / "c.nii", 3)
    assert array.shape == (2, 2, 3, 4) and np.array_equal(array[1], data[..., 1])
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 1, 3), np.float32), np.eye(4)), str(tmp_path / "five.nii.gz"))
    with pytest.raises(DataError) as e:
        read_array(tmp_path / "five.nii.gz", 3)
    assert "five.nii.gz has 5 axes" in _one_line(e) and "(X, Y, Z, C)" in str(e.value)


def test_a_corrupt_nifti_and_a_2d_file_in_a_3d_folder_are_one_line_each(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 20)[:60])
    with pytest.raises(DataError) as e:
        read_array(tmp_path / "bad.nii.gz", 3)
    assert _one_line(e).startswith(f"cannot read {tmp_path / 'bad.nii.gz'}")
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError) as e:
        read_array(tmp_path / "flat.npy", 3)
    assert "flat.npy is 2D" in _one_line(e) and "model.spatial_dims=2" in str(e.value)


def test_tiff_stacks_keep_their_resolution_tags(tmp_path):
    stack = np.random.default_rng(1).integers(0, 4000, (5, 6, 7)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, resolution=(4.0, 2.0),
                     metadata={"spacing": 3.0, "unit": "um", "axes": "ZYX"})
    array, meta = read_array(tmp_path / "s.tif", 3)
    assert array.shape == (1, 5, 6, 7) and np.array_equal(array[0], stack)
    assert meta.spacing == pytest.approx((3.0, 0.5, 0.25))                  # (Z, Y, X): 1 / pixels per unit
    write_array(array.astype(np.float32), tmp_path / "o.tif", meta)
    again, kept = read_array(tmp_path / "o.tif", 3)
    assert np.array_equal(again, array) and kept.spacing == pytest.approx(meta.spacing)
    assert kept.tiff["unit"] == "um"


def test_a_super_resolved_output_gets_the_finer_grid_over_the_same_extent():
    meta = Meta(".nii.gz", (0.8, 0.8, 2.5), _affine())
    fine = meta.resampled((1, 1, 2))
    assert fine.spacing == pytest.approx((0.8, 0.8, 1.25))
    # the first fine voxel's centre lies a quarter of a coarse voxel before the coarse one's, along z
    assert fine.affine[:3, 3] == pytest.approx(_affine()[:3, 3] + np.array([0, 0, -2.5 / 4]))
    coarse_edge = _affine() @ np.array([0, 0, -0.5, 1])
    assert (fine.affine @ np.array([0, 0, -0.5, 1])) == pytest.approx(coarse_edge)


def test_signals_from_npy_npz_and_csv(tmp_path):
    signal = np.sin(np.linspace(0, 6, 50)).astype(np.float32)
    np.save(tmp_path / "a.npy", signal)
    np.savez(tmp_path / "b.npz", only=np.stack([signal, -signal]))
    (tmp_path / "c.csv").write_text("left,right\n" + "\n".join(f"{v},{-v}" for v in signal))
    assert read_array(tmp_path / "a.npy", 1)[0].shape == (1, 50)
    two, _ = read_array(tmp_path / "b.npz", 1)
    csv, meta = read_array(tmp_path / "c.csv", 1)
    assert two.shape == csv.shape == (2, 50) and np.allclose(csv, two, atol=1e-6) and meta.format == ".csv"
    write_array(csv, tmp_path / "d.csv")
    assert np.allclose(read_array(tmp_path / "d.csv", 1)[0], csv, atol=1e-6)


def test_bad_signal_files_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "ragged.csv").write_text("1,2\n3,4\n5\n")
    with pytest.raises(DataError) as e:
        read_array(tmp_path / "ragged.csv", 1)
    assert "ragged.csv: row 3 has 1 values but the first has 2" in _one_line(e)
    np.savez(tmp_path / "two.npz", a=np.zeros(4), b=np.zeros(4))
    with pytest.raises(DataError, match="holds 2 arrays"):
        read_array(tmp_path / "two.npz", 1)
    np.save(tmp_path / "nan.npy", np.array([0.0, np.nan]))
    with pytest.raises(DataError, match="nan.npy holds NaN"):
        read_array(tmp_path / "nan.npy", 1)
    with pytest.raises(DataError, match="is not a signal file"):
        read_array(tmp_path / "x.nii.gz", 1)


def test_a_missing_reader_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_nibabel(name, *args, **kwargs):
        if name == "nibabel":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(tmp_path / "v.nii"))
    monkeypatch.setattr(builtins, "__import__", no_nibabel)
    with pytest.raises(DataError) as e:
        read_array(tmp_path / "v.nii", 3)
    assert _one_line(e) == f"reading {tmp_path / 'v.nii'} needs nibabel: pip install 'diffunet[medical]'"


def test_intensities_go_to_minus_one_one_and_back():
    rng = np.random.default_rng(0)
    ct = np.stack([rng.normal(40, 300, (8, 8, 8)), rng.normal(5, 1, (8, 8, 8))])      # two channels
    window = intensity_window(ct, "percentile", (0.5, 99.5))
    x = normalise(ct, window)
    assert x.dtype == np.float32 and x.min() == -1 and x.max() == 1
    for c in range(2):                                              # each channel by its own percentiles
        assert np.mean(x[c] == 1) == pytest.approx(0.005, abs=0.003)
    inside = (x > -1) & (x < 1)
    assert np.allclose(denormalise(x, window)[inside], ct[inside], rtol=1e-4, atol=1e-3)
    fixed = normalise(ct, intensity_window(ct, "fixed", (-1000, 1000)))
    assert np.allclose(fixed[0], np.clip(ct[0] / 1000, -1, 1), atol=1e-6)
    assert np.array_equal(normalise(np.full((1, 3), 7.0), intensity_window(np.full((1, 3), 7.0), "percentile",
                                                                             (1, 99))), np.full((1, 3), -1.0))
    with pytest.raises(DataError, match="unknown data.intensity 'zscore'"):
        intensity_window(ct, "zscore", (0, 1))
