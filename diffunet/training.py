"""The training loop: accelerate for processes, precision, accumulation and state; diffusers for the schedule,
EMA and learning-rate schedule. ``train.py`` parses a config and calls ``train``."""

from __future__ import annotations

import contextlib
import json
import pickle
import math
import shutil
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers import DDPMPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import ConfigError, build_model, to_dict
from .data import DataError, ImageFolder, apply_bad_image_policy, build_dataset
from .objectives import diffusion_loss, make_noise_scheduler
from . import objectives
from .metrics import ExtractorUnavailable, evaluate, load_extractor
from .nn import choose
from .sampling import generate, make_scheduler, save_grid, to_uint8
from .fast import apply_fast_paths
from .unet import UNet

PRECISIONS = {"no": "no", "fp16": "fp16", "bf16": "bf16"}

# What a resumed run must share with the checkpoint for its data order and RNG streams to continue exactly.
EXACT_RESUME_KEYS = ("world_size", "batch_size", "grad_accum", "seed", "dataset_size")


class TrainingError(RuntimeError):
    """A run that had to stop; the message says why and what was kept."""


class EpochSampler(Sampler):
    """Index batches for one process, forever: a permutation per epoch seeded by (seed, epoch), each global batch
    split across processes, starting at any global batch number.

    Hand-written rather than accelerate's seedable sampler + ``skip_first_batches``: the position in the data
    order must be part of the checkpoint for an exact mid-epoch resume, and the skipping loader restarts the
    sampler's epoch count (accelerate 1.x), which would replay epoch 0's order.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world: int, start: int = 0):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
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
            yield perm[lo:lo + self.batch_size].tolist()
            batch += 1


def no_accelerator() -> bool:
    """True on a machine without a GPU. accelerate (1.x) then needs ``cpu=True`` to see several launched
    processes as MULTI_CPU (gloo); without it each process would train alone, believing it is the main one."""
    probe = getattr(torch, "accelerator", None)                 # torch >= 2.6
    return not probe.is_available() if probe is not None else not torch.cuda.is_available()


def validate(cfg: DictConfig) -> tuple[UNet, torch.utils.data.Dataset]:
    """Everything that can be wrong with a config, checked before any compute: model, data, names, numbers."""
    model = build_model(cfg)
    try:
        objectives.check(cfg.diffusion)
        choose(PRECISIONS, cfg.train.mixed_precision, "train.mixed_precision")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 on a CPU")
    for key in ("max_steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "sample_every"):
        if cfg.train[key] < 1:
            raise ConfigError(f"train.{key} must be at least 1 (got {cfg.train[key]})")
    if not 0 <= cfg.train.label_dropout < 1:
        raise ConfigError(f"train.label_dropout must be in [0, 1) (got {cfg.train.label_dropout})")
    dataset = build_dataset(cfg.data, model.config.sample_size, model.config.in_channels)
    if cfg.train.eval_every > 0:
        if eval_reference(cfg) is None:
            raise ConfigError(f"train.eval_every needs train.eval_reference (a folder, an .npz or 'digits') for "
                              f"data.source={cfg.data.source}")
        try:
            load_extractor(cfg.train.eval_extractor)
        except ExtractorUnavailable as e:
            raise ConfigError(f"train.eval_extractor: {e}") from None
    if model.config.num_classes and not dataset.num_classes:
        raise ConfigError(f"model.num_classes={model.config.num_classes} but data.source={cfg.data.source} has no "
                          f"labels; set model.num_classes=null or give labelled data")
    if model.config.num_classes and dataset.num_classes > model.config.num_classes:
        raise ConfigError(f"data has {dataset.num_classes} classes but model.num_classes={model.config.num_classes}")
    return model, dataset


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where this torch has it for the device (CPU from torch 2.4): the per-tensor
    loop costs more than the maths for a small U-Net's ~150 tensors."""
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kwargs)


