"""The segmentation loss table: properties of ce, dice_ce and unet_weighted_ce on binary and multi-class masks;
the scores (Dice, IoU, 95 % Hausdorff) of predicted masks."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffunet.tasks.segmentation import LOSSES, segmentation_loss, soft_dice


def masks(classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (3, 1, 12, 10), generator=g)


def logits_of(target, confidence):
    """Logits that put ``confidence`` on the true class of every pixel (the others at 0)."""
    return F.one_hot(target[:, 0], 3 if int(target.max()) > 1 else 2).permute(0, 3, 1, 2).float() * confidence


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("classes", [2, 3])
def test_better_predictions_have_lower_loss(name, classes):
    target = masks(classes)
    weight = torch.rand(3, 1, 12, 10) + 0.5
    losses = [float(segmentation_loss(name, logits_of(target, c), target, weight)) for c in (0.0, 1.0, 4.0, 12.0)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.02 * losses[0] + 1e-3
    wrong = float(segmentation_loss(name, -logits_of(target, 4.0), target, weight))
    assert wrong > losses[0]


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_reach_the_logits(name):
    target = masks()
    logits = torch.zeros(3, 2, 12, 10, requires_grad=True)
    segmentation_loss(name, logits, target, torch.ones(3, 1, 12, 10)).backward()
    assert logits.grad.abs().sum() > 0


def test_weighted_ce_with_unit_weights_is_ce_and_weights_scale_pixels():
    target, logits = masks(), torch.randn(3, 2, 12, 10)
    ones = torch.ones(3, 1, 12, 10)
    torch.testing.assert_close(segmentation_loss("unet_weighted_ce", logits, target, ones),
                               segmentation_loss("ce", logits, target))
    torch.testing.assert_close(segmentation_loss("unet_weighted_ce", logits, target, 3 * ones),
                               3 * segmentation_loss("ce", logits, target))
    heavy = ones.clone()
    heavy[..., :2, :] = 10                                          # a "border" the paper's map up-weights
    per_pixel = F.cross_entropy(logits, target[:, 0], reduction="none")
    torch.testing.assert_close(segmentation_loss("unet_weighted_ce", logits, target, heavy),
                               (per_pixel * heavy[:, 0]).mean())


def test_soft_dice_is_zero_for_a_perfect_mask_and_ignores_the_background():
    target = masks()[:, 0]
    assert float(soft_dice(logits_of(target[:, None], 50.0), target)) < 1e-4
    # all background predicted: foreground Dice 0, whatever the background agreement
    all_background = torch.zeros(3, 2, 12, 10)
    all_background[:, 0] = 50
    assert float(soft_dice(all_background, target)) > 0.99


def test_bad_inputs_are_one_line_each():
    target = masks()
    with pytest.raises(ValueError, match="segmentation loss"):
        segmentation_loss("dice", torch.zeros(3, 2, 12, 10), target)
    with pytest.raises(ValueError, match="needs the weight map"):
        segmentation_loss("unet_weighted_ce", torch.zeros(3, 2, 12, 10), target)
    with pytest.raises(ValueError, match="at least 2 output channels .*model.out_channels=2"):
        segmentation_loss("ce", torch.zeros(3, 1, 12, 10), target)
    with pytest.raises(ValueError, match=r"mask ids must be in 0..1 for a 2-class output, got 0..2"):
        segmentation_loss("ce", torch.zeros(3, 2, 12, 10), masks(3))


# ---------------------------------------------------------------------------------------------- scores

def disc(center, radius=5, size=(32, 32)):
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    return ((yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2).long()


def test_scores_of_a_perfect_and_a_shifted_mask():
    from diffunet.tasks.segmentation import segmentation_scores

    truth = torch.stack([disc((12, 12)), disc((20, 15))])
    perfect = segmentation_scores(truth, truth)
    assert perfect["dice"] == pytest.approx(1) and perfect["iou"] == pytest.approx(1) and perfect["hd95"] == 0
    shifted = segmentation_scores(torch.stack([disc((12, 15)), disc((20, 18))]), truth)     # 3 px to the right
    assert 0.5 < shifted["dice"] < 0.8 and shifted["iou"] < shifted["dice"]
    assert 2.5 <= shifted["hd95"] <= 3.0
    # Dice as torchmetrics' functional form gives it, IoU as |A & B| / |A | B|
    a, b = disc((12, 15)), disc((12, 12))
    one = segmentation_scores(a[None], b[None])
    assert one["dice"] == pytest.approx(float(2 * (a & b).sum() / (a.sum() + b.sum())), abs=1e-6)
    assert one["iou"] == pytest.approx(float((a & b).sum() / (a | b).sum()), abs=1e-6)


def test_hd95_ignores_a_few_stray_pixels_that_the_full_hausdorff_counts():
    from diffunet.tasks.segmentation import hd95

    truth = disc((16, 16), radius=8)
    pred = truth.clone()
    pred[0, 0] = 1                                                  # one stray pixel far away
    assert hd95(pred, truth) < 2
    assert math.isnan(hd95(torch.zeros_like(truth), truth))            # an empty mask has no distance
