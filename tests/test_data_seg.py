"""Segmentation data: masks of class ids in paired folders and HF datasets, their checks, the U-Net weight map of
each item, and data.source=cells."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from diffunet.data import seg_masks
from diffunet.config import load_config
from diffunet.data import DataError, apply_bad_image_policy, build_dataset, read_class_mask
from diffunet.data.seg_masks import instances


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr)).save(path)


def _ids(h=16, w=16):
    """(h, w) uint8 class ids 0..2: two class-1 squares (two instances), one class-2 bar touching a square."""
    ids = np.zeros((h, w), np.uint8)
    ids[2:6, 2:6] = 1
    ids[9:13, 2:6] = 1
    ids[2:6, 6:14] = 2
    return ids


def _cfg(source, *options):
    return load_config(None, [f"data.source={source}", *options]).data


def _build(root, classes=3, size=16, channels=1, **kwargs):
    return build_dataset(_cfg(root), size, channels, mask_classes=classes, **kwargs)


def test_class_id_masks_at_any_depth_and_bit_depth_load_as_ids(tmp_path):
    ids = _ids()
    _save(tmp_path / "images/a/b/x.png", np.full((16, 16), 200, np.uint8))
    _save(tmp_path / "masks/a/b/x.png", ids)                                       # 8-bit gray
    _save(tmp_path / "images/y.png", np.full((16, 16), 200, np.uint8))
    _save(tmp_path / "masks/y.png", ids.astype(np.uint16))                         # 16-bit (I;16)
    _save(tmp_path / "images/z.png", np.full((16, 16, 3), 200, np.uint8))
    _save(tmp_path / "masks/z.png", np.repeat(ids[..., None], 3, -1))              # RGB with equal channels
    ds = _build(tmp_path)
    assert ds.condition == "masks" and len(ds) == 3 and ds.preflight() == []
    for i in range(3):
        image, label, mask = ds[i]
        assert image.shape == mask.shape == (1, 16, 16) and mask.dtype == torch.float32 and label == -1
        assert torch.equal(mask[0], torch.from_numpy(ids).float())
    assert np.array_equal(read_class_mask(tmp_path / "masks/y.png", 3), ids) and read_class_mask(
        tmp_path / "masks/y.png", 3).dtype == np.int64


def test_masks_follow_the_image_geometry_and_keep_their_ids(tmp_path):
    ids = np.zeros((32, 48), np.uint8)
    ids[9:23, 9:23] = 2                                          # as test_data_paired's square: rows 2-5, cols 0-3
    _save(tmp_path / "images/x.png", np.zeros((32, 48), np.uint8))
    _save(tmp_path / "masks/x.png", ids)
    expected = torch.zeros(8, 8)
    expected[2:6, 0:4] = 2
    assert torch.equal(_build(tmp_path, size=8)[0][2][0], expected)


def test_a_binary_0_255_mask_reads_as_0_1(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8] = 255
    _save(tmp_path / "images/x.png", np.zeros((16, 16), np.uint8))
    _save(tmp_path / "masks/x.png", mask)
    got = _build(tmp_path, classes=2)[0][2]
    assert torch.equal(got[0], torch.from_numpy(mask // 255).float())
    assert np.array_equal(read_class_mask(tmp_path / "masks/x.png", 2), mask // 255)


BAD = {  # case: (the mask of images/x.png, classes, what the one line says)
    "id >= K": (np.where(_ids() == 2, 7, _ids()), 3,
                r"masks/x\.png has class id 7, but the model has 3 classes \(model\.out_channels\); "
                r"ids must be 0\.\.2, or 0/255 for a binary mask$"),
    "gray 0/128/255": (np.repeat(np.array([0, 128, 255], np.uint8), [6, 5, 5])[None].repeat(16, 0), 2,
                       r"masks/x\.png has class id 128, but the model has 2 classes"),
    "size": (_ids(12, 16), 3, r"masks/x\.png is 16x12 but images/x\.png is 16x16$"),
    "channels": (np.stack([_ids(), _ids() * 0, _ids() * 0], -1), 3, r"masks/x\.png has channels that differ"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_masks_are_one_line_naming_the_file_stopped_by_preflight_or_skipped(tmp_path, case):
    mask, classes, says = BAD[case]
    for name in ("x", "ok"):
        _save(tmp_path / f"images/{name}.png", np.zeros((16, 16), np.uint8))
    ok = _ids() % classes                                             # a good mask for this many classes
    _save(tmp_path / "masks/ok.png", ok)
    _save(tmp_path / "masks/x.png", mask.astype(np.uint8))
    ds = _build(tmp_path, classes)
    with pytest.raises(DataError, match=r"masks/x\.png (has|is) ") as e:
        ds[ds.files.index(tmp_path / "images/x.png")]                 # read without preflight: one line too
    assert "\n" not in str(e.value)
    bad = ds.preflight()
    assert [path for path, _ in bad] == [str(tmp_path / "masks/x.png")] and re.search(says, bad[0][1])
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) under .*, first .*bad_images=skip"):
        apply_bad_image_policy(ds, bad, "strict")
    warned = []
    apply_bad_image_policy(ds, bad, "skip", warn=warned.append)
    assert len(ds) == 1 and ds.preflight() == [] and "skipping 1 " in warned[0]
    assert torch.equal(ds[0][2][0], torch.from_numpy(ok).float())
    if case == "size":                                                 # a file alone: any size is its own
        assert read_class_mask(tmp_path / "masks/x.png", classes).shape == (12, 16)
    else:
        with pytest.raises(DataError, match=re.escape(str(tmp_path)) + "/" + says.split(";")[0]):
            read_class_mask(tmp_path / "masks/x.png", classes)


def test_fractional_and_negative_values_are_not_class_ids(tmp_path):
    _save(tmp_path / "f.tif", np.full((4, 4), 1.5, np.float32))                    # a float TIFF (mode F)
    _save(tmp_path / "i.tif", np.full((4, 4), -1, np.int32))                       # a 32-bit TIFF (mode I)
    for name, value in (("f", "1.5"), ("i", "-1")):
        with pytest.raises(DataError, match=rf"{name}\.tif has value {value}, which is not a class id; ids must be 0"):
            read_class_mask(tmp_path / f"{name}.tif", 3)
    _save(tmp_path / "ok.tif", np.full((4, 4), 2.0, np.float32))                  # whole numbers as floats: ids
    assert (read_class_mask(tmp_path / "ok.tif", 3) == 2).all()


def test_inpainting_masks_keep_their_rules_without_mask_classes(tmp_path):
    _save(tmp_path / "images/x.png", np.zeros((16, 16), np.uint8))
    _save(tmp_path / "masks/x.png", _ids())                                        # ids 0..2: not an inpainting mask
    ds = build_dataset(_cfg(tmp_path), 16, 1)
    assert re.search(r"masks/x\.png has values other than 0/255 or 0/1 \(e\.g\. 1\)", ds.preflight()[0][1])
    assert _build(tmp_path).preflight() == []


def _components(ids):
    """The test's own instance map: 4-connected components of each foreground class, numbered across classes."""
    out, n = np.zeros(ids.shape, np.int32), 0
    for c in (1, 2):
        labels, count = ndimage.label(ids == c)                 # scipy's default structure is 4-connectivity
        out += np.where(labels > 0, labels + n, 0).astype(np.int32)
        n += count
    return out


