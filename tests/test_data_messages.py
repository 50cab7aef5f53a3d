"""What a first data folder is told: the named sources, what a folder without images holds, and images that are
resized to the model's size."""

import numpy as np
import pytest
from PIL import Image

from diffunet.config import load_config
from diffunet.data import SOURCES, DataError, apply_bad_image_policy, build_dataset
from diffunet.training.loop import Trainer

READ = ".bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp"


def _data(source, *overrides):
    return load_config(None, [f"data.source={source}", *overrides]).data


def test_a_missing_folder_lists_every_named_source(tmp_path):
    assert "cells" in SOURCES                               # the source the message once left out
    with pytest.raises(DataError) as e:
        build_dataset(_data(tmp_path / "nope"), 16, 1)
    names = " or ".join([", ".join(repr(name) for name in SOURCES), "'hf:<name>'"])
    assert str(e.value) == f"data.source {tmp_path / 'nope'} is not a folder (nor {names})"
    with pytest.raises(DataError, match="data.source=digits has no masks to segment; use data.source=cells, "):
        build_dataset(_data("digits"), 16, 1, mask_classes=2)


def test_a_folder_without_images_says_what_it_holds_and_what_is_read(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.zeros((16, 16)))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as e:
        build_dataset(_data(tmp_path), 16, 1)
    assert str(e.value) == (f"no images ({READ}) found under {tmp_path}: found 3 .npy files, 1 .txt file; save them "
                            f"in one of those formats (e.g. PNG)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"found under .*empty: the folder is empty$"):
        build_dataset(_data(tmp_path / "empty"), 16, 1)
    paired = tmp_path / "paired"
    for kind in ("images", "masks"):
        (paired / kind).mkdir(parents=True)
    Image.new("L", (16, 16)).save(paired / "images" / "a.png")
    np.save(paired / "masks" / "a.npy", np.zeros((16, 16)))
    with pytest.raises(DataError) as e:
        build_dataset(_data(paired), 16, 1)
    assert str(e.value).startswith(f"no images ({READ}) found under {paired / 'masks'}: found 1 .npy file; ")


def _folder(root, sizes):
    root.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("L", (w, h), 255).save(root / f"{i}.png")
    return root


def test_images_of_another_size_are_noted_once_with_the_count(tmp_path):
    root = _folder(tmp_path / "imgs", [(16, 16), (20, 24), (16, 16), (32, 32)])
    ds = build_dataset(_data(root), 16, 1)
    notes = []
    apply_bad_image_policy(ds, ds.preflight(), "strict", warn=notes.append)
    assert notes == [f"note: 2 of 4 images under {root} are not 16x16: each is resized to cover 16x16 and "
                     f"center-cropped (the first: 1.png, 20x24)"]
    fitting = build_dataset(_data(_folder(tmp_path / "fit", [(16, 16)] * 2)), 16, 1)
    notes = []
    apply_bad_image_policy(fitting, fitting.preflight(), "strict", warn=notes.append)
    assert notes == []
    paired = tmp_path / "paired"
    _folder(paired / "images", [(16, 16), (24, 20)])
    _folder(paired / "masks", [(16, 16), (24, 20)])
    ds = build_dataset(_data(paired), 16, 1, mask_classes=2)
    apply_bad_image_policy(ds, ds.preflight(), "strict", warn=notes.append)
    assert notes == [f"note: 1 of 2 images under {paired} are not 16x16: each is resized to cover 16x16 and "
                     f"center-cropped (the first: images/1.png, 24x20)"]


def test_training_prints_the_size_note(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", [(16, 16), (8, 8), (16, 16), (16, 16)])
    Trainer(load_config("digits", [f"data.source={root}", f"output_dir={tmp_path / 'run'}", "model.num_classes=null",
                                   "train.batch_size=2", "model.base_channels=8", "model.channel_mult=[1,2]",
                                   "model.norm_groups=4"]))
    out = capsys.readouterr().out
    assert out.count("note: 1 of 4 images under") == 1 and "(the first: 1.png, 8x8)" in out
