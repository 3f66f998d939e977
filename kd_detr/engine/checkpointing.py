"""Training checkpoints: model weights in safetensors plus optimizer/scheduler/RNG state.

Layout inside ``<output_dir>/checkpoints/``::

    iter_0000500.safetensors    model weights + metadata (loads with kd_detr.models.load_model)
    iter_0000500.state.pth      optimizer, lr scheduler, grad scaler, epoch, iteration, RNG states
    latest.json                 points at the newest complete pair

Both files are written under temporary names and renamed; ``latest.json`` is replaced only after
both exist, so an interrupted save never leaves a checkpoint that ``--resume auto`` would pick. A failed
save (e.g. a full disk) removes the half-written pair and leaves ``latest.json`` on the previous one.

The training state holds tensors and plain values only (numbers, strings, lists, dicts; the numpy and
Python RNG states are stored as a tensor and lists), so it loads with ``torch.load(weights_only=True)``: a
crafted ``state.pth`` cannot run code. A format-1 state (older kd-detr releases) pickles numpy objects and is
refused with a message saying so.

``--resume auto`` falls back to the previous kept checkpoint when the newest one is unreadable
(truncated, corrupt), with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_detr.errors import UserError
from kd_detr.atomic import atomic_write, write_json_atomic
from kd_detr.pickle_scan import pickle_globals, starts_like_pickle, unsafe_globals
from kd_detr.folder_lock import LOCK_NAME, FolderLock, LockBusy, LockFileRefused, LockUnsupported

log = logging.getLogger("kd_detr.train")

# 2: RNG states as tensors / lists (loads with weights_only=True); 1: numpy / Python RNG tuples pickled.
STATE_FORMAT = 2
_STATE_KEYS = ("optimizer", "scheduler", "epoch", "batch_in_epoch", "iteration", "rng")


class CheckpointUnreadable(UserError, ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint); ``--resume auto``
    falls back to an older checkpoint on this error."""


class CheckpointRefused(UserError, ValueError):
    """A training state that is refused rather than read: Python objects beyond plain values (a crafted
    file, or format 1 written by an older kd-detr), or a format this kd-detr does not know."""


@dataclass
class ResumePoint:
    weights: Path
    state: Path
    iteration: int