def test_weights_are_the_unet_weight_map_of_the_components_and_cached(tmp_path, monkeypatch):
    _save(tmp_path / "images/x.png", np.zeros((16, 16), np.uint8))
    _save(tmp_path / "masks/x.png", _ids())
    expected = seg_masks.weight_map(_components(_ids()), w0=8.0, sigma=3.0)
    assert _components(_ids()).max() == 3 and np.array_equal(instances(_ids()), _components(_ids()))
    calls = []
    real = seg_masks.weight_map
    monkeypatch.setattr(seg_masks, "weight_map", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds = _build(tmp_path, weights=(8.0, 3.0))
    image, label, mask, weight = ds[0]
    assert weight.shape == (1, 16, 16) and weight.dtype == torch.float32
    assert np.array_equal(weight[0].numpy(), expected) and torch.equal(mask[0], torch.from_numpy(_ids()).float())
    assert ds[0][3] is weight and len(calls) == 1                 # the second read reuses the first's map
    # a border term: the background pixel between the two class-1 squares weighs more than one far from cells
    assert weight[0, 7, 3] > weight[0, 15, 15] + 1


def test_hf_mask_column_of_class_ids_with_weights_and_preflight(tmp_path):
    datasets = pytest.importorskip("datasets")
    bad = np.where(_ids() == 2, 5, _ids()).astype(np.uint8)
    datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.zeros((16, 16), np.uint8))] * 3,
         "seg": [Image.fromarray(_ids()), Image.fromarray(bad), Image.fromarray(_ids())],
         "ids": [_ids().astype(np.int64).tolist()] * 3},                        # class ids as a nested-list column
        features=datasets.Features({"image": datasets.Image(), "seg": datasets.Image(),
                                    "ids": datasets.Sequence(datasets.Sequence(datasets.Value("int64")))}),
    ).save_to_disk(tmp_path / "saved")
    source = f"hf:{tmp_path / 'saved'}"
    ds = build_dataset(_cfg(source, "data.mask_column=ids"), 16, 1, mask_classes=3, weights=(10.0, 5.0))
    image, label, mask, weight = ds[1]
    assert ds.condition == "masks" and ds.preflight() == [] and label == -1
    assert torch.equal(mask[0], torch.from_numpy(_ids()).float())
    assert np.array_equal(weight[0].numpy(), seg_masks.weight_map(_components(_ids())))
    ds = build_dataset(_cfg(source, "data.mask_column=seg"), 16, 1, mask_classes=3)
    bad_rows = ds.preflight()
    assert [row for row, _ in bad_rows] == [f"{tmp_path / 'saved'}[1]"]
    assert re.search(r"saved\[1\]\.seg has class id 5, but the model has 3 classes", bad_rows[0][1])
    apply_bad_image_policy(ds, bad_rows, "skip", warn=lambda _: None)
    assert len(ds) == 2 and all(torch.equal(ds[i][2][0], torch.from_numpy(_ids()).float()) for i in range(2))
    with pytest.raises(DataError, match=r"has no masks to segment; set data.mask_column"):
        build_dataset(_cfg(source), 16, 1, mask_classes=3)


