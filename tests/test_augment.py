"""EDM's non-leaky augmentation: the ops and their labels, the model's augmentation input, the config keys, a
tiny augmented run, data.subset, and the memorization measure."""

import pytest
import torch

from conftest import tiny
from diffunet.data.augment import AUGMENT_DIM, COLUMNS, OPS, augment, transform
from diffunet.config import ConfigError, load_config
from diffunet.data import build_dataset, take_subset, DataError
from diffunet.metrics.memorization import memorization
from diffunet.sampling import generate, load_model
from diffunet.tasks import TASKS
from diffunet.training.loop import train, validate

FAST = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "train.batch_size=8",
        "train.log_every=2", "train.warmup_steps=2", "sample.num_images=4", "sample.steps=2",
        "train.sample_every=100", "train.checkpoint_every=100"]


def images(n=8, c=1, h=16, w=16):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


def only(name, values, n=None):
    """Labels (len(values), AUGMENT_DIM) with op ``name`` set to ``values`` and every other op off."""
    values = torch.as_tensor(values, dtype=torch.float32).reshape(len(values), -1)
    labels = torch.zeros(len(values), AUGMENT_DIM)
    labels[:, COLUMNS[name]] = values
    return labels


# ---------------------------------------------------------------------------------------------- the ops

def test_labels_have_a_fixed_width_for_every_channel_count():
    assert AUGMENT_DIM == sum(c for c, _ in OPS.values()) == 9
    for c in (1, 3, 4):
        assert augment(images(c=c), 0.5)[1].shape == (8, AUGMENT_DIM)


def test_p_zero_leaves_every_image_unchanged_with_zero_labels():
    x = images(64)
    y, labels = augment(x, 0.0)
    assert torch.equal(y, x) and not labels.any()


def test_zero_labels_are_the_identity_and_only_zero_labels_are():
    x = images(256)
    assert torch.equal(transform(x, torch.zeros(256, AUGMENT_DIM)), x)
    y, labels = augment(x, 0.3, torch.Generator().manual_seed(0))
    touched = labels.ne(0).any(1)
    assert 0 < touched.sum() < 256
    assert torch.equal(y[~touched], x[~touched])                  # zero labels: exactly as it was
    for name, cols in COLUMNS.items():                            # each op alone: a changed image where it applied
        alone = torch.zeros_like(labels)
        alone[:, cols] = labels[:, cols]
        changed = (transform(x, alone) != x).flatten(1).any(1)
        assert torch.equal(changed, alone.ne(0).any(1)), name


def test_labels_are_non_zero_exactly_where_an_op_applied():
    n, p = 2000, 0.3
    _, labels = augment(images(n), p, torch.Generator().manual_seed(0))
    for name, cols in COLUMNS.items():
        applied = labels[:, cols].ne(0).any(1).float().mean().item()
        assert applied == pytest.approx(p, abs=0.04), name       # each op on its own coin
    assert labels[:, COLUMNS["xflip"]].unique().tolist() == [0.0, 1.0]
    rot = labels[:, COLUMNS["rot90"]]
    assert {tuple(r) for r in rot.tolist()} == {(0.0, 0.0), (-1.0, 1.0), (-2.0, 0.0), (-1.0, -1.0)}
    shift = labels[:, COLUMNS["translate"]] * 16                  # integer pixels, at most 16 / 8 = 2
    assert torch.equal(shift, shift.round()) and shift.abs().max() == 2


def test_flips_twice_are_the_identity_and_match_torch():
    x = images()
    for name, dim in (("xflip", -1), ("yflip", -2)):
        once = transform(x, only(name, [1.0] * 8))
        assert torch.equal(once, x.flip(dim))
        assert torch.equal(transform(once, only(name, [1.0] * 8)), x)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_quarter_turns_are_torch_rot90(k):
    x = images(3, c=3)
    labels = only("rot90", [[[-1.0, 1.0], [-2.0, 0.0], [-1.0, -1.0]][k - 1]] * 3)
    assert torch.equal(transform(x, labels), torch.rot90(x, k, dims=(-2, -1)))


