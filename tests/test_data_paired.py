"""Paired and conditioned data: inpainting masks, paired folders, HF condition columns, the holdout split."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet.config import load_config
from diffunet.data import (DataError, ImageFolder, PairedFolder, apply_bad_image_policy, build_dataset, pair_files,
                           split_holdout)
from diffunet.data.inpaint_masks import MASKS, draw_masks


# ------------------------------------------------------------------------------------------ masks

@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("size", [(16, 16), (12, 20), (2, 3)])
def test_masks_are_binary_with_both_values(name, size):
    m = draw_masks(name, 32, size, torch.Generator().manual_seed(0))
    assert m.shape == (32, 1, *size) and m.dtype == torch.float32
    assert ((m == 0) | (m == 1)).all()
    per_image = m.flatten(1)
    assert (per_image.max(1).values == 1).all() and (per_image.min(1).values == 0).all()


@pytest.mark.parametrize("name", list(MASKS))
def test_masks_are_reproducible_from_the_seed_and_vary_between_images(name):
    a = draw_masks(name, 8, (16, 16), torch.Generator().manual_seed(3))
    b = draw_masks(name, 8, (16, 16), torch.Generator().manual_seed(3))
    c = draw_masks(name, 8, (16, 16), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(x.flatten().tolist()) for x in a}) > 1
    # image i uses the stream in order: the first images of a larger batch are the same
    assert torch.equal(draw_masks(name, 3, (16, 16), torch.Generator().manual_seed(3)), a[:3])


def test_mask_coverage_is_in_range():
    g = torch.Generator().manual_seed(0)
    for name, (lo, hi) in {"box": (0.08, 0.65), "stroke": (0.08, 0.7)}.items():
        cover = draw_masks(name, 64, (32, 32), g).mean((1, 2, 3))
        assert lo <= cover.min() and cover.max() <= hi, name
    half = draw_masks("half", 64, (16, 24), g)
    assert (half.sum((1, 2, 3)) == 16 * 24 / 2).all()
    # each of the four halves occurs, and a half is a full half-plane: rows (top/bottom) or columns (left/right)
    sides = {(int(h[0, 0, 0]), int(h[0, -1, -1]), int(h[0, 0, -1])) for h in half}
    assert sides == {(1, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1)}


def test_masks_move_to_the_device_and_unknown_names_list_the_valid_ones():
    assert draw_masks("box", 2, 8, device="meta").device.type == "meta"
    with pytest.raises(ValueError, match=r"unknown inpainting.mask 'boxes'; choose one of 'box', 'stroke', 'half', 'mixed'"):
        draw_masks("boxes", 2, (8, 8))


# ------------------------------------------------------------------------------------------ paired folders

def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _square(h, w, rows, cols, value=255, channels=None):
    arr = np.zeros((h, w) if channels is None else (h, w, channels), dtype=np.uint8)
    arr[rows, cols] = value
    return arr


def _build(root, channels=1, size=8):
    return build_dataset(load_config(None, [f"data.source={root}"]).data, size, channels)


def test_paired_folder_pairs_by_stem_at_any_depth_and_keeps_masks_on_their_images(tmp_path):
    square = slice(9, 23), slice(9, 23)                 # off-centre and off the 4-pixel grid of the resize
    _save(tmp_path / "images/a/x.bmp", _square(32, 48, *square, channels=3))
    _save(tmp_path / "masks/a/x.png", _square(32, 48, *square, 255))                   # 0/255 gray
    _save(tmp_path / "images/b/y.png", _square(32, 48, *square))
    _save(tmp_path / "masks/b/y.tif", _square(32, 48, *square, 1))                     # 0/1 gray
    _save(tmp_path / "images/z.png", _square(32, 48, *square))
    _save(tmp_path / "masks/z.png", _square(32, 48, *square, 255, channels=3))         # RGB, equal channels
    ds = _build(tmp_path)
    assert isinstance(ds, PairedFolder) and isinstance(ds, ImageFolder)     # what training's preflight checks
    assert ds.condition == "masks" and len(ds) == 3 and ds.num_classes is None and ds.preflight() == []
    assert [(p.relative_to(tmp_path).as_posix(), q.relative_to(tmp_path).as_posix()) for p, q in
            zip(ds.files, ds.partners)] == [("images/a/x.bmp", "masks/a/x.png"), ("images/b/y.png", "masks/b/y.tif"),
                                           ("images/z.png", "masks/z.png")]
    # 32x48 covers 8x8 as 8x12 (/4), the center crop drops 2 columns a side: [9, 23) -> [2.25, 5.75) -> rows 2-5,
    # columns 0-3; a mask sampled at block corners (plain "nearest") would lose row and column 2
    expected = torch.zeros(8, 8)
    expected[2:6, 0:4] = 1
    for image, label, mask in (ds[i] for i in range(3)):
        assert image.shape == (1, 8, 8) and mask.shape == (1, 8, 8) and label == -1
        assert torch.equal(mask[0], expected) and torch.equal((image[0] > 0).float(), expected)


def test_paired_folder_with_class_subfolders_and_conds(tmp_path):
    for cls in ("cat", "dog"):
        _save(tmp_path / f"images/{cls}/x.png", np.full((16, 16, 3), 255))
        _save(tmp_path / f"conds/{cls}/x.jpg", _square(4, 4, slice(None), slice(0, 2), channels=3))    # low-res
    ds = _build(tmp_path, channels=1)
    assert ds.condition == "conds" and ds.num_classes == 2          # images/ reads as any ImageFolder
    image, label, cond = ds[1]
    assert label == 1 and image.shape == cond.shape == (1, 8, 8)
    assert (cond[0, :, :2] > 0.8).all() and (cond[0, :, -2:] < -0.8).all()   # bicubic 4x4 -> 8x8, left half white


def _pair(root, kind="masks", name="x", image=(16, 16), partner=None, partner_arr=None):
    _save(root / f"images/{name}.png", np.zeros(image))
    _save(root / f"{kind}/{name}.png", np.zeros(partner or image) if partner_arr is None else partner_arr)


def _garbage(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG not really")


BAD = {  # case: (make the bad file(s) under root, what the one line says, items left under skip)
    "lone image": (lambda r: _save(r / "images/a/lone.png", np.zeros((16, 16))),
                   r"images/a/lone\.png has no partner in masks/ \(expected masks/a/lone\.<ext>\)", 2),
    "lone mask": (lambda r: _save(r / "masks/extra.png", np.zeros((16, 16))),
                  r"masks/extra\.png has no partner in images/ \(expected images/extra\.<ext>\)", 2),
    "unreadable mask": (lambda r: _garbage(r / "masks/x.png"), r"masks/x\.png: \w+Error", 1),
    "unreadable image": (lambda r: _garbage(r / "images/x.png"), r"images/x\.png: \w+Error", 1),
    "size mismatch": (lambda r: _pair(r, partner=(12, 16)), r"masks/x\.png is 16x12 but images/x\.png is 16x16", 1),
    "gray values": (lambda r: _pair(r, partner_arr=_square(16, 16, slice(0, 4), slice(None), 128)),
                    r"masks/x\.png has values other than 0/255 or 0/1 \(e\.g\. 128\)", 1),
    "colour mask": (lambda r: _pair(r, partner_arr=_square(16, 16, slice(0, 4), slice(None), (255, 0, 0), 3)),
                    r"masks/x\.png has channels that differ", 1),
    "cond aspect": (lambda r: _pair(r, "conds", partner=(2, 8)),
                    r"conds/x\.png is 8x2 but images/x\.png is 16x16: another aspect ratio", 1),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pairs_stop_naming_the_file_or_are_skipped_with_a_count(tmp_path, case):
    make, says, left = BAD[case]
    kind = "conds" if "cond" in case else "masks"
    _pair(tmp_path, kind, name="x")
    _pair(tmp_path, kind, name="ok")
    make(tmp_path)
    ds = _build(tmp_path)
    bad = ds.preflight()
    assert len(bad) == 1 and re.search(says, bad[0][1])
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) under .*, first .*" + says + ".*bad_images=skip"):
        apply_bad_image_policy(ds, bad, "strict")
    warnings = []
    apply_bad_image_policy(ds, bad, "skip", warn=warnings.append)
    assert len(ds) == left and ds.preflight() == [] and "skipping 1 " in warnings[0]
    assert len(warnings) == 2 and warnings[1].startswith(f"note: {left} of {left} images under {tmp_path} are not "
                                                         f"8x8: ")      # 16 px images, a model of 8: what is kept
    assert all(len(ds[i]) == 3 for i in range(len(ds)))


def test_a_bad_pair_read_without_preflight_names_both_files(tmp_path):
    _pair(tmp_path, partner=(12, 16))
    with pytest.raises(DataError, match=r"masks/x\.png is 16x12 but .*images/x\.png is 16x16"):
        _build(tmp_path)[0]


def test_ambiguous_folders_and_stems_are_one_line_errors(tmp_path):
    _pair(tmp_path / "both", "masks")
    _save(tmp_path / "both/conds/x.png", np.zeros((16, 16)))
    with pytest.raises(DataError, match=r"holds images/ and both conds/ and masks/; keep one"):
        _build(tmp_path / "both")
    _pair(tmp_path / "dup", "masks")
    _save(tmp_path / "dup/images/x.jpg", np.zeros((16, 16)))
    with pytest.raises(DataError, match=r"images/x\.jpg and .*images/x\.png have the same stem"):
        _build(tmp_path / "dup")
    assert type(_build(tmp_path / "both/images")) is ImageFolder        # images/ alone is a plain folder


def test_pair_files_matches_two_folders_by_relative_stem(tmp_path):
    for path in ("c/a/x.png", "c/a/y.png", "c/z.png", "m/a/x.jpg", "m/z.bmp", "m/w.png", "m/a/x.txt"):
        _save(tmp_path / path, np.zeros((4, 4))) if not path.endswith(".txt") else (tmp_path / path).write_text("")
    pairs, lone_c, lone_m = pair_files(tmp_path / "c", tmp_path / "m")
    rel = lambda ps: [p.relative_to(tmp_path).as_posix() for p in ps]
    assert [rel(p) for p in pairs] == [["c/a/x.png", "m/a/x.jpg"], ["c/z.png", "m/z.bmp"]]
    assert rel(lone_c) == ["c/a/y.png"] and rel(lone_m) == ["m/w.png"]


# ------------------------------------------------------------------------------------------ HF datasets

def _hf(tmp_path, *options):
    return build_dataset(load_config(None, [f"data.source=hf:{tmp_path / 'saved'}", *options]).data, 8, 1)


def test_hf_datasets_cond_and_mask_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    square = slice(9, 23), slice(9, 23)
    images = [Image.fromarray(_square(32, 48, *square)) for _ in range(3)]
    masks = [Image.fromarray(_square(32, 48, *square, 255)),                # 0/255, aligned with its image
             Image.fromarray(_square(12, 16, *square, 255)),                # another size
             Image.fromarray(_square(32, 48, *square, 128))]                # not binary
    arrays = [_square(32, 48, *square, 1).tolist()] * 3                     # 0/1 as a nested-list column
    lowres = [Image.fromarray(np.full((8, 12), 255, dtype=np.uint8))] * 3
    datasets.Dataset.from_dict({"image": images, "mask": masks, "m01": arrays, "low": lowres},
                               features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                                           "m01": datasets.Sequence(datasets.Sequence(
                                                               datasets.Value("uint8"))),
                                                           "low": datasets.Image()})).save_to_disk(tmp_path / "saved")
    expected = torch.zeros(8, 8)
    expected[2:6, 0:4] = 1
    for column in ("mask", "m01"):
        ds = _hf(tmp_path, f"data.mask_column={column}")
        image, label, mask = ds[0]
        assert ds.condition == "masks" and label == -1 and mask.shape == (1, 8, 8)
        assert torch.equal(mask[0], expected) and torch.equal((image[0] > 0).float(), expected)
    ds = _hf(tmp_path, "data.mask_column=mask")
    with pytest.raises(DataError, match=r"saved\[1\]\.mask is 16x12 but .*saved\[1\]\.image is 48x32"):
        ds[1]
    with pytest.raises(DataError, match=r"saved\[2\]\.mask has values other than 0/255 or 0/1 \(e\.g\. 128\)"):
        ds[2]
    ds = _hf(tmp_path, "data.cond_column=low")
    image, label, cond = ds[2]
    assert ds.condition == "conds" and cond.shape == (1, 8, 8) and (cond > 0.99).all()
    assert len(_hf(tmp_path)[0]) == 2                                       # no condition column: (image, label)
    with pytest.raises(DataError, match=r"no column 'masks' \(columns: image, mask, m01, low\); set data.mask_column"):
        _hf(tmp_path, "data.mask_column=masks")
    with pytest.raises(DataError, match=r"cond_column and data.mask_column are both set .*keep one"):
        _hf(tmp_path, "data.mask_column=mask", "data.cond_column=low")
    # before any compute, as a paired folder's: strict names the first bad row, skip drops both and counts them
    ds = _hf(tmp_path, "data.mask_column=mask")
    bad = ds.preflight()
    assert [row for row, _ in bad] == [f"{tmp_path / 'saved'}[1]", f"{tmp_path / 'saved'}[2]"]
    with pytest.raises(DataError, match=r"2 unreadable image\(s\) under .*saved, first .*saved\[1\]\.mask is 16x12"):
        apply_bad_image_policy(ds, bad, "strict")
    warned = []
    apply_bad_image_policy(ds, bad, "skip", warn=warned.append)
    assert len(ds) == 1 and torch.equal(ds[0][2][0], expected) and "skipping 2" in warned[0]
    saved = tmp_path / "saved"                                              # 48x32 rows, a model of 8x8
    assert warned[1:] == [f"note: 1 of 1 images under dataset '{saved}' are not 8x8: each is resized to cover 8x8 "
                          f"and center-cropped (the first: {saved}[0], 48x32)"]
    assert _hf(tmp_path).preflight() == []                                  # no condition: rows read as trained on


# ------------------------------------------------------------------------------------------ holdout

def test_split_holdout_is_fixed_disjoint_and_keeps_what_training_reads(tmp_path):
    ds = build_dataset(load_config(None, []).data, 16, 1)                   # the embedded digits: 1,797, 10 classes
    train, held = split_holdout(ds, 100)
    assert (len(train), len(held)) == (1697, 100) and train.num_classes == held.num_classes == 10
    assert sorted(set(train.indices) | set(held.indices)) == list(range(len(ds)))
    assert not set(train.indices) & set(held.indices) and held.indices == sorted(held.indices)
    torch.manual_seed(123)                                                  # the global seed plays no part
    again_train, again = split_holdout(build_dataset(load_config(None, []).data, 16, 1), 100)
    assert again.indices == held.indices and again_train.indices == train.indices
    assert torch.equal(held[0][0], ds[held.indices[0]][0]) and held[0][1] == ds[held.indices[0]][1]
    assert set(split_holdout(ds, 10)[1].indices) <= set(held.indices)      # first n of one permutation: nested
    assert split_holdout(ds, 0) == (ds, None)
    for n in (len(ds), len(ds) + 5, -1):
        with pytest.raises(DataError, match=rf"data.holdout={n} but the dataset has 1797 images"):
            split_holdout(ds, n)
    _pair(tmp_path, name="a")
    _pair(tmp_path, name="b")
    train, held = split_holdout(_build(tmp_path), 1)
    assert held.condition == train.condition == "masks" and held.root == tmp_path and len(held[0]) == 3
