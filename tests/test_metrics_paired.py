"""diffunet.metrics.paired_scores and python -m diffunet.evaluate --paired: PSNR / SSIM equal torchmetrics',
their properties (identical images, noise, the mask), class accuracy, LPIPS or one line on how to get it, and the
pairing of output files with their truth."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.image.psnr import PeakSignalNoiseRatio
from torchmetrics.image.ssim import StructuralSimilarityIndexMeasure

from diffunet.metrics import paired as metrics
from diffunet.data import digits_arrays, read_image, write_image
from diffunet.evaluate import main
from diffunet.metrics.paired import PSNR_CAP, ssim_kernel
from diffunet.metrics import classify, digits_extractor, extract, paired_scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return digits_arrays(16)


@pytest.fixture(autouse=True)
def _no_lpips_weights(tmp_path, monkeypatch):
    """An empty torch hub cache: LPIPS is unavailable whatever is installed, unless a test says otherwise."""
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield hub
    torch.hub.set_dir(hub)


def noisy(images, std, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, std, images.shape), 0, 255).round().astype(np.uint8)


def put(image, path):
    """Write one (H, W, 1) uint8 image, making its folder; a .jpg is a real (lossy) JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        Image.fromarray(image[..., 0]).save(path, "JPEG")
    else:
        write_image(image, path)


def nchw(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("channels", [1, 3])
def test_psnr_ssim_equal_torchmetrics(channels):
    truth = np.random.default_rng(1).integers(0, 256, (12, 16, 16, channels), dtype=np.uint8)
    out = noisy(truth, 30)
    s = paired_scores(out, truth, device="cpu", lpips=False)
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="none", dim=(1, 2, 3))(nchw(out), nchw(truth))
    assert s["psnr"] == pytest.approx(psnr.mean().item(), rel=1e-6)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(nchw(out), nchw(truth))      # the default 11x11 window
    assert s["ssim"] == pytest.approx(ssim.item(), rel=1e-6)
    # torch (N, C, H, W) and numpy (N, H, W, C) are the same images; batches do not change the numbers
    as_torch = paired_scores(torch.from_numpy(out).permute(0, 3, 1, 2), torch.from_numpy(truth).permute(0, 3, 1, 2),
                             device="cpu", lpips=False, batch_size=5)
    assert as_torch == pytest.approx(s, rel=1e-6)


def test_identical_at_the_cap_and_more_noise_scores_lower(digits):
    images = digits[0][:64]
    same = paired_scores(images, images, mask=np.ones(images.shape[:3], bool), device="cpu", lpips=False)
    assert same["psnr"] == same["psnr_masked"] == PSNR_CAP and same["ssim"] == pytest.approx(1, abs=1e-6)
    levels = [paired_scores(noisy(images, std), images, device="cpu", lpips=False) for std in (5, 20, 60)]
    assert levels[0]["psnr"] > levels[1]["psnr"] > levels[2]["psnr"]
    assert levels[0]["ssim"] > levels[1]["ssim"] > levels[2]["ssim"]
    assert 35 < levels[0]["psnr"] < 40              # noise of 5 levels out of 255: 20 log10(255 / 5) = 34 dB + clipping


def test_masked_psnr_sees_only_the_mask(digits):
    images = digits[0][:32]
    mask = np.zeros(images.shape, bool)
    mask[:, 4:12, 2:10] = True
    out = noisy(images, 25)
    s = paired_scores(out, images, mask=mask, device="cpu", lpips=False)
    outside = np.where(mask, out, 255 - images)                  # other pixels changed: psnr moves, psnr_masked not
    t = paired_scores(outside, images, mask=mask, device="cpu", lpips=False)
    assert t["psnr_masked"] == s["psnr_masked"] and t["psnr"] < s["psnr"] - 3
    # equal to torchmetrics' PSNR over each image's masked pixels
    direct = [PeakSignalNoiseRatio(data_range=1.0)(nchw(out[i:i + 1])[nchw(mask[i:i + 1]) > 0],
                                                   nchw(images[i:i + 1])[nchw(mask[i:i + 1]) > 0]) for i in range(32)]
    assert s["psnr_masked"] == pytest.approx(torch.stack(direct).mean().item(), rel=1e-5)
    # 0/255 masks and (N, 1, H, W) torch masks mean the same; an empty mask is left out, and said so
    as_255 = paired_scores(out, images, mask=torch.from_numpy(mask * 255).permute(0, 3, 1, 2), device="cpu", lpips=False)
    assert as_255["psnr_masked"] == s["psnr_masked"]
    mask[0] = False
    empty = paired_scores(out, images, mask=mask, device="cpu", lpips=False)
    assert empty["psnr_masked"] == pytest.approx(torch.stack(direct[1:]).mean().item(), rel=1e-5)
    assert empty["notes"] == ["psnr_masked: 1 of 32 images have an empty mask and are left out"]
    with pytest.raises(ValueError, match="mask values must be 0/1"):
        paired_scores(out, images, mask=mask * 2, device="cpu", lpips=False)


