"""Folders and checkpoints of earlier versions keep working: a run written by commit 703f466 (before the sampling
settings and the scheduler record were saved; tests/fixtures/README.md) loads, samples, exports and resumes to the
weights it reached itself."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sample
from diffunet import DiffunetPipeline, export
from diffunet.pretrained import sample_settings
from diffunet.config import load_config
from diffunet.objectives import objective_of
from diffunet.sampling import load_model
from diffunet.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = Path(__file__).parent / "fixtures" / "run-703f466"
MADE_ON = "AVX2"                    # the torch CPU kernels the fixture was made with: bitwise only on the same


@pytest.fixture
def run(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "run"))


def test_an_old_pipeline_folder_loads_samples_and_exports(run, tmp_path, capsys):
    pipeline = run / "pipeline"
    assert "sample_steps" not in json.loads((pipeline / "model_index.json").read_text())   # from before #30
    assert sample_settings(pipeline) == {}                                # it records none: the defaults apply
    pipe = DiffunetPipeline.from_pretrained(pipeline)
    unet, sampler = load_model(pipeline / "unet")                       # the unet/ alone: its pipeline's scheduler
    assert objective_of(sampler.config) == "flow" and torch.equal(unet.conv_in.weight, pipe.unet.conv_in.weight)
    capsys.readouterr()
    assert sample.main([str(pipeline), "--out", str(tmp_path / "s"), "--num-images", "3", "--steps", "2",
                        "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("sampling with flow_dpmpp (DPMSolverMultistepScheduler), 2 "
                                                       "steps, guidance 1 (--scheduler, --guidance-scale: defaults, "
                                                       "the folder records none)")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["000000.png", "000001.png", "000002.png",
                                                                   "grid.png"]
    assert export.main([str(run), str(tmp_path / "out"), "--checkpoint", "latest"]) == 0
    again, _ = load_model(tmp_path / "out")                             # the step-8 EMA, now with the record
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pipe.unet.state_dict().values()))


def test_an_old_checkpoint_resumes_to_the_weights_its_run_reached(run):
    expected = load_file(FIXTURE / "checkpoints" / "step_000008" / "model.safetensors")
    shutil.rmtree(run / "checkpoints" / "step_000008")
    shutil.rmtree(run / "pipeline")
    cfg = load_config(run / "config.yaml", [f"output_dir={run}", "train.resume=latest"])
    train(cfg)
    got = load_file(run / "checkpoints" / "step_000008" / "model.safetensors")
    assert got.keys() == expected.keys()
    same_kernels = torch.backends.cpu.get_cpu_capability() == MADE_ON
    for key, value in expected.items():
        if same_kernels:
            assert torch.equal(got[key], value), key
        else:                                       # other kernels sum in another order: float rounding only
            assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-6), key
    state = json.loads((run / "checkpoints" / "step_000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["batches_seen"] == 8
