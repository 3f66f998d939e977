"""Training checkpoints: model weights in safetensors plus optimizer/scheduler/RNG state.

Layout inside ``<output_dir>/checkpoints/``::

    iter_0000500.safetensors    model weights + metadata (loads with kd_detr.models.load_model)
    iter_0000500.state.pth      optimizer, lr scheduler, grad scaler, epoch, iteration, RNG states
    latest.json                 points at the newest complete pair

Both files are written under temporary names and renamed; ``latest.json`` is replaced only after
both exist, so an interrupted save never leaves a checkpoint that ``--resume auto`` would pick.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_detr.atomic import atomic_write, write_json_atomic

STATE_FORMAT = 1


@dataclass
class ResumePoint:
    weights: Path
    state: Path
    iteration: int


def _torch_save_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(checkpoint_dir: str | os.PathLike, model: torch.nn.Module, *, optimizer, scheduler,
                    scaler, epoch: int, batch_in_epoch: int, iteration: int, metadata: dict[str, Any],
                    label_map=None, keep_last: int = 2, extra: dict[str, Any] | None = None) -> ResumePoint:
    """Save a resumable checkpoint at an iteration boundary and prune older ones."""
    from kd_detr.models import save_model

    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stem = f"iter_{iteration:07d}"
    weights = ckpt_dir / f"{stem}.safetensors"
    state_path = ckpt_dir / f"{stem}.state.pth"
    save_model(model, weights, label_map=label_map, extra_metadata={"iteration": iteration, **metadata})
    _torch_save_atomic({
        "format": STATE_FORMAT,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "iteration": iteration,
        "rng": rng_state(),
        "extra": extra or {},  # state of modules trained beside the model (e.g. a distillation projection)
    }, state_path)
    write_json_atomic(ckpt_dir / "latest.json", {"iteration": iteration, "weights": weights.name,
                                                 "state": state_path.name})
    _prune(ckpt_dir, keep_last)
    return ResumePoint(weights, state_path, iteration)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    stems = sorted({p.name.split(".")[0] for p in ckpt_dir.glob("iter_*.safetensors")})
    for stem in stems[:-keep_last]:
        for p in ckpt_dir.glob(stem + ".*"):
            p.unlink(missing_ok=True)


def find_resume_point(resume: str, output_dir: str | os.PathLike) -> ResumePoint | None:
    """Resolve ``--resume``: ``auto`` (latest in the output dir, or None), a checkpoints folder, a
    ``latest.json``, or an ``iter_*.safetensors`` / ``iter_*.state.pth`` file."""
    if resume == "auto":
        latest = Path(output_dir) / "checkpoints" / "latest.json"
        if not latest.exists():
            return None
        return _from_pointer(latest)
    p = Path(resume)
    if p.is_dir():
        p = p / "checkpoints" / "latest.json" if (p / "checkpoints").is_dir() else p / "latest.json"
    if not p.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {p}")
    if p.suffix == ".json":
        return _from_pointer(p)
    stem = p.name.split(".")[0]
    weights, state = p.parent / f"{stem}.safetensors", p.parent / f"{stem}.state.pth"
    for f in (weights, state):
        if not f.exists():
            raise FileNotFoundError(f"--resume: {f} is missing (a checkpoint is a .safetensors + .state.pth pair)")
    return ResumePoint(weights, state, int(stem.split("_")[-1]) if stem.startswith("iter_") else -1)


def _from_pointer(pointer: Path) -> ResumePoint:
    try:
        info = json.loads(pointer.read_text())
        weights, state = pointer.parent / info["weights"], pointer.parent / info["state"]
        iteration = int(info["iteration"])
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise ValueError(f"--resume: {pointer} is not a valid checkpoint pointer ({e})") from e
    for f in (weights, state):
        if not f.exists():
            raise FileNotFoundError(f"--resume: {pointer} points at {f}, which is missing")
    return ResumePoint(weights, state, iteration)


def load_training_state(point: ResumePoint) -> dict[str, Any]:
    # weights_only=False: the state holds numpy/python RNG tuples; it is a file this tool wrote.
    state = torch.load(point.state, map_location="cpu", weights_only=False)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{point.state}: unknown training-state format {state.get('format')!r}")
    return state
