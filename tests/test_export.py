"""The portable pipeline folder (issue 16.4): it loads with stock diffusers where diffunet is not installed, and
still loads where it is; ``python -m diffunet.export``; bad model folders are one line and run no code."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from packaging.version import Version
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import sample
from diffunet.tasks import task_of
from diffunet import export
from diffunet.config import build_model
from diffunet.objectives import make_noise_scheduler
from diffunet.sampling import load_model
from diffunet.training.loop import train
from test_reliability import MARKER, Evil
from test_training import ROOT, fast_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# Python started as a user without diffunet would be: no project directory on the path, no editable-install finder
# (pip install -e puts a finder on sys.meta_path and a marker entry on sys.path). Not -I / -S: site-packages,
# where torch and diffusers live (inside the clone, for a .venv there), stays. diffunet's own dependencies that the
# folder must not need (omegaconf, torchmetrics) are made unimportable: the card promises torch, diffusers, einops.
HIDE = (f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r}) and '__editable__' not in p]; "
        "sys.meta_path = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]; "
        "sys.modules.update(omegaconf=None, torchmetrics=None)\n")


def python(code: str, cwd: Path, hide: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -c code`` in ``cwd`` with no PYTHONPATH, diffunet hidden (``hide``) or on the path; diffusers'
    module cache inside ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(cwd / "hf-modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if not hide:
        env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", (HIDE if hide else "") + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def readme_snippet() -> str:
    """The README's first Python snippet, exactly as printed."""
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


def tiny_run(tmp_path: Path) -> Path:
    """A run folder (config.yaml) with a portable pipeline/ of random weights, written as train.py writes it."""
    cfg = fast_cfg(tmp_path, "model.zero_init=false", "model.attention_resolutions=[8]")
    run = Path(cfg.output_dir)
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    pipeline = task_of(cfg).pipeline(build_model(cfg).eval(), make_noise_scheduler(cfg.diffusion), cfg)
    export.write_folder(run / "pipeline", pipeline, cfg, run, 0, None)
    return run


@pytest.fixture
def folder(tmp_path) -> Path:
    return tiny_run(tmp_path) / "pipeline"


def probe(folder: Path) -> dict:
    """A fixed input and the installed diffunet's output for it, saved beside ``folder`` for a subprocess."""
    unet, _ = load_model(folder)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        out = unet(x, t, y).sample
    save_file({"x": x, "t": t, "y": y, "out": out}, folder.parent / "probe.safetensors")
    return {"x": x, "out": out}


COMPARE = """
import sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
pipe = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)
p = load_file("{probe}")
with torch.no_grad():
    out = pipe.unet.eval()(p["x"], p["t"], p["y"]).sample
print("pipeline", type(pipe).__name__, type(pipe).__module__)
print("unet", type(pipe.unet).__module__, "max difference", float((out - p["out"]).abs().max()))
print("diffunet imported:", "diffunet" in sys.modules)
"""


@pytest.mark.parametrize("where,module,class_name", [("unet", "unet", "UNet"), (".", "pipeline", "DiffunetPipeline")])
def test_the_copied_code_is_the_package_code(folder, where, module, class_name):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet" if module == "unet" else "_class_name"] == [f"diffunet_{module}", class_name]
    packages = list((folder / where).glob("diffunet_*/"))
    assert len(packages) == 1 and packages[0].name == next((folder / ".").glob("diffunet_*/")).name  # one name
    copied = sorted(p.stem for p in packages[0].glob("*.py"))
    # diffunet/model/, whole: the network, its kernels and tables, tiling and both pipelines; nothing else
    assert copied == sorted(["kernels", "nn", "pipeline", "segment_pipeline", "tables", "tiles", "unet"])
    for name in copied:                                          # byte for byte: no second copy to maintain
        assert (packages[0] / f"{name}.py").read_bytes() == (ROOT / "diffunet" / "model" / f"{name}.py").read_bytes()
    entry = (folder / where / f"diffunet_{module}.py").read_text()
    assert all(f"from .{packages[0].name}.{name} import" in entry for name in copied)