def test_segmentation_needs_masks(tmp_path):
    _save(tmp_path / "images/x.png", np.zeros((16, 16), np.uint8))
    _save(tmp_path / "conds/x.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match=r"has no masks to segment; segmentation reads class-id masks from masks/"):
        _build(tmp_path)
    with pytest.raises(DataError, match=r"data.source=digits has no masks to segment; use data.source=cells"):
        build_dataset(_cfg("digits"), 16, 1, mask_classes=10)


def test_cells_source_gives_num_crops_weighted_items(monkeypatch):
    ds = build_dataset(_cfg("cells", "data.num_crops=5"), 32, 1, mask_classes=2, weights=(10.0, 5.0))
    assert len(ds) == 5 and ds.condition == "masks"
    image, label, mask, weight = ds[4]
    assert image.shape == mask.shape == weight.shape == (1, 32, 32) and label == -1
    assert image.min() >= -1 and image.max() <= 1 and set(mask.unique().tolist()) == {0.0, 1.0}
    again = build_dataset(_cfg("cells", "data.num_crops=5"), (32, 32), 1)       # mask_classes None: binary, fine
    assert len(again[0]) == 4 and torch.equal(again[4][0], image)               # seed 0: the same crops
    assert not torch.equal(build_dataset(_cfg("cells", "data.num_crops=5"), 32, 1, weights=(0.0, 5.0))[4][3], weight)


@pytest.mark.parametrize("size, channels, mask_classes, says", [
    (32, 3, None, r"^data.source=cells is grayscale, square crops: set model.in_channels=1$"),
    ((32, 48), 1, None, r"^data.source=cells is grayscale, square crops: set model.sample_size to one int$"),
    (32, 1, 3, r"^data.source=cells has 2 classes \(background, cell\) but the model has 3; set model.out_channels=2$"),
])
def test_cells_source_errors(size, channels, mask_classes, says):
    with pytest.raises(DataError, match=says):
        build_dataset(_cfg("cells", "data.num_crops=2"), size, channels, mask_classes=mask_classes)
