"""diffusers' UNet2DModel (the DDPM family) -> our UNet: equal outputs per config, one-line refusals, model folders
and fine-tuning from them (train.init_from)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from conftest import tiny
from diffunet import UNet
from diffunet.errors import CheckpointError
from diffunet.config import ConfigError, build_model, load_config, to_dict
from diffunet.pretrained import architecture, from_unet2d, init_from, load_unet
from diffunet.convert import config_from_unet2d
from diffunet.sampling import load_model
from diffunet.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]

# Small UNet2DModels in the layouts of the original DDPM checkpoints and of diffusers' defaults.
DDPM = dict(flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, downsample_padding=0, attention_head_dim=None,
            layers_per_block=2, norm_num_groups=4)
CONFIGS = {
    # google/ddpm-cifar10-32: 4 levels, attention at the second (16x16 of 32)
    "ddpm-cifar10": dict(DDPM, sample_size=16, block_out_channels=(8, 16, 16, 16),
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # google/ddpm-celebahq-256 / church / bedroom: 6 levels, attention at the fifth (16x16 of 256)
    "ddpm-celebahq": dict(DDPM, sample_size=32, block_out_channels=(8, 8, 16, 16, 24, 24),
                          down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    # diffusers' defaults: cos first, symmetric downsampling padding, several heads, attention at several levels,
    # non-square images, grayscale in and two channels out
    "diffusers-default": dict(sample_size=(8, 16), in_channels=1, out_channels=2, block_out_channels=(8, 16, 16),
                              layers_per_block=1, attention_head_dim=4, norm_num_groups=4,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # AdaGN time conditioning (its mid-block attention has a norm only with attn_norm_num_groups)
    "scale-shift": dict(DDPM, sample_size=16, block_out_channels=(8, 16), layers_per_block=1,
                        resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4,
                        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D")),
}

# Max abs difference of the outputs (about unit scale) allowed per precision; measured: docs/training.md.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def unet2d(name: str) -> UNet2DModel:
    """A randomly initialised UNet2DModel of config ``name``, every weight (norms included) perturbed so that a
    swapped or misplaced tensor shows in the outputs."""
    model = UNet2DModel(**CONFIGS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def outputs(model, dtype, x, t):
    with torch.no_grad():
        return model.to(dtype)(x.to(dtype), t).sample


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", TOLERANCE)
def test_converted_model_gives_the_same_outputs(name, dtype):
    theirs = unet2d(name)
    ours = from_unet2d(theirs).eval()
    assert isinstance(ours, UNet) and ours.dtype == theirs.dtype
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    cfg = theirs.config
    x = torch.randn(3, cfg.in_channels, *ours.image_size)
    t = torch.tensor([0, 37, 999])
    want, got = outputs(theirs, dtype, x, t), outputs(ours, dtype, x, t)
    assert got.shape == (3, cfg.out_channels, *ours.image_size)
    assert (got - want).abs().max() < TOLERANCE[dtype]
    assert want.abs().max() > 0.1                                           # not a vacuous comparison


def test_ddpm_options_map_to_our_switches():
    cfg = from_unet2d(unet2d("ddpm-cifar10")).config
    assert (cfg.flip_sin_to_cos, cfg.freq_shift, cfg.norm_eps, cfg.downsample) == (False, 1, 1e-6, "conv_tf")
    assert (cfg.time_condition, cfg.num_heads, cfg.head_dim) == ("add", 1, None)
    assert list(cfg.channel_mult) == [1, 2, 2, 2] and list(cfg.attention_resolutions) == [8]


@pytest.mark.parametrize("options,message", [
    (dict(down_block_types=("DownBlock2D", "SkipDownBlock2D")), "block type SkipDownBlock2D cannot be converted"),
    (dict(up_block_types=("ResnetUpsampleBlock2D", "UpBlock2D")), "block type ResnetUpsampleBlock2D"),
    (dict(up_block_types=("UpBlock2D", "AttnUpBlock2D")), "do not mirror down_block_types"),
    (dict(center_input_sample=True), "option center_input_sample=True has no counterpart"),
    (dict(time_embedding_type="fourier"), "option time_embedding_type='fourier'"),
    (dict(num_class_embeds=10), "option num_class_embeds=10"),
    (dict(mid_block_scale_factor=2), "option mid_block_scale_factor=2"),
    (dict(act_fn="mish"), "option act_fn='mish'"),
    (dict(downsample_type="resnet"), "option downsample_type='resnet'"),
    (dict(resnet_time_scale_shift="scale_shift"), "option attn_norm_num_groups=None"),
    (dict(block_out_channels=(8, 12)), "block_out_channels"),
    (dict(sample_size=None), "has no sample_size"),
])
def test_what_cannot_be_mapped_fails_with_one_line_naming_it(options, message):
    base = dict(sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    theirs = UNet2DModel(**dict(base, **options))
    with pytest.raises(ValueError, match=message) as e:
        from_unet2d(theirs)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ folders

@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_a_unet2d_folder_converts_and_loads(tmp_path, layout):
    theirs = unet2d("ddpm-cifar10")
    if layout == "model":
        theirs.save_pretrained(tmp_path)
    else:                                           # the hub's google/ddpm-* snapshots are pipeline folders
        DDPMPipeline(unet=theirs, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    want = outputs(theirs, torch.float32, x, 10)
    ddpm = {"objective": "ddpm"} if layout == "model" else {}          # a bare folder does not say (sample.py)
    for ours in (from_unet2d(tmp_path), load_unet(tmp_path), load_model(tmp_path, **ddpm)[0]):
        assert (outputs(ours.eval(), torch.float32, x, 10) - want).abs().max() < TOLERANCE[torch.float32]


def test_load_unet_reads_our_own_folders(tmp_path):
    model = tiny(zero_init=False).eval()
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(load_unet(tmp_path).eval()(x, 5).sample, model(x, 5).sample)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/diffunet_convert_evil_marker"


def _bad_folders(tmp_path) -> dict:
    """name -> (folder, what the error line must say): every way a model folder can be wrong."""
    cases = {}
    good = tmp_path / "good"
    UNet2DModel(**CONFIGS["scale-shift"]).save_pretrained(good)
    config = (good / "config.json").read_text()

    def folder(name, files: dict):
        path = tmp_path / name
        path.mkdir()
        for file, content in files.items():
            (path / file).write_bytes(content) if isinstance(content, bytes) else (path / file).write_text(content)
        return path

    evil = folder("pickled", {"config.json": config})
    torch.save({"conv_in.weight": Evil()}, evil / "diffusion_pytorch_model.bin")
    cases["pickled weights"] = (evil, f"cannot load {evil / 'diffusion_pytorch_model.bin'}: it is not a file of tensors")
    cases["no weights"] = (folder("no_weights", {"config.json": config}), "no_weights has no weights")
    cases["no config"] = (folder("no_config", {}), "no_config holds no model: no config.json")
    cases["not json"] = (folder("not_json", {"config.json": "{oops"}), "not_json/config.json is not readable JSON")
    foreign = json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3})
    cases["foreign config"] = (folder("foreign", {"config.json": foreign}), "describes a AutoencoderKL, not .*a diffusers UNet2DModel")
    cases["no class"] = (folder("no_class", {"config.json": "{}"}), "describes no model class")
    cases["missing"] = (tmp_path / "missing", "missing is not a folder")
    return cases


def test_bad_folders_fail_with_one_line_naming_the_file_and_run_no_code(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    for name, (folder, message) in _bad_folders(tmp_path).items():
        sampling = [load_model] if (folder / "config.json").is_file() else []   # else its own "neither ... nor"
        for load in (load_unet, from_unet2d, *sampling):
            with pytest.raises(CheckpointError, match=message) as e:
                load(folder)
            assert "\n" not in str(e.value), name
    assert not os.path.exists(MARKER)


def test_from_unet2d_refuses_our_own_folder_and_other_objects(tmp_path):
    tiny().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="describes a UNet, not a diffusers UNet2DModel"):
        from_unet2d(tmp_path)
    with pytest.raises(TypeError, match="takes a UNet2DModel or a folder"):
        from_unet2d(tiny())


# ------------------------------------------------------------------------------------------ fine-tuning

# The digits run (1 channel, 16 px) at a size a UNet2DModel can be made to match.
FAST = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "model.num_classes=null",
        "model.attention_resolutions=[8]", "train.batch_size=8", "train.max_steps=1", "sample.num_images=2",
        "sample.steps=2"]
MATCHING = ["model.num_res_blocks=2", "model.norm_eps=1e-06", "model.num_heads=1", "model.downsample=conv_tf",
            "model.time_condition=add", "model.flip_sin_to_cos=false", "model.freq_shift=1"]


def digits_unet2d(folder: Path) -> UNet2DModel:
    theirs = UNet2DModel(**dict(DDPM, sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    theirs.save_pretrained(folder)
    return theirs


def test_init_from_starts_training_from_a_converted_unet2d(tmp_path):
    theirs = digits_unet2d(tmp_path / "ddpm")
    cfg = load_config("digits", FAST + MATCHING + [f"output_dir={tmp_path / 'run'}",
                                                   f"train.init_from={tmp_path / 'ddpm'}"])
    trainer = Trainer(cfg)
    want = from_unet2d(theirs).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in trainer.unet.state_dict().items())
    assert all(torch.equal(s, p) for s, p in zip(trainer.ema.shadow_params, trainer.unet.parameters()))
    trainer.train()
    assert UNet.from_pretrained(tmp_path / "run" / "pipeline", subfolder="unet").config.downsample == "conv_tf"


def test_init_from_with_another_architecture_names_the_overrides(tmp_path):
    digits_unet2d(tmp_path / "ddpm")
    model = build_model(load_config("digits", FAST))
    with pytest.raises(ConfigError) as e:
        init_from(model, tmp_path / "ddpm")
    assert "\n" not in str(e.value)
    assert str(e.value).endswith("set " + " ".join(MATCHING))


# google/ddpm-cifar10-32's config.json on the hub (UNet2DModel's defaults for the options it omits).
DDPM_CIFAR10_32 = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def test_the_readme_overrides_make_the_ddpm_cifar10_preset_google_s_checkpoint():
    readme = (ROOT / "docs" / "training.md").read_text()       # the command the training page prints
    command = readme[readme.index("python train.py --config ddpm-cifar10 train.init_from"):].split("```")[0]
    overrides = [w for w in command.split() if w.startswith("model.")]
    preset = to_dict(load_config("ddpm-cifar10", overrides).model)
    assert architecture(config_from_unet2d(DDPM_CIFAR10_32)) == architecture(preset)   # what init_from checks


def test_sample_py_and_train_py_print_one_error_line_for_a_bad_folder(tmp_path, capsys):
    folder, _ = _bad_folders(tmp_path)["pickled weights"]
    for script, argv in (("sample.py", [str(folder), "--out", str(tmp_path / "samples")]),
                         ("train.py", [*FAST, f"output_dir={tmp_path / 'run'}", f"train.init_from={folder}"])):
        spec = importlib.util.spec_from_file_location(script[:-3] + "_cli", ROOT / script)
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        assert cli.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot load {folder / 'diffusion_pytorch_model.bin'}: ")
    assert not os.path.exists(MARKER)