@pytest.mark.parametrize("size, window", [(3, 3), (4, 3), (8, 7), (11, 11), (16, 11), (64, 11)])
def test_ssim_window_fits_small_images(size, window):
    k, sigma = ssim_kernel(size, size)
    assert k == window and int(3.5 * sigma + 0.5) * 2 + 1 == k           # torchmetrics sizes its window from sigma
    assert sigma == (1.5 if size >= 11 else pytest.approx(1.5 * k / 11))
    truth = np.random.default_rng(0).integers(0, 256, (4, size, size, 1), dtype=np.uint8)
    assert paired_scores(truth, truth, device="cpu", lpips=False)["ssim"] == pytest.approx(1, abs=1e-6)
    assert paired_scores(noisy(truth, 40), truth, device="cpu", lpips=False)["ssim"] < 0.95


def test_accuracy_under_the_digits_classifier(digits):
    images, labels = digits
    images, labels = images[:300], labels[:300]
    predicted = classify(images)
    assert torch.equal(predicted, extract(digits_extractor(), images)[1].argmax(1))
    assert torch.equal(classify(torch.from_numpy(images).permute(0, 3, 1, 2)), predicted)
    assert paired_scores(images, images, labels=labels, device="cpu", lpips=False)["accuracy"] > 0.97
    wrong = paired_scores(images, images, labels=(labels + 1) % 10, device="cpu", lpips=False)["accuracy"]
    assert wrong < 0.05
    with pytest.raises(ValueError, match="need a classifier"):
        paired_scores(images, images, labels=labels, classifier=None, device="cpu")


def test_bad_inputs_one_line():
    a = np.zeros((2, 16, 16, 1), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        paired_scores(a, np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="expected torch.uint8 images"):
        paired_scores(a.astype(np.float32), a)


def test_lpips_unavailable_offline_says_how_to_get_it():
    s = paired_scores(np.zeros((2, 16, 16, 1), np.uint8), np.zeros((2, 16, 16, 1), np.uint8), device="cpu")
    assert "lpips" not in s
    [note] = s["notes"]
    assert note.startswith("lpips: unavailable offline") and "pip install 'diffunet[vision]'" in note
    assert "alexnet-owt-7be5be79.pth" in note and "\n" not in note


def test_lpips_gets_rgb_of_at_least_64_in_unit_range(monkeypatch):
    """What LPIPS is fed, checked without torchvision: a stand-in with torchmetrics' update / compute."""
    seen = []

    class StandIn:
        def update(self, a, b):
            seen.append((a.shape, b.shape, float(a.min()), float(a.max())))

        def compute(self):
            return torch.tensor(0.25)

    monkeypatch.setattr(metrics, "lpips_metric", lambda device: (StandIn(), None))
    gray = np.random.default_rng(0).integers(0, 256, (5, 16, 12, 1), dtype=np.uint8)
    s = paired_scores(gray, gray, device="cpu", batch_size=3)
    assert s["lpips"] == 0.25 and "notes" not in s
    assert [shape for shape, *_ in seen] == [(3, 3, 96, 72), (2, 3, 96, 72)]          # x6: the short side >= 64
    assert all(0 <= lo and hi <= 1 for *_, lo, hi in seen)
    seen.clear()
    paired_scores(np.zeros((2, 64, 80, 3), np.uint8), np.zeros((2, 64, 80, 3), np.uint8), device="cpu")
    assert seen[0][0] == (2, 3, 64, 80)
    two = paired_scores(np.zeros((2, 8, 8, 2), np.uint8), np.zeros((2, 8, 8, 2), np.uint8), device="cpu")
    assert "lpips" not in two and two["notes"] == ["lpips: needs 1- or 3-channel images, got 2"]


def test_lpips_equals_torchmetrics_where_available(_no_lpips_weights, digits):
    pytest.importorskip("torchvision")
    torch.hub.set_dir(_no_lpips_weights)                        # the real cache
    from diffunet.metrics.paired import lpips_metric
    net, note = lpips_metric("cpu")
    if net is None:
        pytest.skip(note)
    images = digits[0][:16]
    s = paired_scores(noisy(images, 30), images, device="cpu")
    assert paired_scores(images, images, device="cpu")["lpips"] < 1e-6 < s["lpips"]
    big = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)    # no upsampling, RGB
    net.update(nchw(noisy(big, 30)), nchw(big))
    assert paired_scores(noisy(big, 30), big, device="cpu")["lpips"] == pytest.approx(net.compute().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- the command

@pytest.fixture
def folders(tmp_path, digits):
    """truth/a/x.png, truth/a/y.jpg, truth/z.png; outputs a/x.png, a/y_0.png, a/y_1.png, a/y_mean.png,
    a/y_std.png, z.png, grid.png; masks by truth name."""
    images = digits[0]
    truth, outputs, masks = tmp_path / "truth", tmp_path / "outputs", tmp_path / "masks"
    for key, image in (("a/x", images[0]), ("a/y", images[1]), ("z", images[2])):
        put(image, truth / f"{key}{'.jpg' if key == 'a/y' else '.png'}")
        m = np.zeros_like(image)
        m[:8] = 255
        put(m, masks / f"{key}.png")
    for i, key in enumerate(("a/x", "a/y_0", "a/y_1", "a/y_mean", "a/y_std", "z", "grid")):
        put(noisy(images[3:4], 10 + 10 * i, seed=i)[0], outputs / f"{key}.png")
    return outputs, truth, masks


def test_cli_pairs_by_name_and_scores_like_paired_scores(folders, capsys):
    outputs, truth, masks = folders
    result = main([str(outputs), str(truth), "--paired", "--mask", str(masks), "--device", "cpu", "--no-lpips",
                   "--json"])
    assert result == json.loads(capsys.readouterr().out)
    assert result["num_images"] == 4 and result["num_truth"] == 3          # x, y_0, y_1, z; mean / std / grid skipped
    order = [("a/x", "a/x"), ("a/y_0", "a/y"), ("a/y_1", "a/y"), ("z", "z")]
    out = np.stack([read_image(outputs / f"{o}.png") for o, _ in order])
    true = np.stack([read_image(next(truth.glob(f"{t}.*"))) for _, t in order])
    mask = np.stack([read_image(masks / f"{t}.png") for _, t in order])
    assert result == dict(paired_scores(out, true, mask=mask, device="cpu", lpips=False), num_truth=3)
    main([str(outputs), str(truth), "--paired", "--device", "cpu"])            # aligned lines, notes one a line
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "psnr" and lines[-1].startswith("notes      lpips: unavailable offline")


def test_cli_unpaired_outputs_fail_in_one_line_or_are_counted(folders, capsys):
    outputs, truth, _ = folders
    put(np.zeros((16, 16, 1), np.uint8), outputs / "a/w.png")
    put(np.zeros((16, 16, 1), np.uint8), outputs / "q_mean.png")    # statistics of a condition not in truth
    with pytest.raises(SystemExit, match=r"^error: 2 output\(s\) have no truth image in .*truth, the first "
                                         r".*outputs/a/w.png; pass --skip-unpaired"):
        main([str(outputs), str(truth), "--paired", "--device", "cpu"])
    result = main([str(outputs), str(truth), "--paired", "--skip-unpaired", "--device", "cpu", "--no-lpips"])
    assert result["num_images"] == 4 and result["num_unpaired"] == 2 and "notes" not in result
    with pytest.raises(SystemExit):
        main([str(outputs), str(truth), "--mask", str(truth)])                # paired-only flags need --paired
    assert "--mask needs --paired" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(outputs), str(truth), "--paired", "--extractor", "digits"])
    assert "with --paired, --classifier" in capsys.readouterr().err


