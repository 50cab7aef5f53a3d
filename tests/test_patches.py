"""Signal and volume datasets (``data.patches``, ``data.synthetic``): folders, classes and pairs read from files,
patches cropped where a seeded draw says (on labelled voxels as often as asked), small inputs mirror-padded, the
embedded data made from a seed, and every problem one line naming the file."""

import nibabel as nib
import numpy as np
import pytest
import torch

from diffunet.config import load_config
from diffunet.data import apply_bad_image_policy, build_dataset, split_holdout
from diffunet.data.patches import ArrayFolder, PairedArrays, mirror_pad, patch_box
from diffunet.data.synthetic import SIGNAL_CLASSES, make_nuclei, nuclei_arrays, signals_arrays
from diffunet.errors import DataError
from diffunet.training.loop import EpochSampler

INTENSITY = ("percentile", (0.5, 99.5))


def _nifti(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _volumes(root, n=3, shape=(12, 12, 12), seed=0):
    """images/ and masks/ of random blobs: masks 1 where the image is above 1."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        image = rng.normal(size=shape).astype(np.float32)
        _nifti(root / "images" / f"v{k}.nii.gz", image)
        _nifti(root / "masks" / f"v{k}.nii.gz", (image > 1).astype(np.uint8))
    return root


def test_patch_boxes_are_the_centre_or_a_seeded_draw():
    assert patch_box((10, 20), (4, 4)) == (slice(3, 7), slice(8, 12))
    a, b = patch_box((30, 30, 30), (8, 8, 8), (0, 5, 0, 1)), patch_box((30, 30, 30), (8, 8, 8), (0, 5, 0, 1))
    assert a == b and a != patch_box((30, 30, 30), (8, 8, 8), (0, 6, 0, 1))
    fg = np.zeros((40, 40, 40), bool)
    fg[35, 2, 20] = True                                                    # one labelled voxel, near a corner
    for draw in range(20):
        box = patch_box(fg.shape, (8, 8, 8), (draw,), fg, pos_ratio=1.0)
        assert fg[box].any() and all(s.stop - s.start == 8 for s in box)


def test_a_pos_ratio_of_patches_hold_a_labelled_voxel():
    fg = np.zeros((64, 64, 64), bool)
    fg[30:34, 30:34, 30:34] = True                                           # 0.02 % of the volume
    hits = [fg[patch_box(fg.shape, (8, 8, 8), (k,), fg, 0.5)].any() for k in range(400)]
    assert 0.42 < np.mean(hits) < 0.62                                      # 0.5 centred + ~1 % by chance


def test_short_axes_are_mirror_padded():
    x = np.arange(5, dtype=np.float32)[None]
    assert mirror_pad(x, (9,)).tolist() == [[2, 1, 0, 1, 2, 3, 4, 3, 2]]
    assert mirror_pad(np.ones((1, 3, 9)), (5, 4)).shape == (1, 5, 9)


def test_a_folder_of_signals_with_class_subfolders(tmp_path):
    signals, labels = signals_arrays(8, 40)
    for k, (s, y) in enumerate(zip(signals, labels)):
        (tmp_path / SIGNAL_CLASSES[y]).mkdir(exist_ok=True)
        np.save(tmp_path / SIGNAL_CLASSES[y] / f"{k}.npy", s[0] * 3 + 10)            # any units
    ds = build_dataset(load_config(None, [f"data.source={tmp_path}"]).data, (32,), 1)
    assert isinstance(ds, ArrayFolder) and ds.num_classes == 4 and ds.classes == sorted(SIGNAL_CLASSES)
    assert ds.preflight() == [] and ds.size_note is None
    x, y = ds[0]
    assert x.shape == (1, 32) and -1 <= x.min() and x.max() <= 1 and y == ds.classes.index(ds.files[0].parent.name)
    a, b = ds[(0, (1, 2, 0, 0))], ds[(0, (1, 3, 0, 0))]                     # keys of two batches: two crops
    assert not torch.equal(a[0], b[0]) and torch.equal(a[0], ds[(0, (1, 2, 0, 0))][0])


def test_paired_volumes_crop_image_and_mask_together(tmp_path):
    root = _volumes(tmp_path / "d", shape=(20, 16, 12))
    ds = build_dataset(load_config(None, [f"data.source={root}"]).data, (8, 8, 8), 1, mask_classes=2)
    assert isinstance(ds, PairedArrays) and ds.condition == "masks" and ds.preflight() == []
    whole = nib.load(str(root / "images" / "v1.nii.gz")).get_fdata()
    for key in (1, (1, (0, 0, 0, 0)), (1, (0, 1, 0, 0))):
        image, _, mask = ds[key]
        assert image.shape == mask.shape == (1, 8, 8, 8)
        # the crop's mask is exactly the crop of the file's mask: where the image was above 1
        found = [(i, j, k) for i in range(13) for j in range(9) for k in range(5)
                 if np.array_equal(mask[0].numpy(), (whole[i:i + 8, j:j + 8, k:k + 8] > 1))]
        assert found


def test_small_volumes_are_padded_with_a_note(tmp_path):
    root = _volumes(tmp_path / "d", n=2, shape=(6, 10, 10))
    ds = build_dataset(load_config(None, [f"data.source={root}"]).data, (8, 8, 8), 1, mask_classes=2)
    assert ds.preflight() == []
    assert ds.size_note.startswith("note: 2 of 2 volumes under") and "mirror-padded" in ds.size_note
    assert ds[0][0].shape == (1, 8, 8, 8)


def test_bad_pairs_are_named_before_training(tmp_path):
    root = _volumes(tmp_path / "d", n=3)
    _nifti(root / "masks" / "v1.nii.gz", np.zeros((12, 12, 10), np.uint8))                  # another shape
    moved = np.eye(4)
    moved[0, 3] = 5.0
    _nifti(root / "masks" / "v2.nii.gz", np.zeros((12, 12, 12), np.uint8), moved)          # another place
    _nifti(root / "images" / "lone.nii.gz", np.zeros((12, 12, 12), np.float32))
    ds = build_dataset(load_config(None, [f"data.source={root}"]).data, (8, 8, 8), 1, mask_classes=2)
    bad = dict(ds.preflight())
    warned = []
    apply_bad_image_policy(ds, list(bad.items()), "skip", warn=warned.append)
    assert len(bad) == 3 and len(ds) == 1 and warned[0].startswith("warning: skipping 3 unreadable image(s)")
    assert "lone.nii.gz has no partner in masks/" in bad[str(root / "images" / "lone.nii.gz")]
    assert "v1.nii.gz is 12x12x10 (x1 channels) but" in bad[str(root / "images" / "v1.nii.gz")]
    assert "different affines" in bad[str(root / "images" / "v2.nii.gz")]


def test_wrong_channels_and_dimensionality_are_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "x.npy", np.zeros((3, 8, 8, 8), np.float32))
    ds = build_dataset(load_config(None, [f"data.source={tmp_path / 'a'}"]).data, (8, 8, 8), 1)
    (path, reason), = ds.preflight()
    assert "has 3 channel(s) but the model takes 1; set model.in_channels=3" in reason
    with pytest.raises(DataError, match="data.source=signals holds 1D samples but the model is 3D"):
        build_dataset(load_config(None, ["data.source=signals"]).data, (8, 8, 8), 1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"")
    with pytest.raises(DataError) as e:
        ArrayFolder(tmp_path / "b", (8, 8, 8), 1)
    assert "no volume files" in str(e.value) and "found 1 .png" in str(e.value)


def test_keys_flow_from_the_sampler_through_a_holdout_split():
    sampler = EpochSampler(10, 2, seed=3, rank=1, world=2, keyed=True)
    batch = next(iter(sampler))
    assert [k[1] for k in batch] == [(3, 0, 1, 0), (3, 0, 1, 1)]
    ds = build_dataset(load_config(None, ["data.source=cells3d", "data.num_crops=6"]).data, (16, 16, 16), 1,
                       mask_classes=2)
    train_part, held = split_holdout(ds, 2)
    assert train_part.keyed and held.keyed
    image, _, mask = train_part[(0, (1, 1, 0, 0))]
    assert image.shape == (1, 16, 16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(held[0][0], ds[held.indices[0]][0])                 # evaluation: the centre patch


def test_the_embedded_data_is_made_from_a_seed():
    a, b = make_nuclei(24, seed=(0, 1, 0)), make_nuclei(24, seed=(0, 1, 0))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    image, instances = a
    assert image.shape == (24, 24, 24) and 0 <= image.min() and image.max() <= 1
    assert instances.max() >= 3 and set(np.unique(instances)) == set(range(instances.max() + 1))
    assert image[instances > 0].mean() > image[instances == 0].mean() + 0.2      # nuclei are brighter
    images, masks = nuclei_arrays(2, (16, 20, 24), part=2)
    assert images.shape == masks.shape == (2, 1, 16, 20, 24)
    signals, labels = signals_arrays(8, 64)
    assert labels.tolist() == [0, 1, 2, 3] * 2 and signals.shape == (8, 1, 64)
    assert not np.array_equal(signals, signals_arrays(8, 64, part=2)[0])


def test_a_paired_folder_of_only_lone_files_says_so(tmp_path):
    root = tmp_path / "d"
    _nifti(root / "images" / "a.nii.gz", np.zeros((8, 8, 8), np.float32))
    _nifti(root / "masks" / "b.nii.gz", np.zeros((8, 8, 8), np.uint8))
    ds = build_dataset(load_config(None, [f"data.source={root}"]).data, (8, 8, 8), 1, mask_classes=2)
    bad = ds.preflight()
    assert len(bad) == 2 and len(ds) == 0
    with pytest.raises(DataError, match="no readable images left"):
        apply_bad_image_policy(ds, bad, "skip", warn=lambda _: None)