def eval_reference(cfg: DictConfig) -> str | None:
    """What periodic evaluation compares with: the configured reference, else the training data if it can."""
    if cfg.train.eval_reference:
        return cfg.train.eval_reference
    source = str(cfg.data.source)
    return source if source == "digits" or Path(source).is_dir() else None


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
    """One run: its accelerator, model, optimizer, EMA, data order, and the files it writes."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        t = cfg.train
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.accelerator = acc = Accelerator(
            cpu=no_accelerator(), mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        set_seed(t.seed)                                # the same initial weights on every process, every run
        model, dataset = validate(cfg)
        if isinstance(dataset, ImageFolder):            # decode every file once, on the main process
            bad = dataset.preflight(progress=acc.is_main_process) if acc.is_main_process else None
            bad = gather_object([bad])[0] if acc.num_processes > 1 else bad
            apply_bad_image_policy(dataset, bad, cfg.data.bad_images, warn=acc.print)
        set_seed(t.seed, device_specific=True)          # then different noise on each process, reproducible
        self.resume_from = self._find_resume()

        self.world = acc.num_processes
        self.sampler = EpochSampler(len(dataset), t.batch_size, t.seed, acc.process_index, self.world)
        if self.sampler.per_epoch == 0:
            raise ConfigError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                              f"({t.batch_size} x {self.world} processes); lower train.batch_size")
        self.dataset = dataset
        self.noise_scheduler = make_noise_scheduler(cfg.diffusion)
        self.num_classes = model.config.num_classes     # also the "null" class id that label dropout uses
        self.conditional = bool(self.num_classes)

        apply_fast_paths(model.to(acc.device), channels_last=t.channels_last, compile=t.compile,
                         gradient_checkpointing=t.gradient_checkpointing)
        optimizer = make_optimizer(model, t)
        # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
        lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps * self.world,
                                     num_training_steps=t.max_steps * self.world)
        self.ema = EMAModel(model.parameters(), decay=t.ema_decay, model_cls=UNet, model_config=model.config,
                            foreach=True)          # one multi-tensor op per step, not one per parameter
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(model, optimizer, lr_scheduler)
        self.ema.to(acc.device)
        self.step = 0                   # optimizer updates made
        self.batches_seen = 0           # micro-batches drawn (more than step * grad_accum once steps are skipped)
        self.skipped = 0                # non-finite steps skipped, in total
        self.signal: int | None = None  # SIGTERM / SIGINT received

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

    def _find_resume(self) -> Path | None:
        resume = self.cfg.train.resume
        existing = ckpt.complete_steps(self.ckpt_root)
        if resume is None:
            if existing:
                raise ConfigError(f"{self.out} already holds checkpoints (up to step {existing[-1][0]}); "
                                  f"pass --resume latest to continue, or choose another output_dir")
            return None
        if resume == "latest":
            found = ckpt.latest_valid(self.ckpt_root, warn=self.accelerator.print)
            if found is None and existing:
                raise ckpt.CheckpointError(f"every checkpoint under {self.ckpt_root} is damaged (see above); "
                                           f"refusing to start over silently: move them away or choose another output_dir")
            return found
        path = Path(resume)
        ckpt.verify(path)
        return path

    def save_checkpoint(self) -> Path:
        """Write the full state to a temporary folder, then seal it (manifest, fsync, rename) and rotate.

        Only the main process writes: the other processes send it their RNG states. A failed write (a full disk,
        say) removes the temporary folder, leaves every earlier checkpoint as it was, and stops every process
        with one message.
        """
        acc = self.accelerator
        tmp, final = ckpt.tmp_dir(self.ckpt_root, self.step), ckpt.step_dir(self.ckpt_root, self.step)
        rng = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]
        error = None
        if acc.is_main_process:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                acc.save_state(str(tmp), safe_serialization=True)    # model, optimizer, lr schedule (DDP: no collective)
                ckpt.save_rng(tmp, rng)
                # EMA as safetensors + JSON rather than accelerate's pickled custom state: loading runs no code.
                ema = self.ema.state_dict()
                shadow = {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.pop("shadow_params"))}
                save_file(shadow, tmp / "ema.safetensors")
                state = {"step": self.step, "batches_seen": self.batches_seen, "skipped_steps": self.skipped,
                         "world_size": self.world, "batch_size": self.cfg.train.batch_size,
                         "grad_accum": self.cfg.train.grad_accum, "seed": self.cfg.train.seed,
                         "dataset_size": len(self.dataset), "ema": ema}
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
                ckpt.seal(tmp, final)
                ckpt.rotate(self.ckpt_root, self.cfg.train.keep_checkpoints)
            except OSError as e:
                error = self._save_failed(final, str(e))
        self.agree(error)
        return final

    def _save_failed(self, final: Path, error: str) -> str:
        shutil.rmtree(ckpt.tmp_dir(self.ckpt_root, self.step), ignore_errors=True)
        kept = ckpt.latest_valid(self.ckpt_root, warn=lambda _: None)
        return (f"could not write checkpoint {final.name} ({error}); "
                f"{f'the last good checkpoint {kept} is intact' if kept else 'no earlier checkpoint exists'}")

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "trainer_state.json").read_text())
        current = {"world_size": self.world, "batch_size": self.cfg.train.batch_size,
                   "grad_accum": self.cfg.train.grad_accum, "seed": self.cfg.train.seed,
                   "dataset_size": len(self.dataset)}
        changed = [f"{k} {state[k]} -> {current[k]}" for k in EXACT_RESUME_KEYS if state.get(k) != current[k]]
        if changed:
            message = f"resuming from {path} cannot be exact ({', '.join(changed)}): the data order and RNG differ"
            if not self.cfg.train.allow_inexact_resume:
                raise ckpt.CheckpointError(f"{message}; set train.allow_inexact_resume=true to continue anyway")
            self.accelerator.print(f"WARNING: {message}; continuing as train.allow_inexact_resume=true asks")
        try:
            self.accelerator.load_state(str(path))
        except pickle.UnpicklingError as e:
            raise ckpt.CheckpointError(f"refusing to load {path}: a file holds objects other than plain tensors "
                                       f"and numbers, which could run code ({str(e).splitlines()[0]})") from None
        ckpt.load_rng(path, self.accelerator.process_index)
        shadow = load_file(path / "ema.safetensors")
        self.ema.load_state_dict(dict(state["ema"], shadow_params=[shadow[f"{i}"] for i in range(len(shadow))]))
        self.ema.to(self.accelerator.device)
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

    def sample_grid(self, name: str) -> Path | None:
        """A grid of EMA samples (balanced classes, one class per column) at ``samples/<name>.png``."""
        if not self.accelerator.is_main_process:
            return None
        s = self.cfg.sample
        with self._ema_weights() as model:
            n, labels, nrow = s.num_images, None, None
            if self.conditional:
                k = model.config.num_classes
                nrow = k if n >= k else None
                labels = torch.arange(n) % k
            images = generate(model, make_scheduler(s.scheduler, self.noise_scheduler.config), n, steps=s.steps,
                              seed=s.seed, class_labels=labels, guidance_scale=s.guidance_scale,
                              batch_size=max(n, 1))
        return save_grid(to_uint8(images), self.out / "samples" / f"{name}.png", nrow=nrow)

    def evaluate(self) -> dict | None:
        """FID/KID (and IS) of ``train.eval_num_images`` EMA samples against the reference, logged and appended
        to ``eval.jsonl``. Main process only."""
        if not self.accelerator.is_main_process:
            return None
        s, t = self.cfg.sample, self.cfg.train
        with self._ema_weights() as model:
            images = generate(model, make_scheduler(s.scheduler, self.noise_scheduler.config), t.eval_num_images,
                              steps=s.steps, seed=s.seed + 1, class_labels="all" if self.conditional else None,
                              guidance_scale=s.guidance_scale, batch_size=s.num_images)
        scores = evaluate(to_uint8(images), eval_reference(self.cfg), t.eval_extractor, seed=s.seed)
        scores = {k: v for k, v in scores.items() if isinstance(v, float) and math.isfinite(v)}
        self.accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=self.step)
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **scores}) + "\n")
        self.accelerator.print(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        return scores

    def save_pipeline(self) -> Path:
        """The EMA model and the training scheduler as a diffusers pipeline folder, replaced atomically."""
        final = self.out / "pipeline"
        if self.accelerator.is_main_process:
            tmp = self.out / ".pipeline.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            with self._ema_weights() as model:
                DDPMPipeline(unet=model, scheduler=self.noise_scheduler).save_pretrained(tmp)
            old = self.out / ".pipeline.old"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    # ---------------------------------------------------------------------------------------- loop

    def batches(self):
        """Micro-batches on the device, continuing the data order where the checkpoint left it."""
        self.sampler.start = self.batches_seen
        # The loader's own generator: creating the iterator would otherwise draw from the global RNG, and a
        # resumed run (which creates it after restoring the RNG) would diverge from an uninterrupted one.
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.cfg.data.num_workers,
                            pin_memory=self.accelerator.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.cfg.train.seed))
        for x, y in loader:
            yield x.to(self.accelerator.device, non_blocking=True), y.to(self.accelerator.device, non_blocking=True)

    def augment(self, x: torch.Tensor, y: torch.Tensor):
        """Random horizontal flips (if asked) and label dropout to the null class (for guidance), on the batch."""
        if self.cfg.data.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if not self.conditional:
            return x, None
        drop = torch.rand(y.shape[0], device=y.device) < self.cfg.train.label_dropout
        return x, torch.where(drop, torch.full_like(y, self.num_classes), y)

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
        loss_sum, micro, seen, clock = torch.zeros((), device=acc.device), 0, 0, time.perf_counter()
        grad_norm, bad_in_row = torch.zeros((), device=acc.device), 0
        data = self.batches()
        self.model.train()
        while self.step < t.max_steps:
            error = None
            try:
                x, y = next(data)
            except DataError as e:
                error = str(e)
            if self.agree(error):
                bar.close()
                return False
            self.batches_seen += 1
            x, y = self.augment(x, y)
            with acc.accumulate(self.model):
                loss = diffusion_loss(self.model, self.noise_scheduler, x, {"class_labels": y}, weighting=cfg.diffusion.loss_weighting,
                                      gamma=cfg.diffusion.snr_gamma)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
                    # One host sync per update, for the non-finite guard: a skipped step must leave the weights,
                    # the optimizer and the EMA exactly as they were, which needs the decision on the host.
                    # (fp16's GradScaler handles overflowing gradients itself; a non-finite loss is still bad.)
                    finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | (acc.scaler is not None))
                    if not finite.item():
                        self.optimizer.zero_grad(set_to_none=True)
                        bad_in_row, self.skipped = bad_in_row + 1, self.skipped + 1
                        acc.log({"skipped_steps": self.skipped}, step=self.step)
                        acc.print(f"warning: non-finite loss or gradient at step {self.step + 1}, step skipped "
                                  f"({bad_in_row} in a row)")
                        if bad_in_row >= t.max_bad_steps:
                            path = self.save_checkpoint()
                            raise TrainingError(
                                f"{bad_in_row} non-finite losses/gradients in a row before step {self.step + 1}; "
                                f"checkpoint {path} holds the weights from before the first; try a lower "
                                f"train.lr, train.grad_clip, or train.mixed_precision=bf16/no")
                        continue
                bad_in_row = 0 if acc.sync_gradients else bad_in_row
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            micro += 1
            seen += x.shape[0]
            if not acc.sync_gradients:
                continue
            self.ema.step(params)
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                mean_loss = acc.reduce(loss_sum, reduction="mean").item() / micro
                elapsed = time.perf_counter() - clock
                rate = seen * self.world / elapsed
                logs = {"loss": mean_loss, "lr": self.lr_scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm), "img_per_s": rate}
                acc.log(logs, step=self.step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
                loss_sum.zero_()
                micro, seen, clock = 0, 0, time.perf_counter()
            if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                self.save_checkpoint()
            if self.step % t.sample_every == 0 and self.step != t.max_steps:
                self.sample_grid(f"step_{self.step:06d}")
            if t.eval_every > 0 and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                self.evaluate()
        bar.close()
        return True


class Interrupted(TrainingError):
    """SIGTERM/SIGINT stopped the run after a checkpoint; ``signum`` gives the exit code 128 + signum."""

    def __init__(self, message: str, signum: int | None):
        super().__init__(message)
        self.signum = signum or signal.SIGTERM


def train(cfg: DictConfig) -> Path:
    """Train from a resolved config; returns the pipeline folder."""
    return Trainer(cfg).train()
