"""The task contract (``diffunet.tasks.base.Task``): every job fulfils it, the docstring names every part of it,
the trainer samples only through a task's own pipeline, and a job is added without touching the trainer (the
denoise job, added that way, trains, samples and scores)."""

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffunet.config import load_config
from diffunet.data import split_holdout
from diffunet.pretrained import load_pipeline
from diffunet.model.pipeline import DiffunetPipeline
from diffunet.tasks import TASKS, Generate, Task
from diffunet.training.loop import train, validate
from test_tasks_image import FAST

CONTRACT = [name for name, value in vars(Task).items() if not name.startswith("_")]


def test_every_task_is_a_task_under_its_own_name():
    assert TASKS and all(isinstance(task, Task) and task.name == name for name, task in TASKS.items())
    for task in TASKS.values():                          # a section is a config section of its own
        assert task.section is None or task.section in load_config()


def test_the_contract_is_written_down_part_by_part():
    """Every attribute and method of the base class is named in its docstring (``name``) with what it means."""
    doc = Task.__doc__
    assert len(CONTRACT) >= 14
    assert [name for name in CONTRACT if not re.search(rf"``{name}[`(]", doc)] == []


def test_the_trainer_samples_only_through_the_tasks_pipeline(tmp_path, monkeypatch):
    """Grids, evaluation and the saved folder all come from ``task.pipeline``: a task whose pipeline is counted
    sees every one of them, and no DiffunetPipeline is built anywhere else."""
    calls, built = [], []

    class Counted(Generate):
        def pipeline(self, unet, scheduler, cfg):
            calls.append(type(scheduler).__name__)
            return super().pipeline(unet, scheduler, cfg)

    real_init = DiffunetPipeline.__init__

    @functools.wraps(real_init)                     # diffusers reads the signature to save the pipeline
    def counting_init(self, *args, **kwargs):
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setitem(TASKS, "generate", Counted())
    monkeypatch.setattr(DiffunetPipeline, "__init__", counting_init)
    cfg = load_config("digits", [f"output_dir={tmp_path / 'run'}", *FAST, "model.num_classes=null",
                                 "train.max_steps=2", "train.sample_every=1", "train.checkpoint_every=2",
                                 "train.eval_every=2", "train.eval_num_images=8", "sample.steps=2",
                                 "sample.num_images=4", "train.phema_snapshots=0"])
    train(cfg)
    # grids at steps 1 and 2 (the last one is also final.png) and one evaluation, with the run's sampler; then the
    # saved folder, with the training scheduler (export makes the run's sampler its scheduler/)
    assert calls == ["DPMSolverMultistepScheduler"] * 3 + ["FlowMatchEulerDiscreteScheduler"]
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    assert len(built) == len(calls)


def test_denoise_is_a_job_added_by_the_contract_alone(tmp_path):
    """The denoise job: trains from the digits with noise added, scores its outputs against the truth, saves a
    pipeline that denoises given noisy images, and says so on its model card."""
    cfg = load_config("digits-denoise", [f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=4",
                                         "train.eval_every=4", "data.holdout=6", "train.eval_num_images=6",
                                         "train.phema_snapshots=0"])
    folder = train(cfg)
    run = Path(cfg.output_dir)
    grid = Image.open(run / "samples" / "final.png")
    assert grid.size == (6 * 18 + 2, 3 * 18 + 2)                        # 6 held-out digits x (input, output, truth)
    scores = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert {"psnr", "ssim", "accuracy"} <= scores.keys()
    assert "denoising" in (folder / "README.md").read_text()
    pipe = load_pipeline(DiffunetPipeline, folder)
    _, held = split_holdout(validate(cfg)[1], 6)
    x = torch.stack([held[i][0] for i in range(3)])
    known = TASKS["denoise"].known(x, [], cfg, held_out=True)
    assert 0.2 < (known["cond"] - x).std() < 0.5                         # the noise of denoise.sigma, clipped
    out = pipe(image=known["image"], num_inference_steps=2, output_type="pt").images
    assert out.shape == x.shape and torch.isfinite(out).all()
    # what training saw for these images is what sampling gives the model: the same condition from the same image
    assert torch.equal(known["cond"], TASKS["denoise"].known(x, [], cfg, held_out=True)["cond"])


def test_a_task_missing_a_part_says_which(tmp_path):
    class Bare(Task):
        name = "bare"

    with pytest.raises(NotImplementedError, match="task 'bare' does not say what a batch means"):
        Bare().training_batch(None, None, None)
    with pytest.raises(NotImplementedError, match="task 'bare' has no pipeline"):
        Bare().pipeline(None, None, None)
