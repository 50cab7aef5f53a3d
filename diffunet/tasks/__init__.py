"""The jobs one U-Net does, one entry each in ``TASKS``: what a batch means (the clean target x0 and the model's
conditioning), the loss, the pipeline a run saves and samples with, its grids and its evaluation. The contract
every job fulfils is the ``Task`` base class (``tasks/base.py``); docs/tasks.md shows how to add one.

- ``generate.py``: "generate", from noise and class labels
- ``image.py``: "super_resolution" and "inpainting", conditioned on an image made from each training image
- ``denoise.py``: "denoise", conditioned on a noisy version of the image (the example of adding a job)
- ``segmentation.py``: "segmentation" (deterministic) and "segmentation_diffusion", their losses and scores

The training loop, the export and the evaluator call a task's methods and never ask which task runs.
"""

from ..errors import ConfigError
from ..model.tables import choose
from .base import TaskSampler, Task, check_augment, eval_reference, sample_keywords
from .denoise import Denoise
from .generate import Generate
from .image import Inpainting, SuperResolution, degrade
from .segmentation import Segmentation, SegmentationDiffusion

TASKS: dict[str, Task] = {
    "generate": Generate(),
    "super_resolution": SuperResolution(),
    "inpainting": Inpainting(),
    "denoise": Denoise(),
    "segmentation": Segmentation(),
    "segmentation_diffusion": SegmentationDiffusion(),
}


def task_of(cfg) -> Task:
    """The task entry ``cfg.task`` names; ConfigError (one line, the valid names) for an unknown one."""
    try:
        return choose(TASKS, cfg.task, "task")
    except ValueError as e:
        raise ConfigError(str(e)) from None


__all__ = ["TASKS", "Task", "TaskSampler", "task_of", "check_augment", "eval_reference", "sample_keywords", "degrade",
           "Generate", "SuperResolution", "Inpainting", "Denoise", "Segmentation", "SegmentationDiffusion"]