def test_readme_snippet_runs_where_diffunet_is_not_installed(tmp_path):
    snippet = readme_snippet()
    assert "trust_remote_code=True" in snippet and "runs/digits/pipeline" in snippet
    work = tmp_path / "user"                                     # outside the repository
    (work / "runs" / "digits").mkdir(parents=True)
    folder = (tiny_run(tmp_path) / "pipeline").rename(work / "runs" / "digits" / "pipeline")
    probe(folder)
    hidden = python("import diffunet", work)
    assert hidden.returncode == 1 and "No module named 'diffunet'" in hidden.stderr    # the hiding works
    result = python(snippet + "print('images', len(images), images[0].size)\n"
                    + COMPARE.format(folder=folder, probe=folder.parent / "probe.safetensors"), work)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "images 10 (16, 16)" in lines and "diffunet imported: False" in lines
    assert next(line for line in lines if line.startswith("pipeline ")).startswith(
        "pipeline DiffunetPipeline diffusers_modules.local.diffunet_")
    unet_line = next(line for line in lines if line.startswith("unet "))
    assert unet_line.split()[1].startswith("diffusers_modules.local.diffunet_")
    assert float(unet_line.split()[-1]) < 1e-5                   # the same model: weights and code


def test_the_folder_still_loads_where_diffunet_is_installed(folder, tmp_path, capsys):
    expected = probe(folder)
    unet, _ = load_model(folder)                                 # sample.py's way: no code from the folder runs
    with torch.no_grad():
        assert torch.equal(unet(expected["x"], torch.tensor([3, 700]), torch.tensor([1, 10])).sample, expected["out"])
    assert sample.main([str(folder), "--out", str(tmp_path / "s"), "--num-images", "2", "--steps", "2",
                        "--no-progress"]) == 0
    # diffusers itself (0.38 on) runs a folder's code only when told to, diffunet imported or not; before 0.38 it
    # ran a local folder's code unasked, which is why diffunet's own loader reads folders without running them
    if Version(diffusers.__version__) >= Version("0.38"):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            DiffusionPipeline.from_pretrained(folder)
    result = python("import diffunet\n" + COMPARE.format(folder=folder, probe=folder.parent / "probe.safetensors"),
                    tmp_path, hide=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diffunet imported: True" in result.stdout and float(result.stdout.split()[result.stdout.split().index(
        "difference") + 1]) < 1e-5


def test_train_writes_the_portable_folder_and_export_rewrites_it(tmp_path, capsys):
    cfg = fast_cfg(tmp_path, "train.max_steps=2", "train.eval_every=2", "train.eval_num_images=16")
    pipe_dir = train(cfg)
    run = pipe_dir.parent
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffunet_unet", "UNet"] and (pipe_dir / "unet" / "diffunet_unet.py").is_file()
    assert (pipe_dir / export.GRID).read_bytes() == (run / "samples" / "final.png").read_bytes()
    card = (pipe_dir / export.CARD).read_text()
    fid = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["fid"]
    for fact in ("trained for 2 steps on `digits`", f"![samples]({export.GRID})", "trust_remote_code=True",
                 f"| {fid:.4g} |", "base_channels: 8", "max_steps: 2", "`nn.py`"):
        assert fact in card, fact

    out = tmp_path / "out"
    capsys.readouterr()
    assert export.main([str(run), str(out)]) == 0
    assert (out / export.CARD).read_text() == card               # the run's pipeline/, the same facts
    unet, _ = load_model(out)
    weights = load_file(pipe_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())

    assert export.main([str(run), str(out), "--checkpoint", "latest"]) == 2          # OUT is not empty
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out} exists and is not empty; choose another folder or pass --force to replace it"]
    assert export.main([str(run), str(out), "--checkpoint", "latest", "--force"]) == 0
    from_checkpoint, _ = load_model(out)                        # the step-2 checkpoint's EMA = the final weights
    assert all(torch.equal(weights[k], v) for k, v in from_checkpoint.state_dict().items())
    assert "trained for 2 steps" in (out / export.CARD).read_text()


def _pickle_weights(unet: Path):
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with open(unet / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(Evil(), f)


def _foreign_config(unet: Path):
    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                norm_num_groups=4).save_config(unet)


def _json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