def test_integer_shifts_move_pixels_exactly_and_reflect_at_the_border():
    x = images(2)
    y = transform(x, only("translate", [[2 / 16, 0.0], [0.0, -1 / 16]]))
    assert torch.equal(y[0, ..., 2:], x[0, ..., :-2])             # right by 2
    assert torch.equal(y[0, ..., :2], x[0, ..., :2].flip(-1))     # the border mirrored in
    assert torch.equal(y[1, :, :-1], x[1, :, 1:])                 # up by 1


def test_non_square_images_get_no_quarter_turns():
    _, labels = augment(images(64, h=16, w=8), 1.0)
    assert not labels[:, COLUMNS["rot90"]].any() and labels[:, COLUMNS["xflip"]].all()


def test_scale_and_colour_do_what_their_labels_say():
    x = images(2)
    bright = transform(x, only("brightness", [0.1, -0.2]))
    torch.testing.assert_close(bright, x + torch.tensor([0.1, -0.2])[:, None, None, None])
    contrast = transform(x, only("contrast", [1.0, -1.0]))
    torch.testing.assert_close(contrast, x * torch.tensor([2.0, 0.5])[:, None, None, None])
    flat = torch.full((1, 1, 16, 16), 0.3)                        # scaling a constant image changes nothing
    torch.testing.assert_close(transform(flat, only("scale", [0.3])), flat)
    assert not torch.allclose(transform(x, only("scale", [0.3, -0.3])), x)


def test_a_generator_makes_it_reproducible():
    x = images(32)
    a = augment(x, 0.5, torch.Generator().manual_seed(3))
    b = augment(x, 0.5, torch.Generator().manual_seed(3))
    c = augment(x, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_bad_labels_and_p_are_one_line_errors():
    with pytest.raises(ValueError, match=r"augment labels must be \(B, 9\)"):
        transform(images(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="p must be in"):
        augment(images(2), 1.5)


# ---------------------------------------------------------------------------------------------- the model

def test_augment_dim_zero_adds_no_module():
    plain, other = tiny(), tiny(augment_dim=0)
    assert plain.map_augment is None and set(plain.state_dict()) == set(other.state_dict())
    assert not any("augment" in k for k in plain.state_dict())


def test_zero_or_no_labels_give_the_model_without_the_map():
    torch.manual_seed(0)
    model = tiny(augment_dim=AUGMENT_DIM, zero_init=False, num_classes=3).eval()
    torch.nn.init.normal_(model.map_augment.weight)               # a trained, non-zero map
    plain = tiny(zero_init=False, num_classes=3).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("map_augment")})
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        want = plain(x, t, y).sample
        torch.testing.assert_close(model(x, t, y).sample, want, rtol=0, atol=0)
        torch.testing.assert_close(model(x, t, y, augment_labels=torch.zeros(4, AUGMENT_DIM)).sample, want)
        labels = augment(x, 1.0)[1]
        assert not torch.allclose(model(x, t, y, augment_labels=labels).sample, want)


def test_map_augment_starts_at_zero_and_is_bias_free():
    model = tiny(augment_dim=AUGMENT_DIM)
    assert model.map_augment.bias is None and not model.map_augment.weight.any()
    assert tuple(model.map_augment.weight.shape) == (4 * 8, AUGMENT_DIM)


def test_model_errors_are_one_line():
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"augment_labels must be \(B, augment_dim\) = \(2, 9\), got \(2, 3\)"):
        tiny(augment_dim=AUGMENT_DIM)(x, 1, augment_labels=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="built with augment_dim=0"):
        tiny()(x, 1, augment_labels=torch.zeros(2, AUGMENT_DIM))
    with pytest.raises(ValueError, match="time_condition='none' has no embedding .* set augment_dim=0"):
        tiny(time_condition="none", augment_dim=AUGMENT_DIM)


# ---------------------------------------------------------------------------------------------- config, run