def test_cli_mask_problems_name_the_file(folders):
    outputs, truth, masks = folders
    put(np.full((16, 16, 1), 7, np.uint8), masks / "z.png")
    with pytest.raises(SystemExit, match=r"z.png has values other than 0/255 or 0/1"):
        main([str(outputs), str(truth), "--paired", "--mask", str(masks), "--device", "cpu"])
    (masks / "z.png").unlink()
    with pytest.raises(SystemExit, match=r"1 truth image\(s\) have no mask in .*masks, the first .*z.png"):
        main([str(outputs), str(truth), "--paired", "--mask", str(masks), "--device", "cpu"])


def test_cli_class_accuracy_from_subfolders_else_agreement(tmp_path, digits):
    images, labels = digits
    flat, by_class, outputs = tmp_path / "flat", tmp_path / "by_class", tmp_path / "outputs"
    out = noisy(images[:40], 60)
    for i in range(40):
        put(images[i], flat / f"{i:03d}.png")
        put(images[i], by_class / str(labels[i]) / f"{i:03d}.png")
        put(out[i], outputs / "flat" / f"{i:03d}.png")
        put(out[i], outputs / "by_class" / str(labels[i]) / f"{i:03d}.png")
    args = ["--paired", "--classifier", "digits", "--device", "cpu", "--no-lpips"]
    accuracy = main([str(outputs / "by_class"), str(by_class), *args])
    agreement = main([str(outputs / "flat"), str(flat), *args])
    assert "class_agreement" not in accuracy and "accuracy" not in agreement
    order = sorted(range(40), key=lambda i: f"{labels[i]}/{i:03d}")       # the files' order: by path
    direct = paired_scores(out[order], images[:40][order], labels=labels[:40][order], device="cpu", lpips=False)
    assert accuracy["accuracy"] == pytest.approx(direct["accuracy"])
    predicted = classify(images[:40]).numpy()
    assert agreement["class_agreement"] == pytest.approx((classify(out).numpy() == predicted).mean())
    assert 0.3 < agreement["class_agreement"] < 1                          # heavy noise: some outputs misread
