"""The training loop: accelerate for processes, precision, accumulation and state; diffusers for the schedule,
EMA and learning-rate schedule. ``train.py`` parses a config and calls ``train``."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .. import objectives
from ..config import build_model, to_dict
from ..data.views import pictures
from ..data import apply_bad_image_policy, build_dataset, save_grid, split_holdout, take_subset, to_uint8
from ..errors import ConfigError, DataError, PosthocEMAError, TrainingError
from ..export import write_folder
from ..model.unet import UNet
from ..objectives import make_noise_scheduler
from ..pretrained import init_from
from ..sampling import make_scheduler
from ..tasks import TaskSampler, check_augment, task_of
from . import state as ckpt
from .batchnorm import sync_batch_norm
from .pace import Pace, busy_at_start, set_threads
from .power_ema import SNAPSHOT_DIR, PowerEMA, check_sigma_rel, snapshot_steps
from .precision import apply_fast_paths, training_precision


class EpochSampler(Sampler):
    """Index batches for one process, forever: a permutation per epoch seeded by (seed, epoch), each global batch
    split across processes, starting at any global batch number.

    Why not accelerate's seedable sampler + ``set_epoch`` + ``skip_first_batches``: the old reason (the skipping
    loader restarted the epoch count) no longer holds in accelerate 1.16, which resumes mid-epoch with the right
    order (checked: 20 items, batch 3, resumed after 2 batches of epoch 1, the rest of epoch 1 and all of epoch 2
    equal). Kept for now because switching changes every run's data order, so no checkpoint written by an
    earlier version could resume exactly; and the accelerate loader needs its own ``data_seed`` (the global seed
    here differs per process) plus epoch bookkeeping in the loop, about as much code as this class.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world: int, start: int = 0,
                 keyed: bool = False):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.keyed = keyed      # a patch dataset (data.patches): keys (index, (seed, batch, rank, place)) seed its crops
        self.per_epoch = size // (batch_size * world)               # incomplete last batches are dropped
        self.start = start

    def __iter__(self):
        batch, epoch, perm = self.start, None, None
        span = self.batch_size * self.world
        while True:
            e, i = divmod(batch, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
            lo = i * span + self.rank * self.batch_size
            indices = perm[lo:lo + self.batch_size].tolist()
            yield [(k, (self.seed, batch, self.rank, j)) for j, k in enumerate(indices)] if self.keyed else indices
            batch += 1


def no_accelerator() -> bool:
    """True on a machine without a GPU. accelerate (1.x) then needs ``cpu=True`` to see several launched
    processes as MULTI_CPU (gloo); without it each process would train alone, believing it is the main one."""
    probe = getattr(torch, "accelerator", None)                 # torch >= 2.6
    return not probe.is_available() if probe is not None else not torch.cuda.is_available()


def validate(cfg: DictConfig) -> tuple[UNet, torch.utils.data.Dataset]:
    """Everything that can be wrong with a config, checked before any compute: model, data, names, numbers."""
    model = build_model(cfg)
    task = task_of(cfg)
    try:
        objectives.check(cfg.diffusion)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if model.timed:                                 # a diffusion model: its sampler must fit its objective
        try:
            make_scheduler(cfg.sample.scheduler, make_noise_scheduler(cfg.diffusion).config)
        except ValueError as e:
            raise ConfigError(f"sample.scheduler: {e}") from None
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 on a CPU")
    for key in ("max_steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "sample_every"):
        if cfg.train[key] < 1:
            raise ConfigError(f"train.{key} must be at least 1 (got {cfg.train[key]})")
    if not 0 <= cfg.train.label_dropout < 1:
        raise ConfigError(f"train.label_dropout must be in [0, 1) (got {cfg.train.label_dropout})")
    if cfg.train.phema_snapshots < 0:
        raise ConfigError(f"train.phema_snapshots must be at least 0 (got {cfg.train.phema_snapshots}; 0 turns "
                          f"post-hoc EMA off)")
    for sigma_rel in cfg.train.phema_sigma_rels:
        try:
            check_sigma_rel(sigma_rel)
        except PosthocEMAError as e:
            raise ConfigError(f"train.phema_sigma_rels: {e}") from None
    if len(set(cfg.train.phema_sigma_rels)) < len(cfg.train.phema_sigma_rels):
        raise ConfigError(f"train.phema_sigma_rels has a length twice ({list(cfg.train.phema_sigma_rels)}): the "
                          f"reconstruction needs distinct profiles")
    dataset = build_dataset(cfg.data, model.image_size, **task.dataset_options(cfg, model))
    task.check(cfg, model, dataset)
    check_augment(cfg, model, task)
    if cfg.train.init_from:                     # fine-tuning: the weights of a trained model (resume replaces them)
        init_from(model, cfg.train.init_from)
    return model, dataset


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where this torch has it for the device (CPU from torch 2.4): the per-tensor
    loop costs more than the maths for a small U-Net's ~150 tensors."""
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kwargs)


def flat_hparams(cfg: DictConfig) -> dict:
    """The config as flat scalars, for tensorboard's hparams."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    walk(to_dict(cfg), "")
    return out


class Trainer:
    """One run: its accelerator, model, optimizer, EMA, data order, and the files it writes.

    ``train()`` reads top to bottom: resume, the loop, then the final grid and the pipeline. The loop asks the
    task what a batch means and the objective for the loss; checkpoints are ``state.save`` / ``load``.
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        t = cfg.train
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        notes, cpu = [], no_accelerator()
        try:        # the launcher's word, else "auto" by what the device does; the saved config records what ran
            t.mixed_precision, said = training_precision(t.mixed_precision, "cpu" if cpu else "cuda",
                                                         warn=notes.append)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.accelerator = acc = Accelerator(
            cpu=cpu, mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        try:            # after the Accelerator: several CPU processes have it set the threads, then ours rule
            threads = set_threads(t.num_threads)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if said:
            acc.print(said)
        for note in notes:
            acc.print(f"WARNING: {note}")
        busy = busy_at_start(threads * acc.num_processes) if cpu and acc.is_main_process else None
        if busy:
            acc.print(busy)
        self.pace = Pace(threads, cpu=cpu)
        set_seed(t.seed)                                # the same initial weights on every process, every run
        model, dataset = validate(cfg)
        if hasattr(dataset, "preflight"):               # decode every file (or paired row) once, on the main process
            bad = dataset.preflight(progress=acc.is_main_process) if acc.is_main_process else None
            bad = gather_object([bad])[0] if acc.num_processes > 1 else bad
            apply_bad_image_policy(dataset, bad, cfg.data.bad_images, warn=acc.print)
        dataset = take_subset(dataset, cfg.data.subset)             # a small dataset cut from this one
        dataset, held = split_holdout(dataset, cfg.data.holdout)    # held-out: grids and evaluation
        set_seed(t.seed, device_specific=True)          # then different noise on each process, reproducible
        self.resume_from = ckpt.find_resume(t.resume, self.ckpt_root, warn=acc.print)

        self.world = acc.num_processes
        self.sampler = EpochSampler(len(dataset), t.batch_size, t.seed, acc.process_index, self.world,
                                    keyed=getattr(dataset, "keyed", False))
        if self.sampler.per_epoch == 0:
            raise ConfigError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                              f"({t.batch_size} x {self.world} processes); lower train.batch_size")
        self.dataset, self.held = dataset, held if held is not None else dataset
        self.task = task_of(cfg)
        self.noise_scheduler = make_noise_scheduler(cfg.diffusion)
        self.unet = model                               # unwrapped: its config and properties, for the task

        apply_fast_paths(model.to(acc.device), channels_last=t.channels_last, compile=t.compile,
                         gradient_checkpointing=t.gradient_checkpointing)
        synced = sync_batch_norm(model, acc)           # the global batch's statistics, not each process's part
        if synced:
            acc.print(f"{synced} batch-norm layers synced across {self.world} processes")
        optimizer = make_optimizer(model, t)
        # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
        lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps * self.world,
                                     num_training_steps=t.max_steps * self.world)
        self.ema = EMAModel(model.parameters(), decay=t.ema_decay, model_cls=UNet, model_config=model.config,
                            foreach=True)          # one multi-tensor op per step, not one per parameter
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(model, optimizer, lr_scheduler)
        self.ema.to(acc.device)
        # post-hoc EMA: K power-function profiles, written at evenly spaced steps (diffunet/training/power_ema.py)
        on = t.phema_snapshots > 0 and len(t.phema_sigma_rels) > 0
        self.phema = PowerEMA(model.named_parameters(), t.phema_sigma_rels).to(acc.device) if on else None
        self.phema_steps = snapshot_steps(t.max_steps, t.phema_snapshots) if on else set()
        self.step = 0                   # optimizer updates made
        self.batches_seen = 0           # micro-batches drawn (more than step * grad_accum once steps are skipped)
        self.skipped = 0                # non-finite steps skipped, in total
        self.bad_in_row = 0             # non-finite steps skipped since the last good one
        self.signal: int | None = None  # SIGTERM / SIGINT received

    # ---------------------------------------------------------------------------------------- the run

    def train(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self.out / "config.yaml")
        acc.init_trackers("train", config=flat_hparams(cfg))
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
            acc.print(f"resumed from {self.resume_from} at step {self.step}")
        with self.signals():
            finished = self._loop()
        if not finished:
            path = self.save_checkpoint()
            name = signal.Signals(self.signal).name if self.signal else "a signal"
            acc.end_training()
            raise Interrupted(f"stopped by {name} at step {self.step}; checkpoint {path} written, continue with "
                              f"--resume latest", self.signal)
        self.sample_grid("final")
        path = self.save_pipeline()
        acc.end_training()
        acc.print(f"pipeline written to {path}")
        return path

    def _loop(self) -> bool:
        """Train to ``max_steps``; False if a signal stopped it first."""
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        params = list(self.model.parameters())
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train",
                   dynamic_ncols=True)
        meter = Meter(acc.device)
        data = self.batches()
        self.model.train()
        while self.step < t.max_steps:
            batch = self._next_batch(data)
            if batch is None:                           # a signal: every process stops here, together
                bar.close()
                return False
            x0, cond = self.task.training_batch(batch, self.unet, cfg)
            with acc.accumulate(self.model):
                loss = self.task.loss(self.model, self.noise_scheduler, x0, cond, cfg)
                acc.backward(loss)
                if acc.sync_gradients:
                    meter.grad_norm = acc.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
                    if not self._finite(loss, meter.grad_norm):
                        continue                        # skipped: weights, optimizer and EMA as they were
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            meter.add(loss, x0.shape[0])
            if not acc.sync_gradients:
                continue
            self.ema.step(params)
            if self.phema is not None:
                self.phema.update(params)
            self.step += 1
            bar.update(1)
            self._after_step(meter, bar)
        bar.close()
        return True

    def _next_batch(self, data):
        """The next micro-batch, or None if any process received a signal. An unreadable image on any process
        stops every process with its message."""
        error, batch = None, None
        try:
            batch = next(data)
        except DataError as e:
            error = str(e)
        if self.agree(error):
            return None
        self.batches_seen += 1
        return batch

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """The non-finite-step guard: False (and the gradients dropped) for a non-finite loss or gradient, so the
        update is skipped; ``train.max_bad_steps`` in a row stop the run with a checkpoint of the weights from
        before the first. One host sync per update: a skipped step must leave the weights, the optimizer and
        the EMA exactly as they were, which needs the decision on the host. (fp16's GradScaler handles
        overflowing gradients itself; a non-finite loss is still bad.)"""
        finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | (self.accelerator.scaler is not None))
        if finite.item():
            self.bad_in_row = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_row, self.skipped = self.bad_in_row + 1, self.skipped + 1
        self.accelerator.log({"skipped_steps": self.skipped}, step=self.step)
        self.accelerator.print(f"warning: non-finite loss or gradient at step {self.step + 1}, step skipped "
                               f"({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            path = self.save_checkpoint()
            raise TrainingError(f"{self.bad_in_row} non-finite losses/gradients in a row before step "
                                f"{self.step + 1}; checkpoint {path} holds the weights from before the first; try "
                                f"a lower train.lr, train.grad_clip, or train.mixed_precision=bf16/no")
        return False

    def _after_step(self, meter: "Meter", bar) -> None:
        """What the schedule asks for after optimizer step ``self.step``: logs, checkpoint, grid, evaluation."""
        t, last = self.cfg.train, self.step == self.cfg.train.max_steps
        if self.step % t.log_every == 0 or last:
            logs = meter.read(self.accelerator, self.world)
            logs["lr"] = self.lr_scheduler.get_last_lr()[0]
            self.accelerator.log(logs, step=self.step)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['img_per_s']:.0f}")
            slow = self.pace.check(logs["img_per_s"], self.step)
            if slow and self.accelerator.is_main_process:
                bar.write(slow)                    # above the progress bar, not through it
        with meter.paused():                       # outputs are not training: the throughput leaves them out
            if self.step in self.phema_steps:      # before the checkpoint, so a resume from it never misses one
                self.save_snapshot()
            if self.step % t.checkpoint_every == 0 or last:
                self.save_checkpoint()
            if self.step % t.sample_every == 0 and not last:
                self.sample_grid(f"step_{self.step:06d}")
            if t.eval_every > 0 and (self.step % t.eval_every == 0 or last):
                self.evaluate()

    def batches(self):
        """Micro-batches on the device, continuing the data order where the checkpoint left it."""
        self.sampler.start = self.batches_seen
        # The loader's own generator: creating the iterator would otherwise draw from the global RNG, and a
        # resumed run (which creates it after restoring the RNG) would diverge from an uninterrupted one.
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.cfg.data.num_workers,
                            pin_memory=self.accelerator.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.cfg.train.seed))
        for batch in loader:                        # (images, labels[, conditions])
            yield tuple(t.to(self.accelerator.device, non_blocking=True) for t in batch)

    # ---------------------------------------------------------------------------------------- agreement

    def agree(self, error: str | None = None) -> bool:
        """Check in with every process: raise on all of them if any hit ``error`` (so none waits forever on the
        others), and return whether any received SIGTERM/SIGINT (so all stop together).

        One small all-reduce when several processes run; the messages travel only when something failed.
        """
        acc = self.accelerator
        if acc.num_processes == 1:
            if error:
                raise TrainingError(error)
            return self.signal is not None
        flags = torch.tensor([float(error is not None), float(self.signal is not None)], device=acc.device)
        failed, stop = acc.reduce(flags, reduction="sum").tolist()
        if failed > 0:
            messages = [m for m in gather_object([error]) if m]
            raise TrainingError(error or f"another process failed: {messages[0]}")
        return stop > 0

    @contextlib.contextmanager
    def signals(self):
        """SIGTERM and SIGINT ask for a checkpoint and a clean exit at the end of the step; a second one kills."""
        def ask(signum, frame):
            self.signal = signum
            signal.signal(signum, previous[signum] or signal.SIG_DFL)
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, ask)
            except ValueError:          # not the main thread: no handlers, the run is simply not interruptible
                pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ---------------------------------------------------------------------------------------- state

    def identity(self) -> dict:
        """What a checkpoint must share with this run to resume it exactly (``state.EXACT_RESUME_KEYS``)."""
        t = self.cfg.train
        return {"world_size": self.world, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seed": t.seed,
                "dataset_size": len(self.dataset)}

    def save_checkpoint(self) -> Path:
        """The full state as checkpoint ``step`` (see ``state.save``); a failed write stops every process
        with one message, every earlier checkpoint intact."""
        state = {"step": self.step, "batches_seen": self.batches_seen, "skipped_steps": self.skipped,
                 **self.identity()}
        path, error = ckpt.save(self.ckpt_root, self.step, self.accelerator, self.ema, state,
                                keep=self.cfg.train.keep_checkpoints, extras=self.extras())
        self.agree(error)
        return path

    def extras(self) -> dict:
        """State beside the EMA that a checkpoint carries for an exact resume (``state.save``'s extras)."""
        return {"phema": self.phema} if self.phema is not None else {}

    def save_snapshot(self) -> Path:
        """The post-hoc EMA profiles as ``phema_snapshots/phema-<step>.safetensors``, written atomically by the
        main process; a failed write stops every process with one message, every earlier snapshot intact."""
        folder, error = self.out / SNAPSHOT_DIR, None
        if self.accelerator.is_main_process:
            try:
                self.phema.snapshot(folder, self.step)
            except OSError as e:
                error = (f"could not write post-hoc EMA snapshot phema-{self.step:06d} ({e}); every earlier "
                         f"snapshot in {folder} is intact")
        self.agree(error)
        return folder / f"phema-{self.step:06d}.safetensors"

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.load(path, self.accelerator, self.ema, self.identity(),
                          allow_inexact=self.cfg.train.allow_inexact_resume, warn=self.accelerator.print,
                          extras=self.extras())
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        self.skipped = state.get("skipped_steps", 0)

    # ---------------------------------------------------------------------------------------- outputs

    @contextlib.contextmanager
    def _ema_weights(self):
        """The unwrapped model with the EMA weights swapped in, in eval mode; restored on exit."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        self.ema.store(model.parameters())
        self.ema.copy_to(model.parameters())
        model.eval()
        try:
            yield model
        finally:
            self.ema.restore(model.parameters())
            model.train(was_training)

    def _sampler(self, model, seed: int, batch_size: int) -> TaskSampler:
        """The task's own pipeline of ``model`` with the run's sampler and sampling settings (``sample.*``)."""
        s = self.cfg.sample
        pipe = self.task.pipeline(model, make_scheduler(s.scheduler, self.noise_scheduler.config), self.cfg)
        pipe.set_progress_bar_config(disable=True)
        return TaskSampler(pipe, seed=seed, steps=s.steps, guidance_scale=s.guidance_scale, batch_size=batch_size,
                       device=self.accelerator.device)

    def sample_grid(self, name: str) -> Path | None:
        """A grid of EMA samples, laid out as the task says, at ``samples/<name>.png``. Main process only."""
        if not self.accelerator.is_main_process:
            return None
        n = self.cfg.sample.num_images
        with self._ema_weights() as model:
            sample = self._sampler(model, seed=self.cfg.sample.seed, batch_size=max(n, 1))
            images, nrow = self.task.grid(model, n, sample, self.held, self.cfg)
        return save_grid(to_uint8(pictures(images)), self.out / "samples" / f"{name}.png", nrow=nrow)

    def evaluate(self) -> dict | None:
        """The task's scores of EMA samples (``train.eval_num_images``), logged and appended to ``eval.jsonl``.
        Main process only."""
        if not self.accelerator.is_main_process:
            return None
        s = self.cfg.sample
        with self._ema_weights() as model:
            sample = self._sampler(model, seed=s.seed + 1, batch_size=s.num_images)
            scores = self.task.evaluate(model, sample, self.held, self.cfg)
        scores = {k: v for k, v in scores.items() if isinstance(v, float) and math.isfinite(v)}
        self.accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=self.step)
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **scores}) + "\n")
        self.accelerator.print(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        return scores

    def save_pipeline(self) -> Path:
        """The EMA model and the training scheduler as a pipeline folder that loads without diffunet installed,
        with its model card and final grid (``export.write_folder``), replaced atomically."""
        final = self.out / "pipeline"
        if self.accelerator.is_main_process:
            grid = self.out / "samples" / "final.png"
            with self._ema_weights() as model:
                pipeline = self.task.pipeline(model, self.noise_scheduler, self.cfg)
                ckpt.replace_folder(final, lambda tmp: write_folder(tmp, pipeline, self.cfg, self.out, self.step,
                                                                    grid if grid.is_file() else None))
        self.accelerator.wait_for_everyone()
        return final


class Meter:
    """The loss, gradient norm and throughput since the last log line; one host sync per log line."""

    def __init__(self, device):
        self.loss_sum, self.grad_norm = torch.zeros((), device=device), torch.zeros((), device=device)
        self.micro, self.seen, self.clock = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.detach()
        self.micro, self.seen = self.micro + 1, self.seen + images

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (checkpoints, grids, evaluation) does not count against the throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.clock += time.perf_counter() - start

    def read(self, accelerator, world: int) -> dict:
        """The means across processes, then a fresh start."""
        loss = accelerator.reduce(self.loss_sum, reduction="mean").item() / self.micro
        rate = self.seen * world / (time.perf_counter() - self.clock)
        logs = {"loss": loss, "grad_norm": float(self.grad_norm), "img_per_s": rate}
        self.loss_sum.zero_()
        self.micro, self.seen, self.clock = 0, 0, time.perf_counter()
        return logs


class Interrupted(TrainingError):
    """SIGTERM/SIGINT stopped the run after a checkpoint; ``signum`` gives the exit code 128 + signum."""

    def __init__(self, message: str, signum: int | None):
        super().__init__(message)
        self.signum = signum or signal.SIGTERM


def train(cfg: DictConfig) -> Path:
    """Train from a resolved config; returns the pipeline folder."""
    return Trainer(cfg).train()
