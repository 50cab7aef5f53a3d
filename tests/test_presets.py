"""Presets, the config layer, the shape planner CLI and the gradient diagnostic."""

import pytest
import torch

from conftest import tiny
from diffunet.config import ConfigError, build_model, load_config, model_from_preset, presets
from experiments.report.diagnostics import encoder_grad_norms
from diffunet.objectives import make_noise_scheduler, sampler_name
from diffunet.sampling import make_scheduler
from diffunet.plan import main as plan_main


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_every_preset_builds():
    assert {"digits", "digits-ddpm", "ddpm-cifar10", "small", "unet-original"} <= set(presets())
    for name in presets():
        build_model(load_config(name))


def test_the_docs_description_of_the_default_and_of_digits_ddpm_matches_the_presets():
    """Not a behavioural test: the README, docs/quickstart.md, docs/training.md's preset table and
    docs/recipes/default.md describe the two presets in words (rectified flow, DPM-Solver++ in 10 steps, a cosine
    decay in under half the steps of the DDPM run it replaced; digits-ddpm: DDPM predicting epsilon), and this pins
    the presets to those words. Change a preset, and this says which docs to update with it."""
    default, ddpm = load_config("digits"), load_config("digits-ddpm")
    assert default.diffusion.objective == "flow" and default.sample.steps == 10
    assert sampler_name(default.sample.scheduler, make_noise_scheduler(default.diffusion).config) == "flow_dpmpp"
    assert ddpm.diffusion.objective == "ddpm" and ddpm.diffusion.prediction_type == "epsilon"
    assert default.train.lr_scheduler == "cosine" and 2 * default.train.max_steps <= ddpm.train.max_steps


def test_digits_ddpm_serves_the_ddpm_only_samplers_and_the_flow_defaults_refusal_names_it():
    default, ddpm = load_config("digits"), load_config("digits-ddpm")
    assert make_scheduler("repaint", make_noise_scheduler(ddpm.diffusion).config).__class__.__name__ == \
        "RePaintScheduler"
    with pytest.raises(ValueError, match="samples ddpm models only; this one is flow .* --config digits-ddpm"):
        make_scheduler("repaint", make_noise_scheduler(default.diffusion).config)
    assert default.model == ddpm.model and default.data == ddpm.data      # only the recipe differs


@pytest.mark.parametrize("name", presets())
def test_every_preset_runs_a_forward_pass_at_a_tiny_size(name):
    model = model_from_preset(name, zero_init=False).eval()   # random, not zero, output: finiteness means something
    c = model.config
    n = 2 ** (len(c.channel_mult) - 1)                        # the smallest side "same" takes; "valid" mirror-pads
    x = torch.randn(2, c.in_channels, *(n,) * model.dims)   # (B, C, L), (B, C, H, W) or (B, C, D, H, W)
    labels = torch.tensor([0, model.null_class]) if model.null_class else None
    timed = c.time_condition != "none"                       # a segmentation preset has no time: model(x)
    with torch.no_grad():
        out = model(x, torch.tensor([10, 900]), labels).sample if timed else model(x).sample
        other = model(x, torch.tensor([500, 500]), labels).sample if timed else model(x.flip(0)).sample.flip(0)
    assert out.shape == (2, c.out_channels or c.in_channels, *(n,) * model.dims)   # the input's shape
    assert torch.isfinite(out).all() and out.abs().max() > 0
    if timed:
        assert not torch.allclose(out, other)                       # the time conditioning reaches the output
    else:
        torch.testing.assert_close(out, other)                      # eval mode: each image on its own (batch norm)
        assert not torch.allclose(out[0], out[1])                   # and the input reaches the output


def test_ddpm_cifar10_preset_has_the_papers_parameter_count():
    assert count(model_from_preset("ddpm-cifar10")) == pytest.approx(35.7e6, rel=0.005)


def test_original_unet_preset_is_valid_maxpool_transposed_concat():
    model = model_from_preset("unet-original")
    c = model.config
    assert (c.padding, c.downsample, c.upsample, c.skip) == ("valid", "maxpool", "transposed", "concat")
    assert model(torch.randn(1, 1, 16, 16), 3).sample.shape == (1, 1, 16, 16)


def test_model_from_preset_overrides_are_checked():
    assert model_from_preset("digits", skip="add").config.skip == "add"
    with pytest.raises(ConfigError, match="unknown config key 'model.skp'; did you mean 'model.skip'"):
        model_from_preset("digits", skp="add")


