"""Checkpoint folders that are never half-written: a temporary folder, fsync, a sha256 manifest, an atomic rename.

A folder ``step_XXXXXX`` under ``<run>/checkpoints`` exists only once complete; its ``manifest.json`` (written
last, inside the temporary folder) lists every file's size and sha256, so a file damaged later is detected by
``verify`` and the checkpoint skipped in favour of the previous good one. Old checkpoints are rotated only after
the new one is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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
        _fsync_dir(d)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
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
