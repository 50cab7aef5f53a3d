"""The procedural cells of segmentation: deterministic, exact masks, touching cells, the paper's weight map."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from diffunet import cells as cells_command
from diffunet.data import cells, seg_masks


@pytest.fixture(scope="module")
def sample():
    return cells.make_cells((96, 128), seed=3)


def disc(shape, cy, cx, r):
    y, x = np.ogrid[:shape[0], :shape[1]]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def test_same_seed_same_arrays_other_seed_differs():
    a, b, c = cells.make_cells(64, seed=1), cells.make_cells(64, seed=1), cells.make_cells(64, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_ranges_dtypes_and_contiguous_ids(sample):
    image, instances = sample
    assert image.shape == instances.shape == (96, 128)
    assert image.dtype == np.float32 and instances.dtype == np.int32
    assert 0 <= image.min() and image.max() <= 1
    ids = np.unique(instances)
    assert ids[0] == 0 and np.array_equal(ids, np.arange(ids.size)) and ids.size > 10


def test_each_cell_is_one_blob_after_occlusion():
    _, instances = cells.make_cells(256, seed=0)
    for i, box in enumerate(ndimage.find_objects(instances), start=1):
        assert ndimage.label(instances[box] == i)[1] == 1, f"cell {i} was cut in two by a later cell"


def test_cells_are_brighter_than_background(sample):
    image, instances = sample
    assert image[instances > 0].mean() > image[instances == 0].mean() + 0.15


def test_many_cells_touch(sample):
    _, instances = sample
    pairs = set()
    for a, b in ((instances[:, :-1], instances[:, 1:]), (instances[:-1], instances[1:])):
        touch = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch], b[touch])}
    touching = {i for p in pairs for i in p}
    assert len(pairs) >= 5 and len(touching) >= 0.3 * instances.max()


def test_cells_have_absolute_pixel_sizes():
    for size in (64, 256):
        _, instances = cells.make_cells(size, seed=0)
        areas = np.bincount(instances.ravel())[1:]
        assert 20 < np.median(areas) < np.pi * 14 ** 2
    assert cells.make_cells(256, seed=0)[1].max() > 8 * cells.make_cells(64, seed=0)[1].max()


def test_weight_map_peaks_in_the_gap_between_two_close_cells():
    shape, w0 = (40, 80), 10.0
    instances = np.zeros(shape, np.int32)
    instances[disc(shape, 20, 20, 8)] = 1
    instances[disc(shape, 20, 39, 8)] = 2                  # edges at x = 28 and x = 31: a 2 px gap
    w = seg_masks.weight_map(instances, w0=w0, sigma=5.0)
    gap, far = w[20, 29], w[2, 78]
    assert instances[20, 29] == 0 and gap > w0 / 2 and gap > far + w0 / 2
    background = instances == 0
    assert gap == pytest.approx(w[background].max(), rel=0.02)
    assert w.dtype == np.float32 and w.shape == shape


def test_weight_map_matches_the_formula_with_full_distance_transforms():
    _, instances = cells.make_cells(96, seed=4)
    d = np.sort([ndimage.distance_transform_edt(instances != i) for i in range(1, instances.max() + 1)], axis=0)
    fg = instances > 0
    w_c = np.where(fg, 0.5 / fg.mean(), 0.5 / (1 - fg.mean()))
    expected = w_c + np.where(fg, 0, 10 * np.exp(-(d[0] + d[1]) ** 2 / 50))
    assert np.abs(seg_masks.weight_map(instances) - expected).max() < 1e-3


def test_weight_map_class_balance_and_no_border_term_for_one_cell():
    shape = (32, 32)
    instances = disc(shape, 16, 16, 6).astype(np.int32)
    w = seg_masks.weight_map(instances)
    assert w.mean() == pytest.approx(1.0, abs=1e-5)       # one cell: only w_c, whose mean is 1
    f = instances.mean()
    assert w[16, 16] == pytest.approx(1 / (2 * f)) and w[0, 0] == pytest.approx(1 / (2 * (1 - f)))
    assert np.allclose(seg_masks.weight_map(np.zeros(shape, np.int32)), 1.0)


def test_weight_map_w_c_mean_is_one_on_cells(sample):
    _, instances = sample
    w = seg_masks.weight_map(instances, w0=0.0)
    assert w.mean() == pytest.approx(1.0, abs=1e-5)
    assert seg_masks.weight_map(instances).max() > 5


def test_count_objects_on_hand_made_masks():
    shape = (30, 60)
    assert seg_masks.count_objects(np.zeros(shape)) == 0
    two = disc(shape, 15, 15, 6) | disc(shape, 15, 40, 6)
    assert seg_masks.count_objects(two) == 2
    assert seg_masks.count_objects(disc(shape, 15, 15, 8) | disc(shape, 15, 28, 8)) == 1     # overlapping: one blob
    corner = np.zeros((4, 4), bool)
    corner[0, 0] = corner[1, 1] = True
    assert seg_masks.count_objects(corner) == 2                                                # 4-connectivity


def test_count_objects_counts_the_instances_when_separated(sample):
    _, instances = sample
    eroded = np.zeros(instances.shape, bool)
    for i in range(1, instances.max() + 1):       # each cell shrunk by a pixel: touching cells come apart
        eroded |= ndimage.binary_erosion(instances == i)
    assert seg_masks.count_objects(instances > 0) < instances.max() - 5
    assert seg_masks.count_objects(eroded) >= instances.max() - 2     # a thin cell may erode away or in two


def test_arrays_and_dataset():
    images, masks, weights = cells.cells_arrays(20, crop=32, seed=0, source=64)
    assert images.shape == masks.shape == weights.shape == (20, 1, 32, 32)
    assert images.dtype == masks.dtype == weights.dtype == np.float32
    assert set(np.unique(masks)) == {0.0, 1.0} and 0 <= images.min() and images.max() <= 1
    assert (weights > 0).all() and not np.array_equal(images[0], images[1])
    again = cells.cells_arrays(20, crop=32, seed=0, source=64)
    assert all(np.array_equal(a, b) for a, b in zip((images, masks, weights), again))
    ds = cells.cells_dataset(6, crop=32, seed=0, source=64)
    x, label, mask, weight = ds[2]
    assert len(ds) == 6 and label == -1 and x.shape == mask.shape == weight.shape == (1, 32, 32)
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(mask, torch.from_numpy(masks[2])) and torch.allclose(x, torch.from_numpy(images[2]) * 2 - 1)


def test_masks_equal_carved_instances_in_crops():
    image, instances = cells.make_cells(64, seed=(5, 1, 0))
    instances = seg_masks.carve_borders(instances)                 # touching cells parted, as the crops' masks are
    images, masks, weights = cells.cells_arrays(4, crop=32, seed=5, source=64, stride=32)
    assert np.array_equal(images[3, 0], image[32:, 32:]) and np.array_equal(masks[3, 0], instances[32:, 32:] > 0)
    assert np.array_equal(weights[3, 0], seg_masks.weight_map(instances[32:, 32:]))
    images, masks, _ = cells.cells_arrays(10, crop=32, seed=5, source=64)      # stride 16: 3 x 3 crops an image
    assert np.array_equal(images[5, 0], image[16:48, 32:]) and np.array_equal(masks[8, 0], instances[32:, 32:] > 0)
    assert not np.array_equal(images[9, 0], image[:32, :32])                   # the next image, seeded (5, 1, 1)


def test_test_images_are_held_out():
    pairs = cells.test_images(n=2, size=128, seed=0)
    assert len(pairs) == 2 and pairs[0][0].shape == pairs[0][1].shape == (128, 128)
    assert not np.array_equal(pairs[0][0], pairs[1][0])
    train, _ = cells.make_cells(128, seed=(0, 1, 0))
    assert not np.array_equal(pairs[0][0], train) and not np.array_equal(pairs[0][0], cells.make_cells(128, seed=0)[0])
    images, _, _ = cells.cells_arrays(1, crop=64, seed=0)
    assert not np.array_equal(images[0, 0], cells.make_cells(256, seed=0)[0][:64, :64])   # nor a plain seed


def test_carved_borders_part_touching_cells_by_one_pixel(sample):
    _, instances = sample
    carved = seg_masks.carve_borders(instances)
    for a, b in ((carved[:, :-1], carved[:, 1:]), (carved[:-1], carved[1:])):
        assert not ((a > 0) & (b > 0) & (a != b)).any()              # no two cells touch any more
    lost = (instances > 0) & (carved == 0)
    assert lost.any() and (carved[carved > 0] == instances[carved > 0]).all()
    assert lost.sum() < 0.1 * (instances > 0).sum()                  # a border, not an erosion
    # every carved pixel had a lower-id neighbour: only the higher id of a touching pair gives a pixel up
    padded = np.pad(instances, 1)
    r, c = np.nonzero(lost)
    neighbours = np.stack([padded[r, c + 1], padded[r + 2, c + 1], padded[r + 1, c], padded[r + 1, c + 2]])
    assert (((neighbours > 0) & (neighbours < instances[r, c])).any(0)).all()
    assert seg_masks.count_objects(carved > 0) >= instances.max() - 2 > seg_masks.count_objects(instances > 0)


def test_the_cells_command_writes_the_test_images_as_paired_data(tmp_path, capsys):
    from PIL import Image

    from diffunet.config import load_config
    from diffunet.data import build_dataset

    out = tmp_path / "cells_test"
    assert cells_command.main([str(out), "--num", "2", "--size", "64", "--seed", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote 2 cell image(s) of 64x64 to {out / 'images'} and their masks (0/255) to {out / 'masks'}"]
    names = ["000000.png", "000001.png"]
    for kind in ("images", "masks"):
        assert sorted(p.name for p in (out / kind).iterdir()) == names          # pairs by name
    for name, (image, instances) in zip(names, cells.test_images(2, 64, seed=1)):
        written, mask = (np.asarray(Image.open(out / kind / name)) for kind in ("images", "masks"))
        assert np.array_equal(written, np.round(image * 255).astype(np.uint8))
        assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask > 0, instances > 0)
    ds = build_dataset(load_config(None, [f"data.source={out}"]).data, 64, 1, mask_classes=2)
    assert len(ds) == 2 and ds.preflight() == []                            # what segmentation training reads
    with pytest.raises(SystemExit):
        cells_command.main([str(tmp_path / "small"), "--size", "8"])
    assert capsys.readouterr().err.startswith("python -m diffunet.cells: error: --size 8: give at least 28")