def test_config_overrides_coercion_and_suggestions(tmp_path):
    cfg = load_config("digits", ["train.lr=5e-5", "model.channel_mult=[1,2]", "train.max_steps=7"])
    assert cfg.train.lr == 5e-5 and isinstance(cfg.train.lr, float)
    assert list(cfg.model.channel_mult) == [1, 2] and cfg.train.max_steps == 7
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train:\n  lr: 1e-4\n  batch_size: '8'\n")                 # PyYAML alone reads 1e-4 as a str
    cfg = load_config(yaml)
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 8
    with pytest.raises(ConfigError, match="unknown config key 'train.btach_size'; did you mean 'train.batch_size'"):
        load_config(None, ["train.btach_size=3"])
    with pytest.raises(ConfigError, match="train.max_steps: Value 'ten'"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        load_config("digit")
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"model.channel_mult is a list, set as a whole: model.channel_mult=\[1,2,2\]"):
        load_config("digits", ["model.channel_mult.foo=3"])               # OmegaConf's own TypeError names no key
    yaml.write_text("model:\n  channel_mult:\n    deep: 4\n")
    with pytest.raises(ConfigError, match=f"{yaml}: model.channel_mult is a list"):
        load_config(yaml)
    with pytest.raises(ConfigError, match="model: height 30 does not fit"):
        build_model(load_config("digits", ["model.sample_size=30"]))


def test_plan_cli_prints_every_level_and_the_variant_delta(capsys):
    assert plan_main(["ddpm-cifar10", "--vs", "model.skip=concat_1x1"]) == 0
    out = capsys.readouterr().out
    # the two counts of docs/architecture.md's example output, pinned on purpose so that the page stays true
    assert "35.75M parameters" in out and "variant: 30.37M parameters" in out
    lines = [line.split() for line in out.splitlines()]
    levels = [row for row in lines if row and row[0] in "0123" and len(row) > 6]
    assert [row[0] for row in levels] == ["0", "1", "2", "3"]
    assert all(row[-1].startswith("-") for row in levels)                      # concat_1x1 saves at every level
    assert plan_main(["digits", "--size", "30"]) == 2
    assert "nearest valid heights: 28 or 32" in capsys.readouterr().err


def test_encoder_grad_norms_one_per_level_and_leave_grads_alone():
    model = tiny(channel_mult=(1, 2, 2), zero_init=False, attention_resolutions=())
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    norms = encoder_grad_norms(model, x, generator=torch.Generator().manual_seed(0))
    assert len(norms) == 3 and all(n > 0 for n in norms)
    assert all(p.grad is None for p in model.parameters())
    assert encoder_grad_norms(tiny(), x) == [0.0, 0.0]                           # zero-init: nothing flows yet


def test_every_unknown_key_is_named_on_one_line_with_its_origin(tmp_path):
    yaml = tmp_path / "x.yaml"
    yaml.write_text("train:\n  btach_size: 8\n  lr: 1e-4\nmodel:\n  fooo: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(yaml)
    assert str(e.value) == (f"{yaml}: unknown config keys 'train.btach_size' (did you mean 'train.batch_size'?), "
                            f"'model.fooo'; python train.py --print-config lists the valid keys")
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["model.skp=add", "train.lr=1e-3", "data.sourc=cells"])
    assert str(e.value) == ("command line: unknown config keys 'model.skp' (did you mean 'model.skip'?), "
                            "'data.sourc' (did you mean 'data.source'?)")
    with pytest.raises(ConfigError, match=r"^command line: unknown config key 'train\.qqqq'; valid keys: max_steps, "):
        load_config(None, ["train.qqqq=1"])                   # one key and no near name: the section's keys


def test_keys_that_moved_to_a_tasks_section_are_read_at_their_old_place(tmp_path):
    """An old run's config.yaml (every key, at defaults) loads silently; an old key set to a value says its new
    name once and is read there; the new key wins where both are given."""
    import warnings

    from diffunet.config import MOVED

    old = tmp_path / "config.yaml"
    old.write_text("task: super_resolution\ndata:\n  sr_factor: 4\n  mask: mixed\n  eval_mask: half\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(old).super_resolution.factor == 4              # the defaults: nothing said
    with pytest.warns(FutureWarning, match=r"command line: data.sr_factor is now super_resolution.factor"):
        cfg = load_config("digits-sr", ["data.sr_factor=2"])
    assert cfg.super_resolution.factor == 2 and "sr_factor" not in cfg.data
    with pytest.warns(FutureWarning, match="data.mask is now inpainting.mask"):
        cfg = load_config("digits-inpaint", ["data.mask=box", "inpainting.mask=stroke"])
    assert cfg.inpainting.mask == "stroke"
    assert set(MOVED) == {"data.sr_factor", "data.mask", "data.eval_mask"}
