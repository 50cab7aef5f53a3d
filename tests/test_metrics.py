"""diffunet.metrics and python -m diffunet.evaluate: FID / KID / IS on the offline digits extractor, caching,
Inception weights from a local file or one clear error."""

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffunet.metrics import fid as metrics
from diffunet.data import digits_arrays, write_image
from diffunet.evaluate import main
from diffunet.metrics import ExtractorUnavailable, digits_extractor, evaluate, extract, inception_extractor

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(kid_subsets=10)                                     # KID over 10 subsets instead of 100: seconds


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("DIFFUNET_INCEPTION", raising=False)


@pytest.fixture(scope="module")
def digits():
    return digits_arrays(16)


def noise(n=400, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_extractor_recognises_digits_at_16_and_32(digits):
    images, labels = digits
    net = digits_extractor()
    for size in (16, 32):
        _, logits = extract(net, digits_arrays(size)[0])
        assert (logits.argmax(1).numpy() == labels).mean() > 0.97  # held-out 20 %: 99.7 % (training script)


def test_fid_kid_self_zero_noise_large(digits):
    images, labels = digits
    self_ = evaluate(images, "digits", **FAST)
    assert abs(self_["fid"]) < 1e-6 and abs(self_["kid_mean"]) < 0.02
    assert self_["is_mean"] > 9                                 # 10 balanced, confidently classified classes
    far = evaluate(noise(), "digits", **FAST)
    assert far["fid"] > 20 and far["kid_mean"] > 0.5 and far["is_mean"] < 3
    one_class = evaluate(images[labels == 1], "digits", **FAST)  # mode collapse is far too, and IS sees it
    assert one_class["fid"] > 20 and one_class["is_mean"] < 1.5
    assert evaluate(images[:900], images[900:], **FAST)["fid"] < 2   # two halves of the same data: close
    assert evaluate(images[:150], "digits", **FAST)["is_mean"] > 9   # IS splits keep >= 100 images: no small-N collapse


def test_same_inputs_same_numbers_and_extractor_plugs_into_torchmetrics(digits):
    images = digits[0]
    a = evaluate(images[:300], "digits", cache=False, **FAST)
    assert a == evaluate(images[:300], "digits", cache=False, **FAST)
    fid = FrechetInceptionDistance(feature=digits_extractor())  # the module is a torchmetrics `feature`
    fid.update(torch.from_numpy(images).permute(0, 3, 1, 2), real=True)
    fid.update(torch.from_numpy(images[:300]).permute(0, 3, 1, 2), real=False)
    assert fid.compute().item() == pytest.approx(a["fid"], rel=1e-3)


def test_reference_features_are_cached(digits, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, image in enumerate(digits[0][:200]):
        write_image(image, ref / f"{i:06d}.png")
    first = evaluate(noise(50), ref, **FAST)
    cached = list((tmp_path / "cache").glob("reference-*.npy"))
    assert len(cached) == 1 and first["num_real"] == 200
    assert evaluate(noise(50), ref, **FAST) == pytest.approx(first, rel=0, nan_ok=True)   # is_std: nan, 1 split
    write_image(digits[0][200], ref / "000200.png")            # the folder changed: a new cache entry
    assert evaluate(noise(50), ref, **FAST)["num_real"] == 201
    assert len(list((tmp_path / "cache").glob("reference-*.npy"))) == 2


def test_missing_inception_weights_one_clear_line(tmp_path, capsys):
    with pytest.raises(ExtractorUnavailable, match="no Inception weights.*--inception-weights FILE.*--extractor digits"):
        inception_extractor(tmp_path / "missing.pt")
    np.savez(tmp_path / "s.npz", images=noise(20))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "s.npz"), str(tmp_path / "s.npz")])          # not digits: Inception by default
    message = str(exit_.value.code)
    assert message.startswith("error: no Inception weights") and "\n" not in message


class _FakeInception(nn.Module):
    """Stands for inception-2015-12-05.pt: the same TorchScript call signature, no weights to download; 16
    features instead of 2048 (FID's matrix square root of 2048 x 2048 takes a CPU half a minute)."""

    def __init__(self):
        super().__init__()
        self.features, self.classes = nn.Linear(3, 16), nn.Linear(16, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        f = self.features(x.float().mean(dim=(2, 3)) / 255)
        return f if return_features else self.classes(f).softmax(1)


def test_torchscript_inception_file(tmp_path):
    torch.jit.script(_FakeInception()).save(str(tmp_path / "inception.pt"))
    result = evaluate(noise(60, seed=1), noise(80), tmp_path / "inception.pt", **FAST)   # gray in, RGB to the net
    assert result["num_fake"] == 60 and np.isfinite(result["fid"]) and 1 <= result["is_mean"] <= 1008
    (tmp_path / "bad.pt").write_text("not a model")
    with pytest.raises(ExtractorUnavailable, match="not a TorchScript Inception"):
        inception_extractor(tmp_path / "bad.pt")


def test_cli_on_a_folder_and_an_npz(digits, tmp_path, capsys):
    np.savez(tmp_path / "real.npz", images=digits[0][:300])
    result = main([str(tmp_path / "real.npz"), "digits", "--kid-subsets", "5", "--json"])
    assert result["num_fake"] == 300 and result["fid"] < 5 and '"fid"' in capsys.readouterr().out


def test_the_fid_floor_is_real_images_against_their_reference(digits, capsys):
    """An FID is printed beside its floor: N real images of the reference against all of it, which the same N
    samples are to be read against (the docs' 0.158 for 512 digits over 4 draws); smaller sets have higher
    floors, and a reference no larger than the samples has none."""
    real = metrics.reference_features("digits", "digits")
    assert metrics.fid_floor(real, 512) == pytest.approx(0.158, abs=0.001)
    assert metrics.fid_floor(real, 128) > metrics.fid_floor(real, 512) > 0
    assert metrics.fid_floor(real, len(real)) is None and metrics.fid_floor(real, 512, draws=0) is None
    picked = digits[0][np.random.default_rng(9).choice(len(digits[0]), 512, replace=False)]
    result = evaluate(picked, "digits", "digits", **FAST)
    assert result["fid_floor"] == pytest.approx(metrics.fid_floor(real, 512))
    assert 0.5 < result["fid"] / result["fid_floor"] < 3                # a set of real digits: near its floor
    capsys.readouterr()
    out = main(["digits", "digits", "--kid-subsets", "5"])
    assert "fid_floor" not in out and "no fid_floor (the reference holds 1797 images, not more than 1797)" in \
        capsys.readouterr().out