BAD = {   # what breaks the folder -> the file the one line names, and what it says
    "pickled weights": (_pickle_weights, "unet/diffusion_pytorch_model.bin", "is not a file of tensors"),
    "no config": (lambda u: (u / "config.json").unlink(), "unet/config.json", "is missing"),
    "foreign config": (_foreign_config, "unet/config.json", "describes a UNet2DModel, not diffunet's UNet"),
    "config of unknown keys": (lambda u: _json(u / "config.json", lambda c: c.update(widgets=3)), "unet/config.json",
                               "keys UNet does not take: widgets"),
    "config that is not JSON": (lambda u: (u / "config.json").write_text("{ nope"), "unet/config.json",
                                "not readable JSON"),
    "wrong class": (lambda u: _json(u.parent / "model_index.json",
                                    lambda i: i.update(unet=["diffusers", "UNet2DConditionModel"])), "model_index.json",
                    "names diffusers.UNet2DConditionModel as its unet, not diffunet's UNet or a diffusers UNet2DModel"),
    "unet class other than the index's": (lambda u: _json(u.parent / "model_index.json",
                                                          lambda i: i.update(unet=["diffusers", "UNet2DModel"])),
                                          "unet/config.json", "describes a UNet, not a diffusers UNet2DModel"),
    "foreign scheduler": (lambda u: _json(u.parent / "model_index.json",
                                          lambda i: i.update(scheduler=["evil", "EvilScheduler"])), "model_index.json",
                          "names evil.EvilScheduler as its scheduler, not one of diffusers' schedulers"),
    "misshapen weights": (lambda u: _json(u / "config.json", lambda c: c.update(base_channels=16)),
                          "unet/diffusion_pytorch_model.safetensors",
                          "expected shape torch.Size([11, 64]), but got torch.Size([11, 32])"),
    "no weights": (lambda u: (u / "diffusion_pytorch_model.safetensors").unlink(), "unet", "has no weights"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_model_folder_is_one_line_naming_the_file(tmp_path, capsys, case):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    run = tiny_run(tmp_path)
    folder = run / "pipeline"
    break_it, name, says = BAD[case]
    break_it(folder / "unet")
    (folder / "unet" / "diffunet_unet.py").write_text(f"import os\nos.system('touch {MARKER}')\n")
    assert sample.main([str(folder), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert export.main([str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0] == err[1], err                      # one line each, no traceback
    assert err[0].startswith("error: ") and str(folder / name) in err[0] and says in err[0], err[0]
    assert not os.path.exists(MARKER)                                  # no code from the folder ran


def test_bin_weights_of_plain_tensors_still_load(folder):
    unet = folder / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    loaded, _ = load_model(folder)
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())


# ------------------------------------------------------------------------------------------ issue 30: our own folders

def test_the_installed_class_loads_a_folder_without_running_its_code(folder, tmp_path):
    """``DiffunetPipeline.from_pretrained(folder)`` with diffunet installed: no trust_remote_code, nothing imported
    from the folder, the installed class with the same weights; diffusers' loader of the folder's own code stays."""
    import diffunet
    from diffunet import DiffunetSegmentationPipeline

    before = set(sys.modules)
    pipe = diffunet.DiffunetPipeline.from_pretrained(folder)
    assert type(pipe) is diffunet.DiffunetPipeline                      # the installed class, not the copy
    assert not [m for m in set(sys.modules) - before if m.split(".")[0].startswith(("diffunet_", "diffusers_modules"))]
    assert type(pipe.unet) is diffunet.UNet and type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_flow_sigmas                        # the run's sampler: flow_dpmpp
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())
    assert pipe.unet.dtype == torch.float32 and not pipe.unet.training
    half = diffunet.DiffunetPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16
    with pytest.raises(export.CheckpointError, match="load it with DiffunetPipeline.from_pretrained"):
        DiffunetSegmentationPipeline.from_pretrained(folder)
    for wrong, message in ((dict(device_map="auto"), "not device_map"), (dict(variant="fp16"), "not variant"),
                           (dict(torch_dtype={"unet": torch.float16}), "one torch.dtype")):
        with pytest.raises(TypeError, match=message):
            diffunet.DiffunetPipeline.from_pretrained(folder, **wrong)
    probe(folder)
    result = python(COMPARE.format(folder=folder, probe=folder.parent / "probe.safetensors"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]               # without diffunet: the folder's own code
    assert "pipeline DiffunetPipeline diffusers_modules.local.diffunet_" in result.stdout


def test_a_pipeline_samples_as_its_run_did(tmp_path):
    """The run's sample.* travel in model_index.json: a call without steps or guidance uses them."""
    from diffunet import DiffunetPipeline

    cfg = fast_cfg(tmp_path, "sample.steps=3", "sample.guidance_scale=2.0", "sample.scheduler=flow_euler")
    pipeline = task_of(cfg).pipeline(build_model(cfg).eval(), make_noise_scheduler(cfg.diffusion), cfg)
    export.write_folder(tmp_path / "folder", pipeline, cfg, tmp_path, 0, None)
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    assert (index["sample_steps"], index["sample_guidance_scale"], index["sample_scheduler"]) == (3, 2.0, "flow_euler")
    pipe = DiffunetPipeline.from_pretrained(tmp_path / "folder")
    pipe.set_progress_bar_config(disable=True)
    calls = []
    predict = pipe.unet.forward
    pipe.unet.forward = lambda x, t, *a, **k: calls.append(len(x)) or predict(x, t, *a, **k)
    pipe(class_labels=[1], output_type="pt")
    assert calls == [2, 2, 2]                       # 3 steps, each a batch of 2 (guidance 2: cond and uncond)


def test_a_model_folder_records_what_it_predicts(folder, tmp_path, capsys):
    """The unet/ of a pipeline folder, copied anywhere, still says what its model predicts; a model folder that
    records nothing is refused with the flag to pass, never sampled as a guess."""
    from diffunet.objectives import objective_of

    bare = tmp_path / "bare"
    (folder / "unet").rename(bare)
    _, sampler = load_model(bare)
    assert objective_of(sampler.config) == "flow" and type(sampler).__name__ == "DPMSolverMultistepScheduler"
    config = json.loads((bare / "config.json").read_text())
    del config[export.pretrained.SCHEDULER_KEY]
    (bare / "config.json").write_text(json.dumps(config))
    assert sample.main([str(bare), "--out", str(tmp_path / "s"), "--num-images", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bare} does not say what its model predicts (a model folder saved without its training scheduler): "
        f"pass --objective ddpm|flow|edm (with --prediction-type for a ddpm model), or sample the pipeline folder "
        f"train.py wrote")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    assert sample.main([str(bare), "--out", str(tmp_path / "s"), "--num-images", "1", "--objective", "flow",
                        "--steps", "2", "--no-progress"]) == 0
    assert "sampling with flow_dpmpp" in capsys.readouterr().out


def test_a_unet_copied_out_of_an_image_conditioned_run_says_its_task(tmp_path, capsys):
    """The unet/ of a super-resolution run, copied anywhere, still samples as super-resolution (its pipeline's
    class and keywords travel in its config.json); without that record it is refused, never run as a generator."""
    from diffunet.pretrained import PIPELINE_KEY, pipeline_options

    cfg = fast_cfg(tmp_path, "task=super_resolution", "model.cond_channels=1", "super_resolution.factor=2",
                   "sample.steps=2")
    pipeline = task_of(cfg).pipeline(build_model(cfg).eval(), make_noise_scheduler(cfg.diffusion), cfg)
    export.write_folder(tmp_path / "folder", pipeline, cfg, tmp_path, 0, None)
    unet = (tmp_path / "folder" / "unet").rename(tmp_path / "unet")
    assert pipeline_options(unet) == {"task": "super_resolution", "sr_factor": 2}
    config = json.loads((unet / "config.json").read_text())
    assert config[PIPELINE_KEY]["sample_steps"] == 2
    del config[PIPELINE_KEY]
    (unet / "config.json").write_text(json.dumps(config))
    assert sample.main([str(unet), "--out", str(tmp_path / "s"), "--num-images", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {unet} takes an image condition (model.cond_channels) but does not say for which task "
        f"(super-resolution, inpainting, ...): sample the pipeline folder it came from")
