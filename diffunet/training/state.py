"""Everything a run saves and loads: checkpoints (model, optimizer, schedule, EMA, every process's RNG, the
trainer's counters) and finding the one to resume from. Reading a model or pipeline folder without running code
from it is ``diffunet.pretrained``; writing one, ``diffunet.export``.

Checkpoint folders are never half-written: a temporary folder, fsync, a sha256 manifest, an atomic rename.

A folder ``step_XXXXXX`` under ``<run>/checkpoints`` exists only once complete; its ``manifest.json`` (written
last, inside the temporary folder) lists every file's size and sha256, so a file damaged later is detected by
``verify`` and the checkpoint skipped in favour of the previous good one. Old checkpoints are rotated only after
the new one is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")

# What a resumed run must share with the checkpoint for its data order and RNG streams to continue exactly.
EXACT_RESUME_KEYS = ("world_size", "batch_size", "grad_accum", "seed", "dataset_size")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f".step_{step:06d}.tmp"


def seal(tmp: Path, final: Path) -> Path:
    """Fsync every file of ``tmp``, write the manifest, and rename it to ``final`` atomically.

    If ``final`` exists (the same step saved before, as when a run stops on bad steps right after saving), it
    holds the same weights and is kept.
    """
    if final.exists():
        shutil.rmtree(tmp)
        return final
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {}
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        manifest[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"complete": True, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in {p.parent for p in files} | {tmp}:
        fsync_dir(d)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def verify(path: Path) -> None:
    """Raise CheckpointError unless every file in ``path``'s manifest is there with its size and sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST} (incomplete or not a checkpoint)") from None
    for name, want in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != want["bytes"] or _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupted (checksum mismatch)")


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every sealed checkpoint under ``root``, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return sorted(found)