def _torch_save_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict[str, Any]:
    """Every RNG stream as tensors and plain values (``torch.load(weights_only=True)`` reads it back)."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(bit_generator), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "state": [int(x) for x in internal],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(checkpoint_dir: str | os.PathLike, model: torch.nn.Module, *, optimizer, scheduler,
                    scaler, epoch: int, batch_in_epoch: int, iteration: int, metadata: dict[str, Any],
                    label_map=None, keep_last: int = 2, extra: dict[str, Any] | None = None,
                    ema: dict[str, Any] | None = None) -> ResumePoint:
    """Save a resumable checkpoint at an iteration boundary and prune older ones. ``model`` is the raw student
    (training resumes from it); ``ema``, the state of its weights' moving average, is kept in the training
    state."""
    from kd_detr.models import save_model

    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stem = f"iter_{iteration:07d}"
    weights = ckpt_dir / f"{stem}.safetensors"
    state_path = ckpt_dir / f"{stem}.state.pth"
    latest = ckpt_dir / "latest.json"
    try:
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
            **({"ema": ema} if ema is not None else {}),
        }, state_path)
        write_json_atomic(latest, {"iteration": iteration, "weights": weights.name, "state": state_path.name})
    except BaseException:
        # latest.json still names the previous pair: drop this one's files (unless latest.json names them)
        if _pointer_names(latest) != {weights.name, state_path.name}:
            for f in (weights, state_path):
                f.unlink(missing_ok=True)
        raise
    _prune(ckpt_dir, keep_last)
    return ResumePoint(weights, state_path, iteration)


def _pointer_names(pointer: Path) -> set[str]:
    try:
        info = json.loads(pointer.read_text())
        return {info["weights"], info["state"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


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
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"--resume: {pointer} is not a valid checkpoint pointer ({type(e).__name__}: {e})") from e
    for f in (weights, state):
        if not f.exists():
            raise FileNotFoundError(f"--resume: {pointer} points at {f}, which is missing")
    return ResumePoint(weights, state, iteration)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _reason(exc: BaseException, path: Path) -> str:
    """``Type: first line`` of why ``path`` could not be read (the library's own error when ``exc`` wraps it)."""
    inner = exc.__cause__ if exc.__cause__ is not None and str(path) in str(exc) else exc
    return f"{type(inner).__name__}: {_first_line(inner).replace(str(path), 'the file')}"


def _torch_reason(exc: BaseException, path: Path) -> str:
    """:func:`_reason` without torch's advice to retry with ``weights_only=False`` (which would run the file)."""
    reason = _reason(exc, path)
    if "weights_only" in reason or "weights only" in reason.lower():
        return f"{type(exc).__name__}: torch's weights-only loader could not read it"
    return reason


def load_training_state(point: ResumePoint | str | os.PathLike) -> dict[str, Any]:
    """Read a ``.state.pth`` with ``torch.load(weights_only=True)``: tensors and plain values only.

    Raises :class:`CheckpointRefused` for a file holding other Python objects (nothing of it is run) or
    of an unknown format, :class:`CheckpointUnreadable` for a truncated / corrupt one."""
    path = Path(point.state if isinstance(point, ResumePoint) else point)
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it does not expect: classified below
            warnings.filterwarnings("ignore", message=".*pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classified and re-raised with the file name
        if not zipfile.is_zipfile(path) and starts_like_pickle(path):
            # kd-detr writes torch's zip format only: a plain pickle or a legacy-format torch file is not one of
            # its training states (torch's own message would suggest weights_only=False, i.e. running it)
            found = pickle_globals(path)
            holds = f" holding Python objects ({', '.join(found[:5])})" if found else ""
            raise CheckpointRefused(
                f"{path} is a plain pickle or legacy-format torch file{holds}, not a training state kd-detr writes "
                f"(torch's zip format): refused, nothing of it was run; use a checkpoint kd-detr wrote (this one "
                f"may have been tampered with)") from None
        unsafe = unsafe_globals(path)
        if unsafe and all(name.split(".")[0] == "numpy" for name in unsafe):
            raise CheckpointRefused(
                f"{path} was written by an older kd-detr (training-state format 1, which pickles numpy "
                f"objects and is not loaded any more): start anew in another --output-dir, or resume it with "
                f"the kd-detr version that wrote it") from None
        if unsafe:
            raise CheckpointRefused(
                f"{path} holds Python objects a kd-detr training state never contains "
                f"({', '.join(unsafe[:5])}): refused, nothing of it was run; use a checkpoint kd-detr wrote "
                f"(this one may have been tampered with)") from None
        raise CheckpointUnreadable(f"{path} is unreadable, truncated or corrupt ({_torch_reason(e, path)})") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if not isinstance(state, dict) or fmt is None:
        raise CheckpointUnreadable(f"{path} is not a kd-detr training state (no 'format' entry)")
    if fmt == 1:
        raise CheckpointRefused(f"{path} was written by an older kd-detr (training-state format 1): start anew "
                                "in another --output-dir, or resume it with the kd-detr version that wrote it")
    if fmt != STATE_FORMAT:
        raise CheckpointRefused(f"{path} has training-state format {fmt!r}, this kd-detr reads {STATE_FORMAT}: "
                                "resume it with the (newer) kd-detr version that wrote it")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise CheckpointUnreadable(f"{path} is incomplete: no {', '.join(missing)}")
    return state


@dataclass
class LoadedCheckpoint:
    """A checkpoint read in full: the model of its ``.safetensors`` and its training state."""

    point: ResumePoint
    model: torch.nn.Module
    meta: dict[str, Any]
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # newer checkpoints found unreadable (--resume auto)


def load_checkpoint(point: ResumePoint) -> LoadedCheckpoint:
    """Read both files of ``point`` (:class:`CheckpointUnreadable` / :class:`CheckpointRefused` naming the file)."""
    from kd_detr.models import load_model

    try:
        model, meta = load_model(point.weights)
    except FileNotFoundError as e:
        raise CheckpointUnreadable(f"{point.weights} is missing") from e
    except Exception as e:  # noqa: BLE001 - truncated safetensors, corrupt header or metadata
        raise CheckpointUnreadable(f"{point.weights} is unreadable, truncated or corrupt "
                                   f"({_reason(e, point.weights)})") from None
    return LoadedCheckpoint(point, model, meta, load_training_state(point))


def _complete_pairs(ckpt_dir: Path) -> list[ResumePoint]:
    """Every ``iter_N`` pair with both files in ``ckpt_dir``, newest first."""
    points = []
    for weights in ckpt_dir.glob("iter_*.safetensors"):
        stem = weights.name.split(".")[0]
        state = ckpt_dir / f"{stem}.state.pth"
        try:
            iteration = int(stem.split("_")[-1])
        except ValueError:
            continue
        if state.is_file():
            points.append(ResumePoint(weights, state, iteration))
    return sorted(points, key=lambda p: p.iteration, reverse=True)


def resume_candidates(output_dir: str | os.PathLike) -> list[ResumePoint]:
    """``--resume auto``: the checkpoint ``latest.json`` names, then the older kept ones, newest first.
    Empty when the output dir holds no ``latest.json`` (a fresh run)."""
    ckpt_dir = Path(output_dir) / "checkpoints"
    latest = ckpt_dir / "latest.json"
    if not latest.exists():
        return []
    pairs = _complete_pairs(ckpt_dir)
    try:
        head = _from_pointer(latest)
    except (ValueError, FileNotFoundError) as e:
        log.warning("--resume auto: %s; trying the checkpoints in %s", e, ckpt_dir)
        return pairs
    return [head] + [p for p in pairs if p.iteration < head.iteration]


def load_resume_checkpoint(resume: str, output_dir: str | os.PathLike) -> LoadedCheckpoint | None:
    """Resolve and read ``--resume``. ``auto``: the newest readable checkpoint of the output dir (a warning
    names each unreadable one skipped; None when there is none to resume); a path: that checkpoint, or
    a one-line error naming the broken file."""
    if resume != "auto":
        point = find_resume_point(resume, output_dir)
        try:
            return load_checkpoint(point)
        except CheckpointUnreadable as e:
            raise CheckpointUnreadable(f"--resume {resume}: {e}; pass another checkpoint (or --resume auto "
                                       "to take the newest readable one of --output-dir)") from None
    candidates = resume_candidates(output_dir)
    if not candidates:
        return None
    problems: list[str] = []
    for i, point in enumerate(candidates):
        try:
            loaded = load_checkpoint(point)
        except CheckpointUnreadable as e:
            problems.append(str(e))
            if i + 1 < len(candidates):
                log.warning("--resume auto: %s; falling back to the previous checkpoint (%s)", e,
                            candidates[i + 1].weights.name)
            continue
        loaded.skipped = problems
        return loaded
    ckpt_dir = Path(output_dir) / "checkpoints"
    raise CheckpointUnreadable(f"--resume auto: no readable checkpoint in {ckpt_dir} ({'; '.join(problems) or 'none'}"
                               f"): start a new --output-dir, or remove the broken files to start this one anew")


def check_same_model(loaded: LoadedCheckpoint, config: Any) -> None:
    """Refuse to resume ``loaded`` into a model of another architecture than ``config`` (a ModelConfig)."""
    ckpt = dict(loaded.meta.get("config") or {})
    run = config.to_dict()
    diff = [k for k in sorted(set(ckpt) | set(run)) if k != "description" and k != "name"
            and ckpt.get(k) != run.get(k)]
    ckpt_name, run_name = loaded.meta.get("model_name", ckpt.get("name")), run.get("name")
    if not diff and ckpt_name == run_name:
        return
    hint = " and data" if diff == ["num_classes"] else ""
    raise ValueError(f"the checkpoint {loaded.point.weights} holds a {ckpt_name} ({_fields(ckpt, diff)}) but this "
                     f"run builds a {run_name} ({_fields(run, diff)}): resume with the same --model/--model-opt"
                     f"{hint} or start a new --output-dir")


def _fields(cfg: dict[str, Any], keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"{k}={cfg.get(k)}" for k in keys[:limit])
    return (shown + (", ..." if len(keys) > limit else "")) or "same config"


# --------------------------------------------------------------------------- output-dir lock
class OutputDirInUse(UserError, OSError):
    """Another run holds the output dir's lock."""


class OutputDirLockRefused(UserError, OSError):
    """The output dir's ``.lock`` is not a regular file (a link to another file, ...): refused, not written."""


class OutputDirLock:
    """The run's :class:`~kd_detr.folder_lock.FolderLock` on ``<output_dir>/.lock``, held for a whole run (the OS
    drops it when the process ends, crash included); the file holds the holder's pid. A lock that created the
    output dir removes it again on release when the run left nothing else in it. A ``.lock`` that is not a
    regular file (e.g. a symbolic link to another file) is refused, naming it: nothing is written through it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.out = Path(output_dir)
        self.path = self.out / LOCK_NAME
        self._lock: FolderLock | None = None
        self._created_dir = False

    def acquire(self) -> "OutputDirLock":
        self._created_dir = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(self.out)
        try:
            lock.acquire()
        except LockBusy as e:
            raise OutputDirInUse(f"another kd-detr run is using --output-dir {self.out} (pid {e.holder}); "
                                 "wait for it or choose another --output-dir") from None
        except LockFileRefused as e:
            raise OutputDirLockRefused(f"--output-dir: {e}") from None
        except LockUnsupported as e:
            log.warning("could not lock --output-dir %s (%s): nothing stops a second run from using it", self.out, e)
            return self
        self._lock = lock if lock.locked else None
        return self

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        # nothing was written (e.g. a bad option): leave no empty output dir behind
        empty = self._created_dir and [p.name for p in self.out.iterdir()] == [self.path.name]
        lock.release(remove_file=empty)
        if empty:
            try:
                self.out.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