def cfg_of(tmp_path, *overrides):
    return load_config("digits-200-aug", FAST + [f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["train.augment_p=1.0"], r"train.augment_p must be in \[0, 1\) \(got 1.0\)"),
    (["train.augment_p=-0.1"], r"train.augment_p must be in \[0, 1\)"),
    (["train.augment_p=0.12", "model.augment_dim=0"], "train.augment_p=0.12 needs model.augment_dim=9 "),
    (["task=super_resolution", "model.cond_channels=1"], "train.augment_p=0.15 is for task=generate"),
])
def test_augment_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg_of(tmp_path, *overrides))


def test_generate_batches_carry_the_labels_of_their_augmentation(tmp_path):
    cfg = cfg_of(tmp_path, "train.augment_p=0.5")
    model, dataset = validate(cfg)
    x = torch.stack([dataset[i][0] for i in range(16)])
    y = torch.tensor([dataset[i][1] for i in range(16)])
    x0, keywords = TASKS["generate"].training_batch((x, y), model, cfg)
    labels = keywords["augment_labels"]
    assert labels.shape == (16, AUGMENT_DIM) and set(keywords) == {"class_labels", "augment_labels"}
    touched = labels.ne(0).any(1)
    assert touched.any() and torch.equal(x0[~touched], x[~touched])
    plain = load_config("digits", FAST)
    assert "augment_labels" not in TASKS["generate"].training_batch((x, y), validate(plain)[0], plain)[1]


def test_a_tiny_augmented_run_trains_and_its_pipeline_samples(tmp_path, one_thread):
    out = train(cfg_of(tmp_path, "train.max_steps=6"))   # the map gets gradients once the zeroed convs moved
    model, scheduler = load_model(out)
    assert model.config.augment_dim == AUGMENT_DIM and model.map_augment.weight.any()   # it learned from labels
    images = generate(model, scheduler, 2, steps=2, seed=0, class_labels=[1, 2])      # sampling: no labels
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


# ---------------------------------------------------------------------------------------------- data.subset

def test_subset_picks_a_fixed_n_images():
    full = build_dataset(load_config("digits").data, (16, 16), 1)
    a, b = take_subset(full, 200), take_subset(full, 200)
    assert len(a) == 200 and a.indices == b.indices == sorted(a.indices)
    assert a.indices != list(range(200)) and a.num_classes == 10   # random, not the first 200
    assert take_subset(full, 0) is full
    with pytest.raises(DataError, match=f"data.subset=5000 but the dataset has {len(full)} images"):
        take_subset(full, 5000)


def test_a_run_trains_on_the_subset(tmp_path, one_thread):
    cfg = cfg_of(tmp_path, "train.max_steps=1", "data.holdout=20")
    from diffunet.training.loop import Trainer
    trainer = Trainer(cfg)
    assert len(trainer.dataset) == 180 and len(trainer.held) == 20


# ---------------------------------------------------------------------------------------------- memorization

def test_copies_of_training_images_are_all_memorized_and_far_samples_none():
    train_images = images(100)
    copies = memorization(train_images[:30], train_images)
    assert copies["memorized"] == 1.0 and copies["median_distance"] == 0.0 and copies["threshold"] > 0
    far = memorization(train_images[:30] + 10, train_images)
    assert far["memorized"] == 0.0 and far["median_distance"] > far["threshold"]


def test_memorization_by_hand():
    train_points = torch.tensor([0.0, 1.0, 3.0, 6.0, 10.0])[:, None]        # nearest other: 1, 1, 2, 3, 4
    samples = torch.tensor([0.5, 4.5, 8.0, 20.0])[:, None]                 # nearest train: 0.5, 1.5, 2, 10
    out = memorization(samples, train_points, quantile=0.5)
    assert out["threshold"] == 2.0                                          # the median of 1, 1, 2, 3, 4
    assert out["memorized"] == 0.5                                          # 0.5 and 1.5; 2 is not nearer
    assert out["median_distance"] == 1.75
    assert memorization(samples, train_points)["threshold"] == 1.0          # the 5th percentile


def test_memorization_errors():
    with pytest.raises(ValueError, match="same size and layout"):
        memorization(torch.zeros(2, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2"):
        memorization(torch.zeros(2, 4), torch.zeros(1, 4))