def latest_valid(root: Path, warn=print) -> Path | None:
    """The newest checkpoint that passes ``verify``; damaged ones are named through ``warn`` and skipped."""
    for _, path in reversed(complete_steps(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"skipping damaged checkpoint: {e}")
    return None


def rotate(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest sealed checkpoints, and leftovers of interrupted saves."""
    for _, path in complete_steps(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in Path(root).glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------------------------------------ RNG state
# Every process's RNG state, gathered to the main process and written there as safetensors + JSON: one writer,
# and nothing a load could execute. (accelerate's save_state writes a pickle per process, from each process.)

def rng_state() -> dict:
    """This process's python, numpy, torch (and CUDA) RNG states, as tensors and plain numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "meta": {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                      "python": [version, list(internal), gauss_next]}}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def save_rng(folder: Path, states: list[dict]) -> None:
    """Write the states of all processes (index = process rank) into ``folder``."""
    tensors, meta = {}, {}
    for rank, state in enumerate(states):
        meta[str(rank)] = state["meta"]
        tensors.update({f"{rank}.{k}": v.contiguous() for k, v in state.items() if k != "meta"})
    save_file(tensors, Path(folder) / "rng.safetensors")
    (Path(folder) / "rng.json").write_text(json.dumps(meta))


def load_rng(folder: Path, rank: int) -> bool:
    """Restore process ``rank``'s RNG states from ``folder``; False if the checkpoint has none for it."""
    meta = json.loads((Path(folder) / "rng.json").read_text()).get(str(rank))
    if meta is None:
        return False
    tensors = load_file(Path(folder) / "rng.safetensors")
    torch.set_rng_state(tensors[f"{rank}.torch"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors[f"{rank}.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[k] for k in sorted(tensors, key=lambda k: int(k.rsplit(".", 1)[1]) if ".cuda." in k else -1)
            if k.startswith(f"{rank}.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


# ------------------------------------------------------------------------------------------ a run's state

def find_resume(resume: str | None, root: Path, warn=print) -> Path | None:
    """The checkpoint ``train.resume`` asks for: None (start fresh, refused over existing checkpoints),
    "latest" (the newest that verifies) or a folder (verified)."""
    existing = complete_steps(root)
    if resume is None:
        if existing:
            raise ConfigError(f"{Path(root).parent} already holds checkpoints (up to step {existing[-1][0]}); "
                              f"pass --resume latest to continue, or choose another output_dir")
        return None
    if resume == "latest":
        found = latest_valid(root, warn=warn)
        if found is None and existing:
            raise CheckpointError(f"every checkpoint under {root} is damaged (see above); refusing to start over "
                                  f"silently: move them away or choose another output_dir")
        return found
    verify(Path(resume))
    return Path(resume)


def save(root: Path, step: int, accelerator, ema, state: dict, keep: int,
         extras: dict | None = None) -> tuple[Path, str | None]:
    """Write the run's full state as checkpoint ``step`` under ``root``, then rotate to the ``keep`` newest.

    Call it on every process: the others send the main process their RNG states, and only it writes (model,
    optimizer and lr schedule through accelerate, EMA and RNG as safetensors + JSON, ``state`` as
    trainer_state.json; each of ``extras``, name -> an object with ``save_to(folder) -> dict``, such as
    ``power_ema.PowerEMA``, writes its files and gives its JSON entry of trainer_state.json, before the seal).
    Returns (folder, None), or (folder, message) if the write failed (a full disk, say):
    the temporary folder is then removed and every earlier checkpoint left as it was.
    """
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    rng = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if not accelerator.is_main_process:
        return final, None
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accelerator.save_state(str(tmp), safe_serialization=True)   # model, optimizer, lr schedule (no collective)
        save_rng(tmp, rng)
        extra = {name: obj.save_to(tmp) for name, obj in (extras or {}).items()}
        (tmp / "trainer_state.json").write_text(json.dumps(dict(state, ema=_save_ema(tmp, ema), **extra), indent=1))
        seal(tmp, final)
        rotate(root, keep)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_valid(root, warn=lambda _: None)
        return final, (f"could not write checkpoint {final.name} ({e}); "
                       f"{f'the last good checkpoint {kept} is intact' if kept else 'no earlier checkpoint exists'}")
    return final, None


def load(path: Path, accelerator, ema, current: dict, allow_inexact: bool, warn=print,
         extras: dict | None = None) -> dict:
    """Restore checkpoint ``path`` into the accelerator's objects, ``ema`` and this process's RNG; returns the
    trainer state saved with it. Refused (CheckpointError) where ``current`` differs from the saved run in an
    ``EXACT_RESUME_KEYS`` entry, unless ``allow_inexact``; refused where a file holds pickled objects. Each of
    ``extras`` (name -> an object with ``load_from(folder, entry)``) is restored from its entry; a checkpoint
    without one, or one it refuses (ValueError), cannot resume this run exactly: CheckpointError."""
    state = json.loads((path / "trainer_state.json").read_text())
    changed = [f"{k} {state[k]} -> {current[k]}" for k in EXACT_RESUME_KEYS if state.get(k) != current[k]]
    if changed:
        message = f"resuming from {path} cannot be exact ({', '.join(changed)}): the data order and RNG differ"
        if not allow_inexact:
            raise CheckpointError(f"{message}; set train.allow_inexact_resume=true to continue anyway")
        warn(f"WARNING: {message}; continuing as train.allow_inexact_resume=true asks")
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: a file holds objects other than plain tensors and "
                              f"numbers, which could run code ({str(e).splitlines()[0]})") from None
    load_rng(path, accelerator.process_index)
    _load_ema(path, ema, state["ema"])
    ema.to(accelerator.device)
    for name, obj in (extras or {}).items():
        if name not in state:
            raise CheckpointError(f"{path} holds no {name} state (its run kept none), so this run cannot resume "
                                  f"from it exactly; turn {name} off to resume it")
        try:
            obj.load_from(path, state[name])
        except ValueError as e:
            raise CheckpointError(f"cannot resume {path} exactly: {e}") from None
    return state


# EMA as safetensors + JSON rather than accelerate's pickled custom state: loading it runs no code.

def _save_ema(folder: Path, ema) -> dict:
    """Write ``ema``'s shadow weights to ``folder``; returns the rest of its state (decay, step counts)."""
    meta = ema.state_dict()
    shadow = {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(meta.pop("shadow_params"))}
    save_file(shadow, Path(folder) / "ema.safetensors")
    return meta


def _load_ema(folder: Path, ema, meta: dict) -> None:
    ema.load_state_dict(dict(meta, shadow_params=_ema_shadow(folder)))


def _ema_shadow(folder: Path) -> list[torch.Tensor]:
    shadow = load_file(Path(folder) / "ema.safetensors")
    return [shadow[f"{i}"] for i in range(len(shadow))]


def load_ema_weights(path: Path, model) -> int:
    """Put checkpoint ``path``'s EMA weights into ``model`` (its buffers from the model itself), verified first;
    returns the checkpoint's step. For exporting a checkpoint: no optimizer, accelerator or RNG involved."""
    verify(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        model.load_state_dict(load_file(path / "model.safetensors"))    # buffers too, then the EMA parameters
        with torch.no_grad():
            for p, ema in zip(model.parameters(), _ema_shadow(path), strict=True):
                p.copy_(ema)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).strip().splitlines()[0]}") from None
    return int(state["step"])


def replace_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """Replace folder ``final`` atomically with what ``write(tmp)`` puts in a temporary folder beside it: a
    reader finds the old folder or the new one, never a mix."""
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
